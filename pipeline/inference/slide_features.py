"""Features of a slide's tumor heatmap, for a slide-level classifier (HMS-MIT, CAMELYON16).

Wang et al. 2016 ("Deep learning for identifying metastatic breast cancer",
the CAMELYON16 winners) scored a slide not by its heatmap's maximum but by a
random forest on features of the heatmap thresholded at two probabilities:
the tumor region's share of the tissue, its largest region's area, longest
axis and solidity, the mean probability there. These are those features.

Pure functions: a heatmap array in, a feature vector out. Tissue is the
cells with a prediction (probability above 0: the heatmap holds 0 where no
patch was predicted). Regions are 8-connected. Areas are in mm² and
lengths in mm from the cell's size in µm; where the µm/px is unknown the
caller passes a cell of 1000 µm, so that they count cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage import measure

#: Per threshold, in this order (each name gets a ``_t50``-style suffix).
PER_THRESHOLD = (
    "tumor_fraction",  # cells >= t over tissue cells
    "tumor_area_mm2",  # every cell >= t
    "regions",  # 8-connected regions of cells >= t
    "largest_area_mm2",  # the largest region's area
    "largest_major_axis_mm",  # its major axis (the ellipse of the same second moments)
    "largest_solidity",  # its area over its convex hull's
    "largest_mean_probability",  # the mean probability of its cells
)
#: Of the whole heatmap, after the per-threshold features.
GLOBAL = ("max_probability", "mean_probability", "tissue_area_mm2")


def feature_names(thresholds: Sequence[float]) -> list[str]:
    """The features' names, in the order :func:`slide_features` returns them."""
    names = [f"{name}_t{round(t * 100):02d}" for t in thresholds for name in PER_THRESHOLD]
    return names + list(GLOBAL)


def slide_features(
    heatmap: np.ndarray, cell_um: tuple[float, float], thresholds: Sequence[float]
) -> np.ndarray:
    """``(len(feature_names(thresholds)),)`` float64 features of a ``(rows, cols)`` heatmap.

    ``cell_um`` is a cell's width and height in µm. A slide without tissue,
    or without a cell at a threshold, has 0 for that threshold's features.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"Expected a (rows, cols) heatmap. Got shape {heatmap.shape} instead.")
    cell_w_mm, cell_h_mm = cell_um[0] / 1000, cell_um[1] / 1000
    cell_mm2 = cell_w_mm * cell_h_mm
    tissue = heatmap > 0
    tissue_cells = int(tissue.sum())
    features: list[float] = []
    for threshold in thresholds:
        above = heatmap >= threshold
        cells = int(above.sum())
        labels = measure.label(above, connectivity=2)
        regions = measure.regionprops(labels, intensity_image=heatmap)
        row = [cells / tissue_cells if tissue_cells else 0.0, cells * cell_mm2, len(regions)]
        if regions:
            largest = max(regions, key=lambda r: (r.area, -r.label))  # first of equal areas
            row += [
                largest.area * cell_mm2,
                _major_axis_mm(largest.coords, cell_w_mm, cell_h_mm),
                float(largest.solidity),
                float(largest.intensity_mean),
            ]
        else:
            row += [0.0, 0.0, 0.0, 0.0]
        features += row
    features += [
        float(heatmap.max(initial=0.0)),
        float(heatmap[tissue].mean()) if tissue_cells else 0.0,
        tissue_cells * cell_mm2,
    ]
    return np.asarray(features, dtype=np.float64)


def _major_axis_mm(coords: np.ndarray, cell_w_mm: float, cell_h_mm: float) -> float:
    """Major axis in mm of the ellipse with the region's second moments.

    Like scikit-image's ``axis_major_length`` (4 sqrt of the largest
    eigenvalue of the cell centres' covariance), with two changes: in mm along
    each axis, so that non-square cells are measured right, and each cell
    counted as a filled rectangle (its own spread, width²/12, added), so that
    one cell has an axis and a line of cells L long has 2 L / sqrt(3), as a
    filled rod does.
    """
    y = coords[:, 0] * cell_h_mm
    x = coords[:, 1] * cell_w_mm
    cov = np.cov(np.stack([x, y]), bias=True) if len(coords) > 1 else np.zeros((2, 2))
    cov = cov + np.diag([cell_w_mm**2 / 12, cell_h_mm**2 / 12])
    return float(4 * np.sqrt(np.linalg.eigvalsh(cov)[-1]))
