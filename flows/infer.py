"""``infer_flow``: whole slides to heatmaps, detections and scores, one task per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.runtime import cpu_count, load, locked, settle, task_options, task_runner
from pipeline.config import InferenceConfig, OrchestrationConfig, WsiflowConfig
from pipeline.errors import ModelError, failure_reason
from pipeline.identity import slide_id_of
from pipeline.inference.driver import (
    SlideInference,
    infer_slide,
    record_inference,
    summarize,
    unique_slides,
)
from pipeline.inference.predict import ModelSpec, model_spec
from pipeline.outputs import claim_folder


def _infer_name() -> str:
    from prefect.runtime import task_run

    return f"infer-{slide_id_of(Path(task_run.parameters['slide']))}"


@task(task_run_name=_infer_name)
def infer_slide_task(
    slide: str,
    spec: ModelSpec,
    out_dir: str,
    config: InferenceConfig,
    overwrite: bool = False,
    tf_threads: int | None = None,
) -> tuple[SlideInference, str]:
    """Predict one slide into ``out_dir``; its result and fingerprint (raises its error).

    ``skipped`` when ``inference.json`` records its outputs complete for the same
    slide, model and settings: the one record of what is done.
    """
    return infer_slide(
        Path(slide), spec, Path(out_dir), config, overwrite=overwrite, tf_threads=tf_threads
    )


def tf_threads(inference: InferenceConfig, orchestration: OrchestrationConfig) -> int | None:
    """TensorFlow threads per worker: the cores shared out (None on an external cluster)."""
    if orchestration.scheduler:
        return None
    return max(1, cpu_count() // (inference.workers or 1))  # one worker by default


@flow(name="infer", log_prints=True)
def infer_flow(
    model_dir: str,
    slides: list[str],
    out_dir: str,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict slides (files or folders) with the model in ``model_dir``, one task per slide.

    Only slides not yet done for this model and settings are predicted (a
    folder watched by a scheduled deployment costs nothing when nothing is
    new). A failing slide is listed in the result and the ``infer-slides``
    artifact while the others go on; a model that cannot be loaded fails the
    flow, naming the file. The tasks run on the configured Dask cluster
    (one local worker by default: TensorFlow uses every core), in a subflow.
    """
    cfg = load(config, settings)
    workers = cfg.inference.workers or 1
    runner = task_runner(cfg.orchestration, workers=workers)
    return infer_slides_flow.with_options(task_runner=runner)(
        model_dir, slides, out_dir, cfg, overwrite
    )


@flow(name="infer-slides", log_prints=True)
def infer_slides_flow(
    model_dir: str, slides: list[str], out_dir: str, cfg: WsiflowConfig, overwrite: bool
) -> dict[str, Any]:
    """``infer_flow``'s work, on the task runner it is given."""
    from pipeline.slides.reader import find_slides

    logger = get_run_logger()
    inference = cfg.inference
    # ModelError: the flow fails
    spec = model_spec(model_dir, inference.min_tissue_fraction, inference.slide_score)
    out = claim_folder(out_dir, "inference")  # never a folder of the user's
    threads = tf_threads(inference, cfg.orchestration)
    submitted, duplicates = unique_slides(find_slides([Path(s) for s in slides]))
    outcomes: list[tuple[SlideInference, str | None]] = [(d, None) for d in duplicates]
    infer = infer_slide_task.with_options(**task_options(cfg.orchestration, io=True, cache=False))
    with locked(out):
        futures = [
            infer.submit(str(p), spec, str(out), inference, overwrite, threads) for p in submitted
        ]
        model_errors = []
        for path, (outcome, error, _) in zip(submitted, settle(futures), strict=True):
            if error is not None:
                if isinstance(error, ModelError):
                    model_errors.append(error)
                failed = SlideInference(
                    slide_id_of(path), str(path), "failed", reason=failure_reason(path, error)
                )
                logger.error("failed: %s", failed.reason)
                outcomes.append((failed, None))
                continue
            outcomes.append(outcome)
        record_inference(out, spec, inference, outcomes)
    if model_errors:  # not the slides' fault: no slide can be done with this model
        raise model_errors[0]
    summary = {"flow": "infer", **summarize([result for result, _ in outcomes], out, model_dir)}
    rows = summary["per_slide"]
    artifacts.slides_table("infer-slides", rows, f"Inference into {out}: one row per slide")
    artifacts.summary_markdown(
        "infer-summary",
        f"Inference with {model_dir}",
        [
            ("slides", f"{summary['slides']} ({len(summary['failures'])} failed)"),
            ("patches", f"{summary['patches']:,}"),
            ("slide scores", str(out / "scores.csv")),
            ("heatmaps", str(out / "heatmaps")),
            ("detections", str(out / "detections")),
        ],
    )
    logger.info(
        "%d slides, %d patches, %d failed; heatmaps in %s",
        summary["slides"],
        summary["patches"],
        len(summary["failures"]),
        out / "heatmaps",
    )
    return summary
