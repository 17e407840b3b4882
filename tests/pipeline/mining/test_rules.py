"""Which stored patches may be hard negatives: exact geometry on hand-placed patches."""

from __future__ import annotations

import numpy as np

from pipeline.mining.rules import candidates, near_annotations
from pipeline.slides.annotations import Polygon


def _square(x0, y0, x1, y1, group):
    return Polygon("p", group, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float))


TUMOR = _square(1000, 1000, 2000, 2000, "_0")
EXCLUSION = _square(5000, 0, 6000, 1000, "_2")
#: Top-left corners of 100 px patches.
XY = np.array(
    [
        (0, 0),  # far from both
        (850, 1500),  # 50 px left of the tumor
        (1500, 1500),  # inside it
        (5500, 500),  # inside the exclusion
        (4900, 0),  # sharing the exclusion's edge
        (4890, 0),  # 10 px from the exclusion, which has no margin
    ]
)


def test_a_margin_around_tumor_and_exclusions_as_drawn():
    polygons = [TUMOR, EXCLUSION]
    assert EXCLUSION.is_exclusion and TUMOR.is_tumor
    near = near_annotations(XY, 100.0, polygons, margin_px=60.0)
    np.testing.assert_array_equal(near, [False, True, True, True, True, False])
    near = near_annotations(XY, 100.0, polygons, margin_px=40.0)
    np.testing.assert_array_equal(near, [False, False, True, True, True, False])
    assert not near_annotations(XY, 100.0, [], 60.0).any()  # a slide without annotation


def test_candidates_are_normal_tumor_free_and_away():
    labels = np.array([0, 0, 1, 0, 0, 0])
    tumor_fraction = np.array([0.0, 0.0, 0.9, 0.1, 0.0, 0.0])
    near = np.array([False, True, False, False, False, False])
    # Row 3 is labelled normal but holds some tumor (below the labelling threshold).
    np.testing.assert_array_equal(
        candidates(labels, tumor_fraction, near), [True, False, False, False, True, True]
    )
