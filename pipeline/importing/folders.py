"""Class-per-folder patch images (Keras' ``image_dataset_from_directory``, fastai's layout)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import DatasetError
from pipeline.images import find_images
from pipeline.importing.parts import SPLIT_NAMES, in_split_order

#: Class folder names taken for the tumor class when --tumor-class is not given.
TUMOR_NAMES = ("tumor", "tumour", "metastasis", "metastases", "positive", "1")


class FolderPart:
    """One split of a class-per-folder dataset: image files and their labels (1 tumor)."""

    dataset = "folders"
    patch_mpp = None  # images say nothing about it: --mpp

    def __init__(
        self,
        root: Path,
        files: list[Path],
        labels: np.ndarray,
        split_name: str,
        name: str,
        classes: dict[str, str],
    ):
        self.source = root
        self.files, self.labels = files, labels
        self.split = SPLIT_NAMES[split_name]
        self.group_id = f"{name}_{split_name}"
        self.classes = classes
        self.n_patches = len(files)
        self.patch_px = 0

    def check(self) -> None:
        """The patch size, from the first image that opens; DatasetError if none does."""
        for path in self.files:
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except Exception:  # reported, with the others, when the patches are read
                continue
            if width == height:
                self.patch_px = width
                return
        raise DatasetError(self.source, f"no square image that opens among {len(self.files)} files")

    def identity(self) -> Any:
        return {
            "folder": str(self.source.resolve()),
            "files": [[str(p.relative_to(self.source)), *_stat(p)] for p in self.files],
            "labels": self.labels.tolist(),
        }

    def meaning(self) -> dict[str, Any]:
        return {"labels": "class folders", "classes": self.classes}

    def blocks(
        self, block: int, warn: Callable[[str], None]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        px = self.patch_px
        patches = np.empty((block, px, px, 3), dtype=np.uint8)
        labels = np.empty(block, dtype=np.int8)
        n = 0
        for path, label in zip(self.files, self.labels, strict=True):
            try:
                with Image.open(path) as image:
                    if image.size != (px, px):
                        size = "x".join(map(str, image.size))
                        warn(f"{path}: left out: {size} px, not the {px}x{px} px of the others")
                        continue
                    patches[n] = np.asarray(image.convert("RGB"))
            except Exception as exc:  # truncated, not an image, unsupported mode
                warn(f"{path}: left out: cannot read the image ({type(exc).__name__}: {exc})")
                continue
            labels[n] = label
            n += 1
            if n == block:
                yield patches.copy(), labels.copy()
                n = 0
        if n:
            yield patches[:n].copy(), labels[:n].copy()


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def folder_parts(
    folder: Path,
    *,
    name: str,
    tumor_class: str | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> list[FolderPart]:
    """The splits of a class-per-folder dataset, images in a seeded random order.

    ``folder`` holds two class folders, or split folders (train, valid, test;
    also training, validation, val, testing) that hold them. Without split
    folders, ``validation_fraction`` of each class goes to validation (the
    same images for the same ``seed``). The tumor class is ``tumor_class``, or
    the class named like one of :data:`TUMOR_NAMES`. Raises
    :class:`DatasetError` when that cannot be told, or there are not two
    classes.
    """
    subfolders = _subfolders(folder)
    if subfolders and all(p.name.casefold() in SPLIT_NAMES for p in subfolders):
        by_split = {p.name: _class_files(p) for p in subfolders}
    else:
        by_split = {"": _class_files(folder)}
    classes = sorted({c for files in by_split.values() for c in files})
    tumor, normal = _tumor_and_normal(folder, classes, tumor_class)
    rng = np.random.default_rng(seed)
    parts = []
    if "" in by_split:  # no split folders: split each class here
        train: list[tuple[Path, int]] = []
        valid: list[tuple[Path, int]] = []
        for cls, files in by_split[""].items():
            order = rng.permutation(len(files))
            n_val = round(len(files) * validation_fraction)
            if len(files) >= 2:
                n_val = min(max(n_val, 1), len(files) - 1)
            valid += [(files[i], int(cls == tumor)) for i in order[:n_val]]
            train += [(files[i], int(cls == tumor)) for i in order[n_val:]]
        splits = [("train", train), ("valid", valid)]
    else:
        splits = [
            (split, [(p, int(cls == tumor)) for cls, files in by_class.items() for p in files])
            for split, by_class in by_split.items()
        ]
    for split, items in splits:
        if not items:
            continue
        order = rng.permutation(len(items))  # mixed classes in every chunk
        files = [items[i][0] for i in order]
        labels = np.array([items[i][1] for i in order], dtype=np.int8)
        parts.append(
            FolderPart(folder, files, labels, split, name, {"tumor": tumor, "normal": normal})
        )
    return in_split_order(parts)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """Image files under each class folder of ``folder`` (searched recursively), sorted."""
    return {cls.name: find_images([cls]) for cls in _subfolders(folder)}


def _tumor_and_normal(folder: Path, classes: list[str], tumor_class: str | None) -> tuple[str, str]:
    if len(classes) != 2:
        raise DatasetError(
            folder,
            f"Expected two class folders (tumor and normal), or split folders holding them. "
            f"Got {classes or 'none'} instead.",
        )
    if tumor_class is not None:
        if tumor_class not in classes:
            raise DatasetError(
                folder, f"Expected --tumor-class to be one of {classes}. Got {tumor_class!r}."
            )
        tumor = tumor_class
    else:
        named = [c for c in classes if c.casefold() in TUMOR_NAMES]
        if len(named) != 1:
            raise DatasetError(
                folder,
                f"cannot tell which of the classes {classes} is tumor; name it with --tumor-class",
            )
        tumor = named[0]
    return tumor, next(c for c in classes if c != tumor)
