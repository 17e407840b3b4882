"""``evaluate_flow``: CAMELYON16 slide AUC and lesion FROC of an inference folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.runtime import (
    CACHE_EXPIRATION,
    cache_key,
    folder_identity,
    identity,
    load,
    task_options,
)
from pipeline.config import EvaluationConfig
from pipeline.evaluation.evaluate import REPORT
from pipeline.inference.results import MANIFEST, SCORES
from pipeline.slides.annotations import EXCLUSION_GROUPS, TUMOR_GROUPS


def _evaluate_key(context: Any, parameters: dict[str, Any]) -> str:
    results = Path(parameters["results_dir"])
    masks = parameters.get("masks_dir")
    return cache_key(
        "evaluate",
        identity(results / SCORES),
        identity(results / MANIFEST),
        folder_identity(results / "detections", "*.csv"),
        folder_identity(results, "*.csv"),  # a submission folder of <slide>.csv
        identity(parameters["reference"]),
        folder_identity(parameters["annotations_dir"], "*.*"),
        folder_identity(masks, "*.tif") if masks else None,
        str(Path(parameters["slides_dir"]).resolve()) if parameters["slides_dir"] else None,
        str(Path(parameters["out_dir"] or results).resolve()),
        parameters["config"].model_dump(mode="json"),
        parameters.get("groups"),
    )


@task(cache_key_fn=_evaluate_key, cache_expiration=CACHE_EXPIRATION, persist_result=True)
def evaluate_task(
    results_dir: str,
    reference: str,
    annotations_dir: str | None,
    slides_dir: str | None,
    config: EvaluationConfig,
    out_dir: str | None = None,
    masks_dir: str | None = None,
    groups: tuple[tuple[str, ...], tuple[str, ...]] = (TUMOR_GROUPS, EXCLUSION_GROUPS),
) -> dict[str, Any]:
    """Evaluate; the report without its curves, plus the files written.

    ``groups``: the annotation groups that are tumor, and exclusions.
    """
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.slides.annotations import Groups

    evaluation = evaluate(
        Path(results_dir),
        Path(reference),
        Path(annotations_dir) if annotations_dir else None,
        Path(slides_dir) if slides_dir else None,
        config,
        out_dir=Path(out_dir) if out_dir else None,
        masks_dir=Path(masks_dir) if masks_dir else None,
        groups=Groups.of(*groups),
    )
    report = {k: v for k, v in evaluation.report.items() if k not in ("roc_curve", "froc_curve")}
    return {**report, "files": {k: str(v) for k, v in evaluation.files.items()}}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    results_dir: str,
    reference: str,
    annotations_dir: str | None = None,
    slides_dir: str | None = None,
    out_dir: str | None = None,
    masks_dir: str | None = None,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Slide-level ROC AUC and lesion-level FROC as the CAMELYON16 script computes them.

    Writes ``evaluation.json``, ``roc.png`` and ``froc.png``; the
    ``evaluate-summary`` artifact has the metrics and where the plots are.
    Served from Prefect's cache while the scores, detections, reference and
    annotations are unchanged and the report is still there.
    """
    cfg = load(config, settings)
    report_path = Path(out_dir or results_dir) / REPORT
    options = task_options(cfg.orchestration, io=False, refresh=not report_path.is_file())
    groups = (cfg.tiling.tumor_groups, cfg.tiling.exclusion_groups)
    report = evaluate_task.with_options(**options)(
        results_dir,
        reference,
        annotations_dir,
        slides_dir,
        cfg.evaluation,
        out_dir,
        masks_dir,
        groups,
    )
    artifacts.summary_markdown(
        "evaluate-summary",
        f"CAMELYON16 evaluation of {results_dir}",
        [
            ("slide AUC", artifacts.metric(report["slide_auc"])),
            ("FROC", artifacts.metric(report["froc"])),
            ("lesions", f"{report['lesions']} ({report['isolated_tumor_cells']} ITCs)"),
            *((f"{m} undefined", why) for m, why in report["undefined"].items()),
            *((k, v) for k, v in report["files"].items()),
        ],
    )
    return {"flow": "evaluate", **report}
