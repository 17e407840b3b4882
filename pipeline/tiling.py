"""Tile slides into a Zarr patch store with Dask.

Per slide: plan (overview, tissue, annotations, patch grid, labels; one task),
then extract (one task per chunk of patches, each reading its patches with
the worker's cached slide handle and writing its Zarr chunk directly). The
driver keeps a bounded window of tasks in flight, so memory stays bounded
whatever the cohort size, and marks a group complete only after every chunk
of it was written.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
from PIL import Image

from . import __version__
from .annotations import check_within, read_annotations
from .codecs import image_codec_of, pack_images
from .config import TilingConfig
from .errors import FileError, NoTissueError, SlideError
from .grid import PatchTable, Resolution, choose_resolution, select_patches, slide_id_of
from .masks import PlacedMask, rasterize_tumor
from .slide import SlideReader, open_slide
from .store import (
    completed_fingerprint,
    create_slide_group,
    file_identity,
    fingerprint,
    mark_complete,
    open_patches,
    open_root,
    update_summary,
    write_encoded_chunk,
)
from .tissue import detect_tissue

#: Tumor masks are rasterised at this many samples per patch side.
TUMOR_SAMPLES_PER_PATCH = 16
#: Patches per extraction task: whole Zarr chunks adding up to about this many bytes, so
#: tasks are long enough (~0.1 s) for Dask's per-task overhead not to matter.
TASK_BYTES = 32 * 2**20
#: Overview used for tissue detection when the slide records no mpp: downsample 32.
NO_MPP_OVERVIEW_DOWNSAMPLE = 32.0
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile and the annotation file that goes with it (None: all normal)."""

    slide_id: str
    path: Path
    annotation: Path | None


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

    def summary_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SlidePlan:
    """Everything the extraction tasks and the store need for one slide."""

    job: SlideJob
    resolution: Resolution
    table: PatchTable
    attrs: dict[str, Any] = field(repr=False)
    passthrough: bool = False


def find_annotation(slide_path: Path, annotations_dir: Path | None) -> Path | None:
    """``<dir>/<slide stem>.xml`` (or ``.geojson``/``.json``) if it exists."""
    if annotations_dir is None:
        return None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = annotations_dir / f"{slide_path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def make_jobs(
    slides: list[Path], annotations_dir: Path | None
) -> tuple[list[SlideJob], list[SlideResult]]:
    """Pair slides with annotations; a repeated slide id is a failure naming both files."""
    jobs: dict[str, SlideJob] = {}
    failures = []
    for path in slides:
        slide_id = slide_id_of(path)
        if slide_id in jobs:
            failures.append(
                SlideResult(
                    slide_id,
                    str(path),
                    "failed",
                    reason=f"{path}: duplicate slide id {slide_id!r} (also {jobs[slide_id].path})",
                )
            )
            continue
        jobs[slide_id] = SlideJob(slide_id, path, find_annotation(path, annotations_dir))
    return list(jobs.values()), failures


def job_fingerprint(job: SlideJob, config: TilingConfig) -> str:
    """Identity of the inputs (slide, annotation) and the tiling config."""
    payload: dict[str, Any] = {"config": config.model_dump(mode="json"), "version": __version__}
    payload["slide"] = file_identity(job.path) if job.path.exists() else str(job.path)
    payload["annotation"] = None if job.annotation is None else file_identity(job.annotation)
    return fingerprint(payload)


def plan_slide(job: SlideJob, config: TilingConfig) -> SlidePlan:
    """Open the slide, find tissue, rasterise annotations and choose and label the patches."""
    stride_px = config.stride_px or config.patch_px
    with open_slide(job.path) as reader:
        info = reader.info
        resolution = choose_resolution(
            info,
            patch_px=config.patch_px,
            stride_px=stride_px,
            target_mpp=config.target_mpp,
            level=config.level,
        )
        tissue = _tissue_mask(reader, config.tissue_mpp)
        passthrough = _can_pass_through(reader, resolution, stride_px, config)
    polygons = []
    if job.annotation is not None:
        polygons = read_annotations(job.annotation)
        check_within(job.annotation, polygons, info.level0_wh)
    level_w, level_h = info.level_wh[resolution.level]
    level_scale = (info.level0_wh[0] / level_w, info.level0_wh[1] / level_h)
    tumor = rasterize_tumor(
        polygons, resolution.level0_patch_px / TUMOR_SAMPLES_PER_PATCH, info.level0_wh
    )
    table = select_patches(
        (level_w, level_h),
        level_scale,
        resolution,
        tissue,
        tumor,
        min_tissue_fraction=config.min_tissue_fraction,
        label_rule=config.label_rule,
        tumor_threshold=config.tumor_threshold,
    )
    if len(table) == 0:
        raise NoTissueError(
            job.path,
            f"no patch has >= {config.min_tissue_fraction:.0%} tissue "
            "(blank slide, or lower tiling.min_tissue_fraction)",
        )
    attrs = {
        "slide": file_identity(job.path),
        "annotation": None if job.annotation is None else file_identity(job.annotation),
        "vendor": info.vendor,
        "level0_wh": list(info.level0_wh),
        "mpp": None if info.mpp_xy is None else list(info.mpp_xy),
        "level": resolution.level,
        "downsample": resolution.downsample,
        "level_mpp": resolution.level_mpp,
        "patch_mpp": resolution.patch_mpp,
        "patch_px": resolution.patch_px,
        "stride_px": stride_px,
        "read_px": resolution.read_px,
        "read_stride_px": resolution.read_stride_px,
        "resampled": resolution.resampled,
        "passthrough": passthrough,
        "config": config.model_dump(mode="json"),
        "wsiflow_version": __version__,
    }
    return SlidePlan(
        job=job, resolution=resolution, table=table, attrs=attrs, passthrough=passthrough
    )


def _can_pass_through(
    reader: SlideReader, resolution: Resolution, stride_px: int, config: TilingConfig
) -> bool:
    """Whether patches are exactly the level's stored JPEG tiles, decoding to the same pixels.

    Then the tiles' bytes go into the store as they are: no decode, no
    re-encode, no generation loss (the source quality is kept, not
    ``codec_quality``).
    """
    direct = reader.direct_level(resolution.level)
    if (
        not config.passthrough
        or config.codec != "jpeg"
        or direct is None
        or not direct.whole_jpeg_tiles
        or resolution.resampled
        or not (resolution.read_px == stride_px == direct.tile_w == direct.tile_h)
        or direct.width < direct.tile_w
        or direct.height < direct.tile_h
    ):
        return False
    # The store decodes with plain imagecodecs: check it agrees with the TIFF decoder.
    index = direct.tile_index(0, 0)
    try:
        stored = imagecodecs.jpeg8_decode(direct.raw_tile(index))
        return bool(np.array_equal(stored, direct.tile(index)))
    except Exception:  # any doubt: decode and re-encode instead
        return False


def _tissue_mask(reader: SlideReader, tissue_mpp: float) -> PlacedMask:
    info = reader.info
    if info.mpp_xy is None:
        downsample = NO_MPP_OVERVIEW_DOWNSAMPLE
    else:
        downsample = tissue_mpp / ((info.mpp_xy[0] + info.mpp_xy[1]) / 2)
    overview, scale = reader.overview(max(1.0, downsample))
    overview_mpp = (info.mpp_xy[0] if info.mpp_xy else 1.0) * scale[0]
    mask = detect_tissue(overview, mpp=overview_mpp)
    return PlacedMask(mask=mask, origin_xy=(0.0, 0.0), scale_xy=scale)


# --- worker side -------------------------------------------------------------------------

_local = threading.local()


def _cached_reader(path: str) -> SlideReader:
    """The worker thread's open reader for ``path`` (a few kept, oldest closed)."""
    readers: dict[str, SlideReader] = getattr(_local, "readers", None) or {}
    _local.readers = readers
    reader = readers.get(path)
    if reader is None:
        if len(readers) >= 4:
            oldest = next(iter(readers))
            readers.pop(oldest).close()
        reader = readers[path] = open_slide(path)
    return reader


def _read_patch(
    reader: SlideReader, level: int, x: int, y: int, read_px: int, patch_px: int
) -> np.ndarray:
    patch = reader.read_level(level, (x, y), (read_px, read_px))
    if read_px != patch_px:
        patch = np.asarray(
            Image.fromarray(patch).resize((patch_px, patch_px), Image.Resampling.BILINEAR)
        )
    return patch


def read_patches(
    slide_path: str, level: int, level_xy: np.ndarray, read_px: int, patch_px: int
) -> np.ndarray:
    """Read ``(n, patch_px, patch_px, 3)`` uint8 patches at ``level_xy`` (level pixels)."""
    reader = _cached_reader(slide_path)
    out = np.empty((len(level_xy), patch_px, patch_px, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(level_xy):
        out[i] = _read_patch(reader, level, int(x), int(y), read_px, patch_px)
    return out


def _cached_patches(store_path: str, slide_id: str, token: str) -> Any:
    """The worker thread's open ``patches`` array; ``token`` changes when the group is redone."""
    arrays: dict[tuple[str, str, str], Any] = getattr(_local, "arrays", None) or {}
    _local.arrays = arrays
    key = (store_path, slide_id, token)
    array = arrays.get(key)
    if array is None:
        if len(arrays) >= 8:
            arrays.pop(next(iter(arrays)))
        array = arrays[key] = open_patches(store_path, slide_id)
    return array


def extract_chunk(
    slide_path: str,
    store_path: str,
    slide_id: str,
    token: str,
    start: int,
    level: int,
    level_xy: np.ndarray,
    read_px: int,
    patch_px: int,
    passthrough: bool = False,
) -> int:
    """Read a block of whole chunks' patches and write them into the store; return how many.

    Image-codec stores get each chunk encoded here, patch by patch while the
    decoded patch is still in cache, and written as the chunk's file (or, with
    ``passthrough``, the source tiles' bytes); lossless stores go through Zarr.
    """
    array = _cached_patches(store_path, slide_id, token)
    codec = image_codec_of(array)
    if codec is None:
        patches = read_patches(slide_path, level, level_xy, read_px, patch_px)
        array[start : start + len(patches)] = patches
        return len(patches)
    reader = _cached_reader(slide_path)
    direct = reader.direct_level(level) if passthrough else None
    chunk = array.chunks[0]
    for offset in range(0, len(level_xy), chunk):
        block = level_xy[offset : offset + chunk]
        if direct is not None:
            try:
                images = [direct.raw_tile(direct.tile_index(int(x), int(y))) for x, y in block]
            except OSError as exc:
                raise SlideError(slide_path, f"cannot read level {level} tiles: {exc}") from exc
        else:
            images = [
                codec.encode_patch(_read_patch(reader, level, int(x), int(y), read_px, patch_px))
                for x, y in block
            ]
        # The last chunk of an array is stored full size: repeat an image past the end.
        images += images[-1:] * (chunk - len(images))
        write_encoded_chunk(array, (start + offset) // chunk, pack_images(images))
    return len(level_xy)


# --- driver --------------------------------------------------------------------------------


def tile_slides(
    client: Any,
    slides: list[Path],
    store_path: Path,
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

    store_path = Path(store_path)
    root = open_root(store_path)
    jobs, results = make_jobs(slides, annotations_dir)
    for result in results:
        _finish(root, result, on_slide)
    pending: list[tuple[SlideJob, str]] = []
    for job in jobs:
        digest = job_fingerprint(job, config)
        if not overwrite and completed_fingerprint(root, job.slide_id) == digest:
            previous = root.attrs.get("slides", {}).get(job.slide_id, {})
            result = SlideResult(
                job.slide_id,
                str(job.path),
                "skipped",
                patches=previous.get("patches", 0),
                tumor_patches=previous.get("tumor_patches", 0),
                reason="complete with the same inputs and config",
                level=previous.get("level"),
                read_px=previous.get("read_px"),
            )
            results.append(result)
            _finish(root, result, on_slide)
        else:
            pending.append((job, digest))

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    in_flight_cap = max_in_flight or 4 * n_workers
    max_active = 2 * n_workers  # slides planned but not finished: bounds the driver's memory
    started: dict[str, float] = {}
    plan_queue = deque(pending)
    chunk_queue: deque[tuple[str, int, np.ndarray]] = deque()
    plans: dict[Any, tuple[SlideJob, str]] = {}
    chunks: dict[Any, str] = {}
    active: dict[str, SlidePlan] = {}  # planned slides still being written
    groups: dict[str, Any] = {}
    tokens: dict[str, str] = {}  # unique per (re)created group: workers cache open arrays by it
    remaining: dict[str, int] = {}
    # Results come with the completion events: future.result() would cost a
    # synchronous round trip (~8 ms) per task in the driver.
    work = as_completed(loop=client.loop, with_results=True, raise_errors=False)

    def submit_some() -> None:
        while work.count() < in_flight_cap:
            # Plans first (at most max_active): the next slides are planned while this
            # one is extracted, so workers never wait for a plan between slides.
            if plan_queue and len(active) + len(plans) < max_active:
                job, digest = plan_queue.popleft()
                started[job.slide_id] = time.perf_counter()
                future = client.submit(plan_slide, job, config, pure=False)
                plans[future] = (job, digest)
            elif chunk_queue:
                slide_id, start, xy = chunk_queue.popleft()
                if slide_id not in active:
                    continue  # the slide failed meanwhile
                plan = active[slide_id]
                future = client.submit(
                    extract_chunk,
                    str(plan.job.path),
                    str(store_path),
                    slide_id,
                    tokens[slide_id],
                    start,
                    plan.resolution.level,
                    xy,
                    plan.resolution.read_px,
                    plan.resolution.patch_px,
                    plan.passthrough,
                    pure=False,
                )
                chunks[future] = slide_id
            else:
                return
            work.add(future)

    def fail(job: SlideJob, exc: BaseException) -> None:
        active.pop(job.slide_id, None)
        result = SlideResult(job.slide_id, str(job.path), "failed", reason=_reason(job, exc))
        results.append(result)
        _finish(root, result, on_slide)

    submit_some()
    for future, outcome in work:
        # A failed task's outcome is (type, exception, traceback).
        error = outcome[1] if future.status == "error" else None
        if future in plans:
            job, digest = plans.pop(future)
            if error is not None:
                fail(job, error)
                submit_some()
                continue
            plan: SlidePlan = outcome
            n, chunk = len(plan.table), config.chunk_patches
            chunk_bytes = chunk * config.patch_px**2 * 3
            block = chunk * max(1, TASK_BYTES // chunk_bytes)
            group = create_slide_group(
                root,
                job.slide_id,
                n_patches=n,
                patch_px=config.patch_px,
                chunk_patches=chunk,
                codec=config.codec,
                codec_quality=config.codec_quality,
                attrs={**plan.attrs, "fingerprint": digest},
            )
            group["labels"][:] = plan.table.labels
            group["tumor_fraction"][:] = plan.table.tumor_fraction
            group["tissue_fraction"][:] = plan.table.tissue_fraction
            group["coords"][:] = plan.table.level0_xy
            active[job.slide_id], groups[job.slide_id] = plan, group
            tokens[job.slide_id] = f"{digest}-{time.time_ns()}"
            remaining[job.slide_id] = -(-n // block)
            chunk_queue.extend(
                (job.slide_id, start, plan.table.level_xy[start : start + block])
                for start in range(0, n, block)
            )
            if on_planned is not None:
                on_planned(n)
            submit_some()
            continue
        slide_id = chunks.pop(future)
        plan = active.get(slide_id)
        if plan is None:  # an earlier chunk of this slide failed
            submit_some()
            continue
        if error is not None:
            fail(plan.job, error)
            submit_some()
            continue
        written = outcome
        if on_patches is not None:
            on_patches(written)
        remaining[slide_id] -= 1
        if remaining[slide_id] == 0:
            table = active.pop(slide_id).table
            result = SlideResult(
                slide_id,
                str(plan.job.path),
                "done",
                patches=len(table),
                tumor_patches=int(table.labels.sum()),
                seconds=round(time.perf_counter() - started[slide_id], 2),
                level=plan.resolution.level,
                read_px=plan.resolution.read_px,
            )
            mark_complete(
                groups.pop(slide_id), {"patches": len(table), "tumor_patches": result.tumor_patches}
            )
            results.append(result)
            _finish(root, result, on_slide)
        submit_some()
    order = {path: i for i, path in enumerate(map(str, slides))}
    return sorted(results, key=lambda r: order.get(r.path, len(order)))


def _finish(root: Any, result: SlideResult, on_slide: Callable[[SlideResult], None] | None) -> None:
    update_summary(root, result.slide_id, result.summary_row())
    if on_slide is not None:
        on_slide(result)


def _reason(job: SlideJob, exc: BaseException) -> str:
    """One line naming the file and the reason; typed errors already name their file."""
    if isinstance(exc, FileError):
        return str(exc)
    return f"{job.path}: {type(exc).__name__}: {exc}"
