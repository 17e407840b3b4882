"""Tumor heatmaps: stitching patch probabilities, lesion detections and slide scores.

A heatmap has one cell per grid stride: cell ``(row, col)`` covers level-0
pixels ``[col * cx, (col + 1) * cx) x [row * cy, (row + 1) * cy)`` where
``(cx, cy)`` is ``level0_cell_px``. A patch at grid index ``(i, j)`` covers
``cells_per_patch`` cells along each side from ``(j, i)``; each cell holds the
mean probability of the predicted patches covering it, and 0 where none does
(background, or tissue below the patch threshold).

Pure functions and a small accumulator: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import measure


@dataclass(frozen=True)
class HeatmapGrid:
    """Geometry of one slide's heatmap: ``shape`` (rows, cols) and its level-0 placement."""

    shape: tuple[int, int]
    level0_cell_px: tuple[float, float]
    cells_per_patch: int

    def cell_centers_level0(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(N, 2)`` int64 level-0 x, y of the centres of cells ``(rows, cols)``."""
        cx, cy = self.level0_cell_px
        x = np.floor((np.asarray(cols) + 0.5) * cx).astype(np.int64)
        y = np.floor((np.asarray(rows) + 0.5) * cy).astype(np.int64)
        return np.stack([x, y], axis=1)


def heatmap_grid(
    level_wh: tuple[int, int],
    level0_wh: tuple[int, int],
    read_px: int,
    read_stride_px: int,
) -> HeatmapGrid:
    """The heatmap of a patch grid of ``read_px`` patches every ``read_stride_px`` level pixels."""
    level_w, level_h = level_wh
    cols = max(1, -(-level_w // read_stride_px))
    rows = max(1, -(-level_h // read_stride_px))
    scale_x, scale_y = level0_wh[0] / level_w, level0_wh[1] / level_h
    return HeatmapGrid(
        shape=(rows, cols),
        level0_cell_px=(read_stride_px * scale_x, read_stride_px * scale_y),
        cells_per_patch=max(1, round(read_px / read_stride_px)),
    )


class HeatmapAccumulator:
    """Sums and counts of patch probabilities per cell; :meth:`heatmap` gives the means."""

    def __init__(self, grid: HeatmapGrid):
        self.grid = grid
        self._sum = np.zeros(grid.shape, dtype=np.float64)
        self._count = np.zeros(grid.shape, dtype=np.int32)

    def add(self, grid_ij: np.ndarray, probabilities: np.ndarray) -> None:
        """Add ``(N,)`` probabilities of patches at ``(N, 2)`` grid indices (column, row)."""
        grid_ij = np.asarray(grid_ij, dtype=np.int64).reshape(-1, 2)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        rows_total, cols_total = self.grid.shape
        k = self.grid.cells_per_patch
        for dy in range(k):
            for dx in range(k):
                cols = grid_ij[:, 0] + dx
                rows = grid_ij[:, 1] + dy
                inside = (cols < cols_total) & (rows < rows_total)
                np.add.at(self._sum, (rows[inside], cols[inside]), probabilities[inside])
                np.add.at(self._count, (rows[inside], cols[inside]), 1)

    @property
    def covered(self) -> np.ndarray:
        """``(rows, cols)`` bool: cells covered by at least one predicted patch."""
        return self._count > 0

    def heatmap(self) -> np.ndarray:
        """``(rows, cols)`` float32 mean probability per cell, 0 where no patch was predicted."""
        out = np.zeros(self.grid.shape, dtype=np.float32)
        covered = self._count > 0
        out[covered] = self._sum[covered] / self._count[covered]
        return out


@dataclass(frozen=True)
class Detections:
    """Lesion candidates: ``(N,)`` confidences and ``(N, 2)`` int64 level-0 x, y, best first."""

    confidence: np.ndarray
    level0_xy: np.ndarray
    area_cells: np.ndarray

    def __len__(self) -> int:
        return len(self.confidence)


def detect_lesions(heatmap: np.ndarray, grid: HeatmapGrid, threshold: float) -> Detections:
    """One detection per 8-connected region of cells with probability >= ``threshold``.

    Its confidence is the region's highest probability and its position the
    centre of that cell (always on the region, unlike a centroid of a
    curved lesion), so it lands on the lesion the region covers.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"Expected a detection threshold in (0, 1). Received: {threshold}")
    regions = measure.label(heatmap >= threshold, connectivity=2)
    n = int(regions.max())
    if n == 0:
        empty = np.zeros(0, dtype=np.float64)
        return Detections(empty, np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))
    flat = regions.ravel()
    values = heatmap.ravel().astype(np.float64)
    # Highest cell of each region: sort by (region, value) and take each region's last.
    order = np.lexsort((values, flat))
    ends = np.searchsorted(flat[order], np.arange(1, n + 1), side="right") - 1
    peak = order[ends]
    rows, cols = np.unravel_index(peak, heatmap.shape)
    confidence = values[peak]
    area = np.bincount(flat, minlength=n + 1)[1:]
    best = np.argsort(-confidence, kind="stable")
    return Detections(
        confidence[best], grid.cell_centers_level0(rows, cols)[best], area[best].astype(np.int64)
    )


def detect_local_maxima(
    heatmap: np.ndarray, grid: HeatmapGrid, threshold: float, min_distance_level0_px: float
) -> Detections:
    """Detections by non-maximum suppression: maxima >= ``threshold``, ``min_distance`` apart.

    Liu et al. 2017's procedure: report the heatmap's highest cell, set
    every cell within the distance of it aside, and repeat while a cell at
    or above ``threshold`` remains (ties in row-major order; distances
    between cell centres in level-0 pixels, Euclidean). Two lesions whose
    regions touch are two detections when their peaks are far enough apart,
    where :func:`detect_lesions` gives one; a region wider than the distance
    gives several. ``area_cells`` is the size of the 8-connected region above
    ``threshold`` that holds each detection.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"Expected a detection threshold in (0, 1). Received: {threshold}")
    if min_distance_level0_px < 0:
        raise ValueError(
            f"Expected a minimum distance >= 0. Received: min_distance_level0_px="
            f"{min_distance_level0_px}"
        )
    values = heatmap.astype(np.float64)
    rows, cols = np.nonzero(values >= threshold)
    order = np.lexsort((cols, rows, -values[rows, cols]))  # highest first, then row-major
    rows, cols = rows[order], cols[order]
    centers = grid.cell_centers_level0(rows, cols)
    kept: list[int] = []
    for i in range(len(rows)):
        if kept and np.hypot(*(centers[kept] - centers[i]).T).min() < min_distance_level0_px:
            continue  # within the distance of a higher detection: suppressed
        kept.append(i)
    rows, cols = rows[kept], cols[kept]
    regions = measure.label(values >= threshold, connectivity=2)
    area = np.bincount(regions.ravel(), minlength=int(regions.max()) + 1)
    return Detections(
        values[rows, cols],
        centers[kept].reshape(-1, 2),
        area[regions[rows, cols]].astype(np.int64),
    )


def slide_score(heatmap: np.ndarray) -> float:
    """The slide's tumor score: its highest cell (0 for a slide with no predicted patch)."""
    return float(heatmap.max(initial=0.0))


#: Probabilities below this are fully transparent in the ``tumor`` colour map.
VISIBLE_FROM = 0.1
#: The most a heatmap colour covers the tissue (alpha): the tissue always shows through.
MAX_ALPHA = 0.6
#: Colour maps of heatmap tiles, PNGs and overlays, as ``(probability, (r, g, b), alpha)`` stops:
#: ``tumor`` (default) is clear below :data:`VISIBLE_FROM`, then amber to saturated red;
#: ``redgreen`` is the classic green for normal to red for tumor over every predicted cell
#: (a cell no patch covered holds 0 and stays clear).
COLOR_MAPS: dict[str, tuple[tuple[float, tuple[int, int, int], float], ...]] = {
    "tumor": (
        (VISIBLE_FROM, (255, 200, 0), 0.15),
        (0.5, (255, 100, 0), 0.45),
        (1.0, (220, 0, 0), MAX_ALPHA),
    ),
    "redgreen": (
        (0.0, (0, 170, 0), 0.4),
        (0.5, (235, 200, 0), 0.45),
        (1.0, (220, 0, 0), MAX_ALPHA),
    ),
}
DEFAULT_COLOR_MAP = "tumor"


def colorize(heatmap: np.ndarray, color_map: str = DEFAULT_COLOR_MAP) -> np.ndarray:
    """``(h, w, 4)`` uint8 RGBA of an ``(h, w)`` probability map (0-1), in ``color_map``.

    Colours and alpha are interpolated between the map's stops (see
    :data:`COLOR_MAPS`); below the first stop, and where the value is 0 (no
    predicted patch), the pixel is transparent. Alpha never exceeds
    :data:`MAX_ALPHA`, so the tissue stays visible under the highest
    probabilities.
    """
    stops = COLOR_MAPS[color_map]
    at = np.array([s[0] for s in stops], dtype=np.float32)
    p = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    rgba = np.empty((*p.shape, 4), dtype=np.uint8)
    for channel in range(3):
        values = np.array([s[1][channel] for s in stops], dtype=np.float32)
        rgba[..., channel] = np.rint(np.interp(p, at, values))
    alpha = np.interp(p, at, np.array([s[2] for s in stops], dtype=np.float32))
    rgba[..., 3] = np.rint(alpha * 255)
    visible = (p >= at[0]) & (p > 0)
    # Clear pixels are (0, 0, 0, 0): a drawer that blends as if premultiplied (OpenSeadragon's
    # WebGL one) would otherwise add their colour to the slide.
    rgba[~visible] = 0
    return rgba


def heatmap_image(
    heatmap: np.ndarray,
    grid: HeatmapGrid,
    level0_wh: tuple[int, int],
    out_wh: tuple[int, int],
    color_map: str = DEFAULT_COLOR_MAP,
) -> np.ndarray:
    """``(h, w, 4)`` uint8 RGBA of the whole slide's heatmap at ``out_wh`` (e.g. its thumbnail's).

    Each pixel takes the cell under its centre in level-0 coordinates, so it
    lies exactly over an image of the slide of the same size.
    """
    level0_box = (0.0, 0.0, float(level0_wh[0]), float(level0_wh[1]))
    return colorize(sample_level0(heatmap, grid.level0_cell_px, level0_box, out_wh), color_map)


def overlay(rgb: np.ndarray, rgba: np.ndarray, *, opacity: float = 1.0) -> np.ndarray:
    """Blend an RGBA heatmap image over the ``(h, w, 3)`` uint8 image of the same size.

    At the default opacity the result is what the viewer shows at its default.
    """
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0 * opacity
    out = rgb.astype(np.float32) * (1 - alpha) + rgba[..., :3].astype(np.float32) * alpha
    return np.rint(out).astype(np.uint8)


def sample_level0(
    heatmap: np.ndarray,
    level0_cell_px: tuple[float, float],
    level0_box: tuple[float, float, float, float],
    out_wh: tuple[int, int],
) -> np.ndarray:
    """``(h, w)`` float32 heatmap values under each pixel of an image of ``level0_box``.

    Each output pixel takes the cell under its centre (level-0 coordinates);
    outside the heatmap is 0. Used to draw heatmap tiles exactly over slide tiles.
    """
    x0, y0, x1, y1 = level0_box
    w, h = out_wh
    cx, cy = level0_cell_px
    cols = np.floor((x0 + (np.arange(w) + 0.5) * ((x1 - x0) / w)) / cx).astype(np.int64)
    rows = np.floor((y0 + (np.arange(h) + 0.5) * ((y1 - y0) / h)) / cy).astype(np.int64)
    col_ok = (cols >= 0) & (cols < heatmap.shape[1])
    row_ok = (rows >= 0) & (rows < heatmap.shape[0])
    out = np.zeros((h, w), dtype=np.float32)
    if col_ok.any() and row_ok.any():
        inner = heatmap[rows[row_ok]][:, cols[col_ok]]
        out[np.ix_(row_ok, col_ok)] = inner
    return out
