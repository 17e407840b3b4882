"""Tissue detection on a low-resolution overview of a slide.

Stained tissue is coloured, glass and background are grey or white: Otsu's
threshold on HSV saturation separates them, then morphology removes specks
and fills small holes. Sizes are physical (µm), so the result does not depend
on the overview's resolution.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

#: Below this saturation nothing is tissue, whatever Otsu says (blank slides, glass).
MIN_SATURATION = 0.07
#: Darker than this (HSV value) is pen ink, folds or slide edges, not tissue.
MIN_VALUE = 0.12


def detect_tissue(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 10_000.0,
    closing_um: float = 16.0,
) -> np.ndarray:
    """Return an ``(h, w)`` bool tissue mask of an ``(h, w, 3)`` uint8 overview at ``mpp`` µm/px.

    ``min_object_um2`` drops specks smaller than that area (20,000 µm², a
    ~160 µm blob), ``max_hole_um2`` fills holes up to that area, and
    ``closing_um`` bridges gaps that narrow between pieces of one section.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"Expected an (h, w, 3) uint8 image. Received: shape={rgb.shape}, dtype={rgb.dtype}"
        )
    # HSV saturation and value in float32 (skimage's rgb2hsv makes three float64 planes).
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(r, g), b)  # ~10x faster than rgb.max(axis=2)
    low = np.minimum(np.minimum(r, g), b)
    value = high.astype(np.float32) / 255.0
    saturation = (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)
    if np.ptp(saturation) > 1e-6:
        threshold = max(float(threshold_otsu(saturation)), MIN_SATURATION)
    else:
        threshold = MIN_SATURATION
    mask = (saturation > threshold) & (value > MIN_VALUE)
    px_area = mpp * mpp
    # Capped: on a fine overview a wide disk costs much and bridges nothing more.
    radius = min(8, max(1, round(closing_um / mpp)))
    mask = disk_closing(mask, radius)
    mask = remove_small_objects(mask, max_size=max(1, round(min_object_um2 / px_area)))
    mask = remove_small_holes(mask, max_size=max(1, round(max_hole_um2 / px_area)))
    return mask


def disk_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing of ``mask`` by a disk of ``radius``, edges reflected.

    The same pixels as ``skimage.morphology.closing(mask, disk(radius))``,
    ~10x faster: a disk is a stack of rows, so each pass ORs (or ANDs) a few
    shifted copies of the whole mask instead of visiting the footprint per pixel.
    """
    return _disk_pass(_disk_pass(mask, radius, np.logical_or), radius, np.logical_and)


def _disk_pass(mask: np.ndarray, radius: int, combine: np.ufunc) -> np.ndarray:
    """Dilation (``logical_or``) or erosion (``logical_and``) by a disk of ``radius``."""
    h, w = mask.shape
    r = radius
    padded = np.pad(mask, r, mode="symmetric")
    # rows[k]: each pixel combined with its k neighbours either side along x.
    rows = [padded[:, r : r + w]]
    for k in range(1, r + 1):
        rows.append(
            combine(rows[-1], combine(padded[:, r - k : r - k + w], padded[:, r + k : r + k + w]))
        )
    out = rows[r][r : r + h].copy()
    for dy in range(1, r + 1):
        half = rows[math.isqrt(r * r - dy * dy)]
        combine(out, half[r - dy : r - dy + h], out=out)
        combine(out, half[r + dy : r + dy + h], out=out)
    return out
