"""``wsiflow evaluate``: CAMELYON16 slide AUC and lesion FROC of an inference output folder.

Reads ``scores.csv`` and ``detections/<slide>.csv`` from the folder, the
reference (``name,Tumor|Normal``), each tumor slide's annotation and the
slide itself (its level-0 size and µm/px); the metrics are
:mod:`pipeline.froc`'s. Writes ``evaluation.json``, ``roc.png`` and
``froc.png`` into the folder (or another one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .annotations import read_annotations
from .config import EvaluationConfig
from .errors import MissingMppError, ResultsError
from .froc import (
    SlideHits,
    compute_froc,
    evaluation_mask,
    itc_labels,
    roc,
    score_detections,
    tumor_mask,
)
from .outputs import claim_folder
from .plan import find_annotation
from .plots import plot_froc, plot_roc
from .results import SCORES, detections_path, read_detections, read_reference, read_scores
from .slide import find_slides, open_slide

REPORT = "evaluation.json"


@dataclass(frozen=True)
class Evaluation:
    """The report (JSON-able) and the files written."""

    report: dict[str, Any]
    files: dict[str, Path]


def evaluate(
    results_dir: Path,
    reference_csv: Path,
    annotations_dir: Path,
    slides_dir: Path,
    config: EvaluationConfig,
    *,
    out_dir: Path | None = None,
    masks_dir: Path | None = None,
) -> Evaluation:
    """Evaluate the slides of ``results_dir``'s ``scores.csv`` against the reference.

    Every slide there must be in the reference (:class:`ResultsError`
    otherwise) and have a detections CSV; reference slides without results
    are listed as not evaluated. With ``masks_dir``, tumor comes from the
    challenge's ``<slide>_Mask.tif`` files (255 = tumor, read at the mask
    level), as the official script reads it, instead of the XML annotations.
    A metric that is undefined (one class only; no lesion to find) is None
    with the reason in ``undefined``.
    """
    results_dir = Path(results_dir)
    out_dir = claim_folder(out_dir or results_dir, "evaluation", accept=("inference",))
    scores_path = results_dir / SCORES
    scores = read_scores(scores_path)
    if not scores:
        raise ResultsError(scores_path, "no slide scores (did `wsiflow infer` finish a slide?)")
    reference = read_reference(reference_csv)
    unknown = sorted(set(scores) - set(reference))
    if unknown:
        raise ResultsError(
            scores_path,
            f"slides missing from the reference {reference_csv}: {', '.join(unknown)}",
        )
    slide_paths = {p.stem: p for p in find_slides([slides_dir])}
    downsample = 2**config.mask_level
    hits: list[SlideHits] = []
    per_slide = []
    for slide_id in sorted(scores):
        is_tumor = reference[slide_id]
        confidences, level0_xy = read_detections(_existing(detections_path(results_dir, slide_id)))
        labels, itcs = None, frozenset()
        if is_tumor:
            slide_path = slide_paths.get(slide_id)
            if slide_path is None:
                raise ResultsError(
                    slides_dir, f"no slide file for {slide_id!r} (needed for its size and µm/px)"
                )
            with open_slide(slide_path) as reader:
                info = reader.info
            if info.mpp is None:
                raise MissingMppError(slide_path, "the FROC needs the slide's µm/px (mpp)")
            if masks_dir is not None:
                tumor = official_mask(Path(masks_dir) / f"{slide_id}_Mask.tif", config.mask_level)
            else:
                annotation = find_annotation(slide_path, annotations_dir)
                if annotation is None:
                    raise ResultsError(
                        annotations_dir,
                        f"no annotation <{slide_id}>.xml/.geojson for tumor slide {slide_id!r}",
                    )
                tumor = tumor_mask(read_annotations(annotation), info.level0_wh, downsample)
            labels = evaluation_mask(
                tumor, info.mpp, downsample, tumor_growth_um=config.tumor_growth_um
            )
            itcs = itc_labels(
                labels, info.mpp, downsample, itc_major_axis_um=config.itc_major_axis_um
            )
        try:
            slide_hits = score_detections(confidences, level0_xy, labels, itcs, downsample)
        except ValueError as exc:
            raise ResultsError(detections_path(results_dir, slide_id), str(exc)) from exc
        hits.append(slide_hits)
        per_slide.append(
            {
                "slide": slide_id,
                "tumor": is_tumor,
                "score": scores[slide_id],
                "detections": len(confidences),
                "lesions": slide_hits.lesions,
                "itcs": slide_hits.itcs,
                "lesions_found": int((slide_hits.tp_confidences > 0).sum()),
                "false_positives": len(slide_hits.fp_confidences),
            }
        )
    names = sorted(scores)
    undefined: dict[str, str] = {}
    try:
        slide_roc = roc([int(reference[n]) for n in names], [scores[n] for n in names])
    except ValueError as exc:  # one class only
        slide_roc, undefined["slide_auc"] = None, str(exc)
    try:
        froc = compute_froc(hits, config.fp_rates)
    except ValueError as exc:  # no lesion to find (normal slides or ITCs only)
        froc, undefined["froc"] = None, str(exc)
    files = {"report": out_dir / REPORT, "roc": out_dir / "roc.png", "froc": out_dir / "froc.png"}
    report = {
        "slides": len(names),
        "tumor_slides": sum(reference[n] for n in names),
        "normal_slides": sum(not reference[n] for n in names),
        "not_evaluated": sorted(set(reference) - set(scores)),
        "slide_auc": None if slide_roc is None else slide_roc.auc,
        "froc": None if froc is None else froc.score,
        "froc_fp_rates": list(config.fp_rates),
        "froc_sensitivities": None if froc is None else list(froc.sensitivities),
        "lesions": sum(h.lesions for h in hits),
        "isolated_tumor_cells": sum(h.itcs for h in hits),
        "undefined": undefined,
        "roc_curve": None
        if slide_roc is None
        else {"fpr": slide_roc.fpr.tolist(), "tpr": slide_roc.tpr.tolist()},
        "froc_curve": None
        if froc is None
        else {
            "fps_per_slide": froc.fps_per_slide.tolist(),
            "sensitivity": froc.sensitivity.tolist(),
        },
        "per_slide": per_slide,
        "evaluation": config.model_dump(mode="json"),
        "results_dir": str(results_dir),
        "reference": str(reference_csv),
        "files": {},
    }
    if slide_roc is not None:
        plot_roc(files["roc"], slide_roc.fpr, slide_roc.tpr, slide_roc.auc)
        report["files"]["roc"] = str(files["roc"])
    if froc is not None:
        plot_froc(files["froc"], froc)
        report["files"]["froc"] = str(files["froc"])
    report["files"]["report"] = str(files["report"])
    partial = files["report"].with_name(f".{REPORT}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, files["report"])
    return Evaluation(report, {k: Path(v) for k, v in report["files"].items()})


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ResultsError(path, "detections file missing (inference did not finish this slide)")
    return path


def official_mask(path: Path, level: int) -> np.ndarray:
    """Tumor (bool) of a CAMELYON16 ``*_Mask.tif`` at ``level``: where its first channel is 255.

    As ``computeEvaluationMask`` reads it (``255 - pixelarray[:, :, 0]`` is 0 on tumor).
    """
    if not path.is_file():
        raise ResultsError(path, "no such mask file (CAMELYON16 names it <slide>_Mask.tif)")
    with open_slide(path, direct=False) as reader:
        if reader.info.level_count <= level:
            raise ResultsError(
                path,
                f"Expected a mask pyramid with level {level}. "
                f"Got {reader.info.level_count} level(s) instead.",
            )
        rgb = reader.read_region((0, 0), level, reader.info.level_wh[level])
    return rgb[..., 0] == 255
