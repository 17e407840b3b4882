"""Pure geometry: mask area fractions, rasterised annotations, level choice, labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import MissingMppError, SlideError
from pipeline.slides.annotations import Polygon
from pipeline.slides.masks import PlacedMask, rasterize_tumor
from pipeline.slides.reader import SlideInfo
from pipeline.tiling.grid import choose_resolution, patch_grid, select_patches


def _info(mpp: float | None, sizes=((8192, 8192), (4096, 4096), (2048, 2048))) -> SlideInfo:
    return SlideInfo(
        path=Path("slide.tif"),
        vendor="generic-tiff",
        level_wh=tuple(sizes),
        level_downsamples=tuple(sizes[0][0] / w for w, _ in sizes),
        mpp_xy=None if mpp is None else (mpp, mpp),
        objective_power=None,
        properties={},
        associated_images=(),
    )


def test_fractions_are_exact_area_integrals():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True  # level-0 square 10..30 with scale 10
    placed = PlacedMask(mask, origin_xy=(0.0, 0.0), scale_xy=(10.0, 10.0))
    boxes = np.array(
        [
            [10, 10, 30, 30],  # exactly the square
            [0, 0, 20, 20],  # one quarter of it
            [15, 15, 25, 25],  # inside
            [25, 10, 35, 30],  # half
            [-20, -20, 0, 0],  # outside the mask entirely
            [30, 30, 60, 60],  # partly outside the mask, no tumor
        ]
    )
    np.testing.assert_allclose(placed.fractions(boxes), [1.0, 0.25, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    shifted = PlacedMask(mask, origin_xy=(100.0, 0.0), scale_xy=(10.0, 10.0))
    np.testing.assert_allclose(shifted.fractions(np.array([[110, 10, 130, 30]])), [1.0])


def test_rasterised_tumor_carves_holes_and_exclusions():
    square = np.array([[0, 0], [100, 0], [100, 100], [0, 100]], dtype=float)
    hole = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], dtype=float)
    exclusion = np.array([[60, 60], [80, 60], [80, 80], [60, 80]], dtype=float)
    polygons = [Polygon("t", "Tumor", square, (hole,)), Polygon("x", "_2", exclusion)]
    placed = rasterize_tumor(polygons, 1.0, (200, 200))
    f = placed.fractions(
        np.array([[40, 40, 50, 50], [10, 10, 30, 30], [60, 60, 80, 80], [150, 150, 160, 160]])
    )
    np.testing.assert_allclose(f, [1.0, 0.0, 0.0, 0.0], atol=1e-6)
    whole = placed.fractions(np.array([[0, 0, 100, 100]]))[0]
    assert whole == pytest.approx(1 - 2 * 400 / 10000, abs=0.01)
    assert rasterize_tumor([Polygon("x", "_2", exclusion)], 1.0, (200, 200)) is None


def test_resolution_by_mpp_resamples_when_no_level_matches():
    r = choose_resolution(_info(0.243), patch_px=96, stride_px=96, target_mpp=0.5)
    assert (r.level, r.read_px, r.read_stride_px, r.resampled) == (1, 99, 99, True)
    assert r.level_mpp == pytest.approx(0.486)
    exact = choose_resolution(_info(0.25), patch_px=96, stride_px=48, target_mpp=0.5)
    assert (exact.level, exact.read_px, exact.read_stride_px, exact.resampled) == (1, 96, 48, False)
    finer = choose_resolution(_info(0.25), patch_px=64, stride_px=64, target_mpp=0.2)
    assert (finer.level, finer.read_px) == (0, 51)  # upsampled from the finest level


def test_resolution_by_level_and_errors():
    r = choose_resolution(_info(None), patch_px=64, stride_px=64, level=2)
    assert (r.level, r.read_px, r.downsample, r.level_mpp) == (2, 64, 4.0, None)
    with pytest.raises(
        MissingMppError, match="slide.tif: the slide records neither a pixel size .* use --level"
    ):
        choose_resolution(_info(None), patch_px=64, stride_px=64, target_mpp=0.5)
    # An objective power only: 10 / power µm/px, assumed and said (40x: 0.25 µm/px).
    forty = dataclasses.replace(_info(None), objective_power=40.0)
    r = choose_resolution(forty, patch_px=64, stride_px=64, target_mpp=0.5)
    assert (r.level, r.read_px, r.level_mpp) == (1, 64, 0.5)
    assert r.note.startswith("the slide records no pixel size (mpp): assumed 0.25 µm/px")
    assert choose_resolution(_info(0.25), patch_px=64, stride_px=64, target_mpp=0.5).note is None
    with pytest.raises(SlideError, match="Expected a level in 0..2. Got level 5"):
        choose_resolution(_info(0.25), patch_px=64, stride_px=64, level=5)


def test_resolution_refuses_upsampling_beyond_the_limit_and_patches_larger_than_the_slide():
    twice = choose_resolution(
        _info(0.5), patch_px=96, stride_px=96, target_mpp=0.25, max_upsample=2
    )
    assert (twice.level, twice.read_px) == (0, 48)  # a 20x scan read at 40x resolution
    with pytest.raises(
        SlideError,
        match=r"^slide.tif: patches at 0.01 µm/px would be upsampled 25.0x from the slide's "
        r"finest level \(0.25 µm/px\); more than 2x is refused \(tiling.max_upsample\)",
    ):
        choose_resolution(_info(0.25), patch_px=96, stride_px=96, target_mpp=0.01, max_upsample=2)
    # No limit unless asked (inference reads slides at its model's resolution).
    assert choose_resolution(_info(0.25), patch_px=96, stride_px=96, target_mpp=0.01).read_px == 4
    with pytest.raises(
        SlideError,
        match=r"^slide.tif: one patch \(96 px at 100 µm/px = 9,600 µm\) is larger than the slide "
        r"\(2,048 x 2,048 µm\)$",
    ):
        choose_resolution(_info(0.25), patch_px=96, stride_px=96, target_mpp=100)
    with pytest.raises(
        SlideError,
        match=r"^slide.tif: one patch \(4,096 px\) is larger than level 2 of the slide "
        r"\(2,048 x 2,048 px\)$",
    ):
        choose_resolution(_info(None), patch_px=4096, stride_px=4096, level=2)
    fits = choose_resolution(_info(None), patch_px=2048, stride_px=2048, level=2)
    assert fits.read_px == 2048


def test_grid_keeps_only_whole_patches():
    grid = patch_grid((250, 130), 64, 64)
    assert grid.tolist() == [[0, 0], [64, 0], [128, 0], [0, 64], [64, 64], [128, 64]]


@pytest.mark.parametrize(("rule", "expected"), [("fraction", [1, 0, 0]), ("center", [1, 1, 0])])
def test_label_rules(rule, expected):
    info = _info(0.5, sizes=((300, 100),))
    resolution = choose_resolution(info, patch_px=100, stride_px=100, level=0)
    tissue = PlacedMask(np.ones((1, 3), dtype=bool), (0.0, 0.0), (100.0, 100.0))
    # Patch 0 all tumor; patch 1 tumor only in a 20 px central square; patch 2 none.
    polygons = [
        Polygon("a", "_0", np.array([[0, 0], [100, 0], [100, 100], [0, 100]], dtype=float)),
        Polygon("b", "_0", np.array([[140, 40], [160, 40], [160, 60], [140, 60]], dtype=float)),
    ]
    tumor = rasterize_tumor(polygons, 1.0, (300, 100))
    table = select_patches(
        (300, 100),
        (1.0, 1.0),
        resolution,
        tissue,
        tumor,
        min_tissue_fraction=0.5,
        label_rule=rule,
        tumor_threshold=0.5,
    )
    assert table.labels.tolist() == expected
    np.testing.assert_allclose(table.tumor_fraction, [1.0, 0.04, 0.0], atol=1e-3)
    assert table.level0_xy.tolist() == [[0, 0], [100, 0], [200, 0]]
