"""Export: inference results as files pathologists' tools open (QuPath, ASAP).

- ``regions``: ``tumor_regions`` (the heatmap's outlines at a threshold, with holes,
  simplified within a tolerance, valid) and ``Region``.
- ``formats``: ``geojson_collection`` (QuPath GeoJSON) and ``asap_xml`` (ASAP XML).
- ``driver``: ``export_results`` (an inference folder into an export folder),
  ``export_slide``, ``write_heatmap_tiff`` (the heatmap as a pyramidal TIFF).
"""

from pipeline.export.driver import ExportResult, export_results, export_slide, write_heatmap_tiff
from pipeline.export.formats import asap_xml, geojson_collection
from pipeline.export.regions import Region, tumor_regions

__all__ = [
    "ExportResult",
    "Region",
    "asap_xml",
    "export_results",
    "export_slide",
    "geojson_collection",
    "tumor_regions",
    "write_heatmap_tiff",
]
