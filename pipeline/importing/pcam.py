"""PatchCamelyon: ``<stem>_{train,valid,test}_x.h5`` patches and ``_y.h5`` labels."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DatasetError
from pipeline.identity import file_identity
from pipeline.importing.parts import SPLIT_NAMES, in_split_order

#: PCam's patches are level 2 of CAMELYON16 slides, 4x the ~0.243 µm/px of level 0.
PCAM_MPP = 0.972

PCAM_X = re.compile(r"^(?P<stem>.+)_(?P<split>train|valid|test)_x\.h5(?P<gz>\.gz)?$")


class PcamPart:
    """One PCam split: ``<stem>_<split>_x.h5`` (dataset ``x``) and ``_y.h5`` (dataset ``y``)."""

    dataset = "pcam"
    patch_mpp = PCAM_MPP

    def __init__(self, x_path: Path, y_path: Path, split_name: str, name: str):
        self.x_path, self.y_path = x_path, y_path
        self.source = x_path
        self.split = SPLIT_NAMES[split_name]
        self.group_id = f"{name}_{split_name}"
        self.n_patches, self.patch_px = 0, 0
        self._labels: np.ndarray | None = None

    def check(self) -> None:
        """Read the shapes and labels; :class:`DatasetError` naming the file if malformed."""
        if not self.y_path.is_file():
            raise DatasetError(self.y_path, f"missing: the labels of {self.x_path.name}")
        with _h5(self.x_path, "x") as x:
            shape, dtype = x.shape, x.dtype
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or dtype != np.uint8:
            raise DatasetError(
                self.x_path,
                f"Expected x of shape (N, P, P, 3) uint8. Got {shape} {dtype} instead.",
            )
        with _h5(self.y_path, "y") as y:
            if y.shape[:1] != shape[:1] or int(np.prod(y.shape[1:])) != 1:
                raise DatasetError(
                    self.y_path,
                    f"Expected y of shape ({shape[0]}, 1, 1, 1), one label per patch of "
                    f"{self.x_path.name}. Got {y.shape} instead.",
                )
            labels = np.asarray(y[:]).reshape(-1)
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            raise DatasetError(
                self.y_path,
                f"Expected labels 0 or 1. Got {labels[bad][0].item()!r} "
                f"at patch {np.flatnonzero(bad)[0]} instead.",
            )
        self.n_patches, self.patch_px = int(shape[0]), int(shape[1])
        self._labels = labels.astype(np.int8)

    def identity(self) -> Any:
        return [file_identity(self.x_path), file_identity(self.y_path)]

    def meaning(self) -> dict[str, Any]:
        return {"labels": "PCam: 1 when the centre 32x32 px of the patch hold tumor"}

    def blocks(
        self, block: int, warn: Callable[[str], None]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._labels is None:
            self.check()
        with _h5(self.x_path, "x") as x:
            for start in range(0, self.n_patches, block):
                stop = min(start + block, self.n_patches)
                try:
                    patches = np.asarray(x[start:stop])
                except Exception as exc:  # a truncated or corrupt chunk of the file
                    raise DatasetError(
                        self.x_path, f"cannot read patches {start}-{stop - 1}: {exc}"
                    ) from exc
                yield patches, self._labels[start:stop]


class _h5:
    """One dataset of an HDF5 file, opened read-only; unreadable files are a DatasetError."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def __enter__(self):
        import h5py

        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(self.path, f"not a readable HDF5 file ({exc})") from exc
        if self.key not in self.file:
            found = ", ".join(self.file.keys()) or "nothing"
            self.file.close()
            raise DatasetError(
                self.path, f"Expected an HDF5 dataset {self.key!r}. Got {found} instead."
            )
        return self.file[self.key]

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def pcam_parts(folder: Path, name: str = "pcam") -> list[PcamPart]:
    """The PCam splits in ``folder``, in the order train, valid, test.

    Raises :class:`DatasetError` when there are none, or when a file is still
    gzip-compressed as downloaded (HDF5 needs random access: gunzip it).
    """
    parts = []
    names = {p.name for p in folder.iterdir()}
    for path in sorted(folder.iterdir()):
        match = PCAM_X.match(path.name)
        if match is None:
            continue
        if match["gz"]:
            if path.name[: -len(".gz")] in names:
                continue  # unpacked beside it
            raise DatasetError(path, f"is gzip-compressed as downloaded; run `gunzip {path}` first")
        y_path = path.with_name(f"{match['stem']}_{match['split']}_y.h5")
        parts.append(PcamPart(path, y_path, match["split"], name))
    if not parts:
        raise DatasetError(
            folder, "Expected PCam files <name>_{train,valid,test}_x.h5 and _y.h5. Found none."
        )
    return in_split_order(parts)
