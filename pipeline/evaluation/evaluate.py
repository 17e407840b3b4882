"""``wsiflow evaluate``: CAMELYON16 slide AUC and lesion FROC of detections.

The results are a ``wsiflow infer`` output folder (``scores.csv`` and
``detections/<slide>.csv`` of its complete slides) or a submission folder as
the organisers' script reads it (``<slide>.csv`` of ``Confidence,X,Y`` per
slide; slide AUC only if a ``scores.csv`` is there too). Tumor comes from the
challenge's ``<slide>_Mask.tif`` files (``masks_dir``) or from the lesion
annotations rasterised at the slide's size. Slide names match the reference
case-insensitively (``Test_001`` in ``reference.csv``, ``test_001.tif``,
``Test_001_Mask.tif`` or ``test_001_mask.tif``). The metrics are
:mod:`pipeline.evaluation.froc`'s, under the official or the corrected rules. Writes
``evaluation.json``, ``roc.png`` and ``froc.png``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvaluationConfig
from pipeline.errors import MissingMppError, ResultsError
from pipeline.evaluation.froc import (
    OFFICIAL_MPP,
    SlideHits,
    compute_froc,
    evaluation_mask,
    itc_labels,
    review,
    roc,
    score_detections,
    tumor_mask,
)
from pipeline.evaluation.plots import plot_froc, plot_roc
from pipeline.evaluation.reference import read_reference
from pipeline.identity import slide_id_of
from pipeline.inference.results import (
    EVALUATION,
    MANIFEST,
    SCORES,
    detections_path,
    read_detections,
    read_scores,
)
from pipeline.outputs import claim_folder
from pipeline.slides.annotations import DEFAULT_GROUPS, Groups, annotation_of, read_annotations
from pipeline.slides.reader import find_slides, open_slide

REPORT = EVALUATION  # evaluation.json
MASK_SUFFIX = "_Mask.tif"


@dataclass(frozen=True)
class Evaluation:
    """The report (JSON-able) and the files written."""

    report: dict[str, Any]
    files: dict[str, Path]


@dataclass(frozen=True)
class _Results:
    """What a results folder holds: detection files and slide scores, by slide name."""

    detections: dict[str, Path]
    scores: dict[str, float] | None
    layout: str


def needs_slides(config: EvaluationConfig, masks_dir: Path | None) -> str | None:
    """Why the slide files are needed (None: masks under the official rules need none)."""
    if masks_dir is None:
        return "the annotations are rasterised at each tumor slide's size"
    if config.rules == "corrected":
        return "the corrected rules use each tumor slide's µm/px"
    return None


def evaluate(
    results_dir: Path,
    reference_csv: Path,
    annotations_dir: Path | None,
    slides_dir: Path | None,
    config: EvaluationConfig,
    *,
    out_dir: Path | None = None,
    masks_dir: Path | None = None,
    exclude: tuple[str, ...] = (),
    groups: Groups = DEFAULT_GROUPS,
) -> Evaluation:
    """Evaluate the slides of ``results_dir`` against the reference.

    Every slide there must be in the reference (:class:`ResultsError`
    otherwise); reference slides without results are listed as not
    evaluated; slides named in ``exclude`` or ``config.exclude`` (any case)
    are left out of both. Tumor comes from ``masks_dir`` (``<slide>_Mask.tif``,
    255 = tumor at the mask level, as the official script reads it) or else
    from ``annotations_dir`` (read with ``groups``) with the slide's size
    from ``slides_dir``. A
    metric that is undefined (one class only; no lesion to find) is None with
    the reason in ``undefined``.
    """
    results_dir = Path(results_dir)
    why_slides = needs_slides(config, masks_dir)
    if why_slides and slides_dir is None:
        raise ValueError(f"Expected a slides folder: {why_slides}")
    if masks_dir is None and annotations_dir is None:
        raise ValueError("Expected an annotations folder or a masks folder for the tumor")
    out_dir = claim_folder(out_dir or results_dir, "evaluation", accept=("inference",))
    results = _read_results(results_dir)
    reference = _reference(reference_csv)
    left_out = {name.casefold() for name in (*config.exclude, *exclude)}
    excluded = sorted(reference[k][0] for k in left_out if k in reference)
    unknown_excluded = sorted(
        name for name in (*config.exclude, *exclude) if name.casefold() not in reference
    )
    named = {**results.detections, **(results.scores or {})}
    unknown = sorted(n for n in named if n.casefold() not in reference)
    if unknown:
        where = results_dir / SCORES if results.scores is not None else results_dir
        raise ResultsError(
            where, f"slides missing from the reference {reference_csv}: {', '.join(unknown)}"
        )
    detections = {n: p for n, p in results.detections.items() if n.casefold() not in left_out}
    scores = (
        None
        if results.scores is None
        else {n: v for n, v in results.scores.items() if n.casefold() not in left_out}
    )
    if not detections and not scores:
        raise ResultsError(results_dir, "no slide left to evaluate after the exclusions")
    slide_paths = _by_key(find_slides([slides_dir]), slide_id_of) if slides_dir else {}
    masks = _by_key(Path(masks_dir).glob("*"), lambda p: p.name, MASK_SUFFIX) if masks_dir else {}
    downsample = 2**config.mask_level
    warnings: list[str] = []
    hits: list[SlideHits] = []
    per_slide = []
    for slide_id in sorted(detections):
        is_tumor = reference[slide_id.casefold()][1]
        confidences, level0_xy = read_detections(_existing(detections[slide_id]))
        labels, itcs, mpp = None, frozenset(), None
        if is_tumor:
            tumor, mpp = _tumor(
                slide_id, config, downsample, slide_paths, slides_dir, masks, masks_dir,
                annotations_dir, groups, warnings,
            )  # fmt: skip
            labels = evaluation_mask(
                tumor, mpp, downsample, tumor_growth_um=config.tumor_growth_um, rules=config.rules
            )
            itcs = itc_labels(labels, mpp, downsample, itc_major_axis_um=config.itc_major_axis_um)
        try:
            slide_hits = score_detections(
                confidences, level0_xy, labels, itcs, downsample, rules=config.rules
            )
        except ValueError as exc:
            raise ResultsError(detections[slide_id], str(exc)) from exc
        hits.append(slide_hits)
        per_slide.append(
            {
                "slide": slide_id,
                "tumor": is_tumor,
                "score": None if scores is None else scores.get(slide_id),
                "detections": len(confidences),
                "mpp": mpp,
                "lesions": slide_hits.lesions,
                "itcs": slide_hits.itcs,
                "lesions_found": int((slide_hits.tp_confidences > 0).sum()),
                "false_positives": len(slide_hits.fp_confidences),
                "review": review(slide_hits, confidences, level0_xy, labels, itcs, downsample),
            }
        )
    names = sorted(detections)
    undefined: dict[str, str] = {}
    slide_roc = None
    if scores is None:
        undefined["slide_auc"] = f"no {SCORES} (slide,score) in {results_dir}"
    else:
        scored = sorted(scores)
        try:
            slide_roc = roc(
                [int(reference[n.casefold()][1]) for n in scored], [scores[n] for n in scored]
            )
        except ValueError as exc:  # one class only
            undefined["slide_auc"] = str(exc)
    froc = None
    try:
        froc = compute_froc(hits, config.fp_rates, rules=config.rules)
    except ValueError as exc:  # no lesion to find (normal slides or ITCs only)
        undefined["froc"] = str(exc)
    files = {"report": out_dir / REPORT, "roc": out_dir / "roc.png", "froc": out_dir / "froc.png"}
    evaluated = {n.casefold() for n in names} | {n.casefold() for n in (scores or {})}
    report = {
        "slides": len(names),
        "tumor_slides": sum(reference[n.casefold()][1] for n in names),
        "normal_slides": sum(not reference[n.casefold()][1] for n in names),
        "rules": config.rules,
        "mpp": OFFICIAL_MPP if config.rules == "official" else "per slide",
        "excluded": excluded,
        "excluded_not_in_reference": unknown_excluded,
        "not_evaluated": sorted(
            name for key, (name, _) in reference.items() if key not in evaluated | left_out
        ),
        "slide_auc": None if slide_roc is None else slide_roc.auc,
        "froc": None if froc is None else froc.score,
        "froc_fp_rates": list(config.fp_rates),
        "froc_sensitivities": None if froc is None else list(froc.sensitivities),
        "lesions": sum(h.lesions for h in hits),
        "isolated_tumor_cells": sum(h.itcs for h in hits),
        "undefined": undefined,
        "warnings": warnings,
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
        "results_layout": results.layout,
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


def _read_results(results_dir: Path) -> _Results:
    """The detections and scores of a ``wsiflow infer`` folder or a submission folder."""
    if not results_dir.is_dir():
        raise ResultsError(results_dir, "no such results folder")
    if (results_dir / MANIFEST).is_file() or (results_dir / "detections").is_dir():
        scores_path = results_dir / SCORES
        scores = read_scores(scores_path)
        if not scores:
            raise ResultsError(scores_path, "no slide scores (did `wsiflow infer` finish a slide?)")
        # Only complete slides are in scores.csv: a detections file of an interrupted
        # slide is not evaluated as if it were whole.
        detections = {name: detections_path(results_dir, name) for name in scores}
        return _Results(detections, scores, "wsiflow infer")
    files = sorted(p for p in results_dir.glob("*.csv") if p.name != SCORES and p.is_file())
    if not files:
        raise ResultsError(
            results_dir,
            "no detections: neither a `wsiflow infer` output folder (scores.csv, detections/) "
            "nor a folder of <slide>.csv files (Confidence,X,Y)",
        )
    twice = _twice(p.stem for p in files)
    if twice:
        raise ResultsError(results_dir, f"detections of one slide in two files: {twice}")
    scores_path = results_dir / SCORES
    scores = read_scores(scores_path) if scores_path.is_file() else None
    return _Results({p.stem: p for p in files}, scores, "submission")


def _reference(path: Path) -> dict[str, tuple[str, bool]]:
    """``{name.casefold(): (name, is_tumor)}`` of the reference CSV."""
    reference = read_reference(path)
    twice = _twice(reference)
    if twice:
        raise ResultsError(path, f"slides listed twice (names differ only in case): {twice}")
    return {name.casefold(): (name, tumor) for name, tumor in reference.items()}


def _twice(names) -> str:
    seen: dict[str, list[str]] = {}
    for name in names:
        seen.setdefault(name.casefold(), []).append(name)
    return ", ".join("/".join(group) for group in seen.values() if len(group) > 1)


def _by_key(paths, name_of, suffix: str = "") -> dict[str, Path]:
    """Paths by ``name_of(path)`` less ``suffix`` (any case), the key case-folded."""
    found: dict[str, Path] = {}
    for path in paths:
        name = name_of(path)
        if suffix and not name.casefold().endswith(suffix.casefold()):
            continue
        found.setdefault(name[: len(name) - len(suffix)].casefold(), path)
    return found


def _tumor(
    slide_id: str,
    config: EvaluationConfig,
    downsample: int,
    slide_paths: dict[str, Path],
    slides_dir: Path | None,
    masks: dict[str, Path],
    masks_dir: Path | None,
    annotations_dir: Path | None,
    groups: Groups,
    warnings: list[str],
) -> tuple[np.ndarray, float]:
    """A tumor slide's tumor mask at ``downsample`` and the µm/px its constants use."""
    key = slide_id.casefold()
    slide_path = slide_paths.get(key)
    info = None
    if masks_dir is None or config.rules == "corrected":
        if slide_path is None:
            raise ResultsError(
                slides_dir, f"no slide file for {slide_id!r} (needed for its size and µm/px)"
            )
        with open_slide(slide_path) as reader:
            info = reader.info
    if config.rules == "official":
        mpp = OFFICIAL_MPP  # the script's constant for every slide
    else:
        if info.mpp is None:
            raise MissingMppError(slide_path, "the corrected FROC needs the slide's µm/px (mpp)")
        mpp = info.mpp
    if masks_dir is not None:
        mask = masks.get(key, Path(masks_dir) / f"{slide_id}{MASK_SUFFIX}")
        return official_mask(mask, config.mask_level), mpp
    annotation = _annotation(slide_id, Path(annotations_dir))
    polygons = read_annotations(annotation, groups, warnings)
    return tumor_mask(polygons, info.level0_wh, downsample), mpp


def _annotation(slide_id: str, annotations_dir: Path) -> Path:
    """``<slide>.xml`` (or ``.geojson``/``.json``) in ``annotations_dir``, in any case."""
    found = annotation_of(slide_id, annotations_dir, any_case=True)
    if found is None:
        raise ResultsError(
            annotations_dir,
            f"no annotation <{slide_id}>.xml/.geojson for tumor slide {slide_id!r}",
        )
    return found


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
