"""``tile_flow``: slides to a Zarr patch store, one task per slide on Dask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.runtime import load, locked, settle, task_options, task_runner
from pipeline.config import TilingConfig, WsiflowConfig
from pipeline.errors import failure_reason
from pipeline.store.patch_store import location, open_root
from pipeline.tiling.driver import SlideResult, make_jobs, record_results, summarize, tile_slide
from pipeline.tiling.plan import SlideJob


@task(task_run_name="tile-{job.slide_id}")
def tile_slide_task(
    job: SlideJob, store: str, config: TilingConfig, overwrite: bool = False
) -> SlideResult:
    """Tile one slide into its group of ``store`` (raises the slide's error).

    ``skipped`` when its group is complete with the same inputs and config:
    the store's fingerprint is the one record of what is done.
    """
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
    the others go on and the flow completes. A slide whose group is complete
    for the same slide, annotation and config is skipped. The tasks run on
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
    from pipeline.slides.reader import find_slides

    logger = get_run_logger()
    paths = find_slides([Path(s) for s in slides])
    jobs, results = make_jobs(paths, Path(annotations) if annotations else None)
    store_path = location(store)
    open_root(store_path)  # created once, here: the per-slide tasks only add their own groups
    tile = tile_slide_task.with_options(**task_options(cfg.orchestration, io=True, cache=False))
    with locked(store_path):
        futures = [tile.submit(job, store_path, cfg.tiling, overwrite) for job in jobs]
        for job, (result, error, _) in zip(jobs, settle(futures), strict=True):
            if error is not None:
                reason = failure_reason(job.path, error)
                result = SlideResult(job.slide_id, str(job.path), "failed", reason=reason)
                logger.error("failed: %s", result.reason)
            for warning in result.warnings:
                logger.warning(warning)
            results.append(result)
        order = {str(p): i for i, p in enumerate(paths)}
        results.sort(key=lambda r: order.get(r.path, len(order)))
        record_results(store_path, results)
    summary = {"flow": "tile", **summarize(results, store_path, cfg.tiling.patch_px)}
    rows = summary["per_slide"]
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
