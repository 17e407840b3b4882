"""Which stored patches may be hard negatives (pure: arrays and polygons in, masks out).

A hard negative is a patch labelled normal that a model calls tumor. Only
patches surely normal qualify: no tumor in the patch at all, no part of it
within ``margin_px`` of a tumor outline (annotations are drawn by hand, and
cells at a lesion's edge are often missed), and no part of it in an
exclusion region (CAMELYON16's ``_2`` group: areas the annotators would
not call either way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely

from pipeline.slides.annotations import Polygon


def near_annotations(
    level0_xy: np.ndarray, level0_patch_px: float, polygons: Sequence[Polygon], margin_px: float
) -> np.ndarray:
    """``(N,)`` bool: patches within ``margin_px`` of a tumor outline or touching an exclusion.

    ``level0_xy`` is ``(N, 2)`` top-left corners and ``level0_patch_px`` the
    side of a patch, both in level-0 pixels. A tumor polygon's holes count
    as tumor here (their edges are a lesion's edges too).
    """
    xy = np.asarray(level0_xy, dtype=np.float64).reshape(-1, 2)
    shapes = []
    for polygon in polygons:
        shape = shapely.make_valid(shapely.Polygon(polygon.level0_xy))
        shapes.append(shape if polygon.is_exclusion else shape.buffer(margin_px))
    if not shapes or not len(xy):
        return np.zeros(len(xy), dtype=bool)
    keep_out = shapely.union_all(shapes)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + level0_patch_px, xy[:, 1] + level0_patch_px)
    # Touching counts: a box sharing only an edge with the region is at distance 0 from it.
    return np.asarray(shapely.intersects(boxes, keep_out), dtype=bool)


def candidates(labels: np.ndarray, tumor_fraction: np.ndarray, near: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: normal patches with no tumor and away from every annotation (``~near``)."""
    return (np.asarray(labels) == 0) & (np.asarray(tumor_fraction) == 0) & ~np.asarray(near)
