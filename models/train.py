"""Train a patch classifier from Zarr patch stores under ``tf.distribute.MirroredStrategy``.

One code path on every machine: MirroredStrategy over all visible GPUs, or,
without GPUs, over ``replicas`` logical CPU devices carved out of the CPU (so
the distributed path runs and is tested on a laptop). Global batch =
per-replica batch x replicas; Keras splits each global batch across replicas
and averages their gradients.

Phases: with pretrained weights (ImageNet, a weights file, or a previous
wsiflow model) the head trains first with the base frozen, then the top N
layers of the base open at a lower learning rate. Without pretrained weights
there is nothing to protect: one phase trains every layer.

After every epoch the run writes ``checkpoints/last.keras`` (model and
optimizer) and ``checkpoints/state.json`` (the commit point), and the best
model by validation AUC to ``model.keras``; a killed run started again with
the same stores and settings resumes at the next epoch. ``wsiflow_model.json``
is written last (see :mod:`models.saved`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import __version__
from pipeline.config import TrainingConfig
from pipeline.errors import ModelError, StoreError, WsiflowError
from pipeline.outputs import atomic, claim_folder
from pipeline.store import canonical, fingerprint

from .classifier import (
    WeightsError,
    build_classifier,
    check_backbone,
    freeze_backbone,
    preprocess_fn,
    unfreeze_top,
)
from .data import SlidePatches, make_dataset, open_stores, split_by_slide
from .saved import (
    CLASS_NAMES,
    METADATA_FILE,
    MODEL_FILE,
    load_model_dir,
    model_dir_of,
    read_metadata,
    write_json_atomic,
)

CHECKPOINTS = "checkpoints"
HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = (
    "epoch", "phase", "learning_rate", "loss", "auc", "accuracy",
    "val_loss", "val_auc", "val_accuracy", "seconds", "patches_per_s",
)  # fmt: skip
#: Fewest steps in an epoch when ``steps_per_epoch`` is left to the data (tiny cohorts).
MIN_STEPS = 25
#: Validation AUCs closer than this are a tie, broken by the validation loss.
AUC_TIE = 1e-4
#: Settings that change nothing about the trained model (not part of its fingerprint).
_NOT_FINGERPRINTED = ("mlflow", "mlflow_tracking_uri")


@dataclass(frozen=True)
class Phase:
    """One ``fit`` of the schedule: which layers train, for how long, how fast."""

    name: str  # "head" (base frozen), "fine_tune" (top layers open) or "full"
    epochs: int
    learning_rate: float


@dataclass
class EpochRecord:
    """What one finished epoch reports to the caller's progress callback."""

    epoch: int  # 1-based, counted over all phases
    total_epochs: int
    phase: str
    logs: dict[str, float]
    improved: bool
    stopped: bool


@dataclass
class TrainResult:
    model_dir: Path
    metadata: dict[str, Any]
    reused: bool = False
    resumed_at_epoch: int = 0
    seconds: float = 0.0
    last_model: Any = None  # the model after the last epoch (model.keras holds the best)

    def summary(self) -> dict[str, Any]:
        """The numbers a user looks for (JSON-able): data, settings, best validation metrics."""
        meta = self.metadata
        metrics = meta["metrics"]
        return {
            "model_dir": str(self.model_dir),
            "reused": self.reused,
            "resumed_at_epoch": self.resumed_at_epoch,
            "backbone": meta["backbone"],
            "weights": meta["weights"],
            "patch_px": meta["patch_px"],
            "patch_mpp": meta["patch_mpp"],
            "replicas": meta["replicas"],
            "global_batch": meta["global_batch"],
            "steps_per_epoch": meta["steps_per_epoch"],
            "train_slides": [s["slide_id"] for s in meta["slides"]["train"]],
            "validation_slides": [s["slide_id"] for s in meta["slides"]["validation"]],
            "val_auc": metrics["val_auc"],
            "val_loss": metrics["val_loss"],
            "val_accuracy": metrics["val_accuracy"],
            "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"],
            "history": meta["history"],
            "seconds": round(self.seconds, 1),
        }


@dataclass
class _State:
    """The run's progress, saved after every epoch as ``checkpoints/state.json``."""

    fingerprint: str
    epoch: int = 0  # epochs finished, over all phases
    phase_index: int = 0
    phase_done: bool = False  # the current phase stopped early or ran all its epochs
    wait: int = 0  # epochs of the current phase since the last better val AUC
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_phases(cfg: TrainingConfig, pretrained: bool) -> list[Phase]:
    """The schedule: head then fine-tune when pretrained, else one full phase."""
    if pretrained:
        phases = [
            Phase("head", cfg.head_epochs, cfg.learning_rate),
            Phase("fine_tune", cfg.fine_tune_epochs, cfg.fine_tune_learning_rate),
        ]
        phases = [p for p in phases if p.epochs]
    else:
        phases = [Phase("full", cfg.head_epochs + cfg.fine_tune_epochs, cfg.learning_rate)]
    if not phases or not phases[0].epochs:
        raise ValueError(
            "Expected at least one training epoch. Received: head_epochs=0 and fine_tune_epochs=0"
        )
    return phases


def distribution_strategy(replicas: int = 1):
    """MirroredStrategy over all GPUs, or over ``replicas`` logical CPU devices.

    Logical devices must be configured before TensorFlow starts its runtime;
    in a process where it already has fewer, this raises ``RuntimeError``
    saying so rather than silently training on fewer replicas.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()  # every visible GPU (CUDA_VISIBLE_DEVICES)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        # Dask and OpenMP settings do not reach TF's thread pools: set them.
        threads = os.cpu_count() or 1
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        if replicas > 1:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
            )
    except RuntimeError as exc:  # the runtime is already up in this process
        have = len(tf.config.list_logical_devices("CPU"))
        if have < replicas:
            raise RuntimeError(
                f"TensorFlow already started with {have} logical CPU device(s), so "
                f"{replicas} replicas cannot be made in this process; choose the replicas "
                "before TensorFlow runs (a new process, e.g. `wsiflow train --replicas N`)"
            ) from exc
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def train_classifier(
    stores: list[Path] | tuple[Path, ...],
    out_dir: Path | str,
    cfg: TrainingConfig,
    *,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
    replace_different: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    hold: Callable[[], AbstractContextManager] | None = None,
) -> TrainResult:
    """Train on the complete slides of ``stores`` and write the model directory ``out_dir``.

    Everything that can be wrong with the inputs (stores, labels, classes,
    backbone, patch size, weights, an ``out_dir`` holding another model) is
    checked before the first step. A finished ``out_dir`` with the same
    inputs and settings is reused; an interrupted one resumes; ``overwrite``
    starts afresh. A run with other inputs or settings in ``out_dir`` is an
    error, or is replaced with ``replace_different`` (a directory the caller
    owns, as the demo's). ``config`` (the whole resolved config) goes into the
    metadata for the record. ``on_epoch`` gets an :class:`EpochRecord` after
    every epoch, ``on_batch`` ``(epoch, step, steps)`` after every step.
    ``hold()`` is entered once the inputs are checked, before ``out_dir`` is
    read or made, and held to the end (the CLI claims and locks it there, so
    a bad input leaves no folder behind).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    slides = open_stores(stores)
    px = slides[0].patch_px
    patch_mpp = _common_mpp(slides)
    parent_dir = model_dir_of(cfg.weights) if cfg.weights not in ("none", "imagenet") else None
    parent = read_metadata(parent_dir) if parent_dir else None
    backbone = parent["backbone"] if parent else cfg.backbone
    if parent and int(parent["patch_px"]) != px:
        raise ModelError(
            parent_dir,
            f"was trained on {parent['patch_px']} px patches; the stores hold {px} px patches",
        )
    weights_file = cfg.weights not in ("none", "imagenet") and parent is None
    if weights_file and not Path(cfg.weights).is_file():
        raise WeightsError(
            Path(cfg.weights),
            "no such weights file or wsiflow model directory "
            "(expected imagenet, none, a weights file or a model directory)",
        )
    spec = check_backbone(backbone, px)
    # Something to protect from a fresh head's first gradients: a pretrained backbone.
    pretrained = backbone != "small_cnn" and (parent is not None or cfg.weights != "none")
    phases = plan_phases(cfg, pretrained)
    train, val = split_by_slide(slides, cfg.validation_fraction, cfg.seed)
    _check_split(train, val)
    digest = fingerprint(
        {
            "slides": [[canonical(s.store), s.slide_id, s.fingerprint, len(s)] for s in slides],
            "training": cfg.model_dump(mode="json", exclude=set(_NOT_FINGERPRINTED)),
            "parent": parent.get("fingerprint") if parent else None,
        }
    )
    mlflow = _mlflow_or_error() if cfg.mlflow else None
    with contextlib.ExitStack() as held:
        if hold is not None:
            held.enter_context(hold())  # claim and lock out_dir: inputs are good
        state = _prepare_dir(out_dir, digest, overwrite, replace_different)
        if isinstance(state, dict):  # finished with the same inputs and settings
            return TrainResult(out_dir, state, reused=True, seconds=time.perf_counter() - started)
        resumed_at = state.epoch

        strategy = distribution_strategy(cfg.replicas)
        replicas = strategy.num_replicas_in_sync
        global_batch = cfg.batch_per_replica * replicas
        train_tumor = sum(s.tumor for s in train)
        steps = cfg.steps_per_epoch or max(MIN_STEPS, math.ceil(2 * train_tumor / global_batch))
        preprocess = preprocess_fn(spec.preprocessing)
        # Datasets outside the strategy scope: their random generators live on the host.
        train_ds = make_dataset(
            train, batch_size=global_batch, training=True, seed=cfg.seed, preprocess=preprocess
        )
        val_ds = make_dataset(
            val,
            batch_size=global_batch,
            training=False,
            seed=cfg.seed,
            preprocess=preprocess,
            max_patches=cfg.validation_max_patches,
        )
        previous_policy = keras.mixed_precision.global_policy()
        if cfg.mixed_precision:
            keras.mixed_precision.set_global_policy(_mixed_policy())
        keras.utils.set_random_seed(cfg.seed)
        checkpoints = out_dir / CHECKPOINTS
        mlflow_run = _start_mlflow(mlflow, cfg, out_dir) if mlflow else None
        try:
            with strategy.scope():
                if state.epoch:
                    model = _load_checkpoint(checkpoints / "last.keras")
                elif parent_dir is not None:
                    model, _ = load_model_dir(parent_dir)
                else:
                    model, _ = build_classifier(backbone, px, weights=cfg.weights)
            base_name = parent.get("base_layer") if parent else _base_name(model, backbone)
            base = model.get_layer(base_name) if base_name else None
            total_epochs = sum(p.epochs for p in phases)
            for index, phase in enumerate(phases):
                end = sum(p.epochs for p in phases[: index + 1])
                if index < state.phase_index or (
                    index == state.phase_index and (state.phase_done or state.epoch >= end)
                ):
                    continue  # finished before an interruption
                if index > state.phase_index or state.epoch == 0 or not _in_phase(state, index):
                    _enter_phase(model, base, phase, cfg, strategy)
                    state.phase_index, state.phase_done, state.wait = index, False, 0
                    state.epoch = max(state.epoch, end - phase.epochs)
                checkpointer = _Checkpointer(
                    out_dir,
                    state,
                    phase,
                    phase_index=index,
                    patience=cfg.early_stopping_patience,
                    total_epochs=total_epochs,
                    steps=steps,
                    global_batch=global_batch,
                    on_epoch=on_epoch,
                    on_batch=on_batch,
                )
                callbacks = [
                    keras.callbacks.ReduceLROnPlateau(
                        monitor="val_auc",
                        mode="max",
                        factor=0.2,
                        patience=cfg.reduce_lr_patience,
                        min_lr=1e-7,
                    ),
                    keras.callbacks.TensorBoard(
                        log_dir=str(out_dir / "logs"), write_graph=False, profile_batch=0
                    ),
                    checkpointer,  # last: it records the learning rate the plateau rule set
                ]
                model.fit(
                    train_ds,
                    steps_per_epoch=steps,
                    epochs=end,
                    initial_epoch=state.epoch,
                    validation_data=val_ds,
                    callbacks=callbacks,
                    shuffle=False,  # the stream is shuffled; Keras cannot shuffle a dataset
                    verbose=0,
                )
                state.phase_done = True
        except BaseException:
            if mlflow_run is not None:
                mlflow.end_run(status="FAILED")
            raise
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
        metadata = {
            "complete": True,
            "format": 1,
            "wsiflow_version": __version__,
            "keras_version": keras.__version__,
            "backbone": backbone,
            "base_layer": base_name,
            "weights": cfg.weights,
            "parent_model": str(parent_dir) if parent_dir else None,
            "patch_px": px,
            "patch_mpp": patch_mpp,
            "preprocessing": spec.preprocessing,
            "class_names": list(CLASS_NAMES),
            "output": "sigmoid probability of the tumor class",
            "replicas": replicas,
            "devices": list(strategy.extended.worker_devices),
            "global_batch": global_batch,
            "steps_per_epoch": steps,
            "phases": [p.__dict__ for p in phases],
            "training": cfg.model_dump(mode="json"),
            "config": config,
            "stores": sorted({s.store for s in slides}),
            "slides": {
                "train": [_slide_record(s) for s in train],
                "validation": [_slide_record(s) for s in val],
            },
            "metrics": {
                "best_epoch": state.best.get("epoch"),
                "val_auc": state.best.get("val_auc"),
                "val_loss": state.best.get("val_loss"),
                "val_accuracy": state.best.get("val_accuracy"),
                "train_auc": state.best.get("auc"),
                "train_loss": state.best.get("loss"),
                "epochs_run": len(state.history),
            },
            "history": state.history,
            "fingerprint": digest,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if not (out_dir / MODEL_FILE).is_file():
            raise ModelError(out_dir / MODEL_FILE, "no epoch produced a validation AUC to keep")
        write_json_atomic(out_dir / METADATA_FILE, metadata)  # the model is complete from here
        shutil.rmtree(checkpoints, ignore_errors=True)
        if mlflow_run is not None:
            best = {f"wsiflow_{k}": v for k, v in metadata["metrics"].items() if v is not None}
            mlflow.log_metrics(best)
            mlflow.log_artifact(str(out_dir / METADATA_FILE))
            mlflow.end_run()
        return TrainResult(
            out_dir,
            metadata,
            resumed_at_epoch=resumed_at,
            seconds=time.perf_counter() - started,
            last_model=model,
        )


class _Checkpointer(keras.callbacks.Callback):
    """Best model, last checkpoint, state, history and early stopping, after every epoch."""

    def __init__(
        self,
        out_dir: Path,
        state: _State,
        phase: Phase,
        *,
        phase_index: int,
        patience: int,
        total_epochs: int,
        steps: int,
        global_batch: int,
        on_epoch: Callable[[EpochRecord], None] | None,
        on_batch: Callable[[int, int, int], None] | None,
    ):
        super().__init__()
        self.out_dir, self.state, self.phase = Path(out_dir), state, phase
        self.phase_index, self.patience, self.total_epochs = phase_index, patience, total_epochs
        self.steps, self.epoch_patches = steps, steps * global_batch
        self.on_epoch, self.on_batch = on_epoch, on_batch
        self.epoch_started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()
        self.train_seconds = None
        self.epoch = epoch + 1

    def on_test_begin(self, logs=None):  # validation starts: the training steps are done
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.epoch_started

    def on_train_batch_end(self, batch, logs=None):
        if self.on_batch is not None:
            self.on_batch(self.epoch, batch + 1, self.steps)

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.epoch_started
        train_seconds = self.train_seconds or seconds
        logs = {k: float(v) for k, v in (logs or {}).items()}
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        record = {
            "epoch": epoch + 1,
            "phase": self.phase.name,
            "learning_rate": rate,
            **{k: logs.get(k) for k in HISTORY_COLUMNS[3:9]},
            "seconds": round(seconds, 2),
            "patches_per_s": round(self.epoch_patches / max(train_seconds, 1e-9), 1),
        }
        state = self.state
        improved = _better(record, state.best)
        checkpoints = self.out_dir / CHECKPOINTS
        checkpoints.mkdir(parents=True, exist_ok=True)
        _save_atomic(self.model, checkpoints / "last.keras")
        if improved:  # the same model: copy the file rather than serialise it again
            _copy_atomic(checkpoints / "last.keras", self.out_dir / MODEL_FILE)
            state.best, state.wait = record, 0
        else:
            state.wait += 1
        stopped = state.wait >= self.patience
        state.epoch, state.phase_index = epoch + 1, self.phase_index
        state.phase_done = stopped
        state.history.append(record)
        write_json_atomic(checkpoints / "state.json", state.to_json())  # the commit point
        _write_history(self.out_dir / HISTORY_FILE, state.history)
        if stopped:
            self.model.stop_training = True
        if self.on_epoch is not None:
            self.on_epoch(
                EpochRecord(
                    epoch + 1, self.total_epochs, self.phase.name, record, improved, stopped
                )
            )


def _better(record: dict[str, Any], best: dict[str, Any]) -> bool:
    """Higher validation AUC; at an equal AUC (within 1e-4), lower validation loss.

    AUC saturates near 1.0 on easy data while the probabilities are still
    badly calibrated; the loss then picks the model whose 0.5 threshold
    (lesion detection) means something.
    """
    auc, loss = record.get("val_auc"), record.get("val_loss")
    if auc is None or not math.isfinite(auc):
        return False
    if not best:
        return True
    if abs(auc - best["val_auc"]) <= AUC_TIE:
        return loss is not None and loss < (best.get("val_loss") or math.inf)
    return auc > best["val_auc"]


def _save_atomic(model, path: Path) -> None:
    with atomic(path, f".tmp-{path.name}") as tmp:  # Keras insists on the .keras suffix
        model.save(tmp)


def _copy_atomic(source: Path, path: Path) -> None:
    with atomic(path) as tmp:
        shutil.copyfile(source, tmp)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _prepare_dir(
    out_dir: Path, digest: str, overwrite: bool, replace_different: bool
) -> _State | dict[str, Any]:
    """A fresh or resumed state for ``out_dir``, or the metadata of a finished same run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(out_dir, "exists and is not a directory")
    claim_folder(out_dir, "model")  # never a folder of the user's: --overwrite deletes in it
    if overwrite or (replace_different and _run_in(out_dir) not in (None, digest)):
        for name in (MODEL_FILE, METADATA_FILE, HISTORY_FILE, "logs", CHECKPOINTS):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    other = ModelError(
        out_dir,
        "holds a model trained on other stores or settings; "
        "pass --overwrite to replace it or choose another --out",
    )
    metadata = _read_json(out_dir / METADATA_FILE, "model metadata")
    if metadata is not None:
        if metadata.get("complete") is True and metadata.get("fingerprint") == digest:
            return metadata
        raise other
    if (out_dir / CHECKPOINTS / "last.keras").is_file():
        saved = _read_json(out_dir / CHECKPOINTS / "state.json", "training state")
        if saved is not None:
            if saved.get("fingerprint") != digest:
                raise other
            return _State(**saved)
    return _State(fingerprint=digest)


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object the run wrote; None if absent, :class:`ModelError` if unreadable."""
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"unreadable {what}: {exc}") from exc
    if not isinstance(payload, dict):
        raise ModelError(path, f"unreadable {what}: not a JSON object")
    return payload


def _run_in(out_dir: Path) -> str | None:
    """The fingerprint of the run (finished or not) in ``out_dir``; None if there is none."""
    for path in (out_dir / METADATA_FILE, out_dir / CHECKPOINTS / "state.json"):
        try:
            payload = _read_json(path, "run record")
        except ModelError:
            return "unreadable"
        if payload is not None:
            return payload.get("fingerprint", "unknown")
    return None


def _in_phase(state: _State, index: int) -> bool:
    """A resumed run that stopped inside phase ``index`` (its model is already set up)."""
    return state.phase_index == index and not state.phase_done and state.epoch > 0


def _enter_phase(model, base, phase: Phase, cfg: TrainingConfig, strategy) -> None:
    if phase.name == "head":
        freeze_backbone(base)
    elif phase.name == "fine_tune":
        unfreeze_top(base, cfg.fine_tune_layers)
    elif base is not None:
        base.trainable = True
    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(phase.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[
                keras.metrics.AUC(name="auc", num_thresholds=500),
                keras.metrics.BinaryAccuracy(name="accuracy"),
            ],
        )


def _load_checkpoint(path: Path):
    try:
        return keras.models.load_model(path)
    except Exception as exc:
        raise ModelError(
            path, f"cannot resume from this checkpoint ({exc}); pass --overwrite to start afresh"
        ) from exc


def _base_name(model, backbone: str) -> str | None:
    if backbone == "small_cnn":
        return None
    nested = [layer.name for layer in model.layers if hasattr(layer, "layers")]
    return nested[0] if nested else None


def _common_mpp(slides: list[SlidePatches]) -> float | None:
    """The patches' µm/px; ``StoreError`` if slides differ by more than 10%."""
    values = [s.patch_mpp for s in slides if s.patch_mpp is not None]
    if not values:
        return None
    low, high = min(values), max(values)
    if high > low * 1.1:
        worst = max(slides, key=lambda s: s.patch_mpp or 0)
        raise StoreError(
            worst.store,
            f"patches of different physical sizes ({low:.3f}-{high:.3f} µm/px); "
            "tile every slide at one --mpp to train one model",
        )
    return float(np.median(values))


def _check_split(train: list[SlidePatches], val: list[SlidePatches]) -> None:
    for name, side in (("training", train), ("validation", val)):
        tumor = sum(s.tumor for s in side)
        if tumor == 0 or tumor == sum(len(s) for s in side):
            missing = "tumor" if tumor == 0 else "normal"
            raise StoreError(
                side[0].store,
                f"the {name} slides ({', '.join(s.slide_id for s in side)}) have no {missing} "
                "patch; a slide-level split needs at least two slides with tumor and one without",
            )


def _slide_record(slide: SlidePatches) -> dict[str, Any]:
    return {
        "store": slide.store,
        "slide_id": slide.slide_id,
        "patches": len(slide),
        "tumor": slide.tumor,
    }


def _mixed_policy() -> str:
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def _mlflow_or_error():
    try:
        import mlflow
        import mlflow.tensorflow  # its import needs pandas
    except ImportError as exc:
        raise WsiflowError(
            f"MLflow tracking was asked for (training.mlflow) but cannot be used: {exc}; "
            "pip install 'wsiflow[mlflow]'"
        ) from exc
    return mlflow


def _start_mlflow(mlflow, cfg: TrainingConfig, out_dir: Path):
    """An MLflow run with Keras autologging, into ``./mlruns`` unless a URI is configured."""
    uri = cfg.mlflow_tracking_uri
    if uri is None:
        # MLflow 3 keeps the file store in maintenance mode behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (Path.cwd() / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("wsiflow")
    # No dataset logging: MLflow would iterate the endless training stream to hash it.
    mlflow.tensorflow.autolog(log_models=False, log_datasets=False, checkpoint=False, silent=True)
    run = mlflow.start_run(run_name=out_dir.name)
    mlflow.log_params({f"wsiflow.{k}": v for k, v in cfg.model_dump(mode="json").items()})
    return run


__all__ = [
    "EpochRecord",
    "Phase",
    "TrainResult",
    "distribution_strategy",
    "plan_phases",
    "train_classifier",
]
