"""Stain vectors of H&E images, estimated with Macenko's method.

Macenko et al., "A method for normalizing histology slides for quantitative
analysis", ISBI 2009: pixels are taken to optical density, the transparent
ones dropped, and the two stain vectors are the extreme directions (robust
percentiles of the angle) in the plane of the two largest principal axes.
"""

from __future__ import annotations

import numpy as np


def optical_density(rgb: np.ndarray, light: float = 255.0) -> np.ndarray:
    """Return ``(..., 3)`` float64 optical density of ``(..., 3)`` uint8 RGB."""
    return -np.log((rgb.astype(np.float64) + 1.0) / light)


def macenko_vectors(
    rgb: np.ndarray, *, min_od: float = 0.15, percentile: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return unit optical-density vectors ``(haematoxylin, eosin)``, each ``(3,)`` float64.

    ``rgb`` is ``(..., 3)`` uint8 of stained tissue (background is dropped:
    pixels with optical density under ``min_od`` in any channel). Haematoxylin
    is the vector that absorbs more red.
    """
    od = optical_density(rgb).reshape(-1, 3)
    od = od[(od > min_od).all(axis=1)]
    if len(od) < 100:
        raise ValueError(
            f"Expected at least 100 stained pixels to estimate stains. Got {len(od)} instead."
        )
    _, axes = np.linalg.eigh(np.cov(od.T))
    plane = axes[:, 1:3]  # the two largest principal axes
    projected = od @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, [percentile, 100.0 - percentile])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    first, second = first * np.sign(first.sum()), second * np.sign(second.sum())
    h_od, e_od = (first, second) if first[0] > second[0] else (second, first)
    return h_od / np.linalg.norm(h_od), e_od / np.linalg.norm(e_od)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees."""
    cosine = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
