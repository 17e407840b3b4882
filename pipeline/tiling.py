"""Tile slides into a Zarr patch store with Dask: the driver.

Per slide: plan (overview, tissue, annotations, patch grid, labels; one task,
:mod:`pipeline.plan`), then extract (tasks of whole chunks of patches, each
reading its patches with the worker's cached slide handle and writing its
chunks directly, :mod:`pipeline.extract`). A slide whose patches are its
stored JPEG tiles, copied as they are, is instead one task that plans, copies
and marks it complete, while at least as many slides as workers wait behind
it: the driver and Dask's scheduler then spend CPU on one task per slide
instead of several. The driver keeps a bounded window of tasks in flight, so
memory stays bounded whatever the cohort size, and a group is marked complete
only after every chunk of it was written.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import submit_reporting, task_error
from .config import TilingConfig
from .errors import AnnotationError, OutputWriteError, SlideError, failure_reason
from .extract import extract_chunk
from .grid import slide_id_of
from .plan import SlideJob, SlidePlan, find_annotation, job_fingerprint, plan_slide
from .store import (
    completed_attrs,
    create_slide_group,
    location,
    mark_complete,
    open_root,
    other_source,
    update_summary,
    zarr_root,
)

#: Raw pixels per extraction task that decodes and encodes its patches: whole Zarr chunks
#: adding up to about this many bytes, ~0.2 s of work, so that Dask's cost per task (~4 ms
#: of scheduler CPU on our 2-core machines, BENCHMARKS.md) stays a few percent.
TASK_BYTES = 64 * 2**20
#: A task that copies stored JPEG tiles (passthrough) does a tenth or less of that work per
#: patch, so it covers this many times more patches (one chunk in memory at a time either way).
COPY_FACTOR = 8


@dataclass
class SlideResult:
    """What happened to one slide: ``status`` is done, skipped or failed."""

    slide_id: str
    path: str
    status: str
    patches: int = 0
    tumor_patches: int = 0
    reason: str = ""
    seconds: float = 0.0
    level: int | None = None
    read_px: int | None = None
    #: What was left out of the annotation (degenerate outlines, unknown groups), one line each.
    warnings: tuple[str, ...] = ()

    def summary_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["warnings"] = list(self.warnings)
        return row


def make_jobs(
    slides: list[Path], annotations_dir: Path | None
) -> tuple[list[SlideJob], list[SlideResult]]:
    """Pair slides with annotations; a repeated slide id is a failure naming both files.

    So is a slide with two annotation files (:func:`find_annotation`).
    """
    jobs: dict[str, SlideJob] = {}
    failures = []
    for path in slides:
        slide_id = slide_id_of(path)
        if slide_id in jobs:
            reason = f"{path}: duplicate slide id {slide_id!r} (also {jobs[slide_id].path})"
            failures.append(SlideResult(slide_id, str(path), "failed", reason=reason))
            continue
        try:
            annotation = find_annotation(path, annotations_dir)
        except AnnotationError as exc:
            failures.append(SlideResult(slide_id, str(path), "failed", reason=str(exc)))
            continue
        jobs[slide_id] = SlideJob(slide_id, path, annotation)
    return list(jobs.values()), failures


def tile_slides(
    client: Any,
    slides: list[Path],
    store_path: Path | str,
    config: TilingConfig,
    *,
    annotations_dir: Path | None = None,
    overwrite: bool = False,
    max_in_flight: int | None = None,
    on_planned: Callable[[int], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    on_slide: Callable[[SlideResult], None] | None = None,
) -> list[SlideResult]:
    """Tile every slide into ``store_path`` on the Dask ``client``; one result per slide.

    Slides whose group is complete with the same inputs and config are
    skipped (unless ``overwrite``). A failing slide is reported in its result
    (reason names the file) and the others go on. ``on_planned(total_patches)``
    is called as extraction totals become known, ``on_patches(n)`` per chunk
    written and ``on_slide(result)`` once per slide.
    """
    from distributed import as_completed

    store_path = location(store_path)
    root = open_root(store_path)
    jobs, results = make_jobs(slides, annotations_dir)
    for result in results:
        _finish(root, result, on_slide)
    pending: list[tuple[SlideJob, str]] = []
    for job in jobs:
        digest = job_fingerprint(job, config)
        done = completed_attrs(root, job.slide_id)
        other = None if overwrite else other_source(done, job.path)
        if other is not None:
            result = SlideResult(
                job.slide_id,
                str(job.path),
                "failed",
                reason=f"{job.path}: {_other_source(job, store_path, other)}",
            )
            results.append(result)
            _finish(root, result, on_slide)
        elif not overwrite and done is not None and done.get("fingerprint") == digest:
            result = _skipped(job, root.attrs.get("slides", {}).get(job.slide_id, {}))
            results.append(result)
            _finish(root, result, on_slide)
        else:
            pending.append((job, digest))

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    in_flight_cap = max_in_flight or 4 * n_workers
    max_active = 2 * n_workers  # slides planned but not finished: bounds the driver's memory
    plan_queue = deque(pending)
    chunk_queue: deque[tuple[str, int, np.ndarray]] = deque()
    plans: dict[Any, tuple[SlideJob, str, float]] = {}  # future -> job, digest, start time
    chunks: dict[Any, str] = {}
    active: dict[str, _Writing] = {}  # planned slides still being written
    # Results come with the completion events: future.result() would cost a
    # synchronous round trip (~8 ms) per task in the driver.
    work = as_completed(loop=client.loop, with_results=True, raise_errors=False)

    def submit_some() -> None:
        while work.count() < in_flight_cap:
            # Plans first (at most max_active): the next slides are planned while this
            # one is extracted, so workers never wait for a plan between slides.
            if plan_queue and len(active) + len(plans) < max_active:
                job, digest = plan_queue.popleft()
                # A slide of copied tiles is one task, except the last few, whose
                # extraction tasks spread over the workers as the cohort runs out.
                copy_all = len(plan_queue) >= n_workers
                future = submit_reporting(
                    client, plan_and_start, job, config, store_path, digest, copy_all=copy_all
                )
                plans[future] = (job, digest, time.perf_counter())
            elif chunk_queue:
                slide_id, start, xy = chunk_queue.popleft()
                if slide_id not in active:
                    continue  # the slide failed meanwhile
                writing = active[slide_id]
                args = _chunk_args(writing.plan, store_path, writing.token, start, xy)
                future = submit_reporting(client, extract_chunk, *args)
                chunks[future] = slide_id
            else:
                return
            work.add(future)

    def fail(job: SlideJob, exc: BaseException) -> None:
        if isinstance(exc, OutputWriteError):  # the store's disk: every slide would fail
            raise exc
        active.pop(job.slide_id, None)
        result = SlideResult(
            job.slide_id, str(job.path), "failed", reason=failure_reason(job.path, exc)
        )
        results.append(result)
        _finish(root, result, on_slide)

    submit_some()
    for future, outcome in work:
        error = task_error(future, outcome)
        if future in plans:
            job, digest, started = plans.pop(future)
            if error is not None:
                fail(job, error)
                submit_some()
                continue
            if isinstance(outcome, Tiled):  # written and marked complete by the task
                for report in (on_planned, on_patches):
                    if report is not None:
                        report(outcome.patches)
                result = outcome.result(job, time.perf_counter() - started)
                results.append(result)
                _finish(root, result, on_slide)
                submit_some()
                continue
            plan: SlidePlan = outcome
            n = len(plan.table)
            block = _block_patches(config, plan.passthrough, n, n_workers)
            active[job.slide_id] = _Writing(
                plan=plan,
                token=_group_token(digest),
                remaining=-(-n // block),
                started=started,
            )
            chunk_queue.extend(
                (job.slide_id, start, plan.table.level_xy[start : start + block])
                for start in range(0, n, block)
            )
            if on_planned is not None:
                on_planned(n)
            submit_some()
            continue
        slide_id = chunks.pop(future)
        writing = active.get(slide_id)
        if writing is None:  # an earlier chunk of this slide failed
            submit_some()
            continue
        plan = writing.plan
        if error is not None:
            fail(plan.job, error)
            submit_some()
            continue
        if on_patches is not None:
            on_patches(outcome)
        writing.remaining -= 1
        if writing.remaining == 0:
            del active[slide_id]
            tiled = _mark_complete(root[slide_id], plan)
            result = tiled.result(plan.job, time.perf_counter() - writing.started)
            results.append(result)
            _finish(root, result, on_slide)
        submit_some()
    order = {path: i for i, path in enumerate(map(str, slides))}
    return sorted(results, key=lambda r: order.get(r.path, len(order)))


def plan_and_start(
    job: SlideJob, config: TilingConfig, store_path: str, digest: str, *, copy_all: bool = False
) -> SlidePlan | Tiled:
    """Worker side: plan the slide and (re)create its group, its per-patch tables written.

    Done on the worker so that the driver, which every slide's tasks go
    through, keeps little work of its own per slide. With ``copy_all``, a
    slide whose patches are stored tiles copied as they are (a small fraction
    of a second for a whole slide) is written and marked complete here too,
    and only its counts come back: one task per slide instead of a plan and
    its extraction tasks, each costing the driver and Dask's scheduler CPU.
    """
    plan, group = _plan_and_start(job, config, store_path, digest)
    if not (copy_all and plan.passthrough):
        return plan
    return _write_all(plan, group, store_path, digest, config)


def _plan_and_start(
    job: SlideJob, config: TilingConfig, store_path: str, digest: str
) -> tuple[SlidePlan, Any]:
    plan = plan_slide(job, config)
    return plan, _start_group(zarr_root(store_path), plan, digest, config)


def tile_slide(
    job: SlideJob, store_path: Path | str, config: TilingConfig, *, overwrite: bool = False
) -> SlideResult:
    """Tile one slide in this process: its plan, then its chunks in order.

    For per-slide tasks (the Prefect flows run one per Dask worker thread).
    Raises the slide's typed error instead of returning a failed result;
    returns ``skipped`` when its group is complete with the same inputs and
    config. Writes only the slide's own group: the cohort summary in the root
    attributes is left to one writer (:func:`record_results`), since
    concurrent tasks would race on it.
    """
    store_path = location(store_path)
    root = zarr_root(store_path)
    digest = job_fingerprint(job, config)
    done = completed_attrs(root, job.slide_id)
    other = None if overwrite else other_source(done, job.path)
    if other is not None:
        raise SlideError(job.path, _other_source(job, store_path, other))
    if not overwrite and done is not None and done.get("fingerprint") == digest:
        return _skipped(job, done)
    started = time.perf_counter()
    plan, group = _plan_and_start(job, config, store_path, digest)
    tiled = _write_all(plan, group, store_path, digest, config)
    return tiled.result(job, time.perf_counter() - started)


@dataclass(frozen=True)
class Tiled:
    """A slide written and marked complete by one worker task: what its result needs."""

    patches: int
    tumor_patches: int
    level: int
    read_px: int
    warnings: tuple[str, ...] = ()

    def result(self, job: SlideJob, seconds: float) -> SlideResult:
        return SlideResult(
            job.slide_id,
            str(job.path),
            "done",
            patches=self.patches,
            tumor_patches=self.tumor_patches,
            seconds=round(seconds, 2),
            level=self.level,
            read_px=self.read_px,
            warnings=self.warnings,
        )


def _other_source(job: SlideJob, store_path: str, other: str) -> str:
    return (
        f"slide id {job.slide_id!r} in {store_path} is already complete from "
        f"another file, {other}; pass --overwrite to replace it, or tile this one into "
        "another store"
    )


def _group_token(digest: str) -> str:
    """Unique per (re)created group: workers cache the open ``patches`` array by it."""
    return f"{digest}-{time.time_ns()}"


def _mark_complete(group: Any, plan: SlidePlan) -> Tiled:
    """Mark a slide's group complete (every chunk written) with its counts; return them."""
    table, resolution = plan.table, plan.resolution
    tiled = Tiled(
        len(table),
        int(table.labels.sum()),
        resolution.level,
        resolution.read_px,
        tuple(plan.attrs.get("annotation_warnings", ())),
    )
    mark_complete(group, {"patches": tiled.patches, "tumor_patches": tiled.tumor_patches})
    return tiled


def _write_all(
    plan: SlidePlan, group: Any, store_path: str, digest: str, config: TilingConfig
) -> Tiled:
    """Write every chunk of a planned slide in order, then mark its group complete."""
    table = plan.table
    token = _group_token(digest)
    block = _block_patches(config, plan.passthrough, len(table), workers=1)
    for start in range(0, len(table), block):
        extract_chunk(
            *_chunk_args(plan, store_path, token, start, table.level_xy[start : start + block])
        )
    return _mark_complete(group, plan)


def record_results(store_path: Path | str, results: list[SlideResult]) -> None:
    """Write the cohort summary rows of ``results`` in one update of the root attributes."""
    root = open_root(store_path)
    slides = dict(root.attrs.get("slides", {}))
    slides.update({r.slide_id: r.summary_row() for r in results})
    root.attrs["slides"] = slides


def _skipped(job: SlideJob, record: Any) -> SlideResult:
    """A slide complete with the same inputs and config; numbers from its summary or group."""
    return SlideResult(
        job.slide_id,
        str(job.path),
        "skipped",
        patches=record.get("patches", 0),
        tumor_patches=record.get("tumor_patches", 0),
        reason="complete with the same inputs and config",
        level=record.get("level"),
        read_px=record.get("read_px"),
    )


def _chunk_args(
    plan: SlidePlan, store_path: str, token: str, start: int, level_xy: np.ndarray
) -> tuple[Any, ...]:
    """:func:`extract_chunk`'s arguments for the patches at ``level_xy`` from ``start`` on."""
    resolution = plan.resolution
    return (
        str(plan.job.path),
        store_path,
        plan.job.slide_id,
        token,
        start,
        resolution.level,
        level_xy,
        resolution.read_px,
        resolution.patch_px,
        plan.passthrough,
        plan.verify_copied_tiles,
    )


def _block_patches(config: TilingConfig, passthrough: bool, n_patches: int, workers: int) -> int:
    """Patches per extraction task: whole chunks adding up to at most about ``TASK_BYTES``.

    Copying tasks cover ``COPY_FACTOR`` times more. A slide is split into a
    multiple of ``workers`` tasks where it has the chunks for it, all but the
    last of the same size, so that no worker is left with a short tail while
    another copies two full tasks (a 138-chunk slide copied on 2 workers:
    4 tasks of 35 chunks, not 3 of 42 and one of 12).
    """
    chunk = config.chunk_patches
    budget = TASK_BYTES * (COPY_FACTOR if passthrough else 1)
    max_chunks = max(1, budget // (chunk * config.patch_px**2 * 3))
    n_chunks = max(1, -(-n_patches // chunk))
    tasks = -(-n_chunks // max_chunks)
    tasks = min(n_chunks, -(-tasks // workers) * workers)
    return chunk * -(-n_chunks // tasks)


def _start_group(root: Any, plan: SlidePlan, digest: str, config: TilingConfig) -> Any:
    """(Re)create the slide's group with its per-patch tables; patches still to write."""
    table = plan.table
    group = create_slide_group(
        root,
        plan.job.slide_id,
        n_patches=len(table),
        patch_px=config.patch_px,
        chunk_patches=config.chunk_patches,
        codec=config.codec,
        codec_quality=config.codec_quality,
        attrs={**plan.attrs, "fingerprint": digest},
    )
    group["labels"][:] = table.labels
    group["tumor_fraction"][:] = table.tumor_fraction
    group["tissue_fraction"][:] = table.tissue_fraction
    group["coords"][:] = table.level0_xy
    return group


@dataclass
class _Writing:
    """A planned slide whose chunks are being written (driver-side state)."""

    plan: SlidePlan
    token: str  # unique per (re)created group: workers cache open arrays by it
    remaining: int  # extraction tasks not yet finished
    started: float  # perf_counter() when its plan was submitted


def _finish(root: Any, result: SlideResult, on_slide: Callable[[SlideResult], None] | None) -> None:
    update_summary(root, result.slide_id, result.summary_row())
    if on_slide is not None:
        on_slide(result)
