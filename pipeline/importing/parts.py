"""One split of a patch dataset (:class:`Part`) and the names of the splits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: The splits ``wsiflow train`` knows: training and validation are used, test is held out.
SPLITS = ("training", "validation", "test")
#: Folder (and PCam file) names of each split, as fastai, Keras and PCam spell them.
SPLIT_NAMES = {
    "train": "training",
    "training": "training",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "test": "test",
    "testing": "test",
}


class Part(Protocol):
    """One split of a dataset: where it comes from and how to read it in blocks."""

    group_id: str
    split: str
    source: Path
    dataset: str
    #: At most this many patches (images that turn out unreadable are left out).
    n_patches: int
    patch_px: int  # known once ``check`` has run
    patch_mpp: float | None  # µm/px the dataset's patches are known to have; None: unknown

    def check(self) -> None:
        """Read what the writing needs (size, labels); DatasetError naming the file if bad."""

    def identity(self) -> Any:
        """What decides whether the source changed (files, sizes, times)."""

    def meaning(self) -> dict[str, Any]:
        """What the labels mean, for the group's attributes."""

    def blocks(
        self, block: int, warn: Callable[[str], None]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(patches (k, P, P, 3) uint8, labels (k,) int8)``, k = ``block`` but the last."""


def in_split_order(parts: list) -> list:
    """``parts`` ordered training, validation, test."""
    return sorted(parts, key=lambda p: SPLITS.index(p.split))
