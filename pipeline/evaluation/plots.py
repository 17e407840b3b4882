"""PNG plots of metrics: ROC, FROC and training curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluation.froc import Froc
from pipeline.outputs import atomic


def plot_roc(path: Path, fpr: np.ndarray, tpr: np.ndarray, auc: float) -> None:
    """The slide-level ROC curve with its AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, drawstyle="default", lw=2, label=f"slides, AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Slide-level ROC")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_froc(path: Path, froc: Froc) -> None:
    """The FROC curve with the six operating points of the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    # np.interp holds the last sensitivity beyond the curve's end: draw it so.
    fps = np.append(froc.fps_per_slide, max(max(froc.fp_rates), froc.fps_per_slide[-1]))
    sensitivity = np.append(froc.sensitivity, froc.sensitivity[-1])
    ax.plot(fps, sensitivity, lw=2, label=f"FROC score {froc.score:.3f}")
    ax.scatter(froc.fp_rates, froc.sensitivities, c="C3", zorder=3, label="operating points")
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set(
        xlabel="average false positives per slide",
        ylabel="sensitivity",
        title="Lesion-level FROC (CAMELYON16)",
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic(path) as partial:
            fig.savefig(partial, format="png")
    finally:
        plt.close(fig)


def plot_training(path: Path, history: list[dict]) -> None:
    """Loss and AUC per epoch, training and validation, from a model's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        left.plot(epochs, [row[key] for row in history], style, marker="o", label=key)
    for key, style in (("auc", "-"), ("val_auc", "--")):
        right.plot(epochs, [row[key] for row in history], style, marker="o", label=key)
    left.set(xlabel="epoch", ylabel="binary cross-entropy", title="Loss")
    right.set(xlabel="epoch", ylabel="ROC AUC", title="AUC", ylim=(0, 1.02))
    for ax in (left, right):
        ax.legend()
        ax.set_xticks(epochs)
    fig.tight_layout()
    _save(fig, path)
