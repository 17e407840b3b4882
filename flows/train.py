"""``train_flow``: patch stores to a model directory (transfer learning, MirroredStrategy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.runtime import CACHE_EXPIRATION, cache_key, load, locked, task_options
from pipeline.config import WsiflowConfig


def store_identity(store: Path | str) -> dict[str, Any]:
    """The fingerprints of a store's complete slide groups: what training reads from it."""
    from pipeline.errors import StoreError
    from pipeline.store.patch_store import canonical, completed_fingerprint, open_store

    try:
        root = open_store(store)
    except StoreError:
        return {"missing": canonical(store)}
    return {
        "store": canonical(store),
        "slides": {sid: completed_fingerprint(root, sid) for sid in sorted(root.group_keys())},
    }


def model_complete(model_dir: Path | str) -> bool:
    from models.saved import METADATA_FILE

    return all((Path(model_dir) / name).is_file() for name in (METADATA_FILE, "model.keras"))


def _train_key(context: Any, parameters: dict[str, Any]) -> str:
    cfg: WsiflowConfig = parameters["cfg"]
    workers = cfg.orchestration.training_workers
    return cache_key(
        "train",
        [store_identity(s) for s in parameters["stores"]],
        str(Path(parameters["model_dir"]).resolve()),
        cfg.training.model_dump(mode="json"),
        # Part of the model's fingerprint when > 1; one-process keys stay as they were.
        *([{"training_workers": workers}] if workers > 1 else []),
    )


@task(
    task_run_name="train-{cfg.training.backbone}",
    cache_key_fn=_train_key,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def train_task(
    stores: list[str], model_dir: str, cfg: WsiflowConfig, replace_different: bool = False
) -> dict[str, Any]:
    """Train (or reuse, or resume) the model in ``model_dir``; its summary.

    In this process, or with ``orchestration.training_workers`` N > 1 as N
    processes on the Dask cluster (:mod:`flows.train_workers`).
    """
    from flows.train_workers import epoch_line

    logger = get_run_logger()
    if cfg.orchestration.training_workers > 1:
        return _train_on_dask(stores, model_dir, cfg, replace_different, logger.info)

    from models.train import train_classifier

    result = train_classifier(
        list(stores),  # paths or store URLs (Path would mangle s3://)
        Path(model_dir),
        cfg.training,
        config=cfg.model_dump(mode="json"),
        replace_different=replace_different,
        on_epoch=lambda record: logger.info(epoch_line(record)),
        hold=lambda: locked(model_dir, "model"),
    )
    return result.summary()


def _train_on_dask(
    stores: list[str],
    model_dir: str,
    cfg: WsiflowConfig,
    replace_different: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from prefect.runtime import flow_run

    from flows.train_workers import train_on_dask
    from pipeline.cluster import dask_client
    from pipeline.store.patch_store import canonical

    orchestration = cfg.orchestration
    with dask_client(orchestration.scheduler, workers=orchestration.training_workers) as client:
        return train_on_dask(
            client,
            [canonical(s) for s in stores],
            str(Path(model_dir).resolve()),
            cfg,
            replace_different=replace_different,
            command=f"prefect flow run {flow_run.flow_name}/{flow_run.name}",
            log=log,
        )


@flow(name="train", log_prints=True)
def train_flow(
    stores: list[str],
    model_dir: str,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
    replace_different: bool = False,
) -> dict[str, Any]:
    """Train a patch classifier on patch stores; the ``train-summary`` artifact has its metrics.

    Training runs in the flow's own process (TensorFlow spreads it over the
    cores or GPUs with MirroredStrategy), or, with
    ``orchestration.training_workers`` N > 1, in one process per worker of
    the Dask cluster (``orchestration.scheduler``, else a local one of N
    workers) under MultiWorkerMirroredStrategy. Served from Prefect's cache
    when the stores' slides, the training settings and the model directory
    are unchanged and the model is still there.
    """
    cfg = load(config, settings)
    options = task_options(cfg.orchestration, io=False, refresh=not model_complete(model_dir))
    summary = train_task.with_options(**options)(stores, model_dir, cfg, replace_different)
    artifacts.summary_markdown(
        "train-summary",
        f"Model {model_dir}",
        [
            ("backbone", f"{summary['backbone']} ({summary['weights']} weights)"),
            ("patches", f"{summary['patch_px']} px at {summary['patch_mpp']:.3f} µm/px"),
            ("validation AUC", f"{summary['val_auc']:.4f} (epoch {summary['best_epoch']})"),
            ("validation accuracy", f"{summary['val_accuracy']:.4f}"),
            (
                "slides",
                f"{len(summary['train_slides'])} train, "
                f"{len(summary['validation_slides'])} validation",
            ),
            ("model", f"{model_dir}/model.keras"),
        ],
    )
    return {"flow": "train", **summary}
