"""The fine-tuning schedule: phases, the layers each one trains, and which epoch is best.

With pretrained weights (ImageNet, a weights file, or a previous wsiflow
model) the head trains first with the base frozen, then the top N layers of
the base open at a lower learning rate. Without pretrained weights there is
nothing to protect: one phase trains every layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import TrainingConfig

from .classifier import freeze_backbone, unfreeze_top

if TYPE_CHECKING:
    from .rundir import RunState

#: Validation AUCs closer than this are a tie, broken by the validation loss.
AUC_TIE = 1e-4


@dataclass(frozen=True)
class Phase:
    """One ``fit`` of the schedule: which layers train, for how long, how fast."""

    name: str  # "head" (base frozen), "fine_tune" (top layers open) or "full"
    epochs: int
    learning_rate: float


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


def cosine_rate(phase: Phase, epoch_in_phase: int) -> float:
    """The learning rate of the phase's 0-based epoch ``epoch_in_phase`` under cosine decay.

    Half a cosine from the phase's rate down towards 0 over its epochs
    (Loshchilov and Hutter, SGDR, 2017, without restarts): the first epoch
    trains at the full rate, the last at a small fraction of it, so a phase
    that runs to its end has settled.
    """
    return phase.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch_in_phase / phase.epochs))


def phases_to_run(phases: list[Phase], state: RunState) -> Iterator[tuple[int, Phase, int, bool]]:
    """``(index, phase, end_epoch, enter)`` for each phase a (resumed) run has yet to finish.

    ``enter``: the phase starts here, so its layers must be set up and the model
    compiled; False when a resumed run stopped inside it (the checkpoint has both).
    ``state`` moves to the phase as it is yielded.
    """
    for index, phase in enumerate(phases):
        end = sum(p.epochs for p in phases[: index + 1])
        if index < state.phase_index or (
            index == state.phase_index and (state.phase_done or state.epoch >= end)
        ):
            continue  # finished before an interruption
        inside = state.phase_index == index and not state.phase_done and state.epoch > 0
        enter = index > state.phase_index or state.epoch == 0 or not inside
        if enter:
            state.phase_index, state.phase_done, state.wait = index, False, 0
            state.epoch = max(state.epoch, end - phase.epochs)
        yield index, phase, end, enter


def enter_phase(
    model, base, phase: Phase, fine_tune_layers: int | Literal["all"], strategy
) -> None:
    """Freeze or open the base's layers for ``phase`` and compile the model at its rate."""
    import keras

    if phase.name == "head":
        freeze_backbone(base)
    elif phase.name == "fine_tune":
        unfreeze_top(base, fine_tune_layers)
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


def better(record: dict[str, Any], best: dict[str, Any]) -> bool:
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
