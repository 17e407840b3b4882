"""Identity of inputs: a file's path, size and time, stable fingerprints, slide ids.

What decides whether a stage's output is complete for the same inputs and
settings (tiling, inference, training all use it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size and modification time: what decides whether a file changed.

    A folder (a DICOM series, one slide) is the sum of its files' sizes and
    the latest of their times, over the files in it (not below).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        stats = [p.stat() for p in files]
        return {
            "path": str(path.resolve()),
            "files": len(files),
            "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        }
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a JSON-able payload (inputs and config of one slide's tiling)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def split_repeated_ids(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The paths with distinct slide ids, in order; each repeated id with a reason naming both."""
    seen: dict[str, Path] = {}
    repeated = []
    for path in paths:
        slide_id = slide_id_of(path)
        if slide_id in seen:
            repeated.append(
                (path, f"{path}: duplicate slide id {slide_id!r} (also {seen[slide_id]})")
            )
        else:
            seen[slide_id] = path
    return list(seen.values()), repeated


def slide_id_of(path: Path) -> str:
    """The slide identifier used for store groups and outputs: the file name without suffix.

    A folder is a DICOM series (one slide in several files): its whole name.
    """
    path = Path(path)
    return path.name if path.is_dir() else path.stem
