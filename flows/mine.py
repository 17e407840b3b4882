"""``mine_flow``: hard negatives of a patch store by a first model; training with them.

:func:`train_with_mining` is the recipe's training for the ``camelyon`` flow
and each fold of the slide classifier: train, and with ``mining.enabled``
mine the store with that model and train again with ``mining.share`` of the
normal patches from its hard negatives (from its weights, or anew:
:func:`retrain_settings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.runtime import load, task_options
from flows.train import train_flow
from pipeline.config import MiningConfig, WsiflowConfig


@task(name="mine-store")
def mine_task(store: str, model_dir: str, cfg: MiningConfig) -> dict[str, Any]:
    """Mine every slide the model trained on; each slide records itself, so reruns skip."""
    from pipeline.mining.driver import mine_store, summarize

    logger = get_run_logger()

    def report(result) -> None:
        if result.status == "failed":
            logger.error("failed: %s", result.reason)

    return summarize(mine_store(store, model_dir, cfg, on_slide=report), store, model_dir)


@flow(name="mine", log_prints=True)
def mine_flow(
    store: str, model_dir: str, config: str | None = None, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mine ``store``'s hard negatives with ``model_dir``; the ``mine-summary`` artifact."""
    cfg = load(config, settings)
    options = task_options(cfg.orchestration, io=False, cache=False)
    summary = {"flow": "mine", **mine_task.with_options(**options)(store, model_dir, cfg.mining)}
    artifacts.summary_markdown(
        "mine-summary",
        f"Hard negatives of {store}",
        [
            ("model", model_dir),
            ("slides", f"{summary['slides']} ({summary['failed']} failed)"),
            ("mined", f"{summary['mined']:,} of {summary['candidates']:,} candidates"),
        ],
    )
    get_run_logger().info(
        "%d hard negatives of %d candidates on %d slides",
        summary["mined"],
        summary["candidates"],
        summary["slides"],
    )
    return summary


def train_with_mining(
    store: str,
    model_dir: str,
    config: str | None,
    settings: dict[str, Any] | None,
    stage: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> str:
    """Train into ``model_dir``; with ``mining.enabled``, mine and train again.

    The second model goes into ``<model_dir>_hnm``; the final model's
    directory is returned. ``stage(name, run)`` runs each step (``train``,
    ``mine``, ``retrain``), so a caller can time them.
    """
    run_stage = stage or (lambda name, run: run())
    cfg = load(config, settings)
    run_stage("train", lambda: train_flow([store], model_dir, config, settings, True))
    if not cfg.mining.enabled:
        return model_dir
    run_stage("mine", lambda: mine_flow(store, model_dir, config, settings))
    second = f"{model_dir}_hnm"
    retrain = {**(settings or {}), **retrain_settings(cfg, model_dir)}
    run_stage("retrain", lambda: train_flow([store], second, config, retrain, True))
    return second


def retrain_settings(cfg: WsiflowConfig, model_dir: str) -> dict[str, Any]:
    """The second training's settings over the first's, as ``mining.retrain`` says.

    ``fine_tune``: from the first model's weights, with the training's phases
    (head, then the top ``fine_tune_layers``); ``continue``: from its weights,
    every layer open (BatchNorm excepted) at ``fine_tune_learning_rate`` for
    the first training's whole budget (its head is trained already, so
    nothing needs protecting from a fresh head; ``small_cnn``, without a
    base, trains in its one phase at ``learning_rate`` as always);
    ``scratch``: anew.
    """
    retrain: dict[str, Any] = {
        "training.hard_negative_share": cfg.mining.share,
        "training.hard_negatives_from": model_dir,
    }
    if cfg.mining.retrain in ("fine_tune", "continue"):
        retrain["training.weights"] = model_dir
    if cfg.mining.retrain == "continue":
        t = cfg.training
        retrain["training.head_epochs"] = 0
        retrain["training.fine_tune_epochs"] = t.head_epochs + t.fine_tune_epochs
        retrain["training.fine_tune_layers"] = "all"
    return retrain
