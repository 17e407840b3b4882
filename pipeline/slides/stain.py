"""Stain normalisation of H&E patches: Reinhard and Macenko, fitted per slide, mapped to a target.

Slides from two centres differ in stain more than in anything a model
should learn. Both methods fit a few numbers to a slide's tissue pixels
(the *source*) and map its patches onto those of a *target* (a reference
slide, or the training cohort's pooled patches), the same way in training
and inference:

- **Reinhard** (Reinhard et al. 2001): the mean and standard deviation of
  each channel in CIE L*a*b*; a pixel's channels are standardised by the
  source's and rescaled to the target's.
- **Macenko** (Macenko et al. 2009): the two stain vectors in optical density
  (OD), from the extreme angles (1st and 99th percentiles) of the tissue OD
  projected on its two main axes, and each stain's 99th-percentile
  concentration; a pixel's concentrations under the source's vectors are
  rescaled to the target's maxima and recombined with the target's vectors.

Tissue pixels are those whose OD exceeds :data:`OD_TISSUE` in every channel
(Macenko's beta: background and barely stained pixels carry no stain
information). Pure functions: arrays in, arrays out; a fit is a small
JSON-able dict. :func:`macenko_vectors` alone also serves the synthetic
cohorts' tests (their two centres' stains).
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("reinhard", "macenko")
#: A pixel is tissue when its optical density is above this in every channel.
OD_TISSUE = 0.15
#: Percentiles of the stain angles (Macenko's alpha) and of the concentrations.
ANGLE_PERCENTILE = 1.0
CONCENTRATION_PERCENTILE = 99.0
#: Fewer tissue pixels than this: a fit is refused rather than guessed.
MIN_TISSUE_PIXELS = 100
#: Patches a slide's stain is fitted to, spread evenly over its patches (training, inference,
#: mining alike).
SAMPLE_PATCHES = 64


def optical_density(rgb: np.ndarray, light: float = 255.0) -> np.ndarray:
    """Return ``(..., 3)`` float64 optical density of ``(..., 3)`` uint8 RGB."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / light)


def macenko_vectors(
    rgb: np.ndarray, *, min_od: float = OD_TISSUE, percentile: float = ANGLE_PERCENTILE
) -> tuple[np.ndarray, np.ndarray]:
    """Return unit optical-density vectors ``(haematoxylin, eosin)``, each ``(3,)`` float64.

    ``rgb`` is ``(..., 3)`` uint8 of stained tissue (background is dropped:
    pixels with optical density under ``min_od`` in any channel). Haematoxylin
    is the vector that absorbs more red.
    """
    od = optical_density(rgb).reshape(-1, 3)
    od = od[(od > min_od).all(axis=1)]
    if len(od) < MIN_TISSUE_PIXELS:
        raise ValueError(
            f"Expected at least {MIN_TISSUE_PIXELS} stained pixels to estimate stains. "
            f"Got {len(od)} instead."
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


def fit_stain(images: np.ndarray, method: str) -> dict[str, Any]:
    """The ``method`` fit of ``(..., 3)`` uint8 RGB pixels (patches or a region), as a dict.

    Raises ``ValueError`` for an unknown method or too few tissue pixels.
    """
    if method not in METHODS:
        raise ValueError(f"Expected a method in {METHODS}. Received: method={method!r}")
    pixels = np.asarray(images, dtype=np.uint8).reshape(-1, 3)
    od = optical_density(pixels)
    tissue = (od > OD_TISSUE).all(axis=1)
    if tissue.sum() < MIN_TISSUE_PIXELS:
        raise ValueError(
            f"Expected at least {MIN_TISSUE_PIXELS} stained pixels to fit the stain. "
            f"Got {int(tissue.sum())} instead."
        )
    if method == "reinhard":
        lab = _rgb_to_lab(pixels[tissue])
        return {"method": method, "mean": lab.mean(0).tolist(), "std": lab.std(0).tolist()}
    else:
        stains = np.stack(macenko_vectors(pixels[tissue]))
        concentrations = np.linalg.lstsq(stains.T, od[tissue].T, rcond=None)[0]
        maxima = np.percentile(concentrations, CONCENTRATION_PERCENTILE, axis=1)
        return {"method": method, "stains": stains.tolist(), "max_concentrations": maxima.tolist()}


def normalize(images: np.ndarray, source: dict[str, Any], target: dict[str, Any]) -> np.ndarray:
    """``images`` (``(..., 3)`` uint8) mapped from the ``source`` fit to the ``target`` fit."""
    images = np.asarray(images, dtype=np.uint8)
    if source["method"] != target["method"]:
        raise ValueError(
            f"Expected fits of one method. Got {source['method']} and {target['method']} instead."
        )
    if source["method"] == "reinhard":
        lab = _rgb_to_lab(images.reshape(-1, 3))
        mean_s, std_s = np.asarray(source["mean"]), np.maximum(np.asarray(source["std"]), 1e-6)
        lab = (lab - mean_s) / std_s * np.asarray(target["std"]) + np.asarray(target["mean"])
        out = _lab_to_rgb(lab)
    else:
        od = optical_density(images.reshape(-1, 3))
        stains_s, stains_t = np.asarray(source["stains"]), np.asarray(target["stains"])
        concentrations = np.linalg.lstsq(stains_s.T, od.T, rcond=None)[0]  # (2, N)
        scale = np.asarray(target["max_concentrations"]) / np.maximum(
            np.asarray(source["max_concentrations"]), 1e-6
        )
        out = 255.0 * np.exp(-(stains_t.T @ (concentrations * scale[:, None])).T) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(images.shape)


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb

    return lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3) * 255.0
