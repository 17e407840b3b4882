"""The slide classifier's heatmap features, on hand-built heatmaps with values worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.slide_features import feature_names, slide_features


def _heatmap() -> np.ndarray:
    """8 x 10 cells: row 0 background (0), the rest tissue at 0.1, with two regions.

    A: a line of 3 cells (0.6, 0.95, 0.7) in row 2; B: a 3 x 3 ring of 0.6 around a 0.1 cell.
    """
    heat = np.full((8, 10), 0.1)
    heat[0] = 0.0
    heat[2, 1:4] = (0.6, 0.95, 0.7)
    heat[4:7, 5:8] = 0.6
    heat[5, 6] = 0.1
    return heat


def test_features_of_a_hand_built_heatmap():
    names = feature_names((0.5, 0.9))
    features = dict(zip(names, slide_features(_heatmap(), (100.0, 100.0), (0.5, 0.9)), strict=True))
    # Cells of 0.1 mm x 0.1 mm = 0.01 mm²; 70 tissue cells.
    expected = {
        # 0.5: A (3 cells) and B (8 cells); B is the largest.
        "tumor_fraction_t50": 11 / 70,
        "tumor_area_mm2_t50": 0.11,
        "regions_t50": 2,
        "largest_area_mm2_t50": 0.08,
        # The ring's centres spread 0.1 mm each way (variance 0.06 / 8), plus a cell's 0.01/12.
        "largest_major_axis_mm_t50": 4 * np.sqrt(0.06 / 8 + 0.01 / 12),
        "largest_solidity_t50": 8 / 9,  # its hull holds the centre cell
        "largest_mean_probability_t50": 0.6,
        # 0.9: the one cell of 0.95.
        "tumor_fraction_t90": 1 / 70,
        "tumor_area_mm2_t90": 0.01,
        "regions_t90": 1,
        "largest_area_mm2_t90": 0.01,
        "largest_major_axis_mm_t90": 4 * np.sqrt(0.01 / 12),
        "largest_solidity_t90": 1.0,
        "largest_mean_probability_t90": 0.95,
        "max_probability": 0.95,
        "mean_probability": (59 * 0.1 + 0.6 + 0.95 + 0.7 + 8 * 0.6) / 70,
        "tissue_area_mm2": 0.7,
    }
    assert list(features) == list(expected)
    for name, value in expected.items():
        assert features[name] == pytest.approx(value, rel=1e-12), name


def test_major_axis_follows_non_square_cells_and_a_line_is_a_rod():
    heat = np.zeros((7, 3))
    heat[1:6, 1] = 0.8  # a vertical line of 5 cells, each 0.1 mm wide and 0.2 mm tall: 1 mm
    values = slide_features(heat, (100.0, 200.0), (0.5,))
    features = dict(zip(feature_names((0.5,)), values, strict=True))
    assert features["largest_major_axis_mm_t50"] == pytest.approx(2 / np.sqrt(3))
    assert features["largest_area_mm2_t50"] == pytest.approx(5 * 0.02)
    assert features["tumor_fraction_t50"] == 1.0  # every tissue cell is above 0.5


def test_a_slide_without_tissue_or_tumor_has_zeros():
    names = feature_names((0.5, 0.9))
    assert names[-3:] == ["max_probability", "mean_probability", "tissue_area_mm2"]
    np.testing.assert_array_equal(slide_features(np.zeros((4, 4)), (1.0, 1.0), (0.5, 0.9)), 0.0)
    low = slide_features(np.full((4, 4), 0.2), (1000.0, 1000.0), (0.5, 0.9))
    np.testing.assert_allclose(low, [0] * 14 + [0.2, 0.2, 16.0])  # 1 mm cells: areas in cells
    with pytest.raises(ValueError, match=r"Expected a \(rows, cols\) heatmap"):
        slide_features(np.zeros((2, 2, 2)), (1.0, 1.0), (0.5,))
