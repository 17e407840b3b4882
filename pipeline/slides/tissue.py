"""Tissue detection on a low-resolution overview of a slide.

Stained tissue is coloured, glass and background are grey or white: Otsu's
threshold on HSV saturation separates them, then morphology removes specks
and fills small holes. Sizes are physical (µm), so the result does not depend
on the overview's resolution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from pipeline.slides.masks import PlacedMask

if TYPE_CHECKING:
    from pipeline.slides.reader import SlideReader

#: Below this saturation nothing is tissue, whatever Otsu says (blank slides, glass).
MIN_SATURATION = 0.07
#: Darker than this (HSV value) is pen ink, folds or slide edges, not tissue.
MIN_VALUE = 0.12
#: Otsu's histogram bins (skimage's default).
OTSU_BINS = 256

# A pixel's HSV saturation and value depend only on its (max, min) channel pair,
# so both are tables over the 65,536 pairs, indexed by ``max << 8 | min``.
_HIGH, _LOW = np.divmod(np.arange(65536), 256)
_SATURATION = (_HIGH - _LOW).astype(np.float32) / np.maximum(_HIGH, 1).astype(np.float32)
_BRIGHT_ENOUGH = _HIGH.astype(np.float32) / np.float32(255.0) > MIN_VALUE


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
    pair = channel_pairs(rgb)
    pair_counts = np.bincount(pair.ravel(), minlength=65536)
    threshold = max(otsu_of_counts(_SATURATION, pair_counts), MIN_SATURATION)
    mask = ((threshold < _SATURATION) & _BRIGHT_ENOUGH)[pair]
    px_area = mpp * mpp
    # Capped: on a fine overview a wide disk costs much and bridges nothing more.
    radius = min(8, max(1, round(closing_um / mpp)))
    mask = disk_closing(mask, radius)
    mask = drop_small_components(mask, max(1, round(min_object_um2 / px_area)))
    return ~drop_small_components(~mask, max(1, round(max_hole_um2 / px_area)))


def channel_pairs(rgb: np.ndarray) -> np.ndarray:
    """``(h, w)`` intp: each pixel's ``max << 8 | min`` of its channels, the tables' index."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    pair = np.maximum(np.maximum(r, g), b).astype(np.intp)  # ~10x faster than rgb.max(axis=2)
    pair <<= 8
    pair |= np.minimum(np.minimum(r, g), b)
    return pair


def drop_small_components(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_px`` pixels.

    skimage's ``remove_small_objects(mask, max_size=max_px)`` (and, on the
    inverted mask, ``remove_small_holes``), leaner: no copy of the mask, and
    none of the lookup when no component is that small.
    """
    labels = np.empty(mask.shape, dtype=np.int32)
    n = ndi.label(mask, output=labels)
    keep = np.bincount(labels.ravel(), minlength=n + 1) > max_px
    keep[0] = False
    if keep[1:].all():
        return mask
    return keep.take(labels)


def otsu_of_counts(values: np.ndarray, counts: np.ndarray) -> float:
    """``threshold_otsu`` of an image holding ``counts[i]`` pixels of value ``values[i]``.

    The same threshold as skimage's on the image itself: its 256-bin
    histogram over the image's range is built from the distinct values only.
    On a 1280 x 1280 overview, counting pairs and this take ~5 ms where
    skimage's histogram of the float saturation image takes ~10 ms. 0.0 for
    an image of one value.
    """
    present = np.flatnonzero(counts)
    values = values[present]
    low, high = values.min(), values.max()
    if high - low <= 1e-6:
        return 0.0
    hist, edges = np.histogram(
        values, bins=OTSU_BINS, range=(low, high), weights=counts[present].astype(np.float64)
    )
    centers = (edges[:-1] + edges[1:]) / 2.0
    return float(threshold_otsu(hist=(hist.astype(np.int64), centers)))


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


#: Overview used for tissue detection when the slide records no mpp: downsample 32.
NO_MPP_OVERVIEW_DOWNSAMPLE = 32.0


def tissue_mask(reader: SlideReader, tissue_mpp: float) -> tuple[PlacedMask, np.ndarray]:
    """The slide's tissue mask at about ``tissue_mpp`` µm/px, and the RGB overview it came from.

    Slides without mpp are looked at with downsample :data:`NO_MPP_OVERVIEW_DOWNSAMPLE`.
    """
    mpp = reader.info.mpp
    downsample = NO_MPP_OVERVIEW_DOWNSAMPLE if mpp is None else tissue_mpp / mpp
    overview, scale = reader.overview(max(1.0, downsample))
    overview_mpp = (1.0 if mpp is None else mpp) * scale[0]
    mask = detect_tissue(overview, mpp=overview_mpp)
    return PlacedMask(mask=mask, origin_xy=(0.0, 0.0), scale_xy=scale), overview
