"""Train a patch classifier from Zarr patch stores: the run, from inputs to model directory.

The steps of the keras.io transfer-learning guide, under
``tf.distribute.MirroredStrategy`` (:mod:`models.distribute`): check the
inputs, build the model on a pretrained base, train the head with the base
frozen, then fine-tune its top layers at a lower rate (:mod:`models.phases`).
Around them, a resume guard: after every epoch the run commits its model and
state to the run directory (:mod:`models.rundir`), so a killed run started
again with the same stores and settings resumes at the next epoch, and
``wsiflow_model.json`` is written last (see :mod:`models.saved`).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from pipeline import __version__
from pipeline.config import TrainingConfig
from pipeline.errors import TrainingClusterError

from .classifier import build_classifier, preprocess_fn
from .data import SlidePatches, make_dataset, stain_sources, stain_transform
from .distribute import (
    TrainingCluster,
    check_cluster_replicas,
    distribution_strategy,
    mixed_policy,
)
from .inputs import TrainingInputs, check_training_inputs
from .phases import Phase, better, cosine_rate, enter_phase, phases_to_run, plan_phases
from .rundir import HISTORY_COLUMNS, RunDir, RunState
from .saved import (
    CLASS_NAMES,
    METADATA_FILE,
    MODEL_FILE,
    load_model_dir,
)
from .tracking import MlflowRun, tensorboard

#: Fewest steps in an epoch when ``steps_per_epoch`` is left to the data (tiny cohorts).
MIN_STEPS = 25


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
            "workers": meta.get("workers", 1),
            "global_batch": meta["global_batch"],
            "steps_per_epoch": meta["steps_per_epoch"],
            "train_slides": [s["slide_id"] for s in meta["slides"]["train"]],
            "validation_slides": [s["slide_id"] for s in meta["slides"]["validation"]],
            "val_auc": metrics["val_auc"],
            "val_loss": metrics["val_loss"],
            "val_accuracy": metrics["val_accuracy"],
            "test_slides": [s["slide_id"] for s in meta["slides"].get("test", [])],
            "test_auc": metrics.get("test_auc"),
            "test_loss": metrics.get("test_loss"),
            "test_accuracy": metrics.get("test_accuracy"),
            "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"],
            "history": meta["history"],
            "seconds": round(self.seconds, 1),
        }


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
    cluster: TrainingCluster | None = None,
    inputs: TrainingInputs | None = None,
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
    a bad input leaves no folder behind). ``inputs``: what
    :func:`models.inputs.check_training_inputs` returned for these ``stores``
    and ``cfg``, when the caller checked them first (the CLI does, before
    importing this module and Keras); None: checked here.

    With a ``cluster``, this process is one worker of a multi-worker run
    (every worker runs this with the same arguments). The chief (worker 0)
    alone holds, writes and finishes ``out_dir``; the others read the state
    to resume from it and write their own epochs' commits, which the
    strategy needs from every worker, to a temporary folder removed at the end.
    """
    started = time.perf_counter()
    check_cluster_replicas(cluster, cfg.replicas)  # before any file is read or made
    chief = cluster is None or cluster.is_chief
    if inputs is None:
        inputs = check_training_inputs(stores, cfg, workers=len(cluster.workers) if cluster else 1)
    mlflow = MlflowRun(cfg) if cfg.mlflow and chief else None
    run = source = RunDir(Path(out_dir), inputs.fingerprint)
    with contextlib.ExitStack() as held:
        if chief:
            if hold is not None:
                held.enter_context(hold())  # claim and lock out_dir: inputs are good
            state = run.prepare(overwrite=overwrite, replace_different=replace_different)
        else:
            state = RunState(inputs.fingerprint) if overwrite else source.read_state()
            # One place per run and worker: a killed worker's leftovers go when it resumes.
            scratch = Path(tempfile.gettempdir()) / (
                f"wsiflow-train-{inputs.fingerprint[:16]}-worker{cluster.index}"
            )
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            held.callback(shutil.rmtree, scratch, ignore_errors=True)
            run = RunDir(scratch, inputs.fingerprint)
        if isinstance(state, dict):  # finished with the same inputs and settings
            return TrainResult(
                source.path, state, reused=True, seconds=time.perf_counter() - started
            )
        resumed_at = state.epoch

        strategy = distribution_strategy(cfg.replicas, cluster)
        global_batch = cfg.batch_per_replica * strategy.num_replicas_in_sync
        train_tumor = sum(s.tumor for s in inputs.train)
        steps = cfg.steps_per_epoch or max(MIN_STEPS, math.ceil(2 * train_tumor / global_batch))
        preprocess = preprocess_fn(inputs.preprocessing)
        stain = inputs.stain
        train_sources, val_sources = _sources(inputs.train, stain), _sources(inputs.val, stain)
        # Datasets outside the strategy scope: their random generators live on the host.
        train_ds = make_dataset(
            inputs.train, batch_size=global_batch, training=True,
            seed=cfg.seed + (cluster.index if cluster else 0), preprocess=preprocess,
            hard_share=cfg.hard_negative_share, stain_jitter=cfg.stain_jitter,
            transform=_normalizer(train_sources, stain),
        )  # fmt: skip
        val_ds = make_dataset(
            inputs.val, batch_size=global_batch, training=False, seed=cfg.seed,
            preprocess=preprocess, max_patches=cfg.validation_max_patches,
            transform=_normalizer(val_sources, stain),
        )  # fmt: skip
        if cluster is not None:
            train_ds, val_ds = _whole_on_each_worker(train_ds), _whole_on_each_worker(val_ds)
        previous_policy = keras.mixed_precision.global_policy()
        if cfg.mixed_precision:
            keras.mixed_precision.set_global_policy(mixed_policy())
        keras.utils.set_random_seed(cfg.seed)
        if mlflow is not None:
            mlflow.start(run.path)
        try:
            with strategy.scope():
                if state.epoch:
                    model = source.load_last()
                elif inputs.parent_dir is not None:
                    model, _ = load_model_dir(inputs.parent_dir)
                else:
                    model, _ = build_classifier(
                        inputs.backbone, inputs.patch_px, weights=cfg.weights
                    )
            parent = inputs.parent
            base_name = parent.get("base_layer") if parent else _base_name(model, inputs.backbone)
            base = model.get_layer(base_name) if base_name else None
            total_epochs = sum(p.epochs for p in inputs.phases)
            # A cosine phase is its own budget: stopped early, its rate is still high, so
            # it runs to its end (the best epoch is kept either way).
            patience = cfg.early_stopping_patience if cfg.lr_schedule == "plateau" else None
            for index, phase, end, enter in phases_to_run(inputs.phases, state):
                if enter:
                    enter_phase(model, base, phase, cfg.fine_tune_layers, strategy)
                callbacks = [
                    _rate_rule(cfg, phase, start=end - phase.epochs),
                    tensorboard(run.path),
                    # Last: it records the learning rate the rate rule set.
                    _EpochCommit(
                        run,
                        state,
                        phase,
                        phase_index=index,
                        patience=patience,
                        total_epochs=total_epochs,
                        steps=steps,
                        global_batch=global_batch,
                        on_epoch=on_epoch,
                        on_batch=on_batch,
                    ),
                ]
                with _cluster_errors(cluster, source.path, state):
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
            if mlflow is not None:
                mlflow.failed()
            raise
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
        metadata = _metadata(
            inputs, cfg, config, state, base_name, strategy, global_batch, steps, cluster
        )
        # Inference normalises slides as this says; the slides fitted on the target's vectors.
        metadata["stain"] = {
            **stain,
            **_fallbacks(inputs.train + inputs.val, train_sources, val_sources),
        }
        test = inputs.test if chief else []  # the chief alone scores the test split
        metadata["metrics"].update(
            _test_metrics(
                run.path / MODEL_FILE, test, global_batch, cfg.seed, preprocess,
                _normalizer(_sources(test, stain), stain),
            )
        )  # fmt: skip
        metadata["seconds"] = round(time.perf_counter() - started, 1)
        run.finish(metadata)
        if mlflow is not None:
            mlflow.end(metadata["metrics"], run.path / METADATA_FILE)
        return TrainResult(
            source.path,
            metadata,
            resumed_at_epoch=resumed_at,
            seconds=time.perf_counter() - started,
            last_model=model,
        )


def _metadata(
    inputs: TrainingInputs,
    cfg: TrainingConfig,
    config: dict[str, Any] | None,
    state: RunState,
    base_name: str | None,
    strategy,
    global_batch: int,
    steps: int,
    cluster: TrainingCluster | None,
) -> dict[str, Any]:
    """``wsiflow_model.json``: how to use the model, what it was trained on, how well it did."""
    return {
        "complete": True,
        "format": 1,
        "wsiflow_version": __version__,
        "keras_version": keras.__version__,
        "backbone": inputs.backbone,
        "base_layer": base_name,
        "weights": cfg.weights,
        "parent_model": str(inputs.parent_dir) if inputs.parent_dir else None,
        "patch_px": inputs.patch_px,
        "patch_mpp": inputs.patch_mpp,
        "patch_level": inputs.patch_level,
        "preprocessing": inputs.preprocessing,
        "class_names": list(CLASS_NAMES),
        "output": "sigmoid probability of the tumor class",
        "replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),  # this worker's
        "workers": len(cluster.workers) if cluster else 1,
        "cluster": list(cluster.workers) if cluster else None,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "phases": [p.__dict__ for p in inputs.phases],
        "training": cfg.model_dump(mode="json"),
        "hard_negatives": (
            _hard_negative_record(cfg, inputs.train) if cfg.hard_negative_share > 0 else None
        ),
        "config": config,
        "stores": sorted({s.store for s in inputs.slides}),
        "slides": {
            "train": [_slide_record(s) for s in inputs.train],
            "validation": [_slide_record(s) for s in inputs.val],
            "test": [_slide_record(s) for s in inputs.test],
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
        "fingerprint": inputs.fingerprint,
    }


def _rate_rule(cfg: TrainingConfig, phase: Phase, start: int) -> keras.callbacks.Callback:
    """The callback that sets ``phase``'s learning rate; ``start``: its first epoch (0-based)."""
    if cfg.lr_schedule == "cosine":
        # A function of the epoch alone, so a resumed run trains at the rate it would have.
        return keras.callbacks.LearningRateScheduler(
            lambda epoch, _rate: cosine_rate(phase, epoch - start)
        )
    return keras.callbacks.ReduceLROnPlateau(
        monitor="val_auc", mode="max", factor=0.2, patience=cfg.reduce_lr_patience, min_lr=1e-7
    )


class _EpochCommit(keras.callbacks.Callback):
    """After every epoch: its history row, the commit to the run directory, early stopping."""

    def __init__(
        self,
        run: RunDir,
        state: RunState,
        phase: Phase,
        *,
        phase_index: int,
        patience: int | None,
        total_epochs: int,
        steps: int,
        global_batch: int,
        on_epoch: Callable[[EpochRecord], None] | None,
        on_batch: Callable[[int, int, int], None] | None,
    ):
        super().__init__()
        self.run, self.state, self.phase = run, state, phase
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
        improved = better(record, state.best)
        if improved:
            state.best, state.wait = record, 0
        else:
            state.wait += 1
        stopped = self.patience is not None and state.wait >= self.patience
        state.epoch, state.phase_index = epoch + 1, self.phase_index
        state.phase_done = stopped
        state.history.append(record)
        self.run.commit_epoch(self.model, state, best=improved)
        if stopped:
            self.model.stop_training = True
        if self.on_epoch is not None:
            self.on_epoch(
                EpochRecord(
                    epoch + 1, self.total_epochs, self.phase.name, record, improved, stopped
                )
            )


def _whole_on_each_worker(dataset):
    """``dataset`` as each worker of a multi-worker run reads it: whole, not sharded by Keras.

    Training: each worker draws its own stream (its own seed); Keras gives
    each replica per-replica batches of it, so a step still takes one global
    batch over all workers. Validation: every worker reads the same whole
    set, so the metrics agree on every worker and none runs out of batches
    before the others (uneven input hangs the all-reduce).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


@contextlib.contextmanager
def _cluster_errors(cluster: TrainingCluster | None, out_dir: Path, state: RunState):
    """A worker lost mid-run as one :class:`TrainingClusterError` saying how to resume."""
    if cluster is None:
        yield
        return
    import tensorflow as tf

    failed = None
    try:
        yield
    except (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.CancelledError,
        tf.errors.AbortedError,
    ) as exc:
        # TensorFlow's message: the op that saw it ({{...}}), then the cause over a few lines.
        reason = " ".join(re.sub(r"\{\{.*?\}\}", "", exc.message or "").split())
        reason = textwrap.shorten(reason, 240, placeholder=" ...") or type(exc).__name__
        failed = TrainingClusterError(
            out_dir,
            f"a worker of the training cluster ({', '.join(cluster.workers)}) stopped or cannot "
            f"be reached ({reason}); {cluster.resume_hint} to resume "
            f"after epoch {state.epoch}",
        )
    if failed is not None:
        _quiet_pool_teardown()
        raise failed


def _quiet_pool_teardown() -> None:
    """Drop the one error TensorFlow's failed all-reduce leaves for the interpreter's exit.

    Its thread pool (``cross_device_ops``, one thread per device) is never
    closed when a peer is lost; torn down at exit, ``Pool.__del__`` writes to
    a pipe already closed and Python prints that as a traceback after the
    one-line error. Other unraisable errors are reported as before.
    """
    import multiprocessing.pool

    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.object is not multiprocessing.pool.Pool.__del__:
            previous(unraisable)

    sys.unraisablehook = hook


def _base_name(model, backbone: str) -> str | None:
    if backbone == "small_cnn":
        return None
    nested = [layer.name for layer in model.layers if hasattr(layer, "layers")]
    return nested[0] if nested else None


def _test_metrics(
    model_path: Path,
    test: list[SlidePatches],
    batch_size: int,
    seed: int,
    preprocess,
    transform=None,
) -> dict[str, float | None]:
    """AUC, loss and accuracy of the best model on the held-out test groups (None without).

    Every test patch once, as stored, after training: the test split
    chooses nothing (not the epoch, not the learning rate).
    """
    if not test:
        return {"test_auc": None, "test_loss": None, "test_accuracy": None}
    model = keras.models.load_model(model_path)  # compiled: its last phase's loss and metrics
    dataset = make_dataset(
        test,
        batch_size=batch_size,
        training=False,
        seed=seed,
        preprocess=preprocess,
        transform=transform,
    )
    logs = model.evaluate(dataset, return_dict=True, verbose=0)
    return {f"test_{k}": float(logs[k]) for k in ("auc", "loss", "accuracy")}


def _sources(slides: list[SlidePatches], stain: dict[str, Any]) -> list[dict] | None:
    """Each slide's own stain fit (None without normalisation)."""
    if stain["normalization"] == "none":
        return None
    return stain_sources(slides, stain["normalization"], stain["target"])


def _normalizer(sources: list[dict] | None, stain: dict[str, Any]):
    """The data stream's transform from the slides' ``sources`` (None without normalisation)."""
    return None if sources is None else stain_transform(sources, stain["target"])


def _fallbacks(slides: list[SlidePatches], *sources: list[dict] | None) -> dict[str, Any]:
    """``{"fallback": [...]}``: the slides whose stain was unmixed with the target's vectors.

    ``sources``: the fits of ``slides`` in order, in parts (None: no normalisation).
    """
    if all(part is None for part in sources):
        return {}
    fits = [fit for part in sources for fit in part or []]
    rows = [
        {"store": slide.store, "slide_id": slide.slide_id, "reason": fit["fallback"]}
        for slide, fit in zip(slides, fits, strict=True)
        if "fallback" in fit
    ]
    return {"fallback": rows} if rows else {}


def _hard_negative_record(cfg: TrainingConfig, train: list[SlidePatches]) -> dict[str, Any]:
    """What the model's metadata says about the hard negatives it trained with."""
    return {
        "share": cfg.hard_negative_share,
        "patches": int(sum(len(s.hard_negatives) for s in train)),
        "mining": {
            s.slide_id: {
                k: s.mining.get(k)
                for k in ("model_dir", "threshold", "margin_um", "mined", "fingerprint")
            }
            for s in train
        },
    }


def _slide_record(slide: SlidePatches) -> dict[str, Any]:
    return {
        "store": slide.store,
        "slide_id": slide.slide_id,
        "patches": len(slide),
        "tumor": slide.tumor,
    }


__all__ = [
    "EpochRecord",
    "Phase",
    "TrainResult",
    "distribution_strategy",
    "plan_phases",
    "train_classifier",
]
