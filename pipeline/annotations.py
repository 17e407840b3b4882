"""Lesion annotations as polygons in level-0 pixels: ASAP XML (CAMELYON16/17).

CAMELYON16 ships one ASAP XML file per tumor slide. Polygons in groups ``_0``
and ``_1`` outline tumor; polygons in ``_2`` outline non-tumor areas inside a
tumor outline and are carved out of it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AnnotationError

#: ASAP groups that outline tumor, as CAMELYON16 names them (and CAMELYON17's "metastases").
TUMOR_GROUPS = frozenset({"_0", "_1", "Tumor", "metastases"})
#: ASAP groups carved out of tumor outlines.
EXCLUSION_GROUPS = frozenset({"_2", "Exclusion"})

_GROUP_COLOURS = {"_0": "#F4FA58", "_1": "#F4FA58", "_2": "#64FE2E"}


@dataclass(frozen=True)
class Polygon:
    """One annotated outline: ``level0_xy`` is ``(N, 2)`` float64 x, y in level-0 pixels."""

    name: str
    group: str
    level0_xy: np.ndarray = field(repr=False)

    @property
    def is_tumor(self) -> bool:
        return self.group in TUMOR_GROUPS

    @property
    def is_exclusion(self) -> bool:
        return self.group in EXCLUSION_GROUPS

    def bounds(self) -> tuple[float, float, float, float]:
        """Return ``(x_min, y_min, x_max, y_max)`` in level-0 pixels."""
        x, y = self.level0_xy[:, 0], self.level0_xy[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def write_asap_xml(path: Path | str, polygons: list[Polygon]) -> None:
    """Write ``polygons`` as an ASAP XML file laid out exactly as CAMELYON16's.

    The file appears atomically (written to ``*.partial``, then renamed).
    """
    path = Path(path)
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for polygon in polygons:
        colour = _GROUP_COLOURS.get(polygon.group, "#F4FA58")
        lines.append(
            f'\t\t<Annotation Name="{_xml_attr(polygon.name)}" Type="Polygon" '
            f'PartOfGroup="{_xml_attr(polygon.group)}" Color="{colour}">'
        )
        lines.append("\t\t\t<Coordinates>")
        for order, (x, y) in enumerate(polygon.level0_xy):
            lines.append(f'\t\t\t\t<Coordinate Order="{order}" X="{x:.4f}" Y="{y:.4f}" />')
        lines.append("\t\t\t</Coordinates>")
        lines.append("\t\t</Annotation>")
    lines.append("\t</Annotations>")
    lines.append("\t<AnnotationGroups>")
    for group in sorted({p.group for p in polygons}):
        colour = "#00ff00" if group in EXCLUSION_GROUPS else "#ff0000"
        lines.append(f'\t\t<Group Name="{_xml_attr(group)}" PartOfGroup="None" Color="{colour}">')
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_asap_xml(path: Path | str) -> list[Polygon]:
    """Read every polygon of an ASAP XML file, in file order.

    Raises :class:`AnnotationError` naming the file and the problem for a
    missing file, malformed XML, a polygon with fewer than three points or a
    coordinate that is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "no such annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, column = exc.position
        raise AnnotationError(
            path, f"malformed XML at line {line}, column {column}: {exc.msg}"
        ) from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(
            path, f"Expected an <ASAP_Annotations> root element. Got <{root.tag}> instead."
        )
    polygons = []
    for index, element in enumerate(root.iter("Annotation")):
        name = element.get("Name") or f"Annotation {index}"
        group = element.get("PartOfGroup") or "None"
        kind = element.get("Type", "Polygon")
        if kind not in ("Polygon", "Spline"):
            # Dots and rectangles carry no area to rasterise as a lesion outline.
            continue
        points = []
        for coordinate in element.iter("Coordinate"):
            try:
                order = int(coordinate.get("Order", len(points)))
                x = float(coordinate.get("X", "nan").replace(",", "."))
                y = float(coordinate.get("Y", "nan").replace(",", "."))
            except ValueError as exc:
                raise AnnotationError(
                    path, f"annotation {name!r}: coordinate is not a number: {exc}"
                ) from exc
            if not (np.isfinite(x) and np.isfinite(y)):
                raise AnnotationError(
                    path, f"annotation {name!r}: coordinate {order} lacks a finite X or Y"
                )
            points.append((order, x, y))
        if len(points) < 3:
            raise AnnotationError(
                path,
                f"annotation {name!r}: Expected a polygon of at least 3 coordinates. "
                f"Got {len(points)} instead.",
            )
        points.sort(key=lambda p: p[0])
        xy = np.array([(x, y) for _, x, y in points], dtype=np.float64)
        polygons.append(Polygon(name=name, group=group, level0_xy=xy))
    return polygons


def _xml_attr(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )
