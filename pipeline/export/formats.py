"""Tumor regions and detections as QuPath GeoJSON and ASAP XML.

Both put coordinates in level-0 pixels with the origin at the slide's top-left
corner, which is what QuPath and ASAP (and CAMELYON16's annotations) use.

**QuPath GeoJSON** (File > Import objects from file, or drag and drop): a
FeatureCollection; each region is a ``Polygon`` feature (holes as inner rings)
with ``objectType`` ``annotation``, ``classification`` ``{"name": "Tumor",
"color": [r, g, b]}`` and ``measurements`` (area in mm², maximum and mean
probability, the threshold); each detection is a ``Point`` feature with
``objectType`` ``detection`` and its ``Confidence``. Feature ids are UUIDs
derived from the slide and the feature, so the same results give the same file.

**ASAP XML**, laid out as CAMELYON16's annotations: regions are ``Polygon``
annotations in the group ``Tumor``, their holes are ``Polygon`` annotations in
the group ``Exclusion`` (ASAP has no holes; CAMELYON16's ``_2`` areas work the
same way), detections are ``Dot`` annotations in the group ``Detections``.
Each annotation's name gives its threshold or confidence.

Pure: dicts and strings; the caller writes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

import numpy as np

from pipeline import __version__
from pipeline.export.regions import Region

TUMOR_CLASS = "Tumor"
TUMOR_RGB = (220, 20, 60)  # crimson: the class's colour in QuPath
DETECTION_RGB = (0, 90, 255)
#: ASAP groups, recognised by wsiflow's readers with the default groups.
ASAP_TUMOR, ASAP_HOLE, ASAP_DETECTIONS = "Tumor", "Exclusion", "Detections"
_NAMESPACE = uuid.UUID("6b1f0a3e-7d52-4a55-9a1c-2f3c1e0b9d47")  # wsiflow's export ids
MARK = "wsiflow"  # the GeoJSON member and XML comment that say wsiflow wrote the file


def region_names(regions: Sequence[Region]) -> list[str]:
    """``Tumor p>=0.5 #1``, ...: numbered from 1 within each threshold."""
    seen: dict[float, int] = {}
    names = []
    for region in regions:
        seen[region.threshold] = seen.get(region.threshold, 0) + 1
        names.append(f"Tumor p>={region.threshold:g} #{seen[region.threshold]}")
    return names


def geojson_collection(
    slide_id: str,
    regions: Sequence[Region],
    confidences: np.ndarray,
    level0_xy: np.ndarray,
    mpp_xy: tuple[float, float] | None,
) -> dict:
    """A QuPath-ready FeatureCollection of ``regions`` and detections ``(N,)``, ``(N, 2)``.

    ``mpp_xy`` (µm per level-0 px) gives areas in mm²; None (unknown): areas in px².
    """
    features = []
    for index, (region, name) in enumerate(zip(regions, region_names(regions), strict=True)):
        measurements = {
            "Threshold": region.threshold,
            "Max probability": round(region.max_probability, 6),
            "Mean probability": round(region.mean_probability, 6),
        }
        if mpp_xy is None:
            measurements["Area px^2"] = round(region.area_level0_px2, 1)
        else:
            measurements["Area mm^2"] = round(region.area_mm2(mpp_xy), 6)
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(slide_id, f"region {index}"),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_ring(region.exterior), *(_ring(h) for h in region.holes)],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {"name": TUMOR_CLASS, "color": list(TUMOR_RGB)},
                    "isLocked": False,
                    "measurements": measurements,
                },
            }
        )
    for index, (confidence, (x, y)) in enumerate(zip(confidences, level0_xy, strict=True)):
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(slide_id, f"detection {index}"),
                "geometry": {"type": "Point", "coordinates": [int(x), int(y)]},
                "properties": {
                    "objectType": "detection",
                    "name": f"Detection {index + 1}",
                    "classification": {"name": TUMOR_CLASS, "color": list(DETECTION_RGB)},
                    "measurements": {"Confidence": round(float(confidence), 6)},
                },
            }
        )
    return {
        "type": "FeatureCollection",
        MARK: {"slide": slide_id, "version": __version__},
        "features": features,
    }


def asap_xml(
    slide_id: str, regions: Sequence[Region], confidences: np.ndarray, level0_xy: np.ndarray
) -> str:
    """ASAP XML text of ``regions`` (holes as ``Exclusion`` polygons) and detections."""
    lines = ['<?xml version="1.0"?>', f"<!-- {MARK} {__version__} export of {slide_id} -->"]
    lines += ["<ASAP_Annotations>", "\t<Annotations>"]
    colour = "#{:02x}{:02x}{:02x}".format(*TUMOR_RGB)
    hole_colour, dot_colour = "#64fe2e", "#{:02x}{:02x}{:02x}".format(*DETECTION_RGB)
    for region, name in zip(regions, region_names(regions), strict=True):
        lines += _annotation(name, "Polygon", ASAP_TUMOR, colour, region.exterior[:-1])
        for k, hole in enumerate(region.holes):
            hole_name = f"{name} hole {k + 1}"
            lines += _annotation(hole_name, "Polygon", ASAP_HOLE, hole_colour, hole[:-1])
    for index, (confidence, xy) in enumerate(zip(confidences, level0_xy, strict=True)):
        name = f"Detection {index + 1} ({float(confidence):.4f})"
        lines += _annotation(name, "Dot", ASAP_DETECTIONS, dot_colour, np.reshape(xy, (1, 2)))
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for group, group_colour in (
        (ASAP_TUMOR, colour),
        (ASAP_HOLE, hole_colour),
        (ASAP_DETECTIONS, dot_colour),
    ):
        lines.append(f'\t\t<Group Name="{group}" PartOfGroup="None" Color="{group_colour}">')
        lines += ["\t\t\t<Attributes />", "\t\t</Group>"]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(lines) + "\n"


def _annotation(name: str, kind: str, group: str, colour: str, xy: np.ndarray) -> list[str]:
    lines = [
        f'\t\t<Annotation Name={quoteattr(name)} Type="{kind}" '
        f'PartOfGroup="{group}" Color="{colour}">',
        "\t\t\t<Coordinates>",
    ]
    for order, (x, y) in enumerate(np.asarray(xy, dtype=np.float64)):
        lines.append(f'\t\t\t\t<Coordinate Order="{order}" X="{x:.2f}" Y="{y:.2f}" />')
    return [*lines, "\t\t\t</Coordinates>", "\t\t</Annotation>"]


def _ring(xy: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in xy]


def _feature_id(slide_id: str, what: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{slide_id}/{what}"))
