"""Heatmap stitching, lesion detection and colouring on hand-built probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.heatmap import (
    MAX_ALPHA,
    HeatmapAccumulator,
    colorize,
    detect_lesions,
    detect_local_maxima,
    heatmap_grid,
    heatmap_image,
    overlay,
    slide_score,
)


def test_grid_has_one_cell_per_stride_placed_at_level_0():
    # Level 1 of a 1000 x 800 slide (downsample 2), 100 px patches every 50 px.
    grid = heatmap_grid((500, 400), (1000, 800), read_px=100, read_stride_px=50)
    assert grid.shape == (8, 10)
    assert grid.level0_cell_px == (100.0, 100.0)
    assert grid.cells_per_patch == 2
    np.testing.assert_array_equal(grid.cell_centers_level0(np.array([0, 7]), np.array([0, 9])),
                                  [[50, 50], [950, 750]])  # fmt: skip


def test_overlapping_predictions_are_averaged_and_unpredicted_cells_are_zero():
    grid = heatmap_grid((500, 400), (1000, 800), read_px=100, read_stride_px=50)
    acc = HeatmapAccumulator(grid)
    acc.add(np.array([[0, 0], [1, 0]]), np.array([1.0, 0.0]))
    heat = acc.heatmap()
    assert heat.dtype == np.float32 and heat.shape == (8, 10)
    np.testing.assert_allclose(heat[:2, :3], [[1, 0.5, 0], [1, 0.5, 0]])
    assert heat[2:].sum() == 0 and heat[:, 3:].sum() == 0
    np.testing.assert_array_equal(acc.covered[:3, :4], [[1, 1, 1, 0], [1, 1, 1, 0], [0] * 4])
    # A patch on the last row/column covers only the cells inside the grid.
    acc.add(np.array([[9, 7]]), np.array([0.25]))
    assert acc.heatmap()[7, 9] == 0.25


def test_one_detection_per_connected_region_at_its_peak():
    grid = heatmap_grid((100, 100), (1000, 1000), read_px=10, read_stride_px=10)
    heat = np.zeros(grid.shape, dtype=np.float32)
    heat[1:4, 1:4] = 0.6
    heat[2, 3] = 0.95  # the peak of the first region
    heat[7, 7] = 0.7  # a one-cell region
    heat[8, 8] = 0.8  # diagonal neighbour: the same region (8-connectivity)
    heat[0, 9] = 0.4  # below the threshold
    found = detect_lesions(heat, grid, threshold=0.5)
    assert len(found) == 2
    np.testing.assert_allclose(found.confidence, [0.95, 0.8])
    np.testing.assert_array_equal(found.level0_xy, [[350, 250], [850, 850]])
    np.testing.assert_array_equal(found.area_cells, [9, 2])
    assert len(detect_lesions(np.zeros((3, 3)), grid, threshold=0.5)) == 0
    with pytest.raises(ValueError, match="threshold in"):
        detect_lesions(heat, grid, threshold=1.0)


def test_non_maximum_suppression_splits_touching_lesions_and_spaces_plateaus():
    grid = heatmap_grid((100, 100), (1000, 1000), read_px=10, read_stride_px=10)  # 100 px cells
    heat = np.zeros(grid.shape, dtype=np.float32)
    heat[2, 1:7] = [0.9, 0.8, 0.7, 0.6, 0.85, 0.6]  # two peaks, one region
    heat[9, 0:7] = 0.7  # a plateau 7 cells wide
    heat[0, 9] = 0.4  # below the threshold
    assert len(detect_lesions(heat, grid, threshold=0.5)) == 2  # regions: one per region
    found = detect_local_maxima(heat, grid, threshold=0.5, min_distance_level0_px=250)
    # 0.9 at (2, 1); 0.85 at (2, 5), 400 px away; the plateau from its first cell, every 300 px.
    np.testing.assert_allclose(found.confidence, [0.9, 0.85, 0.7, 0.7, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(
        found.level0_xy, [[150, 250], [550, 250], [50, 950], [350, 950], [650, 950]]
    )
    np.testing.assert_array_equal(found.area_cells, [6, 6, 7, 7, 7])
    # Farther than the peaks are apart (400 px) and the plateau is wide (600 px), nearer
    # than the regions (707 px): one detection per region is left.
    wide = detect_local_maxima(heat, grid, threshold=0.5, min_distance_level0_px=650)
    np.testing.assert_array_equal(wide.level0_xy, [[150, 250], [50, 950]])
    assert len(detect_local_maxima(np.zeros((3, 3)), grid, 0.5, 100)) == 0
    with pytest.raises(ValueError, match="threshold in"):
        detect_local_maxima(heat, grid, threshold=0.0, min_distance_level0_px=100)
    with pytest.raises(ValueError, match="min_distance_level0_px=-1"):
        detect_local_maxima(heat, grid, threshold=0.5, min_distance_level0_px=-1)


def test_slide_score_is_the_highest_cell():
    assert slide_score(np.array([[0.1, 0.7], [0.3, 0.2]])) == pytest.approx(0.7)
    assert slide_score(np.zeros((0, 0))) == 0.0


def test_colour_heatmap_is_transparent_where_low_and_overlay_aligns():
    heat = np.array([[0.0, 0.05], [0.5, 1.0]], dtype=np.float32)
    rgba = colorize(heat)
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[0], 0)  # clear, and no colour to bleed when drawn
    assert 0 < rgba[1, 0, 3] < rgba[1, 1, 3] <= round(255 * MAX_ALPHA)
    assert tuple(rgba[1, 1, :3]) != tuple(rgba[1, 0, :3])
    grid = heatmap_grid((20, 20), (200, 200), read_px=10, read_stride_px=10)
    white = np.full((40, 40, 3), 255, dtype=np.uint8)
    blended = overlay(white, heatmap_image(heat, grid, (200, 200), (40, 40)))
    np.testing.assert_array_equal(blended[:20], 255)  # top row of cells: transparent
    assert (blended[20:, :20] != 255).any(axis=-1).all()


def test_streamed_prediction_places_batches_by_offset_with_several_readers(small_cohort):
    """Any number of reader threads gives every patch its own value; errors reach the caller."""
    from pipeline.errors import SlideNotFoundError
    from pipeline.inference.predict import Block, predict_streamed
    from pipeline.slides.reader import open_slide

    slide = small_cohort.root / small_cohort.slides[0].image
    xy = np.array([[x, y] for y in range(0, 2048, 100) for x in range(0, 2560, 100)])

    def mean_red(batch):  # a real function of the pixels, so misplaced batches show
        return batch[..., 0].mean(axis=(1, 2)).astype(np.float32)

    with open_slide(slide) as reader:
        expected = np.array([reader.read_level(0, (x, y), (32, 32))[..., 0].mean() for x, y in xy])

    def block(path, batch_size=16, queue_batches=2, threads=2):
        return Block(str(path), "unused", 0, xy, 32, 32, batch_size, queue_batches, threads)

    for threads in (1, 3):
        got = predict_streamed(mean_red, block(slide, threads=threads))
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(SlideNotFoundError, match="nope.tif: no such file"):
        predict_streamed(mean_red, block(slide.with_name("nope.tif")))

    def failing(batch):
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        predict_streamed(failing, block(slide, 8, 1))  # returns, does not hang


def _saturation_and_hue(rgb) -> tuple[float, float]:
    import colorsys

    h, _, sat = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
    return sat, h * 360


@pytest.mark.parametrize("color_map", ["tumor", "redgreen"])
def test_high_probability_is_saturated_red_and_the_tissue_shows_through(color_map):
    """Issue 27: the highest probabilities were opaque pale yellow, hiding the tumor they marked."""
    rgba = colorize(np.array([[1.0, 0.9]], dtype=np.float32), color_map)[0]
    for r, g, b, a in rgba.tolist():
        saturation, hue = _saturation_and_hue((r, g, b))
        assert saturation > 0.9 and (hue < 20 or hue > 340), (r, g, b)  # saturated red
        assert r > 180 and g < 60 and b < 60
        assert a <= round(255 * MAX_ALPHA)
    pink = np.array([[[230, 150, 200]]], dtype=np.uint8)  # eosin-stained tissue
    blended = overlay(pink, rgba[None, :1])[0, 0].astype(int)
    tissue_weight = 1 - rgba[0, 3] / 255
    assert tissue_weight >= 0.35  # the tissue contributes at least a third of the pixel
    assert blended[2] > 60  # eosin's blue survives under the red


def test_red_green_map_marks_normal_predictions_green_and_leaves_uncovered_cells_clear():
    rgba = colorize(np.array([[0.0, 0.02, 0.2, 0.8]], dtype=np.float32), "redgreen")[0]
    assert rgba[0, 3] == 0  # no patch predicted there
    for r, g, _, a in rgba[1:3].tolist():
        assert g > r and a > 0  # green: predicted normal
    r, g, _, a = rgba[3].tolist()
    assert r > g and a > 0
    tumor = colorize(np.array([[0.02, 0.2]], dtype=np.float32), "tumor")[0]
    np.testing.assert_array_equal(tumor[0, 3], 0)  # the default map hides low values
    assert tumor[1, 3] > 0
