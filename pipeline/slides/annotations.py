"""Lesion annotations as polygons in level-0 pixels: ASAP XML and QuPath GeoJSON.

CAMELYON16 ships one ASAP XML file per tumor slide. Each annotation is in a
group: the organisers' ``_0``/``_1`` (or ``Tumor``) outline tumor and ``_2``
outlines non-tumor areas inside a tumor outline, carved out of it; CAMELYON17
says ``metastases``/``normal``; re-published copies rename them
(``metastasis``/``negative``). Which names mean what is configurable
(:class:`Groups`, ``tiling.tumor_groups`` and ``tiling.exclusion_groups``,
matched in any case); an annotation in no group (ASAP's ``None``) is tumor;
one in a group that is neither is left out with a warning listing the groups
found, never taken for tumor in silence. ``Spline`` annotations are read as
their control polygon (the vertices ASAP stores; the curve through them is
not reconstructed).

QuPath exports GeoJSON features (Polygon or MultiPolygon, with holes). A
feature is an exclusion when its classification is an exclusion group or one
of :data:`EXCLUSION_CLASSES`, skipped when it is one of
:data:`SKIPPED_CLASSES`, tumor when unclassified or of a tumor group, and
left out with a warning otherwise.

A degenerate outline (fewer than 3 distinct vertices, or no area) is dropped
with a warning naming the file, the annotation and the reason; the slide's
other outlines are kept. Warnings go to the ``warnings`` list the caller
passes.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import TilingConfig
from pipeline.errors import AnnotationError
from pipeline.identity import slide_id_of

#: Groups that outline tumor, and groups carved out of them (any case): the defaults of
#: ``tiling.tumor_groups`` and ``tiling.exclusion_groups``, defined there.
TUMOR_GROUPS: tuple[str, ...] = TilingConfig.model_fields["tumor_groups"].default
EXCLUSION_GROUPS: tuple[str, ...] = TilingConfig.model_fields["exclusion_groups"].default
#: ASAP's group of an annotation in no group: tumor, as an outline drawn on its own is.
NO_GROUP = "None"

#: Vertices may lie this fraction of the slide's width (height) outside it: annotation
#: tools let a stroke overshoot the edge, and masks are clipped to the slide anyway.
OUTSIDE_LEEWAY = 0.02
#: QuPath classifications that mark areas to carve out of tumor.
EXCLUSION_CLASSES = frozenset({"Exclusion", "Ignore", "Ignore*", "Normal", "Non-tumor", "Other"})
#: QuPath classifications that are neither tumor nor carved out of it: a ``Region*``
#: outlines an area to analyse (often the whole tissue, tumor included).
SKIPPED_CLASSES = frozenset({"Region*"})

_GROUP_COLOURS = {"_0": "#F4FA58", "_1": "#F4FA58", "_2": "#64FE2E"}


@dataclass(frozen=True)
class Groups:
    """Which annotation groups outline tumor and which are carved out (names case-folded)."""

    tumor: frozenset[str]
    exclusion: frozenset[str]

    @classmethod
    def of(
        cls, tumor: Iterable[str] = TUMOR_GROUPS, exclusion: Iterable[str] = EXCLUSION_GROUPS
    ) -> Groups:
        return cls(
            frozenset(name.casefold() for name in tumor),
            frozenset(name.casefold() for name in exclusion),
        )

    def role(self, group: str | None) -> str | None:
        """``"tumor"``, ``"exclusion"``, or None for a group that is neither."""
        if group is None or group == NO_GROUP or group.casefold() in self.tumor:
            return "tumor"
        if group.casefold() in self.exclusion:
            return "exclusion"
        return None


#: The default groups (:data:`TUMOR_GROUPS`, :data:`EXCLUSION_GROUPS`).
DEFAULT_GROUPS = Groups.of()


@dataclass(frozen=True)
class Polygon:
    """One annotated outline: ``level0_xy`` is ``(N, 2)`` float64 x, y in level-0 pixels.

    ``holes`` are inner rings (GeoJSON), each ``(M, 2)``, carved out of this polygon.
    ``role`` is ``"tumor"`` or ``"exclusion"``: given by the reader from its
    :class:`Groups`, else taken from ``group`` by the default groups.
    """

    name: str
    group: str
    level0_xy: np.ndarray = field(repr=False)
    holes: tuple[np.ndarray, ...] = field(default=(), repr=False)
    role: str = ""

    def __post_init__(self) -> None:
        if not self.role:
            object.__setattr__(self, "role", DEFAULT_GROUPS.role(self.group) or "tumor")

    @property
    def is_tumor(self) -> bool:
        return self.role == "tumor"

    @property
    def is_exclusion(self) -> bool:
        return self.role == "exclusion"

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
        colour = "#00ff00" if DEFAULT_GROUPS.role(group) == "exclusion" else "#ff0000"
        lines.append(f'\t\t<Group Name="{_xml_attr(group)}" PartOfGroup="None" Color="{colour}">')
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_asap_xml(
    path: Path | str, groups: Groups = DEFAULT_GROUPS, warnings: list[str] | None = None
) -> list[Polygon]:
    """Read the tumor and exclusion polygons of an ASAP XML file, in file order.

    Raises :class:`AnnotationError` naming the file and the problem for a
    missing file, malformed XML or a coordinate that is not a finite number.
    Degenerate polygons and groups that are neither tumor nor exclusion are
    left out, each with a line appended to ``warnings``.
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
    notes = _Notes(path, groups, warnings)
    polygons = []
    for index, element in enumerate(root.iter("Annotation")):
        name = element.get("Name") or f"Annotation {index}"
        group = element.get("PartOfGroup") or NO_GROUP
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
        points.sort(key=lambda p: p[0])
        xy = np.array([(x, y) for _, x, y in points], dtype=np.float64).reshape(-1, 2)
        polygon = notes.keep(name, group, xy)
        if polygon is not None:
            polygons.append(polygon)
    notes.finish()
    return polygons


class _Notes:
    """A reader's checks of one file: roles by group, degenerate outlines, the warnings."""

    def __init__(self, path: Path, groups: Groups, warnings: list[str] | None) -> None:
        self.path, self.groups = path, groups
        self.warnings = warnings if warnings is not None else []
        self.found: dict[str, int] = {}
        self.unknown: dict[str, int] = {}

    def keep(
        self, name: str, group: str, xy: np.ndarray, holes: tuple[np.ndarray, ...] = ()
    ) -> Polygon | None:
        """The polygon, or None (and why, in the warnings) when it is left out."""
        self.found[group] = self.found.get(group, 0) + 1
        role = self.groups.role(group)
        if role is None:
            self.unknown[group] = self.unknown.get(group, 0) + 1
            return None
        problem = degenerate(xy)
        if problem:
            self.warnings.append(f"{self.path}: annotation {name!r} left out: {problem}")
            return None
        return Polygon(name, group, xy, tuple(h for h in holes if not degenerate(h)), role)

    def finish(self) -> None:
        if not self.unknown:
            return
        left_out = ", ".join(f"{g!r} ({n})" for g, n in sorted(self.unknown.items()))
        found = ", ".join(repr(g) for g in sorted(self.found))
        self.warnings.append(
            f"{self.path}: annotations in group(s) {left_out} left out: neither a tumor nor an "
            f"exclusion group (groups found: {found}; name them in tiling.tumor_groups or "
            "tiling.exclusion_groups)"
        )


def degenerate(xy: np.ndarray) -> str | None:
    """Why an outline encloses nothing (fewer than 3 distinct vertices, no area), or None."""
    distinct = len(np.unique(xy, axis=0)) if len(xy) else 0
    if distinct < 3:
        return f"{distinct} distinct vertices (an outline needs at least 3)"
    x, y = xy[:, 0], xy[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area == 0.0:
        return "zero area (all vertices on one line)"
    return None


def read_geojson(
    path: Path | str, groups: Groups = DEFAULT_GROUPS, warnings: list[str] | None = None
) -> list[Polygon]:
    """Read the polygons of a QuPath GeoJSON export (FeatureCollection, feature list or feature).

    Polygons and MultiPolygons are kept (with holes); points and lines are
    skipped. The group is the classification name (``Tumor`` when
    unclassified); see the module for how it is read.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "no such annotation file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if hasattr(exc, "lineno") else ""
        raise AnnotationError(path, f"malformed JSON{where}: {exc}") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list):
        raise AnnotationError(
            path,
            "Expected a GeoJSON FeatureCollection, Feature or list of features. "
            f"Got a {type(data).__name__} instead.",
        )
    classes = Groups(groups.tumor, groups.exclusion | {c.casefold() for c in EXCLUSION_CLASSES})
    notes = _Notes(path, classes, warnings)
    polygons = []
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise AnnotationError(path, f"feature {index}: Expected a Feature with a geometry.")
        properties = feature.get("properties") or {}
        name = str(properties.get("name") or feature.get("id") or f"feature {index}")
        classification = properties.get("classification") or {}
        class_name = (
            classification.get("name") if isinstance(classification, dict) else classification
        )
        if class_name in SKIPPED_CLASSES:
            continue
        group = str(class_name) if class_name else "Tumor"
        geometry = feature["geometry"]
        kind = geometry.get("type")
        if kind == "Polygon":
            parts = [geometry.get("coordinates")]
        elif kind == "MultiPolygon":
            parts = geometry.get("coordinates")
        else:
            continue
        if not isinstance(parts, list):
            raise AnnotationError(path, f"feature {name!r}: {kind} has no coordinate list")
        for part_index, rings in enumerate(parts):
            label = name if len(parts) == 1 else f"{name} [{part_index}]"
            arrays = [_ring(path, label, ring) for ring in (rings or [])]
            if not arrays:
                raise AnnotationError(path, f"feature {label!r}: polygon without rings")
            polygon = notes.keep(label, group, arrays[0], tuple(arrays[1:]))
            if polygon is not None:
                polygons.append(polygon)
    notes.finish()
    return polygons


def read_annotations(
    path: Path | str, groups: Groups = DEFAULT_GROUPS, warnings: list[str] | None = None
) -> list[Polygon]:
    """Read ASAP XML (``.xml``) or GeoJSON (``.geojson``/``.json``) by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path, groups, warnings)
    if suffix in (".geojson", ".json"):
        return read_geojson(path, groups, warnings)
    raise AnnotationError(
        path, f"Expected a .xml, .geojson or .json file. Got {suffix or 'no suffix'!r} instead."
    )


def check_within(path: Path | str, polygons: list[Polygon], level0_wh: tuple[int, int]) -> None:
    """Raise :class:`AnnotationError` if a vertex lies outside the slide (level-0 pixels).

    A stroke overshooting an edge by up to :data:`OUTSIDE_LEEWAY` of the
    slide's size is kept (rasterising clips it to the slide).
    """
    width, height = level0_wh
    dx, dy = OUTSIDE_LEEWAY * width, OUTSIDE_LEEWAY * height
    for polygon in polygons:
        for ring in (polygon.level0_xy, *polygon.holes):
            x_min, y_min = ring.min(axis=0)
            x_max, y_max = ring.max(axis=0)
            if x_min < -dx or y_min < -dy or x_max > width + dx or y_max > height + dy:
                raise AnnotationError(
                    path,
                    f"annotation {polygon.name!r}: Expected coordinates within the slide's "
                    f"{width} x {height} level-0 pixels ({OUTSIDE_LEEWAY:.0%} leeway). Got x "
                    f"{x_min:.0f}..{x_max:.0f}, y {y_min:.0f}..{y_max:.0f} instead "
                    "(annotation of another slide?).",
                )


def _ring(path: Path, name: str, ring: object) -> np.ndarray:
    try:
        xy = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            path, f"feature {name!r}: coordinates are not numbers: {exc}"
        ) from exc
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy).all():
        raise AnnotationError(path, f"feature {name!r}: Expected a ring of [x, y] number pairs.")
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]  # GeoJSON rings repeat the first point at the end
    return xy[:, :2]  # fewer than 3 points: left out as degenerate, with a warning


def _xml_attr(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


def find_annotation(slide_path: Path, annotations_dir: Path | None) -> Path | None:
    """``<dir>/<slide stem>.xml`` (or ``.geojson``/``.json``) if it exists.

    Two of them (an ASAP XML and its QuPath export, say) are an
    :class:`AnnotationError` rather than a silent choice: they may disagree.
    """
    if annotations_dir is None:
        return None
    return annotation_of(slide_id_of(slide_path), annotations_dir)


def annotation_of(slide_id: str, annotations_dir: Path, *, any_case: bool = False) -> Path | None:
    """The annotation file of ``slide_id`` in ``annotations_dir``, or None.

    With ``any_case``, name and suffix match in any case (the CAMELYON16 test
    set mixes them). Two files are an :class:`AnnotationError`.
    """
    if any_case:
        found = [
            path
            for path in sorted(annotations_dir.iterdir())
            if path.suffix.lower() in ANNOTATION_SUFFIXES
            and path.stem.casefold() == slide_id.casefold()
            and path.is_file()
        ]
    else:
        candidates = (annotations_dir / f"{slide_id}{suffix}" for suffix in ANNOTATION_SUFFIXES)
        found = [path for path in candidates if path.is_file()]
    if len(found) > 1:
        raise AnnotationError(
            annotations_dir,
            f"{len(found)} annotation files for slide {slide_id!r} "
            f"({', '.join(p.name for p in found)}); keep one",
        )
    return found[0] if found else None
