"""Find a dataset's splits: PCam files or class folders."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DatasetError
from pipeline.importing.folders import folder_parts
from pipeline.importing.parts import Part
from pipeline.importing.pcam import PCAM_X, pcam_parts


def find_parts(
    source: Path,
    *,
    dataset: str | None = None,
    name: str | None = None,
    tumor_class: str | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> list[Part]:
    """The splits of the dataset in folder ``source``: PCam (``dataset="pcam"``) or folders.

    Without ``dataset``, a folder holding PCam files is PCam. Group ids are
    ``<name>_<split>``, ``name`` defaulting to ``pcam`` or the folder's name.
    """
    source = Path(source)
    if not source.is_dir():
        what = "no such folder" if not source.exists() else "not a folder"
        raise DatasetError(source, f"{what} (expected a PCam folder or a folder of class folders)")
    if dataset is None:
        dataset = "pcam" if any(PCAM_X.match(p.name) for p in source.iterdir()) else "folders"
    if dataset == "pcam":
        return list(pcam_parts(source, name or "pcam"))
    return list(
        folder_parts(
            source,
            name=name or source.resolve().name,
            tumor_class=tumor_class,
            validation_fraction=validation_fraction,
            seed=seed,
        )
    )
