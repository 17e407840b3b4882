"""Whole-slide inference with Dask: plan, predict blocks, stitch, detect, write.

Per slide: a plan task (tissue on an overview, the patch grid at the model's
own µm/px and patch size, a thumbnail), then predict tasks of blocks of
patches. A predict task streams its patches from the slide through a bounded
queue (a reader thread) into batched prediction, so reading overlaps compute
and memory stays bounded; each worker process loads the model once. The
driver stitches the probabilities into the slide's heatmap as blocks come
back, then writes the heatmap, detections and score (:mod:`pipeline.results`).
A failing slide is reported and the others go on; a slide whose outputs are
complete for the same slide, model and settings is skipped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .cluster import submit_reporting, task_error
from .config import InferenceConfig
from .errors import ModelError, failure_reason
from .grid import slide_id_of
from .heatmap import HeatmapAccumulator, detect_lesions, heatmap_image, overlay, slide_score
from .infer_tasks import InferencePlan, ModelSpec, model_spec, plan_inference, predict_block
from .outputs import claim_folder
from .results import (
    is_complete,
    outputs_exist,
    read_manifest,
    write_manifest,
    write_scores,
    write_slide_outputs,
)
from .store import file_identity, fingerprint

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
    from distributed import as_completed

    spec = model_spec(model_dir, config.min_tissue_fraction)
    out_dir = claim_folder(out_dir, "inference")
    manifest = _manifest(out_dir, spec, config)
    results: list[SlideInference] = []

    def finish(result: SlideInference, digest: str | None = None) -> None:
        _record(manifest, result, digest)
        write_manifest(out_dir, manifest)
        write_scores(out_dir, _complete_scores(out_dir, manifest))
        results.append(result)
        if on_slide is not None:
            on_slide(result)

    unique, duplicates = unique_slides(slides)
    for duplicate in duplicates:
        finish(duplicate)
    pending: deque[tuple[Path, str]] = deque()
    for path in unique:
        slide_id = slide_id_of(path)
        digest = slide_fingerprint(path, spec, config)
        if not overwrite and is_complete(out_dir, slide_id, digest, manifest):
            finish(_skipped(path, manifest["slides"][slide_id]), digest)
        else:
            pending.append((path, digest))

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    in_flight_cap = 2 * n_workers + 1  # one block computing and one queued per worker
    max_active = n_workers + 1  # slides planned but unfinished: bounds the driver's memory
    block = config.batch_size * BATCHES_PER_TASK
    plans: dict[Any, tuple[Path, str, float]] = {}
    blocks: dict[Any, tuple[str, int]] = {}
    block_queue: deque[tuple[str, int]] = deque()
    active: dict[str, _Stitching] = {}
    work = as_completed(loop=client.loop, with_results=True, raise_errors=False)

    def submit_some() -> None:
        while work.count() < in_flight_cap:
            if pending and len(active) + len(plans) < max_active:
                path, digest = pending.popleft()
                future = submit_reporting(
                    client, plan_inference, str(path), spec, config.stride_px, config.slide_mpp
                )
                plans[future] = (path, digest, time.perf_counter())
            elif block_queue:
                slide_id, start = block_queue.popleft()
                if slide_id not in active:
                    continue  # the slide failed meanwhile
                plan = active[slide_id].plan
                args = _block_args(plan, spec, config, start, block, tf_threads)
                future = submit_reporting(client, predict_block, *args)
                blocks[future] = (slide_id, start)
            else:
                return
            work.add(future)

    def fail(slide_id: str, path: Path | str, exc: BaseException) -> None:
        active.pop(slide_id, None)
        finish(SlideInference(slide_id, str(path), "failed", reason=failure_reason(path, exc)))

    def complete(stitching: _Stitching) -> None:
        plan = stitching.plan
        del active[plan.slide_id]
        try:
            result = _write_slide(out_dir, plan, stitching, spec, config)
        except Exception as exc:  # disk full, permissions...: this slide fails, others go on
            fail(plan.slide_id, plan.path, exc)
            return
        finish(result, stitching.digest)

    submit_some()
    for future, outcome in work:
        error = task_error(future, outcome)
        if future in plans:
            path, digest, started = plans.pop(future)
            if error is not None:
                fail(slide_id_of(path), path, error)
            else:
                plan: InferencePlan = outcome
                stitching = _Stitching(
                    plan,
                    digest,
                    HeatmapAccumulator(plan.grid),
                    -(-len(plan.level_xy) // block),
                    started,
                )
                active[plan.slide_id] = stitching
                if on_planned is not None:
                    on_planned(len(plan.level_xy))
                if stitching.remaining == 0:
                    complete(stitching)  # no tissue: an empty heatmap
                else:
                    block_queue.extend(
                        (plan.slide_id, start) for start in range(0, len(plan.level_xy), block)
                    )
            submit_some()
            continue
        slide_id, start = blocks.pop(future)
        stitching = active.get(slide_id)
        if stitching is None:  # an earlier block of this slide failed
            submit_some()
            continue
        if isinstance(error, ModelError):  # not this slide's fault: no slide can be done
            raise error
        if error is not None:
            fail(slide_id, stitching.plan.path, error)
            submit_some()
            continue
        plan = stitching.plan
        stitching.accumulator.add(plan.grid_ij[start : start + len(outcome)], outcome)
        stitching.remaining -= 1
        if on_patches is not None:
            on_patches(len(outcome))
        if stitching.remaining == 0:
            complete(stitching)
        submit_some()
    order = {str(path): i for i, path in enumerate(slides)}
    return sorted(results, key=lambda r: order.get(r.path, len(order)))


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
    the same plan, streamed prediction, stitching and outputs as
    :func:`infer_slides`, one block after another. Raises the slide's typed
    error (or :class:`ModelError`) instead of returning a failed result;
    returns ``skipped`` when ``inference.json`` records it complete with the
    same fingerprint. ``inference.json`` and ``scores.csv`` are left to one
    writer (:func:`record_inference`), since concurrent tasks would race on them.
    """
    path, out_dir = Path(path), Path(out_dir)
    slide_id = slide_id_of(path)
    digest = slide_fingerprint(path, spec, config)
    manifest = read_manifest(out_dir)
    if not overwrite and is_complete(out_dir, slide_id, digest, manifest):
        return _skipped(path, manifest["slides"][slide_id]), digest
    started = time.perf_counter()
    plan = plan_inference(str(path), spec, config.stride_px, config.slide_mpp)
    accumulator = HeatmapAccumulator(plan.grid)
    block = config.batch_size * BATCHES_PER_TASK
    for start in range(0, len(plan.level_xy), block):
        probabilities = predict_block(*_block_args(plan, spec, config, start, block, tf_threads))
        accumulator.add(plan.grid_ij[start : start + len(probabilities)], probabilities)
    stitching = _Stitching(plan, digest, accumulator, 0, started)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write_slide(out_dir, plan, stitching, spec, config), digest


def unique_slides(slides: list[Path]) -> tuple[list[Path], list[SlideInference]]:
    """The slides with distinct ids, in order; each repeated id a failure naming both files."""
    seen: dict[str, Path] = {}
    duplicates = []
    for path in slides:
        slide_id = slide_id_of(path)
        if slide_id in seen:
            reason = f"{path}: duplicate slide id {slide_id!r} (also {seen[slide_id]})"
            duplicates.append(SlideInference(slide_id, str(path), "failed", reason=reason))
        else:
            seen[slide_id] = path
    return list(seen.values()), duplicates


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


def _block_args(
    plan: InferencePlan,
    spec: ModelSpec,
    config: InferenceConfig,
    start: int,
    block: int,
    tf_threads: int | None,
) -> tuple[Any, ...]:
    """:func:`predict_block`'s arguments for the ``block`` patches from ``start`` on."""
    return (
        plan.path,
        spec.model_dir,
        plan.resolution.level,
        plan.level_xy[start : start + block],
        plan.resolution.read_px,
        plan.resolution.patch_px,
        config.batch_size,
        config.queue_batches,
        config.reader_threads,
        tf_threads,
    )


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
    digest: str
    accumulator: HeatmapAccumulator
    remaining: int
    started: float


def _write_slide(
    out_dir: Path,
    plan: InferencePlan,
    stitching: _Stitching,
    spec: ModelSpec,
    config: InferenceConfig,
) -> SlideInference:
    heatmap = stitching.accumulator.heatmap()
    detections = detect_lesions(heatmap, plan.grid, config.detection_threshold)
    score = slide_score(heatmap)
    size = plan.thumbnail.shape[1], plan.thumbnail.shape[0]
    heatmap_png = heatmap_image(heatmap, plan.grid, plan.level0_wh, size)
    attrs = {
        **plan.attrs,
        "model_dir": spec.model_dir,
        "model": spec.identity,
        "score": score,
        "detection_threshold": config.detection_threshold,
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
        seconds=round(time.perf_counter() - stitching.started, 2),
        warnings=(f"{plan.path}: {note}",) if (note := plan.attrs.get("mpp_assumed")) else (),
    )


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
