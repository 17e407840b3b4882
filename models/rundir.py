"""A training run's directory: claimed, reused when finished, resumed when interrupted.

::

    MODEL_DIR/
      model.keras               the best model by validation AUC (a copy of an epoch's last)
      history.csv               one row per finished epoch
      checkpoints/last.keras    the model and optimizer after the last finished epoch
      checkpoints/state.json    the run's progress: the commit point of every epoch
      wsiflow_model.json        written last; the run is finished from then on

Every file is written atomically, so a run killed at any moment resumes at
the epoch after the last ``state.json``, and never looks finished.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from pipeline.errors import ModelError
from pipeline.outputs import atomic, claim_folder

from .saved import METADATA_FILE, MODEL_FILE, write_json_atomic

CHECKPOINTS = "checkpoints"
HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = (
    "epoch", "phase", "learning_rate", "loss", "auc", "accuracy",
    "val_loss", "val_auc", "val_accuracy", "seconds", "patches_per_s",
)  # fmt: skip


@dataclass
class RunState:
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


@dataclass(frozen=True)
class RunDir:
    """The model directory of one training run (``fingerprint``: its inputs and settings)."""

    path: Path
    fingerprint: str

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def prepare(self, *, overwrite: bool, replace_different: bool) -> RunState | dict[str, Any]:
        """A fresh or resumed state, or the metadata of a finished run with the same inputs.

        Raises :class:`ModelError` for a directory holding another run (unless
        ``overwrite``, or ``replace_different`` for a directory the caller owns).
        """
        out_dir, digest = self.path, self.fingerprint
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
        return self.read_state()

    def read_state(self) -> RunState | dict[str, Any]:
        """What :meth:`prepare` finds, without writing: for the workers beside a chief.

        The chief of a multi-worker run prepares the directory; the other
        workers read the same state from it (and resume from its checkpoint)
        but write elsewhere.
        """
        out_dir, digest = self.path, self.fingerprint
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
        if (self.checkpoints / "last.keras").is_file():
            saved = _read_json(self.checkpoints / "state.json", "training state")
            if saved is not None:
                if saved.get("fingerprint") != digest:
                    raise other
                return RunState(**saved)
        return RunState(fingerprint=digest)

    def load_last(self):
        """The model and optimizer of the last finished epoch."""
        path = self.checkpoints / "last.keras"
        try:
            return keras.models.load_model(path)
        except Exception as exc:
            raise ModelError(
                path,
                f"cannot resume from this checkpoint ({exc}); pass --overwrite to start afresh",
            ) from exc

    def commit_epoch(self, model, state: RunState, *, best: bool) -> None:
        """Save the epoch's model (and as the best one when ``best``), then its state and history.

        ``state.json`` is written after the models: it is the commit point.
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        last = self.checkpoints / "last.keras"
        with atomic(last, f".tmp-{last.name}") as tmp:  # Keras insists on the .keras suffix
            model.save(tmp)
        if best:  # the same model: copy the file rather than serialise it again
            with atomic(self.path / MODEL_FILE) as tmp:
                shutil.copyfile(last, tmp)
        write_json_atomic(self.checkpoints / "state.json", state.to_json())
        with atomic(self.path / HISTORY_FILE) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(state.history)

    def finish(self, metadata: dict[str, Any]) -> None:
        """Write the metadata (the model is complete from here) and drop the checkpoints."""
        if not (self.path / MODEL_FILE).is_file():
            raise ModelError(self.path / MODEL_FILE, "no epoch produced a validation AUC to keep")
        write_json_atomic(self.path / METADATA_FILE, metadata)
        shutil.rmtree(self.checkpoints, ignore_errors=True)


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
