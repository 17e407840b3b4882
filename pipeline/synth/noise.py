"""Stateless, coordinate-hashed randomness.

Every pixel value of a synthetic slide is a pure function of its level-0
coordinates and the slide seed, so any region renders identically whatever
tile grid asks for it, and the same seed gives byte-identical slides.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)


def hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Return uniform float64 in [0, 1) per integer lattice point ``(ix, iy)`` (broadcast)."""
    with np.errstate(over="ignore"):
        x = np.asarray(ix).astype(np.uint64) * _M1
        x = x ^ (np.asarray(iy).astype(np.uint64) * _M2)
        x = x ^ (np.uint64(key & 0xFFFFFFFFFFFFFFFF) * _M3)
        # splitmix64 finaliser
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def value_noise(xs: np.ndarray, ys: np.ndarray, spacing_px: float, key: int) -> np.ndarray:
    """Smooth noise in [0, 1) on the pixel grid ``ys x xs`` (level-0 coordinates).

    Lattice values every ``spacing_px`` pixels, blended with a smoothstep:
    returns ``(len(ys), len(xs))`` float64.
    """
    fx, fy = xs / spacing_px, ys / spacing_px
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - x0, fy - y0
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    lx0, ly0 = x0.min(), y0.min()
    gx = np.arange(lx0, x0.max() + 2)
    gy = np.arange(ly0, y0.max() + 2)
    lattice = hash_uniform(gx[None, :], gy[:, None], key)
    ix, iy = (x0 - lx0)[None, :], (y0 - ly0)[:, None]
    v00, v10 = lattice[iy, ix], lattice[iy, ix + 1]
    v01, v11 = lattice[iy + 1, ix], lattice[iy + 1, ix + 1]
    tx, ty = tx[None, :], ty[:, None]
    return (v00 * (1 - tx) + v10 * tx) * (1 - ty) + (v01 * (1 - tx) + v11 * tx) * ty
