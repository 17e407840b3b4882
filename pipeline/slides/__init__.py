"""Slides and what is drawn on them: reading, tissue, annotations, masks.

- ``reader``: the one gate for slide I/O (the only module that imports
  OpenSlide): ``open_slide``, ``find_slides``, ``SlideReader``, ``SlideInfo``.
- ``tiffdirect``: direct JPEG tile decoding of tiled TIFF pyramids (``DirectTiff``).
- ``patches``: patches read as tiling and inference both read them
  (``read_patch``, ``read_patches``, ``cached_reader``).
- ``tissue``: ``detect_tissue`` on an overview, ``tissue_mask`` of a slide.
- ``annotations``: ASAP XML and QuPath GeoJSON lesions (``read_annotations``,
  ``find_annotation``).
- ``masks``: coarse masks over level 0 (``PlacedMask``, ``rasterize_tumor``).

Modules are imported by name (``from pipeline.slides.reader import open_slide``),
so importing one part does not load the others.
"""
