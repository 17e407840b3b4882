"""A trained model directory: the Keras model and the metadata that says how to use it.

``wsiflow train`` writes::

    MODEL_DIR/
      model.keras          the best model by validation AUC
      wsiflow_model.json   backbone, patch size and µm/px, preprocessing, class names,
                           training config, stores and slides, metrics; written last
      history.csv          one row per epoch (loss, AUC, accuracy, learning rate)
      logs/                TensorBoard event files
      checkpoints/         the last epoch and the run's state while training (resume)

A directory is a finished model only when ``wsiflow_model.json`` exists and
says ``"complete": true``; inference refuses anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError
from pipeline.outputs import write_atomic

MODEL_FILE = "model.keras"
METADATA_FILE = "wsiflow_model.json"
CLASS_NAMES = ("normal", "tumor")


def model_dir_of(path: Path | str) -> Path | None:
    """The model directory ``path`` names (the directory or its ``model.keras``), if it is one."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    return path if (path / METADATA_FILE).is_file() else None


def read_metadata(model_dir: Path | str) -> dict[str, Any]:
    """The metadata of a finished model; :class:`ModelError` naming the file otherwise."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        reason = (
            "no such model directory"
            if not Path(model_dir).exists()
            else f"not a wsiflow model directory (no {METADATA_FILE}); see `wsiflow train`"
        )
        raise ModelError(Path(model_dir), reason)
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(path, f"unreadable model metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("complete") is not True:
        raise ModelError(path, "training never finished (metadata not marked complete)")
    for key in ("backbone", "patch_px", "preprocessing"):
        if key not in metadata:
            raise ModelError(path, f"model metadata has no {key!r}")
    return metadata


def load_model_dir(model_dir: Path | str, *, compile: bool = False):
    """Return ``(model, metadata)`` of a finished model directory.

    Raises :class:`ModelError` naming the file for a missing, truncated or
    unloadable model, or one whose input does not match its metadata.
    """
    import keras

    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise ModelError(path, "model file missing (the directory is incomplete)")
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as exc:  # zip errors, h5 errors, unknown layers...
        raise ModelError(path, f"cannot load the model: {type(exc).__name__}: {exc}") from exc
    px = int(metadata["patch_px"])
    if tuple(model.input_shape[1:]) != (px, px, 3):
        raise ModelError(
            path,
            f"model input {tuple(model.input_shape[1:])} does not match its metadata's "
            f"{px} px patches",
        )
    return model, metadata


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
