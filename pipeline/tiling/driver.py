"""Tile slides into a Zarr patch store with Dask: the driver.

Per slide: plan (overview, tissue, annotations, patch grid, labels; one task,
:mod:`pipeline.tiling.plan`), then extract (tasks of whole chunks of patches, each
reading its patches with the worker's cached slide handle and writing its
chunks directly, :mod:`pipeline.tiling.extract`). A slide whose patches are its
stored JPEG tiles, copied as they are, is instead one task that plans, copies
and marks it complete, while at least as many slides as workers wait behind
it: the driver and Dask's scheduler then spend CPU on one task per slide
instead of several. The driver keeps a bounded window of tasks in flight, so
memory stays bounded whatever the cohort size, and a group is marked complete
only after every chunk of it was written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TilingConfig
from pipeline.engine import Task, drive, failures, worker_count
from pipeline.errors import AnnotationError, OutputWriteError, SlideError, failure_reason
from pipeline.identity import file_identity, slide_id_of, split_repeated_ids
from pipeline.slides.annotations import find_annotation
from pipeline.store.patch_store import (
    completed_attrs,
    create_slide_group,
    location,
    mark_complete,
    open_root,
    other_source,
    store_bytes,
    update_summary,
    zarr_root,
)
from pipeline.tiling.extract import Chunks, extract_chunk
from pipeline.tiling.plan import SlideJob, SlidePlan, job_fingerprint, plan_slide

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
    unique, repeated = split_repeated_ids(slides)
    failures = [SlideResult(slide_id_of(p), str(p), "failed", reason=r) for p, r in repeated]
    jobs = []
    for path in unique:
        slide_id = slide_id_of(path)
        try:
            annotation = find_annotation(path, annotations_dir)
        except AnnotationError as exc:
            failures.append(SlideResult(slide_id, str(path), "failed", reason=str(exc)))
            continue
        jobs.append(SlideJob(slide_id, path, annotation))
    return jobs, failures


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
    store_path = location(store_path)
    root = open_root(store_path)
    n_workers = worker_count(client)
    stage = _Tiling(root, store_path, config, n_workers, record=True)
    stage.on_planned, stage.on_patches, stage.on_slide = on_planned, on_patches, on_slide
    jobs, failures = make_jobs(slides, annotations_dir)
    for result in failures:
        stage.report(result)
    pending = []
    for job in jobs:
        try:
            triaged = triage(root, store_path, job, config, overwrite=overwrite)
        except SlideError as exc:  # complete from another file
            triaged = SlideResult(job.slide_id, str(job.path), "failed", reason=str(exc))
        if isinstance(triaged, SlideResult):
            stage.report(triaged)
        else:
            pending.append(triaged)
    drive(
        client,
        stage,
        pending,
        # Slides planned but not finished: bounds the driver's memory.
        max_active=2 * n_workers,
        max_in_flight=max_in_flight or 4 * n_workers,
    )
    order = {path: i for i, path in enumerate(map(str, slides))}
    return sorted(stage.results, key=lambda r: order.get(r.path, len(order)))


def tile_slide(
    job: SlideJob, store_path: Path | str, config: TilingConfig, *, overwrite: bool = False
) -> SlideResult:
    """Tile one slide in this process: the same stage as :func:`tile_slides`, inline.

    For per-slide tasks (the Prefect flows run one per Dask worker thread).
    Raises the slide's typed error instead of returning a failed result;
    returns ``skipped`` when its group is complete with the same inputs and
    config. Writes only the slide's own group: the cohort summary in the root
    attributes is left to one writer (:func:`record_results`), since
    concurrent tasks would race on it.
    """
    store_path = location(store_path)
    root = zarr_root(store_path)
    triaged = triage(root, store_path, job, config, overwrite=overwrite)
    if isinstance(triaged, SlideResult):
        return triaged
    stage = _Tiling(root, store_path, config, workers=1, record=False)
    drive(None, stage, [triaged])
    return stage.results[0]


@dataclass(frozen=True)
class Pending:
    """A slide to tile: its job and the fingerprint its group will carry."""

    job: SlideJob
    digest: str


def triage(
    root: Any, store_path: str, job: SlideJob, config: TilingConfig, *, overwrite: bool
) -> SlideResult | Pending:
    """The one idempotency check: skipped (its group complete with this fingerprint) or to tile.

    Raises :class:`SlideError` when the group is complete from another file.
    """
    digest = job_fingerprint(job, config)
    done = completed_attrs(root, job.slide_id)
    other = None if overwrite else other_source(done, job.path)
    if other is not None:
        raise SlideError(job.path, _other_source(job, store_path, other))
    if not overwrite and done is not None and done.get("fingerprint") == digest:
        return _skipped(job, {**done, **root.attrs.get("slides", {}).get(job.slide_id, {})})
    return Pending(job, digest)


class _Tiling:
    """Tiling as an :class:`~pipeline.engine.Stage`: plan and start a group, write chunks."""

    def __init__(
        self, root: Any, store_path: str, config: TilingConfig, workers: int, *, record: bool
    ) -> None:
        self.root, self.store_path, self.config = root, store_path, config
        self.workers = workers
        self.record = record  # keep the store's cohort summary up to date per slide
        self.results: list[SlideResult] = []
        self.on_planned: Callable[[int], None] | None = None
        self.on_patches: Callable[[int], None] | None = None
        self.on_slide: Callable[[SlideResult], None] | None = None

    def plan(self, item: Pending, waiting: int) -> Task:
        # A slide of copied tiles is one task, except the last few, whose
        # extraction tasks spread over the workers as the cohort runs out.
        copy_all = waiting >= self.workers
        args = (item.job, self.config, self.store_path, item.digest)
        return Task(plan_and_start, args, {"copy_all": copy_all})

    def start(self, item: Pending, planned: SlidePlan | Tiled) -> tuple[Any, list[Task]]:
        if isinstance(planned, Tiled):  # written and marked complete by the task
            for report in (self.on_planned, self.on_patches):
                if report is not None:
                    report(planned.patches)
            return planned, []
        if self.on_planned is not None:
            self.on_planned(len(planned.table))
        chunks = _chunk_tasks(planned, self.store_path, item.digest, self.config, self.workers)
        return planned, [Task(extract_chunk, (c,)) for c in chunks]

    def block_done(self, item: Pending, plan: SlidePlan, index: int, written: int) -> None:
        if self.on_patches is not None:
            self.on_patches(written)

    def finish(self, item: Pending, planned: SlidePlan | Tiled, seconds: float) -> None:
        if not isinstance(planned, Tiled):
            planned = _mark_complete(self.root[item.job.slide_id], planned)
        self.report(planned.result(item.job, seconds))

    def fail(self, item: Pending, error: BaseException) -> None:
        if isinstance(error, OutputWriteError):  # the store's disk: every slide would fail
            raise error
        job = item.job
        self.report(
            SlideResult(
                job.slide_id, str(job.path), "failed", reason=failure_reason(job.path, error)
            )
        )

    def report(self, result: SlideResult) -> None:
        self.results.append(result)
        if self.record:
            update_summary(self.root, result.slide_id, result.summary_row())
        if self.on_slide is not None:
            self.on_slide(result)


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
    for chunks in _chunk_tasks(plan, store_path, digest, config, workers=1):
        extract_chunk(chunks)
    return _mark_complete(group, plan)


def summarize(results: list[SlideResult], store_path: str, patch_px: int) -> dict[str, Any]:
    """A tiling run's summary, the same for every front end (CLI, flows): counts, sizes, rows.

    ``store_bytes`` is the whole store on disk; ``raw_pixel_bytes`` what its
    stored patches are as uint8 pixels; ``slide_file_bytes`` the size of the
    slide files they came from.
    """
    stored = [r for r in results if r.status != "failed"]
    slide_bytes = sum(file_identity(Path(r.path))["size"] for r in stored if Path(r.path).exists())
    return {
        "store": store_path,
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(results) - len(stored),
        "patches": sum(r.patches for r in stored),
        "tumor_patches": sum(r.tumor_patches for r in stored),
        "patches_written": sum(r.patches for r in results if r.status == "done"),
        "store_bytes": store_bytes(store_path),
        "raw_pixel_bytes": sum(r.patches for r in stored) * patch_px**2 * 3,
        "slide_file_bytes": slide_bytes,
        "failures": failures(results),
        "per_slide": [r.summary_row() for r in results],
    }


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


def _chunk_tasks(
    plan: SlidePlan, store_path: str, digest: str, config: TilingConfig, workers: int
) -> list[Chunks]:
    """A planned slide's extraction tasks, in order, for a cluster of ``workers``."""
    level_xy, resolution = plan.table.level_xy, plan.resolution
    token = _group_token(digest)
    block = _block_patches(config, plan.passthrough, len(level_xy), workers)
    return [
        Chunks(
            slide_path=str(plan.job.path),
            store_path=store_path,
            slide_id=plan.job.slide_id,
            token=token,
            start=start,
            level=resolution.level,
            level_xy=level_xy[start : start + block],
            read_px=resolution.read_px,
            patch_px=resolution.patch_px,
            passthrough=plan.passthrough,
            verify=plan.verify_copied_tiles,
        )
        for start in range(0, len(level_xy), block)
    ]


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
