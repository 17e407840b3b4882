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
information).

Pen ink is not stain, yet a pen mark over more than 1% of the fitted pixels
becomes the extreme angle Macenko's method takes for a stain (and shifts
Reinhard's statistics). Every fit therefore leaves out the pixels no mix of
haematoxylin and eosin can make (:func:`ink_pixels`): green ink (both stains
absorb green more than red or blue), blue ink (blue absorbed far less than red
and green) and black ink (neutral grey). A blue-violet haematoxylin's darkest nuclei
pass the blue test too, so blue pixels count as ink only when they lie more
than a few degrees from the slide's haematoxylin, fitted without them (or,
when they are most of the tissue, with them). Ink at a mark's edges and faint
streaks is fainter than those tests; in patches (``(N, H, W, 3)``), a patch
whose tissue is at least :data:`INK_PATCH_FRACTION` ink is left out whole.
Red ink looks like eosin to these tests and stays. The fit records the share
of tissue pixels left out (``ink_fraction``).

Unmixing needs two distinct stains. Through stain vectors ``a`` degrees
apart, noise in a pixel's optical density changes its two concentrations by
up to ``1 / (sqrt(2) sin(a / 2))`` times as much; recombined with target
vectors ``t`` degrees apart, it reaches the output amplified about
``sin(t / 2) / sin(a / 2)`` times (4x for a slide fitted at 10° mapped onto
a target at 40°). Fits that narrow come from weakly separated stains (some
labs' magenta-toned H&E), pulled narrower still by JPEG noise. A slide's
Macenko fit under :data:`MIN_STAIN_ANGLE_DEG` is therefore unmixed with the
*target's* vectors instead (its optical density projected on the target's
stain plane, each stain's intensity still matched), and says so in the fit
(``fallback``); a target that narrow is refused.
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
#: Haematoxylin and eosin closer than this are not unmixed with the slide's own vectors.
#: Typical H&E vectors lie 35-45° apart; a slide at 20° mapped onto them doubles its noise.
MIN_STAIN_ANGLE_DEG = 20.0
#: Blue ink: blue's OD under these shares of red's and green's (haematoxylin: ~0.4 and ~0.6,
#: a blue-violet one's darkest nuclei down to ~0.3 and ~0.35; blue ink over tissue ~0.3).
INK_BLUE_OF_RED = 0.5
INK_BLUE_OF_GREEN = 0.4
#: Blue pixels further than this from the slide's haematoxylin are ink (the blue-violet
#: haematoxylin's darkest nuclei lie ~6° from it, blue ink over a magenta-toned one ~30°).
INK_OFF_STAIN_DEG = 8.0
#: Black ink: OD within this angle of neutral grey (haematoxylin lies 15-19° from it).
INK_GREY_DEG = 6.0
#: A patch whose tissue pixels are at least this share ink is left out of a fit whole.
INK_PATCH_FRACTION = 0.1
#: Patches a slide's stain is fitted to, spread evenly over its patches (training, inference,
#: mining alike).
SAMPLE_PATCHES = 64


def sample_rows(n: int, count: int = SAMPLE_PATCHES) -> np.ndarray:
    """``(min(count, n),)`` int64 indices spread evenly over ``n`` patches, first and last kept."""
    return np.unique(np.linspace(0, n - 1, num=min(count, n)).astype(np.int64))


def optical_density(rgb: np.ndarray, light: float = 255.0) -> np.ndarray:
    """Return ``(..., 3)`` float64 optical density of ``(..., 3)`` uint8 RGB."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / light)


def ink_pixels(
    od: np.ndarray, haematoxylin: np.ndarray | None = None, *, blue: bool = True
) -> np.ndarray:
    """``(N,)`` bool: pixels of ``(N, 3)`` optical density that no mix of H&E makes (pen ink).

    Green ink absorbs green least, which neither stain does; black ink lies
    within :data:`INK_GREY_DEG` of neutral grey; blue ink absorbs blue under
    :data:`INK_BLUE_OF_RED` of red and :data:`INK_BLUE_OF_GREEN` of green. A
    blue-violet haematoxylin's darkest nuclei can do that too: given the
    slide's ``haematoxylin`` (``(3,)`` unit OD), a blue pixel is ink only
    more than :data:`INK_OFF_STAIN_DEG` from it. ``blue=False``: no blue test.
    """
    red, green, od_blue = od[:, 0], od[:, 1], od[:, 2]
    norm = np.maximum(np.linalg.norm(od, axis=1), 1e-12)
    ink = (green < red) & (green < od_blue)  # green
    ink |= od.sum(axis=1) / (np.sqrt(3.0) * norm) > np.cos(np.radians(INK_GREY_DEG))  # black
    if blue:
        blue_ink = (od_blue < INK_BLUE_OF_RED * red) & (od_blue < INK_BLUE_OF_GREEN * green)
        if haematoxylin is not None:
            blue_ink &= od @ haematoxylin / norm < np.cos(np.radians(INK_OFF_STAIN_DEG))
        ink |= blue_ink
    return ink


def stained_pixels(images: np.ndarray, *, without_ink: bool = True) -> tuple[np.ndarray, float]:
    """``(N, 3)`` uint8 RGB of ``images``' stained tissue pixels, and the share left out as ink.

    ``images`` is ``(..., 3)`` uint8: ``(N, H, W, 3)`` patches (a patch at least
    :data:`INK_PATCH_FRACTION` ink is left out whole) or one image. Tissue:
    optical density above :data:`OD_TISSUE` in every channel.
    ``without_ink=False``: every tissue pixel (fits made before ink was left out).
    """
    images = np.asarray(images, dtype=np.uint8)
    pixels = images.reshape(-1, 3)
    od = optical_density(pixels)
    tissue = (od > OD_TISSUE).all(axis=1)
    if not without_ink or not tissue.any():
        return pixels[tissue], 0.0
    # The haematoxylin to judge blue pixels by: fitted without them, unless that leaves out
    # most of the tissue (then the blue test describes the haematoxylin itself).
    keep = _outside_ink(images.shape, od, tissue, None, blue=True)
    if keep.sum() < max(MIN_TISSUE_PIXELS, tissue.sum() / 2):
        keep = _outside_ink(images.shape, od, tissue, None, blue=False)
    if keep.sum() >= MIN_TISSUE_PIXELS:
        haematoxylin, _ = macenko_vectors(pixels[keep])
        keep = _outside_ink(images.shape, od, tissue, haematoxylin)
    return pixels[keep], float(1.0 - keep.sum() / tissue.sum())


def _outside_ink(
    shape: tuple[int, ...],
    od: np.ndarray,
    tissue: np.ndarray,
    haematoxylin: np.ndarray | None,
    blue: bool = True,
) -> np.ndarray:
    """``(N,)`` bool: tissue pixels not ink, nor in a patch (of ``shape``) that is mostly ink."""
    ink = np.zeros(len(od), dtype=bool)
    ink[tissue] = ink_pixels(od[tissue], haematoxylin, blue=blue)
    keep = tissue & ~ink
    if len(shape) == 4 and shape[0]:
        per_patch = shape[1] * shape[2]
        patch_tissue = tissue.reshape(shape[0], per_patch).sum(axis=1)
        patch_ink = ink.reshape(shape[0], per_patch).sum(axis=1)
        inky = patch_ink >= INK_PATCH_FRACTION * np.maximum(patch_tissue, 1)
        keep &= ~np.repeat(inky, per_patch)
    return keep


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


def fit_stain(
    images: np.ndarray, method: str, *, target: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``method`` fit of ``(..., 3)`` uint8 RGB pixels (patches or a region), as a dict.

    Pen ink is left out (:func:`stained_pixels`), except for a slide's fit
    against a ``target`` fitted before ink was (no ``ink_fraction``), as its
    model was trained.

    ``target``: the fit the pixels will be mapped onto, for a slide's own
    (source) fit. A Macenko fit whose stain vectors are under
    :data:`MIN_STAIN_ANGLE_DEG` apart then uses the target's vectors and
    records ``fitted_stains``, ``angle_deg`` and ``fallback``; without a
    target (fitting the target itself) it is refused. A target fitted before
    this guard (no ``angle_deg``) keeps the slide's own vectors, as its
    model was trained.

    Raises ``ValueError`` for an unknown method, too few tissue pixels, or
    stains too close to unmix without a target.
    """
    if method not in METHODS:
        raise ValueError(f"Expected a method in {METHODS}. Received: method={method!r}")
    if target is not None and target["method"] != method:
        raise ValueError(f"Expected a {method} target. Got a {target['method']} one instead.")
    without_ink = target is None or "ink_fraction" in target
    pixels, ink_fraction = stained_pixels(images, without_ink=without_ink)
    if len(pixels) < MIN_TISSUE_PIXELS:
        raise ValueError(
            f"Expected at least {MIN_TISSUE_PIXELS} stained pixels"
            + (" outside pen ink" if ink_fraction else "")
            + f" to fit the stain. Got {len(pixels)} instead."
        )
    provenance = {"ink_fraction": round(ink_fraction, 4)} if without_ink else {}
    if method == "reinhard":
        lab = _rgb_to_lab(pixels)
        return {
            "method": method,
            "mean": lab.mean(0).tolist(),
            "std": lab.std(0).tolist(),
            **provenance,
        }
    stains = np.stack(macenko_vectors(pixels))
    angle = angle_deg(stains[0], stains[1])
    fit: dict[str, Any] = {"method": method, "angle_deg": round(angle, 2), **provenance}
    guarded = target is None or "angle_deg" in target
    if angle < MIN_STAIN_ANGLE_DEG and guarded:
        if target is None:
            raise ValueError(
                f"Expected haematoxylin and eosin at least {MIN_STAIN_ANGLE_DEG:g}° apart to "
                f"unmix them. Got {angle:.1f}° instead; choose a reference with distinct "
                "stains, or reinhard"
            )
        fit["fitted_stains"] = stains.tolist()
        fit["fallback"] = (
            f"stain vectors {angle:.1f}° apart (under {MIN_STAIN_ANGLE_DEG:g}°): "
            "unmixed with the target's vectors"
        )
        stains = np.asarray(target["stains"], dtype=np.float64)
    concentrations = np.linalg.lstsq(stains.T, optical_density(pixels).T, rcond=None)[0]
    maxima = np.percentile(concentrations, CONCENTRATION_PERCENTILE, axis=1)
    return {**fit, "stains": stains.tolist(), "max_concentrations": maxima.tolist()}


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
