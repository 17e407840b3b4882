"""Export: heatmap outlines, QuPath GeoJSON and ASAP XML round trips, the heatmap TIFF, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from pipeline.export import asap_xml, export_results, geojson_collection, tumor_regions
from pipeline.export.driver import heatmap_level0
from pipeline.inference.heatmap import HeatmapGrid, detect_lesions
from pipeline.inference.results import write_manifest, write_slide_outputs
from pipeline.slides.annotations import read_asap_xml, read_geojson
from pipeline.slides.reader import open_slide
from tests.conftest import last_json, run

CELL_PX = (40.0, 30.0)  # level-0 px per heatmap cell, not square: x and y must not mix up


def _ring_with_island() -> np.ndarray:
    """(20, 24): a square ring of 0.8 (a hole of 0.1 inside), an island of 0.95 in the hole,
    a blob of 0.6 apart, and a lone cell of 0.55 touching nothing."""
    heat = np.zeros((20, 24), dtype=np.float32)
    heat[2:14, 2:14] = 0.8
    heat[5:11, 5:11] = 0.1
    heat[7:9, 7:9] = 0.95
    heat[15:18, 16:22] = 0.6
    heat[3, 20] = 0.55
    return heat


def _grid(heat: np.ndarray) -> HeatmapGrid:
    return HeatmapGrid(shape=heat.shape, level0_cell_px=CELL_PX, cells_per_patch=1)


def _centres(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.indices(heat.shape)
    return (cols.ravel() + 0.5) * CELL_PX[0], (rows.ravel() + 0.5) * CELL_PX[1]


def test_regions_hold_exactly_the_cells_at_or_above_the_threshold():
    heat = _ring_with_island()
    regions = tumor_regions(heat, _grid(heat), 0.5, tolerance_px=0.0)
    assert len(regions) == 4
    ring, blob, island, lone = regions  # by decreasing area
    assert len(ring.holes) == 1 and not blob.holes and not island.holes and not lone.holes
    x, y = _centres(heat)
    inside = np.zeros(heat.size, dtype=bool)
    for region in regions:
        polygon = region.polygon
        assert polygon.is_valid, shapely.validation.explain_validity(polygon)
        inside |= shapely.contains_xy(polygon, x, y)
    np.testing.assert_array_equal(inside, heat.ravel() >= 0.5)
    assert ring.max_probability == pytest.approx(0.8) and island.max_probability == pytest.approx(
        0.95
    )
    assert blob.mean_probability == pytest.approx(0.6)
    # The outline runs where the field crosses 0.5: from a cell of 0 (centre x 1.5 cells) to
    # one of 0.8 (x 2.5), 0.5 / 0.8 of the way: the ring's left edge at x = 2.125 cells.
    assert ring.exterior[:, 0].min() == pytest.approx(2.125 * CELL_PX[0], abs=1e-5)
    # GeoJSON's winding: exterior counter-clockwise, holes clockwise (x right, y up).
    assert shapely.LinearRing(ring.exterior).is_ccw
    assert not shapely.LinearRing(ring.holes[0]).is_ccw
    # A higher threshold: only the island.
    (only,) = tumor_regions(heat, _grid(heat), 0.9, tolerance_px=0.0)
    assert only.max_probability == pytest.approx(0.95)
    assert tumor_regions(np.zeros((4, 4)), _grid(np.zeros((4, 4))), 0.5, tolerance_px=1) == []


def test_simplified_outlines_stay_within_the_tolerance_and_valid():
    rng = np.random.default_rng(3)
    heat = np.clip(rng.normal(0.3, 0.35, (60, 80)), 0, 1).astype(np.float32)
    exact = tumor_regions(heat, _grid(heat), 0.5, tolerance_px=0.0)
    simple = tumor_regions(heat, _grid(heat), 0.5, tolerance_px=12.0)
    assert sum(len(r.exterior) for r in simple) < 0.8 * sum(len(r.exterior) for r in exact)
    assert all(r.polygon.is_valid for r in simple)
    assert len(simple) == len(exact)  # none lost, however small
    for region in simple:
        # Its exact outline: the one it overlaps most. Every point of each outline lies within
        # the tolerance of the other (densified: not only at vertices).
        polygon = region.polygon
        match = max(exact, key=lambda r: r.polygon.intersection(polygon).area).polygon
        assert shapely.hausdorff_distance(match.boundary, polygon.boundary, densify=0.05) <= 12.01
    with pytest.raises(ValueError, match="threshold"):
        tumor_regions(heat, _grid(heat), 0.0, tolerance_px=1)


def _rings_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Same closed ring, up to the closing vertex and 0.01 px of rounding."""
    a = a[:-1] if np.array_equal(a[0], a[-1]) else a
    b = b[:-1] if np.array_equal(b[0], b[-1]) else b
    np.testing.assert_allclose(a, b, atol=0.006)


def test_geojson_and_asap_read_back_to_the_same_polygons(tmp_path):
    heat = _ring_with_island()
    regions = tumor_regions(heat, _grid(heat), 0.5, tolerance_px=2.0)
    detections = detect_lesions(heat, _grid(heat), 0.5)
    collection = geojson_collection(
        "s1", regions, detections.confidence, detections.level0_xy, (0.25, 0.25)
    )
    path = tmp_path / "s1.geojson"
    path.write_text(json.dumps(collection))
    polygons = read_geojson(path)
    assert len(polygons) == len(regions)
    for polygon, region in zip(polygons, regions, strict=True):
        assert polygon.is_tumor and polygon.group == "Tumor"
        _rings_equal(polygon.level0_xy, region.exterior)
        assert len(polygon.holes) == len(region.holes)
        for hole, expected in zip(polygon.holes, region.holes, strict=True):
            _rings_equal(hole, expected)
    first = collection["features"][0]["properties"]
    assert first["objectType"] == "annotation"
    assert first["classification"]["name"] == "Tumor"
    assert first["measurements"]["Area mm^2"] == pytest.approx(
        regions[0].area_level0_px2 * 0.25 * 0.25 / 1e6, rel=1e-4
    )
    points = [f for f in collection["features"] if f["geometry"]["type"] == "Point"]
    assert [f["properties"]["objectType"] for f in points] == ["detection"] * len(detections)
    np.testing.assert_array_equal(
        [f["geometry"]["coordinates"] for f in points], detections.level0_xy
    )
    # Same inputs, same bytes (ids derived from the slide and the feature).
    again = geojson_collection(
        "s1", regions, detections.confidence, detections.level0_xy, (0.25, 0.25)
    )
    assert json.dumps(again) == json.dumps(collection)

    xml = tmp_path / "s1.xml"
    xml.write_text(asap_xml("s1", regions, detections.confidence, detections.level0_xy))
    warnings: list[str] = []
    polygons = read_asap_xml(xml, warnings=warnings)
    assert warnings == []
    tumors = [p for p in polygons if p.is_tumor]
    holes = [p for p in polygons if p.is_exclusion]
    assert len(tumors) == len(regions) and len(holes) == 1
    for polygon, region in zip(tumors, regions, strict=True):
        _rings_equal(polygon.level0_xy, region.exterior)
    _rings_equal(holes[0].level0_xy, regions[0].holes[0])


def _results_folder(tmp_path, slides: dict[str, np.ndarray], level0_wh=(960, 600)):
    """An inference folder written by inference's own writer, for ``slides`` heatmaps."""
    out = tmp_path / "inference"
    manifest = {"slides": {}}
    for slide_id, heat in slides.items():
        grid = _grid(heat)
        found = detect_lesions(heat, grid, 0.5)
        rgba = np.zeros((*heat.shape, 4), np.uint8)
        attrs = {"level0_wh": list(level0_wh), "mpp": [0.25, 0.25], "score": float(heat.max())}
        write_slide_outputs(out, slide_id, heat, grid, found, rgba, rgba[..., :3], attrs)
        manifest["slides"][slide_id] = {"slide_id": slide_id, "status": "done"}
    write_manifest(out, manifest)
    return out


def test_heatmap_tiff_opens_with_openslide_over_the_slide(tmp_path):
    heat = _ring_with_island()
    results = _results_folder(tmp_path, {"s1": heat})
    (done,) = export_results(results, tmp_path / "export", formats=["tiff"])
    assert done.status == "done"
    with open_slide(tmp_path / "export" / "s1_heatmap.tif", direct=False) as slide:
        assert slide.info.level0_wh == (960, 600)
        assert slide.info.mpp_xy == pytest.approx((0.25, 0.25))
        pixels = slide.read_region((0, 0), 0, (960, 600))
    expected = heatmap_level0(heat, _grid(heat), 0, 0, 960, 600)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 1], expected)
    # Each cell fills its level-0 pixels: the island's cell (7, 7) at x 280-319, y 210-239.
    assert (pixels[210:240, 280:320, 0] == round(0.95 * 255)).all()
    assert (pixels[209, 280:320, 0] == round(0.1 * 255)).all()


def test_export_command_writes_every_format_and_goes_on_past_a_bad_slide(tmp_path):
    heat = _ring_with_island()
    results = _results_folder(tmp_path, {"s1": heat, "s2": heat[::-1].copy()})
    (results / "heatmaps" / "s2.zarr" / "probability" / "zarr.json").write_text("{")
    result = run("export", str(results), "--threshold", "0.5", "--threshold", "0.9", "--json")
    assert result.returncode == 1, result.stderr
    summary = last_json(result)
    assert summary["failed"] == ["s2"]
    assert f"{results / 'heatmaps' / 's2.zarr'}: not a readable wsiflow heatmap" in result.stderr
    assert "Traceback" not in result.stderr
    s1 = summary["slides"]["s1"]
    assert s1["regions"] == {"0.5": 4, "0.9": 1} and s1["detections"] == 4
    out = results / "export"
    assert sorted(p.name for p in out.iterdir()) == [
        ".wsiflow", "s1.geojson", "s1.xml", "s1_heatmap.tif"
    ]  # fmt: skip
    names = [f["properties"]["name"] for f in json.loads((out / "s1.geojson").read_text())[
        "features"
    ] if f["geometry"]["type"] == "Polygon"]  # fmt: skip
    assert names[-1] == "Tumor p>=0.9 #1" and len(names) == 5


def test_export_never_writes_into_a_folder_it_did_not_make(tmp_path):
    results = _results_folder(tmp_path, {"s1": _ring_with_island()})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "s1.xml").write_text("my own annotation")
    result = run("export", str(results), "--out", str(mine))
    assert result.returncode == 2
    assert f"{mine}: is not empty" in result.stderr
    assert (mine / "s1.xml").read_text() == "my own annotation"
    not_results = run("export", str(mine))
    assert not_results.returncode == 1
    assert f"{mine}: has no inference.json" in not_results.stderr
    bad_format = run("export", str(results), "--format", "png")
    assert bad_format.returncode == 2 and "png: not one of geojson, asap, tiff" in (
        bad_format.stderr
    )
    missing = run("export", str(results), "--slide", "s9")
    assert missing.returncode == 1 and "no complete results for slide(s) s9" in missing.stderr
