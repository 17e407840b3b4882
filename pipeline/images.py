"""Patch image files: the images given, and those found in folders (``predict``, ``import``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Suffixes searched for in folders (files given by name are tried whatever their suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and the images under folders (sorted, hidden ones skipped), each once."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return list(dict.fromkeys(found))
