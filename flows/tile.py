"""``tile_flow``: slides to a Zarr patch store, one task per slide on Dask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.runtime import (
    CACHE_EXPIRATION,
    cache_key,
    load,
    settle,
    task_options,
    task_runner,
)
from pipeline.config import TilingConfig, WsiflowConfig
from pipeline.errors import failure_reason
from pipeline.plan import SlideJob, job_fingerprint
from pipeline.store import canonical, completed_fingerprint, location, open_root, store_bytes
from pipeline.tiling import SlideResult, make_jobs, record_results, tile_slide


def _tile_key(context: Any, parameters: dict[str, Any]) -> str:
    job: SlideJob = parameters["job"]
    store = canonical(parameters["store"])
    return cache_key("tile", store, job.slide_id, job_fingerprint(job, parameters["config"]))


@task(
    task_run_name="tile-{job.slide_id}",
    cache_key_fn=_tile_key,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def tile_slide_task(
    job: SlideJob, store: str, config: TilingConfig, overwrite: bool = False
) -> SlideResult:
    """Tile one slide into its group of ``store`` (raises the slide's error)."""
    return tile_slide(job, store, config, overwrite=overwrite)


@flow(name="tile", log_prints=True)
def tile_flow(
    slides: list[str],
    store: str,
    annotations: str | None = None,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tile slides (files or folders) into the patch store ``store``, one task per slide.

    A failing slide is listed in the result and the ``tile-slides`` artifact;
    the others go on and the flow completes. A slide whose task already ran
    on the same slide, annotation and config is served from Prefect's cache,
    unless its group in the store is gone or incomplete. The tasks run on
    the configured Dask cluster (``orchestration``), in a subflow.
    """
    cfg = load(config, settings)
    on_dask = tile_slides_flow.with_options(task_runner=task_runner(cfg.orchestration))
    return on_dask(slides, store, annotations, cfg, overwrite)


@flow(name="tile-slides", log_prints=True)
def tile_slides_flow(
    slides: list[str],
    store: str,
    annotations: str | None,
    cfg: WsiflowConfig,
    overwrite: bool,
) -> dict[str, Any]:
    """``tile_flow``'s work, on the task runner it is given."""
    from pipeline.slide import find_slides

    logger = get_run_logger()
    paths = find_slides([Path(s) for s in slides])
    jobs, results = make_jobs(paths, Path(annotations) if annotations else None)
    store_path = location(store)
    root = open_root(store_path)  # once, here: the per-slide tasks only add their own groups
    futures = []
    for job in jobs:
        complete = completed_fingerprint(root, job.slide_id) == job_fingerprint(job, cfg.tiling)
        options = task_options(cfg.orchestration, io=True, refresh=overwrite or not complete)
        tile = tile_slide_task.with_options(**options)
        futures.append(tile.submit(job, store_path, cfg.tiling, overwrite))
    cached = 0
    for job, (result, error, state) in zip(jobs, settle(futures), strict=True):
        if error is not None:
            reason = failure_reason(job.path, error)
            result = SlideResult(job.slide_id, str(job.path), "failed", reason=reason)
            logger.error("failed: %s", result.reason)
        cached += state == "Cached"
        for warning in result.warnings:
            logger.warning(warning)
        results.append(result)
    order = {str(p): i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order.get(r.path, len(order)))
    record_results(store_path, results)
    rows = [r.summary_row() for r in results]
    summary = {
        "flow": "tile",
        "store": store_path,
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "cached": cached,
        "patches": sum(r.patches for r in results if r.status != "failed"),
        "tumor_patches": sum(r.tumor_patches for r in results if r.status != "failed"),
        "store_bytes": store_bytes(store_path),
        "failures": artifacts.failures(rows),
        "per_slide": rows,
    }
    artifacts.slides_table("tile-slides", rows, f"Patch store {store_path}: one row per slide")
    artifacts.summary_markdown(
        "tile-summary",
        f"Tiling into {store_path}",
        [
            ("slides", f"{summary['slides']} ({len(summary['failures'])} failed)"),
            ("patches", f"{summary['patches']:,} ({summary['tumor_patches']:,} tumor)"),
            ("store size", f"{summary['store_bytes'] / 1e6:,.1f} MB"),
            ("store", store_path),
        ],
    )
    logger.info(
        "%d slides, %d patches (%d tumor), %d failed",
        summary["slides"],
        summary["patches"],
        summary["tumor_patches"],
        len(summary["failures"]),
    )
    return summary
