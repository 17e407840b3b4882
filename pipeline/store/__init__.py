"""The Zarr patch store that tiling writes and training reads.

- ``patch_store``: one group per slide, a cohort summary in the root
  attributes (``open_root``, ``open_store``, ``create_slide_group``,
  ``mark_complete``, ``read_summary``, local paths or object-store URLs).
- ``codecs``: the Zarr codec that stores each patch as its own image
  (``PatchImageCodec``: JPEG, JPEG-XL, AVIF).
- ``preview``: ``contact_sheet`` of stored patches.
"""
