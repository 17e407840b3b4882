"""CAMELYON16 metrics: the lesion-level FROC of the official evaluation script, and slide AUC.

Follows ``Evaluation_FROC.py`` from the CAMELYON16 organisers step by step:

1. Evaluation mask at level 5 (downsample 32): tumor, grown by 75 µm in all
   (the script: a Euclidean distance transform of the non-tumor area, kept
   where the distance is below ``75 / (mpp * 32 * 2)`` pixels), holes filled,
   8-connected components labelled 1..n: the lesions.
2. Isolated tumor cells: lesions whose ``regionprops`` major axis length is
   below ``275 / (mpp * 32)`` pixels. Detections on them count neither way and
   they are not lesions to find.
3. A detection at level-0 ``(x, y)`` hits ``mask[y // 32, x // 32]``: label 0
   is a false positive; several hits on one lesion count once, at their
   highest confidence; on a normal slide every detection is a false positive.
4. FROC: for each distinct confidence, true positives and false positives at
   or above it; false positives per slide over all evaluated slides;
   sensitivity over all non-ITC lesions. The score is the mean sensitivity at
   1/4, 1/2, 1, 2, 4 and 8 false positives per slide, read from the curve by
   linear interpolation (``np.interp``, as the script does).

Two sets of rules (``rules``):

``"official"`` (the default) is the script to the last digit, quirks included:
the mask constants use 0.243 µm/px for every slide (:data:`OFFICIAL_MPP`,
whatever the slide's own resolution); a lesion's true-positive confidence is
kept as float32 while false-positive ones stay float64, so a hit and a miss
with the same printed confidence are two thresholds (and a threshold taken
from a false positive is rounded to float32 to count true positives); the
lowest distinct confidence is dropped (``all_probs[1:]``), which is the 0 of
a missed lesion or ITC when there is one and a real detection when there is
not; and a tumor slide whose mask holds no tumor still gets the distance
transform, whose corner region (SciPy's distance to a virtual edge) becomes
one ITC.

``"corrected"``: each slide's own µm/px, confidences in float64 (one
threshold per printed confidence), only a 0 dropped, an empty mask has no
lesion.

Pure functions: polygons, arrays and numbers in, arrays and numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage import measure

from pipeline.slides.annotations import Polygon
from pipeline.slides.masks import rasterize_tumor

#: The official score's operating points: average false positives per slide.
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: The level-0 µm/px the official script assumes for every slide's mask constants.
OFFICIAL_MPP = 0.243

Rules = Literal["official", "corrected"]
RULES: tuple[Rules, ...] = ("official", "corrected")


def tumor_mask(
    polygons: Sequence[Polygon], level0_wh: tuple[int, int], downsample: int
) -> np.ndarray:
    """Return the ``(ceil(h / d), ceil(w / d))`` bool tumor mask at ``downsample`` d.

    A pixel is tumor when its centre lies in a tumor outline and outside its
    holes and every exclusion (``_2``) outline.
    """
    width, height = level0_wh
    shape = (-(-height // downsample), -(-width // downsample))
    full = np.zeros(shape, dtype=bool)
    placed = rasterize_tumor(list(polygons), float(downsample), level0_wh)
    if placed is None:
        return full
    # The placed mask starts on a multiple of the downsample: it is a window of the frame.
    col0 = round(placed.origin_xy[0] / downsample)
    row0 = round(placed.origin_xy[1] / downsample)
    rows = min(placed.mask.shape[0], shape[0] - row0)
    cols = min(placed.mask.shape[1], shape[1] - col0)
    full[row0 : row0 + rows, col0 : col0 + cols] = placed.mask[:rows, :cols]
    return full


def evaluation_mask(
    tumor: np.ndarray,
    mpp: float,
    downsample: int,
    *,
    tumor_growth_um: float = 75.0,
    rules: Rules = "official",
) -> np.ndarray:
    """Label the lesions of a ``tumor`` mask at ``downsample`` as the official script does.

    Returns an int32 array of the same shape: 0 outside lesions, 1..n lesions.
    ``mpp`` is the level-0 µm per pixel the constants use. Under the official
    rules a mask without tumor still goes through the distance transform, as
    the script's does (one corner region); corrected, it has no lesion.
    """
    if rules == "corrected" and not tumor.any():
        return np.zeros(tumor.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(~tumor)
    threshold = tumor_growth_um / (mpp * downsample * 2)
    filled = ndimage.binary_fill_holes(distance < threshold)
    return measure.label(filled, connectivity=2).astype(np.int32)


def itc_labels(
    labels: np.ndarray, mpp: float, downsample: int, *, itc_major_axis_um: float = 275.0
) -> frozenset[int]:
    """Labels of lesions whose major axis is shorter than ``itc_major_axis_um``."""
    threshold = itc_major_axis_um / (mpp * downsample)
    return frozenset(
        int(region.label)
        for region in measure.regionprops(labels)
        if region.axis_major_length < threshold
    )


@dataclass(frozen=True)
class SlideHits:
    """One slide's detections scored against its lesions.

    ``fp_confidences``: confidences of false positives. ``tp_confidences``:
    one entry per lesion label (ITCs included, as in the script), the highest
    confidence of a detection on it or 0. ``lesions``: lesions to find (ITCs
    excluded). ``hit``: per detection, the lesion label it hit (0: none).
    """

    fp_confidences: np.ndarray
    tp_confidences: np.ndarray
    lesions: int
    itcs: int
    hit: np.ndarray


def score_detections(
    confidences: np.ndarray,
    level0_xy: np.ndarray,
    labels: np.ndarray | None,
    itcs: frozenset[int],
    downsample: int,
    *,
    rules: Rules = "official",
) -> SlideHits:
    """Score ``(N,)`` confidences at ``(N, 2)`` int level-0 x, y against a lesion label mask.

    ``labels`` None means a normal slide: every detection is a false positive.
    Detections must lie inside the mask (``ValueError`` otherwise). Under the
    official rules the true-positive confidences are float32, as the script
    keeps them.
    """
    tp_dtype = np.float32 if rules == "official" else np.float64
    confidences = np.asarray(confidences, dtype=np.float64)
    level0_xy = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
    if labels is None or labels.max(initial=0) == 0:
        n_labels = 0 if labels is None else int(labels.max(initial=0))
        return SlideHits(
            confidences.copy(),
            np.zeros(n_labels, dtype=tp_dtype),
            0,
            0,
            np.zeros(len(confidences), dtype=np.int32),
        )
    rows = level0_xy[:, 1] // downsample
    cols = level0_xy[:, 0] // downsample
    outside = (rows < 0) | (cols < 0) | (rows >= labels.shape[0]) | (cols >= labels.shape[1])
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(
            f"Expected detections inside the slide. Got ({level0_xy[i, 0]}, {level0_xy[i, 1]}) "
            f"outside {labels.shape[1] * downsample} x {labels.shape[0] * downsample} px"
        )
    n_labels = int(labels.max())
    hit = labels[rows, cols].astype(np.int32)
    tp = np.zeros(n_labels, dtype=tp_dtype)
    on_lesion = (hit > 0) & ~np.isin(hit, list(itcs))
    # The highest confidence per lesion (in the tp dtype: the script compares in float32).
    np.maximum.at(tp, hit[on_lesion] - 1, confidences[on_lesion].astype(tp_dtype))
    fp = confidences[hit == 0]
    return SlideHits(fp, tp, n_labels - len(itcs), len(itcs), hit)


def review(
    hits: SlideHits,
    confidences: np.ndarray,
    level0_xy: np.ndarray,
    labels: np.ndarray | None,
    itcs: frozenset[int],
    downsample: int,
) -> dict[str, list]:
    """What a reviewer looks at: each detection's outcome and each lesion, found or missed.

    ``detections``: ``[x, y, confidence, outcome]`` per detection (level-0 px),
    outcome ``tp`` (on a lesion), ``fp`` (on no lesion) or ``itc`` (on an
    isolated tumor cell cluster: neither, the FROC ignores it). ``lesions``:
    per lesion label of the evaluation mask (grown as the rules grow tumor),
    its level-0 box ``[x0, y0, x1, y1]``, whether it is an ITC and the highest
    confidence on it (0: missed).
    """
    outcomes = np.where(hits.hit == 0, "fp", "tp").astype(object)
    outcomes[np.isin(hits.hit, list(itcs))] = "itc"
    xy = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
    detections = [
        [int(x), int(y), float(c), str(o)]
        for (x, y), c, o in zip(xy, np.asarray(confidences, float), outcomes, strict=True)
    ]
    lesions = []
    if labels is not None:
        best = np.zeros(int(labels.max(initial=0)) + 1)
        np.maximum.at(best, hits.hit, np.asarray(confidences, float))
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            rows, cols = box
            lesions.append(
                {
                    "label": label,
                    "box": [
                        cols.start * downsample,
                        rows.start * downsample,
                        cols.stop * downsample,
                        rows.stop * downsample,
                    ],
                    "itc": label in itcs,
                    "confidence": float(best[label]),
                }
            )
    return {"detections": detections, "lesions": lesions}


@dataclass(frozen=True)
class Froc:
    """The FROC curve (ascending false positives per slide), its score and operating points."""

    fps_per_slide: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    score: float
    slides: int
    lesions: int


def compute_froc(
    hits: Sequence[SlideHits], fp_rates: Sequence[float] = FP_RATES, *, rules: Rules = "official"
) -> Froc:
    """The FROC over all ``hits`` (one per evaluated slide), as the official script computes it.

    ``rules``: see the module. Raises ``ValueError`` when there are no slides
    or no lesions to find.
    """
    if not hits:
        raise ValueError("Expected at least one evaluated slide. Got none")
    lesions = sum(h.lesions for h in hits)
    if lesions == 0:
        raise ValueError(
            "Expected at least one tumor lesion (not an ITC) among the evaluated slides. "
            "Got none: the FROC is undefined"
        )
    official = rules == "official"
    fps = np.sort(np.concatenate([np.asarray(h.fp_confidences, np.float64) for h in hits]))
    tp_dtype = np.float32 if official else np.float64
    tps = np.sort(np.concatenate([np.asarray(h.tp_confidences, tp_dtype) for h in hits]))
    # Distinct values as float64: a float32 true positive and a float64 false positive of
    # the same printed confidence are two thresholds under the official rules.
    distinct = np.unique(np.concatenate([fps, tps.astype(np.float64)]))
    thresholds = distinct[1:] if official else distinct[distinct > 0]
    # At or above each threshold. True positives compare in their own dtype: the script's
    # float32 array against a float64 threshold rounds the threshold to float32.
    total_fp = len(fps) - np.searchsorted(fps, thresholds, side="left")
    total_tp = len(tps) - np.searchsorted(tps, thresholds.astype(tp_dtype), side="left")
    fps_per_slide = np.append(total_fp, 0) / float(len(hits))
    sensitivity = np.append(total_tp, 0) / float(lesions)
    # Reversed: ascending false positives, as np.interp needs.
    at = np.interp(np.asarray(fp_rates, dtype=np.float64), fps_per_slide[::-1], sensitivity[::-1])
    return Froc(
        fps_per_slide=fps_per_slide[::-1].copy(),
        sensitivity=sensitivity[::-1].copy(),
        thresholds=np.concatenate([thresholds, [np.inf]])[::-1].copy(),
        fp_rates=tuple(float(r) for r in fp_rates),
        sensitivities=tuple(float(s) for s in at),
        score=float(np.mean(at)),
        slides=len(hits),
        lesions=lesions,
    )


@dataclass(frozen=True)
class Roc:
    """A ROC curve (ascending false positive rate) and its area."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


def roc(labels: Sequence[int], scores: Sequence[float]) -> Roc:
    """Slide-level ROC of ``scores`` against 0/1 ``labels``; ties count half (exact AUC).

    Raises ``ValueError`` unless both classes are present.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(
            "Expected tumor and normal slides to compute a slide AUC. "
            f"Got {positives} tumor and {negatives} normal"
        )
    thresholds = np.unique(s)[::-1]
    tpr = [0.0] + [float(((s >= t) & (y == 1)).sum()) / positives for t in thresholds]
    fpr = [0.0] + [float(((s >= t) & (y == 0)).sum()) / negatives for t in thresholds]
    # Trapezoids between operating points: the Mann-Whitney U with ties counted half.
    x, h = np.asarray(fpr), np.asarray(tpr)
    auc = float(np.sum((x[1:] - x[:-1]) * (h[1:] + h[:-1]) / 2))
    return Roc(x, h, np.concatenate([[np.inf], thresholds]), auc)
