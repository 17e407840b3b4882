"""The distribution strategy of a training run, and the mixed-precision policy.

One code path everywhere: MirroredStrategy over all visible GPUs, or,
without GPUs, over ``replicas`` logical CPU devices carved out of the CPU (so
the distributed path runs and is tested on a laptop). Global batch =
per-replica batch x replicas; Keras splits each global batch across replicas
and averages their gradients.

Several machines: given a :class:`TrainingCluster` (``wsiflow train
--cluster``, or ``TF_CONFIG`` as TensorFlow defines it), the run is one
worker of a ``MultiWorkerMirroredStrategy``: the same Keras code, every
worker's replicas (its GPUs, or its CPU) in one all-reduce, the global batch
per-replica batch x replicas of all workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TrainingCluster:
    """The workers of a multi-worker run (``host:port`` each) and which one this process is.

    Worker 0 is the chief: it alone writes the model directory.
    """

    workers: tuple[str, ...]
    index: int
    #: What the one-line error of a lost worker tells the user to do to resume.
    resume_hint: str = "start every worker again with the same command"

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def tf_config(self) -> str:
        """``TF_CONFIG`` for this worker, as TensorFlow reads it."""
        return json.dumps(
            {
                "cluster": {"worker": list(self.workers)},
                "task": {"type": "worker", "index": self.index},
            }
        )


def training_cluster(
    workers: str | None, index: int | None, environ: Mapping[str, str] = os.environ
) -> TrainingCluster | None:
    """The cluster from ``--cluster HOST:PORT,...`` and ``--worker-index``, else ``TF_CONFIG``.

    None for a run on one machine. Raises :class:`ConfigError` naming the
    option (or the variable) and what is wrong.
    """
    if workers is None and index is None:
        raw = environ.get("TF_CONFIG")
        return None if not raw else _from_tf_config(raw)
    if workers is None or index is None:
        return _problem(
            "--cluster" if workers is None else "--worker-index",
            "Expected --cluster HOST:PORT,HOST:PORT,... and --worker-index I together. "
            f"Got only {'--worker-index' if workers is None else '--cluster'} instead.",
        )
    addresses = tuple(a.strip() for a in workers.split(","))
    return _checked(addresses, index, "--cluster", "--worker-index")


def _from_tf_config(raw: str) -> TrainingCluster | None:
    try:
        spec = json.loads(raw)
        addresses = tuple(spec["cluster"]["worker"])
        task = spec.get("task", {})
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        return _problem(
            "TF_CONFIG",
            'Expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            f'"index": I}}. Got {raw[:120]!r} instead ({type(exc).__name__}: {exc}).',
        )
    if kind != "worker" or set(spec["cluster"]) != {"worker"}:
        return _problem(
            "TF_CONFIG",
            "Expected a cluster of workers only (MultiWorkerMirroredStrategy: no chief, "
            f"ps or evaluator tasks). Got task type {kind!r} in {sorted(spec['cluster'])} instead.",
        )
    if len(addresses) == 1:
        return None  # one worker: the ordinary single-machine run
    return _checked(addresses, index, "TF_CONFIG", "TF_CONFIG")


def _checked(
    addresses: tuple[str, ...], index: int, where: str, index_where: str
) -> TrainingCluster:
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _problem(where, f"Expected HOST:PORT for each worker. Got {address!r} instead.")
    if len(set(addresses)) != len(addresses):
        _problem(where, f"Expected distinct workers. Got {','.join(addresses)} instead.")
    if not 0 <= index < len(addresses):
        _problem(
            index_where,
            f"Expected a worker index from 0 to {len(addresses) - 1}. Got {index} instead.",
        )
    return TrainingCluster(addresses, index)


def _problem(key: str, message: str):
    raise ConfigError(
        "command-line options" if key.startswith("--") else "environment", [(key, message, None)]
    )


def check_cluster_replicas(cluster: TrainingCluster | None, replicas: int) -> None:
    """A worker of a cluster mirrors over its own GPUs, or its CPU: ``replicas`` stays 1."""
    if cluster is not None and replicas != 1:
        _problem(
            "--replicas",
            "Expected 1 replica per worker of a --cluster (each worker mirrors over its "
            f"own GPUs, or its CPU). Got {replicas} instead.",
        )


def distribution_strategy(replicas: int = 1, cluster: TrainingCluster | None = None):
    """MirroredStrategy over all GPUs, or over ``replicas`` logical CPU devices.

    Logical devices must be configured before TensorFlow starts its runtime;
    in a process where it already has fewer, this raises ``RuntimeError``
    saying so rather than silently training on fewer replicas. With a
    ``cluster``, this process's worker of a MultiWorkerMirroredStrategy
    (``replicas`` must be 1: a worker's replicas are its GPUs, or its CPU).
    """
    import tensorflow as tf

    if cluster is not None:
        check_cluster_replicas(cluster, replicas)
        os.environ["TF_CONFIG"] = cluster.tf_config()
        _keras_multi_worker_fixes()
        return tf.distribute.MultiWorkerMirroredStrategy()

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


def mixed_policy() -> str:
    """float16 compute on GPUs (tensor cores), bfloat16 on CPUs."""
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def _keras_multi_worker_fixes() -> None:
    """Let Keras 3's ``fit`` run under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras 3 (3.15 here) averages each step's loss and metrics across workers
    with ``strategy.reduce("MEAN", value, axis=0)``, which fails on those
    scalars (axis=None is the reduction meant), and builds a model's metrics
    from the first batch after reducing the whole distributed batch, which
    this strategy cannot. Both are patched for multi-worker strategies only;
    every other strategy takes Keras's own code.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "_wsiflow", False):
        return
    original_reduce = trainer.reduce_per_replica
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    multi_worker = trainer._collective_all_reduce_multi_worker  # Keras's own test

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        for _, _, batches in iterator:  # this worker's first replica's batch: its shapes
            data_batch = tree.map_structure(
                lambda v: (
                    strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                next(batches),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce_per_replica._wsiflow = True
    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
