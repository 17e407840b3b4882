"""Tumor regions: the heatmap's outlines at a probability threshold, as polygons with holes.

The heatmap is sampled at its cells' centres (see :mod:`pipeline.inference.heatmap`);
a region's outline is that sampled field's iso-line at the threshold (marching
squares, interpolated between cell centres), so it passes where the
probability crosses the threshold, not along cell edges. Outlines never cross
one another; holes are kept; a region inside another's hole is a region of
its own. Each outline is then simplified (Douglas-Peucker that keeps topology)
so it moves no more than ``tolerance_px`` (measured); one too small to simplify
without vanishing is kept as it is, so no region is lost. Every polygon is valid.

Pure: arrays in, :class:`Region` out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from skimage import measure

from pipeline.inference.heatmap import HeatmapGrid

#: How far simplifying may move an outline by default (µm): ``wsiflow export``, the viewer.
DEFAULT_TOLERANCE_UM = 5.0


@dataclass(frozen=True)
class Region:
    """One tumor region: ``exterior`` ``(N, 2)`` and ``holes`` in level-0 pixels (x, y).

    Rings are closed (first vertex repeated last); the exterior winds
    counter-clockwise and holes clockwise in x-right, y-up axes (GeoJSON's rule).
    """

    threshold: float
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]
    area_level0_px2: float
    max_probability: float
    mean_probability: float  # over the heatmap cells whose centres lie inside

    def area_mm2(self, mpp_xy: tuple[float, float]) -> float:
        return self.area_level0_px2 * mpp_xy[0] * mpp_xy[1] * 1e-6

    @property
    def polygon(self) -> Polygon:
        return Polygon(self.exterior, self.holes)


def tumor_regions(
    heatmap: np.ndarray, grid: HeatmapGrid, threshold: float, *, tolerance_px: float
) -> list[Region]:
    """Regions where the ``(rows, cols)`` heatmap reaches ``threshold`` (0 < threshold <= 1).

    Sorted by decreasing area. ``tolerance_px``: how far (level-0 px) simplification may move
    an outline; 0 keeps every marching-squares vertex.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"Expected a threshold in (0, 1]. Received: threshold={threshold}")
    if tolerance_px < 0:
        raise ValueError(f"Expected tolerance_px >= 0. Received: tolerance_px={tolerance_px}")
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    if values.shape != grid.shape:
        raise ValueError(f"Expected a heatmap of shape {grid.shape}. Got {values.shape} instead.")
    if not (values >= threshold).any():
        return []
    # Padding below the threshold closes every contour; 'high' joins diagonal neighbours
    # above it, so a region never pinches into two at a single point.
    padded = np.pad(values, 1, constant_values=0.0)
    level = np.nextafter(threshold, 0.0)  # cells exactly at the threshold are inside
    cx, cy = grid.level0_cell_px
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in measure.find_contours(
        padded, level, fully_connected="high", positive_orientation="high"
    ):
        # (row, col) in the padded array -> level-0 (x, y) of the cell-centre samples.
        ring = np.stack([(contour[:, 1] - 0.5) * cx, (contour[:, 0] - 0.5) * cy], axis=1)
        (shells if _signed_area(contour) < 0 else holes).append(ring)
    regions = []
    for exact in _assemble(shells, holes):
        cells = _cells_inside(exact, values, cx, cy)
        part = orient(_simplified(exact, tolerance_px), sign=1.0)
        regions.append(
            Region(
                threshold=float(threshold),
                exterior=np.asarray(part.exterior.coords, dtype=np.float64),
                holes=tuple(np.asarray(r.coords, dtype=np.float64) for r in part.interiors),
                area_level0_px2=float(part.area),
                max_probability=float(cells.max()),
                mean_probability=float(cells.mean()),
            )
        )
    regions.sort(key=lambda r: -r.area_level0_px2)
    return regions


def _cells_inside(polygon: Polygon, values: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """The heatmap values whose cell centres lie inside ``polygon`` (its bounding box only)."""
    x0, y0, x1, y1 = polygon.bounds
    c0, c1 = max(int(x0 // cx) - 1, 0), min(int(x1 // cx) + 2, values.shape[1])
    r0, r1 = max(int(y0 // cy) - 1, 0), min(int(y1 // cy) + 2, values.shape[0])
    rows, cols = np.mgrid[r0:r1, c0:c1]
    inside = shapely.contains_xy(polygon, (cols + 0.5) * cx, (rows + 0.5) * cy)
    return values[r0:r1, c0:c1][inside]


def _simplified(polygon: Polygon, tolerance_px: float) -> Polygon:
    """``polygon`` simplified so its outlines move at most ``tolerance_px``, and valid.

    GEOS's topology-preserving simplifier can move a ring's closing stretch
    further than asked, so each result is measured (densified Hausdorff
    distance) and redone at half the tolerance, twice, before the outline is
    kept as it is; so is one that would vanish.
    """
    if not polygon.is_valid:  # not expected of marching squares; never hand one on
        fixed = [g for g in getattr(shapely.make_valid(polygon), "geoms", []) if g.area > 0]
        polygon = max(fixed, key=lambda g: g.area) if fixed else polygon
    for attempt in (tolerance_px, tolerance_px / 2, tolerance_px / 4):
        if attempt <= 0:
            break
        simple = shapely.simplify(polygon, attempt, preserve_topology=True)
        if (
            isinstance(simple, Polygon)
            and not simple.is_empty
            and simple.is_valid
            and len(simple.interiors) == len(polygon.interiors)
            and shapely.hausdorff_distance(polygon.boundary, simple.boundary, densify=0.1)
            <= tolerance_px
        ):
            return simple
    return polygon


def _signed_area(contour: np.ndarray) -> float:
    """Shoelace area of a closed ``(N, 2)`` (row, col) contour, in (x=col, y=row) axes."""
    x, y = contour[:, 1], contour[:, 0]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _assemble(shells: list[np.ndarray], holes: list[np.ndarray]) -> list[Polygon]:
    """Give each hole to the smallest shell that contains it."""
    shell_polygons = [Polygon(s) for s in shells]
    order = sorted(range(len(shells)), key=lambda i: shell_polygons[i].area)
    owned: list[list[np.ndarray]] = [[] for _ in shells]
    for hole in holes:
        probe = shapely.Point(hole[0])
        for i in order:
            if shell_polygons[i].covers(probe):
                owned[i].append(hole)
                break
    return [Polygon(s, owned[i]) for i, s in enumerate(shells)]
