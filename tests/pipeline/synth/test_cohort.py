"""Synthetic CAMELYON16 cohorts: layout, annotations, lesion sizes, texture, determinism."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.draw import polygon as draw_polygon
from skimage.measure import label, regionprops

from pipeline.config import SyntheticConfig
from pipeline.outputs import MARKER
from pipeline.slides.annotations import read_asap_xml
from pipeline.slides.reader import open_slide
from pipeline.synth.cohort import plan_cohort, write_cohort, write_slide
from pipeline.synth.scene import make_scene


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_splits_like_camelyon16():
    def counts(n):
        specs = plan_cohort(SyntheticConfig(slides=n))
        return [
            sum(s.split == split and s.label == label for s in specs)
            for split in ("training", "testing")
            for label in ("Tumor", "Normal")
        ]

    assert counts(4) == [1, 1, 1, 1]
    assert counts(8) == [3, 2, 2, 1]
    assert counts(9) == [3, 3, 2, 1]
    names = [s.slide_id for s in plan_cohort(SyntheticConfig(slides=8))]
    assert names == [
        "tumor_001",
        "tumor_002",
        "tumor_003",
        "normal_001",
        "normal_002",
        "test_001",
        "test_002",
        "test_003",
    ]
    with pytest.raises(ValueError, match="at least 4 slides"):
        plan_cohort(SyntheticConfig.model_construct(slides=3))


def test_extra_normal_slides_join_training_and_change_no_other_slide():
    for difficulty in ("easy", "camelyon"):
        plain = plan_cohort(SyntheticConfig(slides=9, difficulty=difficulty))
        more = plan_cohort(SyntheticConfig(slides=9, difficulty=difficulty, extra_normal_slides=4))
        added = [s for s in more if s not in plain]
        assert [s.slide_id for s in added] == [f"normal_{i:03d}" for i in range(4, 8)]
        assert {(s.split, s.label) for s in added} == {("training", "Normal")}
        assert [s for s in more if s in plain] == plain  # same seeds, centres and order
        assert len({s.seed for s in more}) == len(more)


def test_layout_and_reference(small_cohort):
    root = small_cohort.root
    expected = {
        "training/tumor/tumor_001.tif",
        "training/normal/normal_001.tif",
        "training/lesion_annotations/tumor_001.xml",
        "testing/reference.csv",
        "synth.json",
    }
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert expected <= files
    tests = [r for r in small_cohort.slides if r.split == "testing"]
    assert {f"testing/images/{r.slide_id}.tif" for r in tests} <= files
    for record in small_cohort.slides:
        assert (record.annotation is not None) == (record.label == "Tumor")
    with open(root / "testing" / "reference.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [row[:2] for row in rows] == [[r.slide_id, r.label] for r in tests]
    assert all(row[2] in ("Macro", "Micro") for row in rows if row[1] == "Tumor")
    leftovers = [
        p for p in root.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".")
    ]
    assert leftovers == [root / MARKER]  # only the marker saying wsiflow made the folder


def test_slides_open_with_openslide(small_cohort):
    for record in small_cohort.slides:
        with open_slide(small_cohort.root / record.image) as slide:
            info = slide.info
            assert info.level0_wh == (3072, 2560)
            assert info.level_count == record.level_count == 5
            assert info.level_downsamples == pytest.approx([1, 2, 4, 8, 16])
            assert info.mpp_xy == pytest.approx((0.243, 0.243))


def test_xml_holds_the_polygons_of_the_scene(small_cohort):
    from pipeline.synth.cohort import plan_cohort as plan

    specs = {s.slide_id: s for s in plan(small_cohort.params)}
    for record in small_cohort.slides:
        if record.annotation is None:
            continue
        spec = specs[record.slide_id]
        p = small_cohort.params
        scene = make_scene(p.width_px, p.height_px, p.mpp, spec.seed, tumor=True)
        polygons = read_asap_xml(small_cohort.root / record.annotation)
        assert [x.group for x in polygons] == [x.group for x in scene.annotations]
        for read, drawn in zip(polygons, scene.annotations, strict=True):
            np.testing.assert_allclose(read.level0_xy, drawn.level0_xy, atol=1e-4)
        assert record.lesions == len(scene.lesions) >= 1


def _lesion_major_axes_um(scene) -> list[float]:
    """CAMELYON16's evaluation mask: level 5, tumor grown 37.5 µm per side, 8-connected."""
    level, mpp = 5, scene.mpp
    shape = (scene.height // 2**level, scene.width // 2**level)
    tumor = np.zeros(shape, dtype=bool)
    for polygon in scene.lesions:
        rr, cc = draw_polygon(
            polygon.level0_xy[:, 1] / 2**level, polygon.level0_xy[:, 0] / 2**level, shape
        )
        tumor[rr, cc] = True
    distance = ndimage.distance_transform_edt(~tumor)
    grown = ndimage.binary_fill_holes(distance < 75 / (mpp * 2**level * 2))
    labels = label(grown, connectivity=2)
    return [r.axis_major_length * mpp * 2**level for r in regionprops(labels)]


def test_tumor_slides_have_metastases_and_isolated_tumor_cells():
    params = SyntheticConfig()  # the demo's 8192 x 8192 slides
    for spec in plan_cohort(params):
        if not spec.is_tumor:
            continue
        scene = make_scene(params.width_px, params.height_px, params.mpp, spec.seed, tumor=True)
        axes = _lesion_major_axes_um(scene)
        assert len(axes) == len(scene.lesions), "grown lesions must not merge"
        assert any(a < 275 for a in axes), f"{spec.slide_id}: no ITC in {axes}"
        assert any(a >= 275 for a in axes), f"{spec.slide_id}: no lesion to detect in {axes}"
        vertices = np.concatenate([lesion.level0_xy for lesion in scene.lesions]).astype(int)
        assert all(scene.tissue_mask(x, y, 1, 1)[0, 0] for x, y in vertices)


def _box(scene, rng, want_tumor: bool, side: int = 400) -> np.ndarray:
    for _ in range(20000):
        x = int(rng.uniform(0, scene.width - side))
        y = int(rng.uniform(0, scene.height - side))
        tumor = scene.tumor_mask(x, y, side, side)
        if want_tumor and tumor.all():
            return scene.render(x, y, side, side)
        if not want_tumor and not tumor.any() and scene.tissue_mask(x, y, side, side).all():
            return scene.render(x, y, side, side)
    raise AssertionError("no such box")


def _h_autocorrelation(rgb: np.ndarray, lag_px: int) -> float:
    h = rgb2hed(rgb)[..., 0]
    h = (h - h.mean()) / h.std()
    return float(((h[:, lag_px:] * h[:, :-lag_px]).mean() + (h[lag_px:] * h[:-lag_px]).mean()) / 2)


def test_tumor_differs_in_texture_not_just_colour():
    scene = make_scene(8192, 8192, 0.243, seed=5, tumor=True)
    rng = np.random.default_rng(0)
    tumor, normal = _box(scene, rng, True), _box(scene, rng, False)
    # Bigger nuclei: haematoxylin stays correlated over 4 µm in tumor, not in lymphocytes.
    assert _h_autocorrelation(tumor, 16) > _h_autocorrelation(normal, 16) + 0.1
    # ...while the mean colours are close: a model must learn texture.
    assert np.abs(tumor.reshape(-1, 3).mean(0) - normal.reshape(-1, 3).mean(0)).max() < 25


def test_stain_varies_mildly_between_slides():
    means = []
    for seed in (1, 2, 3):
        scene = make_scene(4096, 4096, 0.243, seed=seed, tumor=False)
        means.append(_box(scene, np.random.default_rng(0), False, side=256).reshape(-1, 3).mean(0))
    spread = np.ptp(np.array(means), axis=0).max()
    assert spread > 1.0, "slides should differ in stain"
    assert spread < 40.0, "but only mildly"


def test_same_seed_same_bytes_and_reuse(tmp_path):
    params = SyntheticConfig(slides=4, seed=3, width_px=1024, height_px=768)
    spec = next(s for s in plan_cohort(params) if s.is_tumor)
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        spec.image_path(root).parent.mkdir(parents=True)
        write_slide(root, spec, params)
    assert _sha(spec.image_path(a)) == _sha(spec.image_path(b))
    assert _sha(spec.annotation_path(a)) == _sha(spec.annotation_path(b))

    root = tmp_path / "cohort"
    first = write_cohort(root, params)
    assert _sha(spec.image_path(root)) == _sha(spec.image_path(a))
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")}
    second = write_cohort(root, params)
    assert not first.reused and second.reused
    assert second.slides == first.slides
    assert mtimes == {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")}
    # A missing file or other parameters: regenerate.
    spec.image_path(root).unlink()
    assert not write_cohort(root, params).reused
    assert spec.image_path(root).is_file()
    # A manifest written before a key existed matches that key's default.
    manifest = json.loads((root / "synth.json").read_text())
    del manifest["params"]["extra_normal_slides"]
    (root / "synth.json").write_text(json.dumps(manifest))
    assert write_cohort(root, params).reused
    assert not write_cohort(root, params.model_copy(update={"extra_normal_slides": 1})).reused
    changed = write_cohort(root, params.model_copy(update={"seed": 4}))
    assert not changed.reused
    assert _sha(spec.image_path(root)) != _sha(spec.image_path(a))
