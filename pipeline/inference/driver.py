"""Whole-slide inference with Dask: plan, predict blocks, stitch, detect, write.

Per slide: a plan task (tissue on an overview, the patch grid at the model's
own µm/px and patch size, a thumbnail), then predict tasks of blocks of
patches. A predict task streams its patches from the slide through a bounded
queue (a reader thread) into batched prediction, so reading overlaps compute
and memory stays bounded; each worker process loads the model once. The
driver stitches the probabilities into the slide's heatmap as blocks come
back, then writes the heatmap, detections and score (:mod:`pipeline.inference.results`).
A failing slide is reported and the others go on; a slide whose outputs are
complete for the same slide, model and settings is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import InferenceConfig
from pipeline.engine import Task, drive, failures, worker_count
from pipeline.errors import ModelError, SlideError, failure_reason
from pipeline.identity import file_identity, fingerprint, slide_id_of, split_repeated_ids
from pipeline.inference.heatmap import (
    DEFAULT_COLOR_MAP,
    Detections,
    HeatmapAccumulator,
    detect_lesions,
    detect_local_maxima,
    heatmap_image,
    overlay,
    slide_score,
)
from pipeline.inference.predict import (
    Block,
    InferencePlan,
    ModelSpec,
    model_spec,
    plan_inference,
    predict_block,
)
from pipeline.inference.results import (
    is_complete,
    outputs_exist,
    read_manifest,
    slide_files,
    write_manifest,
    write_scores,
    write_slide_outputs,
)
from pipeline.inference.slide_classifier import METADATA_FILE as CLASSIFIER_METADATA
from pipeline.inference.slide_classifier import cached_slide_classifier
from pipeline.outputs import claim_folder

#: Batches per predict task: long enough (~5 s on a CPU) that the queue's fill-up and
#: Dask's per-task cost stay small, short enough for a live progress bar.
BATCHES_PER_TASK = 32


@dataclass
class SlideInference:
    """What happened to one slide: ``status`` is done, skipped or failed."""

    slide_id: str
    path: str
    status: str
    patches: int = 0
    score: float | None = None
    detections: int = 0
    reason: str = ""
    seconds: float = 0.0
    #: Assumptions made about the slide (an mpp from --slide-mpp or its objective), one each.
    warnings: tuple[str, ...] = ()

    def summary_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["warnings"] = list(self.warnings)
        return row


def slide_fingerprint(path: Path, spec: ModelSpec, config: InferenceConfig) -> str:
    """Identity of the slide, the model and the settings that shape one slide's outputs."""
    payload: dict[str, Any] = {
        "slide": file_identity(path) if path.exists() else str(path),
        "model": spec.identity,
        "min_tissue_fraction": spec.min_tissue_fraction,
        "stride_px": config.stride_px,
        "detection_threshold": config.detection_threshold,
        "version": __version__,
    }
    if config.slide_mpp is not None:  # unset: earlier outputs keep their fingerprint
        payload["slide_mpp"] = config.slide_mpp
    if config.color_map != DEFAULT_COLOR_MAP:  # likewise: the default keeps earlier fingerprints
        payload["color_map"] = config.color_map
    if config.detection != "regions":  # likewise
        payload["detection"] = [config.detection, config.detection_min_distance_um]
    if config.tta:  # likewise
        payload["tta"] = True
    if spec.slide_classifier is not None:  # likewise
        payload["slide_classifier"] = spec.slide_classifier
    return fingerprint(payload)


def infer_slides(
    client: Any,
    model_dir: Path,
    slides: list[Path],
    out_dir: Path,
    config: InferenceConfig,
    *,
    overwrite: bool = False,
    tf_threads: int | None = None,
    on_planned: Callable[[int], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    on_slide: Callable[[SlideInference], None] | None = None,
) -> list[SlideInference]:
    """Predict every slide with the model in ``model_dir`` on the Dask ``client``.

    Raises :class:`ModelError` for a missing or unusable model (before any
    slide is read, or when the first worker fails to load it); slide
    problems become failed results (the reason names
    the file). ``on_planned(n)`` is called with each slide's patch count,
    ``on_patches(n)`` per predicted block and ``on_slide(result)`` per slide.
    """
    spec = model_spec(model_dir, config.min_tissue_fraction, config.slide_score)
    out_dir = claim_folder(out_dir, "inference")
    stage = _Inferring(out_dir, spec, config, tf_threads, manifest=_manifest(out_dir, spec, config))
    stage.on_planned, stage.on_patches, stage.on_slide = on_planned, on_patches, on_slide
    unique, duplicates = unique_slides(slides)
    for duplicate in duplicates:
        stage.report(duplicate)
    pending = []
    for path in unique:
        triaged = triage(out_dir, path, spec, config, stage.manifest, overwrite=overwrite)
        if triaged.skipped is not None:
            stage.report(triaged.skipped, triaged.digest)
        else:
            pending.append(triaged)
    n_workers = worker_count(client)
    drive(
        client,
        stage,
        pending,
        max_active=n_workers + 1,  # slides planned but unfinished: bounds the driver's memory
        max_in_flight=2 * n_workers + 1,  # one block computing and one queued per worker
    )
    order = {str(path): i for i, path in enumerate(slides)}
    return sorted(stage.results, key=lambda r: order.get(r.path, len(order)))


def infer_slide(
    path: Path,
    spec: ModelSpec,
    out_dir: Path,
    config: InferenceConfig,
    *,
    overwrite: bool = False,
    tf_threads: int | None = None,
) -> tuple[SlideInference, str]:
    """Predict one slide in this process; its result and fingerprint.

    For per-slide tasks (the Prefect flows run one per Dask worker thread):
    the same stage as :func:`infer_slides`, run inline. Raises the slide's
    typed error (or :class:`ModelError`) instead of returning a failed
    result; returns ``skipped`` when ``inference.json`` records it complete
    with the same fingerprint. ``inference.json`` and ``scores.csv`` are left
    to one writer (:func:`record_inference`), since concurrent tasks would race on them.
    """
    path, out_dir = Path(path), Path(out_dir)
    manifest = read_manifest(out_dir)
    triaged = triage(out_dir, path, spec, config, manifest, overwrite=overwrite)
    if triaged.skipped is not None:
        return triaged.skipped, triaged.digest
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = _Inferring(out_dir, spec, config, tf_threads, manifest=None)
    drive(None, stage, [triaged])
    result = stage.results[0]
    if result.status == "failed":  # its outputs could not be written
        raise stage.errors[0]
    return result, triaged.digest


@dataclass(frozen=True)
class Pending:
    """A slide to predict: its path and the fingerprint its outputs will carry.

    ``skipped``: its result when its outputs are complete with that fingerprint.
    """

    path: Path
    digest: str
    skipped: SlideInference | None = None


def triage(
    out_dir: Path,
    path: Path,
    spec: ModelSpec,
    config: InferenceConfig,
    manifest: dict[str, Any],
    *,
    overwrite: bool,
) -> Pending:
    """The one idempotency check: skipped (outputs complete for this fingerprint) or to do."""
    slide_id = slide_id_of(path)
    digest = slide_fingerprint(path, spec, config)
    if not overwrite and is_complete(out_dir, slide_id, digest, manifest):
        return Pending(Path(path), digest, _skipped(path, manifest["slides"][slide_id]))
    return Pending(Path(path), digest)


class _Inferring:
    """Inference as an :class:`~pipeline.engine.Stage`: plan, predict blocks, stitch, write.

    With a ``manifest`` each slide's outcome is recorded in ``inference.json``
    and ``scores.csv`` as it finishes; without one that is left to the caller.
    """

    def __init__(
        self,
        out_dir: Path,
        spec: ModelSpec,
        config: InferenceConfig,
        tf_threads: int | None,
        *,
        manifest: dict[str, Any] | None,
    ) -> None:
        self.out_dir, self.spec, self.config, self.tf_threads = out_dir, spec, config, tf_threads
        self.manifest = manifest
        self.block_patches = config.batch_size * BATCHES_PER_TASK
        self.results: list[SlideInference] = []
        self.errors: list[BaseException] = []
        self.on_planned: Callable[[int], None] | None = None
        self.on_patches: Callable[[int], None] | None = None
        self.on_slide: Callable[[SlideInference], None] | None = None

    def plan(self, item: Pending, waiting: int) -> Task:
        config = self.config
        return Task(plan_inference, (str(item.path), self.spec, config.stride_px, config.slide_mpp))

    def start(self, item: Pending, plan: InferencePlan) -> tuple[_Stitching, list[Task]]:
        if self.on_planned is not None:
            self.on_planned(len(plan.level_xy))
        config, n, step = self.config, len(plan.level_xy), self.block_patches
        blocks = [
            Block(
                slide_path=plan.path,
                model_dir=self.spec.model_dir,
                level=plan.resolution.level,
                level_xy=plan.level_xy[start : start + step],
                read_px=plan.resolution.read_px,
                patch_px=plan.resolution.patch_px,
                batch_size=config.batch_size,
                queue_batches=config.queue_batches,
                reader_threads=config.reader_threads,
                tf_threads=self.tf_threads,
                tta=config.tta,
                stain=(
                    None
                    if plan.stain_source is None
                    else (plan.stain_source, self.spec.stain["target"])
                ),
            )
            for start in range(0, n, step)
        ]
        # No blocks (no tissue): an empty heatmap.
        return _Stitching(plan, HeatmapAccumulator(plan.grid)), [
            Task(predict_block, (b,)) for b in blocks
        ]

    def block_done(
        self, item: Pending, stitching: _Stitching, index: int, probabilities: np.ndarray
    ) -> None:
        start = index * self.block_patches
        grid_ij = stitching.plan.grid_ij[start : start + len(probabilities)]
        stitching.accumulator.add(grid_ij, probabilities)
        if self.on_patches is not None:
            self.on_patches(len(probabilities))

    def finish(self, item: Pending, stitching: _Stitching, seconds: float) -> None:
        try:
            result = _write_slide(self.out_dir, stitching, self.spec, self.config, seconds)
        except Exception as exc:  # disk full, permissions...: this slide fails, others go on
            self.fail(item, exc)
            return
        self.report(result, item.digest)

    def fail(self, item: Pending, error: BaseException) -> None:
        if isinstance(error, ModelError):  # not this slide's fault: no slide can be done
            raise error
        self.errors.append(error)
        path = item.path
        reason = failure_reason(path, error)
        self.report(SlideInference(slide_id_of(path), str(path), "failed", reason=reason))

    def report(self, result: SlideInference, digest: str | None = None) -> None:
        if self.manifest is not None:
            _record(self.manifest, result, digest)
            write_manifest(self.out_dir, self.manifest)
            write_scores(self.out_dir, _complete_scores(self.out_dir, self.manifest))
        self.results.append(result)
        if self.on_slide is not None:
            self.on_slide(result)


def unique_slides(slides: list[Path]) -> tuple[list[Path], list[SlideInference]]:
    """The slides with distinct ids, in order; each repeated id a failure naming both files."""
    unique, repeated = split_repeated_ids(slides)
    return unique, [SlideInference(slide_id_of(p), str(p), "failed", reason=r) for p, r in repeated]


def _skipped(path: Path, previous: dict[str, Any]) -> SlideInference:
    """A slide complete for the same slide, model and settings; numbers from its record."""
    return SlideInference(
        slide_id_of(path),
        str(path),
        "skipped",
        patches=previous.get("patches", 0),
        score=previous.get("score"),
        detections=previous.get("detections", 0),
        reason="complete for the same slide, model and settings",
    )


def summarize(
    results: list[SlideInference], out_dir: Path, model_dir: Path | str
) -> dict[str, Any]:
    """An inference run's summary, the same for every front end (CLI, flows)."""
    out_dir = Path(out_dir)
    kept = [r for r in results if r.status != "failed"]
    return {
        "model_dir": str(model_dir),
        "out": str(out_dir),
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(results) - len(kept),
        "patches": sum(r.patches for r in kept),
        "patches_predicted": sum(r.patches for r in results if r.status == "done"),
        "scores": {r.slide_id: r.score for r in results if r.score is not None},
        "heatmaps": {
            r.slide_id: str(slide_files(out_dir, r.slide_id)["overlay_png"]) for r in kept
        },
        "failures": failures(results),
        "per_slide": [r.summary_row() for r in results],
    }


def record_inference(
    out_dir: Path,
    spec: ModelSpec,
    config: InferenceConfig,
    outcomes: list[tuple[SlideInference, str | None]],
) -> None:
    """Record per-slide outcomes in ``inference.json`` and rewrite ``scores.csv``, once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out_dir, spec, config)
    for result, digest in outcomes:
        _record(manifest, result, digest)
    write_manifest(out_dir, manifest)
    write_scores(out_dir, _complete_scores(out_dir, manifest))


def _manifest(out_dir: Path, spec: ModelSpec, config: InferenceConfig) -> dict[str, Any]:
    """``inference.json`` as it stands, with this run's model and settings."""
    manifest = read_manifest(out_dir)
    manifest.update(
        {
            "model_dir": spec.model_dir,
            "model": spec.identity,
            "config": config.model_dump(mode="json"),
            "wsiflow_version": __version__,
        }
    )
    return manifest


def _record(manifest: dict[str, Any], result: SlideInference, digest: str | None) -> None:
    """Set one slide's record; a failure keeps what the slide's status was before."""
    record = {
        **result.summary_row(),
        "fingerprint": digest,
        "model": fingerprint(manifest["model"]),
    }
    if result.status == "failed":
        previous = manifest["slides"].get(result.slide_id, {})
        record["fingerprint"] = None
        record["previous_status"] = previous.get("status")
    manifest["slides"][result.slide_id] = record


@dataclass
class _Stitching:
    """A planned slide whose blocks are being predicted (driver-side state)."""

    plan: InferencePlan
    accumulator: HeatmapAccumulator


def _detect(heatmap: np.ndarray, plan: InferencePlan, config: InferenceConfig) -> Detections:
    """The slide's detections by ``config.detection``: connected regions or local maxima."""
    if config.detection == "regions":
        return detect_lesions(heatmap, plan.grid, config.detection_threshold)
    res = plan.resolution
    if res.level_mpp is None:
        raise SlideError(
            plan.path,
            "lesion detection by local maxima needs the slide's µm/px, which it does not "
            "record: give --slide-mpp, or use inference.detection: regions",
        )
    level0_mpp = res.level_mpp / res.downsample
    return detect_local_maxima(
        heatmap,
        plan.grid,
        config.detection_threshold,
        config.detection_min_distance_um / level0_mpp,
    )


def _score(heatmap: np.ndarray, plan: InferencePlan, spec: ModelSpec) -> float:
    """The slide's score: the heatmap's maximum, or the model's slide classifier on it."""
    if spec.slide_classifier is None:
        return slide_score(heatmap)
    classifier = cached_slide_classifier(spec.model_dir)
    if classifier.identity != spec.slide_classifier:
        raise ModelError(
            Path(spec.model_dir) / CLASSIFIER_METADATA,
            "the slide classifier was refitted during this run: run it again",
        )
    return classifier.score(heatmap, plan.attrs)


def _write_slide(
    out_dir: Path, stitching: _Stitching, spec: ModelSpec, config: InferenceConfig, seconds: float
) -> SlideInference:
    """Write a stitched slide's heatmap, detections, images and score; its result."""
    plan = stitching.plan
    heatmap = stitching.accumulator.heatmap()
    detections = _detect(heatmap, plan, config)
    score = _score(heatmap, plan, spec)
    size = plan.thumbnail.shape[1], plan.thumbnail.shape[0]
    heatmap_png = heatmap_image(heatmap, plan.grid, plan.level0_wh, size, config.color_map)
    attrs = {
        **plan.attrs,
        "model_dir": spec.model_dir,
        "model": spec.identity,
        "score": score,
        "slide_score": "max" if spec.slide_classifier is None else "classifier",
        "max_probability": slide_score(heatmap),
        "detection_threshold": config.detection_threshold,
        "detection": config.detection,
        "tta": config.tta,
        **(
            {"detection_min_distance_um": config.detection_min_distance_um}
            if config.detection == "maxima"
            else {}
        ),
        "wsiflow_version": __version__,
    }
    write_slide_outputs(
        out_dir,
        plan.slide_id,
        heatmap,
        plan.grid,
        detections,
        heatmap_png,
        overlay(plan.thumbnail, heatmap_png),
        attrs,
    )
    return SlideInference(
        plan.slide_id,
        plan.path,
        "done",
        patches=len(plan.level_xy),
        score=score,
        detections=len(detections),
        seconds=round(seconds, 2),
        warnings=tuple(f"{plan.path}: {note}" for note in _notes(plan)),
    )


def _notes(plan: InferencePlan) -> list[str]:
    """What inference assumed about a slide: its mpp, a stain fit on the target's vectors."""
    stain_fallback = (plan.stain_source or {}).get("fallback")
    return [note for note in (plan.attrs.get("mpp_assumed"), stain_fallback) if note]


def _complete_scores(out_dir: Path, manifest: dict[str, Any]) -> dict[str, float]:
    """Scores of slides complete with the manifest's model (files present), for ``scores.csv``."""
    model = fingerprint(manifest["model"])
    scores = {}
    for slide_id, record in manifest["slides"].items():
        if (
            record.get("status") in ("done", "skipped")
            and record.get("model") == model
            and record.get("score") is not None
            and outputs_exist(out_dir, slide_id)
        ):
            scores[slide_id] = float(record["score"])
    return scores
