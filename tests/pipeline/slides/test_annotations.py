"""ASAP XML: the CAMELYON16 layout, round trips, and clear errors on bad files."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipeline.errors import AnnotationError
from pipeline.slides.annotations import Polygon, read_asap_xml, write_asap_xml
from tests.conftest import SHARED_DATA

SQUARE = np.array([[10.0, 20.0], [110.5, 20.0], [110.5, 120.25], [10.0, 120.25]])
TRIANGLE = np.array([[40.0, 40.0], [60.0, 40.0], [50.0, 60.0]])


def test_round_trip_keeps_names_groups_and_coordinates(tmp_path):
    path = tmp_path / "tumor_001.xml"
    written = [Polygon("Annotation 0", "_0", SQUARE), Polygon("Annotation 1", "_2", TRIANGLE)]
    write_asap_xml(path, written)
    read = read_asap_xml(path)
    assert [(p.name, p.group) for p in read] == [("Annotation 0", "_0"), ("Annotation 1", "_2")]
    np.testing.assert_allclose(read[0].level0_xy, SQUARE)
    np.testing.assert_allclose(read[1].level0_xy, TRIANGLE)
    assert read[0].is_tumor and not read[0].is_exclusion
    assert read[1].is_exclusion and not read[1].is_tumor
    assert not list(tmp_path.glob("*.partial"))


def test_camelyon17_normal_regions_are_carved_out_of_metastases(tmp_path):
    """CAMELYON17's masks paint group ``normal`` over ``metastases``; no group is tumor."""
    from pipeline.slides.masks import rasterize_tumor

    path = tmp_path / "patient_004_node_4.xml"
    big = np.array([[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0]])
    write_asap_xml(
        path,
        [
            Polygon("Annotation 0", "metastases", big),
            Polygon("Annotation 1", "normal", big / 2),  # the top-left quarter
            Polygon("Annotation 2", "None", big + np.array([150.0, 0.0])),  # no group: tumor
        ],
    )
    polygons = read_asap_xml(path)
    assert [(p.is_tumor, p.is_exclusion) for p in polygons] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    placed = rasterize_tumor(polygons, 1.0, (300, 200))
    boxes = np.array([[0, 0, 50, 50], [50, 50, 100, 100], [150, 0, 250, 100]])
    np.testing.assert_allclose(placed.fractions(boxes), [0.0, 1.0, 1.0], atol=0.03)


def test_file_is_laid_out_like_camelyon16(tmp_path):
    path = tmp_path / "a.xml"
    write_asap_xml(path, [Polygon("Annotation 0", "_1", TRIANGLE)])
    root = ET.parse(path).getroot()
    assert root.tag == "ASAP_Annotations"
    (annotation,) = root.find("Annotations")
    assert annotation.attrib["Type"] == "Polygon"
    assert annotation.attrib["PartOfGroup"] == "_1"
    coords = annotation.find("Coordinates").findall("Coordinate")
    assert [c.attrib["Order"] for c in coords] == ["0", "1", "2"]
    assert (coords[2].attrib["X"], coords[2].attrib["Y"]) == ("50.0000", "60.0000")
    assert [g.attrib["Name"] for g in root.find("AnnotationGroups")] == ["_1"]


def test_coordinates_are_ordered_by_their_order_attribute(tmp_path):
    path = tmp_path / "shuffled.xml"
    path.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon" PartOfGroup="_0">'
        '<Coordinates><Coordinate Order="2" X="5" Y="9"/><Coordinate Order="0" X="1" Y="2"/>'
        '<Coordinate Order="1" X="3,5" Y="4"/></Coordinates></Annotation></Annotations>'
        "</ASAP_Annotations>"
    )
    (polygon,) = read_asap_xml(path)
    np.testing.assert_allclose(polygon.level0_xy, [[1, 2], [3.5, 4], [5, 9]])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ASAP_Annotations><Annotations>\n<Annotation", r"malformed XML at line 2"),
        ("<Annotations/>", r"Expected an <ASAP_Annotations> root element. Got <Annotations>"),
        (
            '<ASAP_Annotations><Annotation Name="Bad" PartOfGroup="_0"><Coordinates>'
            '<Coordinate Order="0" X="one" Y="1"/></Coordinates></Annotation></ASAP_Annotations>',
            r"'Bad': coordinate is not a number",
        ),
        (
            '<ASAP_Annotations><Annotation Name="NoY" PartOfGroup="_0"><Coordinates>'
            '<Coordinate Order="0" X="1"/></Coordinates></Annotation></ASAP_Annotations>',
            r"'NoY': coordinate 0 lacks a finite X or Y",
        ),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path, text, expected):
    path = tmp_path / "broken.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=expected) as info:
        read_asap_xml(path)
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_asap_xml(tmp_path / "absent.xml")


def _feature(geometry, classification=None, name="f"):
    properties = {"name": name}
    if classification:
        properties["classification"] = {"name": classification, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def test_qupath_geojson_polygons_multipolygons_and_holes(tmp_path):
    import json

    from pipeline.slides.annotations import read_annotations

    outer = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]
    collection = {
        "type": "FeatureCollection",
        "features": [
            _feature({"type": "Polygon", "coordinates": [outer, hole]}, "Tumor", "lesion"),
            _feature(
                {
                    "type": "MultiPolygon",
                    "coordinates": [[outer], [[[200, 0], [210, 0], [205, 9]]]],
                },
                None,
                "multi",
            ),
            _feature({"type": "Polygon", "coordinates": [hole]}, "Ignore*", "skip me"),
            _feature({"type": "Point", "coordinates": [5, 5]}, "Tumor", "dot"),
            # An area to analyse around the tissue: neither tumor nor carved out.
            _feature({"type": "Polygon", "coordinates": [outer]}, "Region*", "tissue"),
        ],
    }
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(collection))
    polygons = read_annotations(path)
    assert [(p.name, p.group, len(p.holes)) for p in polygons] == [
        ("lesion", "Tumor", 1),
        ("multi [0]", "Tumor", 0),
        ("multi [1]", "Tumor", 0),
        ("skip me", "Ignore*", 0),
    ]
    assert polygons[3].is_exclusion and polygons[0].is_tumor
    assert polygons[0].level0_xy.shape == (4, 2)  # closing point dropped
    # A bare list of features (QuPath's "Export objects" default) reads the same.
    path.write_text(json.dumps(collection["features"]))
    assert len(read_annotations(path)) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "FeatureCollection", "features": [', "malformed JSON at line 1"),
        ('{"type": "Feature"}', "feature 0: Expected a Feature with a geometry"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"]]]}}]',
            "coordinates are not numbers",
        ),
        ('"just a string"', "Expected a GeoJSON FeatureCollection"),
    ],
)
def test_bad_geojson_names_the_file(tmp_path, text, expected):
    from pipeline.slides.annotations import read_geojson

    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=expected) as info:
        read_geojson(path)
    assert str(info.value).startswith(str(path))


def test_coordinates_outside_the_slide(tmp_path):
    from pipeline.slides.annotations import check_within

    inside = Polygon("in", "_0", SQUARE)
    outside = Polygon("far", "_0", SQUARE + 5000)
    check_within(tmp_path / "a.xml", [inside], (200, 200))
    with pytest.raises(
        AnnotationError,
        match=r"^.*a.xml: annotation 'far': Expected coordinates within the slide's 200 x 200 "
        r"level-0 pixels \(2% leeway\). Got x 5010..5110, y 5020..5120 instead",
    ):
        check_within(tmp_path / "a.xml", [inside, outside], (200, 200))
    # A stroke overshooting an edge a little (2% of the slide's size) is kept ...
    edge = np.array([[-40.0, -60.0], [2040.0, -60.0], [2040.0, 1060.0], [-40.0, 1060.0]])
    check_within(tmp_path / "a.xml", [Polygon("edge", "_0", edge)], (2000, 3000))
    # ... and rasterised clipped to the slide: the corner patches are all tumor.
    from pipeline.slides.masks import rasterize_tumor

    placed = rasterize_tumor([Polygon("edge", "_0", edge)], 4.0, (2000, 3000))
    corners = np.array([[0, 0, 100, 100], [1900, 0, 2000, 100], [0, 1000, 100, 1100]])
    np.testing.assert_allclose(placed.fractions(corners), [1.0, 1.0, 0.6], atol=0.02)
    for beyond in ([-41.0, 0.0], [0.0, 3061.0]):
        stroke = np.vstack([edge[:3], [beyond]])
        with pytest.raises(AnnotationError, match="'edge': Expected coordinates within"):
            check_within(tmp_path / "a.xml", [Polygon("edge", "_0", stroke)], (2000, 3000))


def _asap(*annotations: tuple[str, str, list[tuple[float, float]]]) -> str:
    body = "".join(
        f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}"><Coordinates>'
        + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(xy))
        + "</Coordinates></Annotation>"
        for name, group, xy in annotations
    )
    return f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>"


def test_degenerate_outlines_are_left_out_with_a_warning_and_the_rest_kept(tmp_path):
    """One real CAMELYON16 annotation has a 2-vertex lesion: it must not sink the slide."""
    import json

    from pipeline.slides.annotations import read_annotations

    path = tmp_path / "tumor_018.xml"
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    path.write_text(
        _asap(
            ("_0", "_0", square),
            ("Two", "_0", [(1, 1), (2, 2)]),
            ("Repeated", "_1", [(1, 1), (2, 2), (1, 1), (2, 2)]),
            ("Line", "_0", [(0, 0), (5, 5), (9, 9)]),
        )
    )
    warnings: list[str] = []
    (kept,) = read_annotations(path, warnings=warnings)
    assert kept.name == "_0"
    assert warnings == [
        f"{path}: annotation 'Two' left out: 2 distinct vertices (an outline needs at least 3)",
        f"{path}: annotation 'Repeated' left out: 2 distinct vertices (an outline needs at least 3)",
        f"{path}: annotation 'Line' left out: zero area (all vertices on one line)",
    ]
    geojson = tmp_path / "tumor_018.geojson"
    ring = [[0, 0], [1, 1], [0, 0]]
    geojson.write_text(json.dumps([_feature({"type": "Polygon", "coordinates": [ring]})]))
    warnings = []
    assert read_annotations(geojson, warnings=warnings) == []
    assert warnings == [
        f"{geojson}: annotation 'f' left out: 2 distinct vertices (an outline needs at least 3)"
    ]


def test_group_names_are_configurable_any_case_and_unknown_ones_are_a_warning(tmp_path):
    from pipeline.slides.annotations import Groups, read_annotations

    path = tmp_path / "tumor_002.xml"
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    path.write_text(
        _asap(
            ("a", "Metastasis", square),  # a renamed export, in another case
            ("b", "NEGATIVE", square),
            ("c", "Tumour", square),
            ("d", "Tumour", square),
            ("e", "stroma", square),
        )
    )
    warnings: list[str] = []
    polygons = read_annotations(path, warnings=warnings)
    assert [(p.name, p.role) for p in polygons] == [("a", "tumor"), ("b", "exclusion")]
    assert warnings == [
        f"{path}: annotations in group(s) 'Tumour' (2), 'stroma' (1) left out: neither a tumor "
        "nor an exclusion group (groups found: 'Metastasis', 'NEGATIVE', 'Tumour', 'stroma'; "
        "name them in tiling.tumor_groups or tiling.exclusion_groups)"
    ]
    warnings = []
    mine = Groups.of(tumor=["tumour"], exclusion=["Stroma", "negative"])
    polygons = read_annotations(path, mine, warnings)
    assert [(p.name, p.role) for p in polygons] == [
        ("b", "exclusion"),
        ("c", "tumor"),
        ("d", "tumor"),
        ("e", "exclusion"),
    ]
    assert "'Metastasis' (1) left out" in warnings[0]


REAL = SHARED_DATA / "annotations"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real annotations not present: {REAL}")
@pytest.mark.parametrize(
    ("name", "tumors", "exclusions"), [("tumor_036", 103, 2), ("tumor_039", 4, 144)]
)
def test_real_camelyon16_annotations(name, tumors, exclusions):
    """Two real CAMELYON16 lesion files (groups renamed metastasis/negative by their publisher)."""
    from matplotlib.path import Path as Outline

    from pipeline.evaluation.froc import tumor_mask
    from pipeline.slides.annotations import read_annotations

    warnings: list[str] = []
    polygons = read_annotations(REAL / f"{name}.xml", warnings=warnings)
    assert warnings == []
    assert sum(p.is_tumor for p in polygons) == tumors
    assert sum(p.is_exclusion for p in polygons) == exclusions
    assert all(p.level0_xy.shape[0] >= 3 for p in polygons)
    x_max = max(p.level0_xy[:, 0].max() for p in polygons)
    y_max = max(p.level0_xy[:, 1].max() for p in polygons)
    ds = 128
    mask = tumor_mask(polygons, (int(x_max) + ds, int(y_max) + ds), ds)
    # Each mask pixel of the annotated region against the outlines themselves
    # (matplotlib's point-in-polygon): tumor where a pixel centre is inside a tumor
    # outline and outside every exclusion.
    x_min = min(p.level0_xy[:, 0].min() for p in polygons)
    y_min = min(p.level0_xy[:, 1].min() for p in polygons)
    rows, cols = np.mgrid[int(y_min) // ds : mask.shape[0], int(x_min) // ds : mask.shape[1]]
    centres = np.column_stack([(cols.ravel() + 0.5) * ds, (rows.ravel() + 0.5) * ds])

    def within(polygon):  # the centres inside the outline (tested within its bounding box)
        x0, y0, x1, y1 = polygon.bounds()
        near = (centres[:, 0] >= x0) & (centres[:, 0] <= x1)
        near &= (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
        hits = np.zeros(len(centres), dtype=bool)
        hits[near] = Outline(polygon.level0_xy).contains_points(centres[near])
        return hits

    inside = np.zeros(len(centres), dtype=bool)
    carved = 0
    for polygon in polygons:
        if polygon.is_tumor:
            inside |= within(polygon)
    for polygon in polygons:
        if polygon.is_exclusion:
            hits = within(polygon)
            carved += int((hits & inside).sum())
            inside &= ~hits
    expected = inside.reshape(rows.shape)
    ours = mask[int(y_min) // ds :, int(x_min) // ds :]
    assert expected.sum() > 50 and mask.sum() == ours.sum()
    # Rasterisers differ only on centres within a hair of an edge.
    assert (ours != expected).sum() <= 0.02 * expected.sum()
    assert carved > 0  # the exclusions do carve pixels out of tumor
