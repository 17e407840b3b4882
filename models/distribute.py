"""``tf.distribute.MirroredStrategy`` on every machine, and the mixed-precision policy.

One code path everywhere: MirroredStrategy over all visible GPUs, or,
without GPUs, over ``replicas`` logical CPU devices carved out of the CPU (so
the distributed path runs and is tested on a laptop). Global batch =
per-replica batch x replicas; Keras splits each global batch across replicas
and averages their gradients.
"""

from __future__ import annotations

import os


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


def mixed_policy() -> str:
    """float16 compute on GPUs (tensor cores), bfloat16 on CPUs."""
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
