"""``slide_classifier_flow``: out-of-fold heatmaps of the training slides, then the classifier.

The ``camelyon`` flow runs it between training and inference when
``slide_classifier.enabled``. With ``folds`` K > 1 it trains K patch
models, each without one fold of the training slides
(``training.exclude_slides``) by the same recipe as the main model (hard
negatives too, with ``mining.enabled``), infers each fold with the model that did not
see it, and fits the slide classifier of the main model on those heatmaps;
``folds: 1`` infers the training slides with the main model itself
(in-sample heatmaps, recorded so). Every stage is a subflow that skips or
serves from cache what an earlier run finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import artifacts
from flows.infer import infer_flow
from flows.mine import train_with_mining
from flows.runtime import load
from pipeline.inference.slide_classifier import assign_folds, describe, fit_from_results


@flow(name="slide-classifier", log_prints=True)
def slide_classifier_flow(
    store: str,
    model_dir: str,
    slides: list[dict[str, Any]],
    work_dir: str,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit ``model_dir``'s slide classifier on heatmaps of ``slides`` (in ``store``).

    ``slides``: one ``{"slide_id", "path", "tumor"}`` per labelled training
    slide. Fold models and heatmaps go into ``work_dir`` (``fold<k>/model``,
    ``fold<k>/inference``; ``in_sample`` for one fold).
    """
    logger = get_run_logger()
    cfg = load(config, settings).slide_classifier
    work = Path(work_dir)
    paths = {s["slide_id"]: s["path"] for s in slides}
    labels = {s["slide_id"]: bool(s["tumor"]) for s in slides}
    # The heatmaps the classifier learns from are scored by their maximum, whatever the config.
    plain = {**(settings or {}), "inference.slide_score": "max"}
    results: list[str] = []
    if cfg.folds == 1:
        results.append(str(work / "in_sample"))
        infer_flow(model_dir, list(paths.values()), results[0], config, plain)
    else:
        for k, held_out in enumerate(assign_folds(labels, cfg.folds, cfg.seed)):
            fold = work / f"fold{k}"
            logger.info("fold %d of %d: a model without %s", k + 1, cfg.folds, ", ".join(held_out))
            # The same recipe as the main model (mining too), without the fold's slides.
            fold_model = train_with_mining(
                store, str(fold / "model"), config, {**plain, "training.exclude_slides": held_out}
            )
            results.append(str(fold / "inference"))
            infer_flow(fold_model, [paths[s] for s in held_out], results[-1], config, plain)
    summary = {
        "flow": "slide-classifier",
        "folds": cfg.folds,
        **fit_from_results(model_dir, results, labels, cfg),
    }
    if summary["in_sample"]:
        logger.warning(
            "%d of %d heatmaps are of slides the patch model trained or validated on",
            summary["in_sample"],
            summary["slides"],
        )
    artifacts.summary_markdown(
        "slide-classifier-summary",
        f"Slide classifier of {model_dir}",
        [("classifier", describe(summary)), ("file", summary["classifier"])],
    )
    return summary
