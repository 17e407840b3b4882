"""Batched tumor probabilities from a trained model directory.

A :class:`Predictor` wraps the model and its own preprocessing in one traced
function of fixed batch shape that takes uint8 patches (the cast and the
preprocessing run inside TensorFlow, so no float copy is made in NumPy, and
the last short batch is padded rather than retraced). With ``tta`` it
averages the probabilities of the 8 flips and rotations of each patch
(test-time augmentation), one model call per view, so memory stays that of
one batch and time is 8 times the model's.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .saved import MODEL_FILE, load_model_dir

_cache_lock = threading.Lock()
_cache: dict[tuple[str, int, int, int, bool], Predictor] = {}


def configure_threads(threads: int | None) -> None:
    """Set TensorFlow's CPU thread pools before its runtime starts (no-op afterwards).

    Dask's ``OMP_NUM_THREADS=1`` does not reach TF's thread pools; when
    several processes share the cores each gets its share explicitly.
    """
    import tensorflow as tf

    threads = threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        _pin_worker_gpu(tf)
    except RuntimeError:  # the runtime is already up: keep what it has
        pass


def _pin_worker_gpu(tf) -> None:
    """In Dask worker number k of a multi-GPU machine, use GPU k mod n only (one per worker)."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < 2:
        return
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):  # not in a LocalCluster worker
        return
    tf.config.set_visible_devices(gpus[index % len(gpus)], "GPU")


def dihedral_views(x):
    """The 8 symmetries of the square of ``(n, P, P, C)`` images: 4 rotations, each mirrored."""
    import tensorflow as tf

    return [tf.image.rot90(view, k) for view in (x, tf.reverse(x, axis=[2])) for k in range(4)]


class Predictor:
    """Tumor probability of ``(n, P, P, 3)`` uint8 patches; ``metadata`` of the model directory.

    ``tta``: the mean probability of the patch's 8 flips and rotations.
    """

    def __init__(self, model_dir: Path | str, *, batch_size: int = 64, tta: bool = False):
        import tensorflow as tf

        from .classifier import preprocess_fn

        self.model_dir = Path(model_dir)
        self.model, self.metadata = load_model_dir(self.model_dir)
        self.patch_px = int(self.metadata["patch_px"])
        self.batch_size = batch_size
        self.tta = tta
        preprocess = preprocess_fn(self.metadata["preprocessing"])
        model = self.model
        spec = tf.TensorSpec([batch_size, self.patch_px, self.patch_px, 3], tf.uint8)

        @tf.function(input_signature=[spec])
        def probabilities(patches):
            x = preprocess(tf.cast(patches, tf.float32))
            views = dihedral_views(x) if tta else [x]
            total = tf.add_n([tf.cast(model(v, training=False), tf.float32) for v in views])
            return tf.reshape(total / len(views), [-1])

        self._fn = probabilities

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Return ``(n,)`` float32 probabilities of ``(n, P, P, 3)`` uint8 patches, any ``n``."""
        n = len(patches)
        out = np.empty(n, dtype=np.float32)
        size = self.batch_size
        for start in range(0, n, size):
            batch = patches[start : start + size]
            if len(batch) < size:
                padded = np.zeros((size, *batch.shape[1:]), dtype=np.uint8)
                padded[: len(batch)] = batch
                batch = padded
            out[start : start + size] = self._fn(batch).numpy()[: min(size, n - start)]
        return out


def cached_predictor(
    model_dir: Path | str, *, batch_size: int = 64, threads: int | None = None, tta: bool = False
) -> Predictor:
    """This process's :class:`Predictor` of ``model_dir`` (loaded once; reloaded if it changed)."""
    path = Path(model_dir).resolve()
    try:
        stat = (path / MODEL_FILE).stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, batch_size, tta)
    except OSError:
        key = (str(path), -1, -1, batch_size, tta)  # load_model_dir reports what is missing
    with _cache_lock:
        predictor = _cache.get(key)
        if predictor is None:
            configure_threads(threads)
            _cache.clear()  # one model per process: a changed model replaces the old one
            predictor = _cache[key] = Predictor(path, batch_size=batch_size, tta=tta)
    return predictor


def model_identity(model_dir: Path | str) -> dict[str, Any]:
    """What decides whether a model changed: its metadata fingerprint and file identity."""
    from pipeline.errors import ModelError
    from pipeline.identity import file_identity

    from .saved import read_metadata

    path = Path(model_dir)
    metadata = read_metadata(path)
    if not (path / MODEL_FILE).is_file():
        raise ModelError(path / MODEL_FILE, "model file missing (the directory is incomplete)")
    return {
        "model": file_identity(path / MODEL_FILE),
        "fingerprint": metadata.get("fingerprint"),
    }
