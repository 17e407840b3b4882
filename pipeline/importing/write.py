"""Write a dataset's splits into a patch store, one group per split, each marked complete last."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.errors import (
    DatasetError,
    ForeignOutputError,
    OutputWriteError,
    WsiflowError,
    failure_reason,
    write_error,
)
from pipeline.identity import fingerprint
from pipeline.importing.parts import Part
from pipeline.store.patch_store import (
    completed_attrs,
    create_slide_group,
    mark_complete,
    open_patches,
    update_summary,
    zarr_root,
)

#: Patches per read-and-write block (rounded down to whole chunks): ~28 MB of 96 px patches.
BLOCK_PATCHES = 1024


@dataclass(frozen=True)
class ImportSettings:
    """How patches are stored and labelled: the patch store's codec, the dataset's meaning."""

    codec: str
    codec_quality: int
    chunk_patches: int
    #: µm/px of the patches; None: the dataset's own (PCam's), if it has one.
    patch_mpp: float | None = None


@dataclass
class ImportResult:
    """What happened to one split: ``status`` is done, skipped or failed."""

    group_id: str
    split: str
    source: str
    status: str
    patches: int = 0
    tumor_patches: int = 0
    reason: str = ""
    seconds: float = 0.0
    #: Images left out (unreadable, another size), one line each naming the file.
    warnings: list[str] = field(default_factory=list)

    def summary_row(self) -> dict[str, Any]:
        return {"slide_id": self.group_id, "path": self.source, **asdict(self)}


def import_parts(
    parts: list[Part],
    store_path: str,
    settings: ImportSettings,
    *,
    overwrite: bool = False,
    on_planned: Callable[[int], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    on_part: Callable[[ImportResult], None] | None = None,
) -> list[ImportResult]:
    """Write each split into its group of the store at ``store_path`` (opened with open_root).

    A split that cannot be read is a failed result naming the file; the
    others are still imported. A group complete from another source is not
    replaced unless ``overwrite``.
    """
    root = zarr_root(store_path)
    results = []
    for part in parts:
        started = time.perf_counter()
        warnings: list[str] = []
        try:
            result = _import_part(
                root, store_path, part, settings, overwrite, warnings, on_planned, on_patches
            )
        except (WsiflowError, OSError) as exc:
            error = write_error(exc) if isinstance(exc, OSError) else None
            if error is not None:  # the store's disk: every split would fail
                raise error from exc
            if isinstance(exc, ForeignOutputError | OutputWriteError):
                raise
            result = ImportResult(
                part.group_id, part.split, str(part.source), "failed",
                reason=failure_reason(part.source, exc),
            )  # fmt: skip
        result.seconds = round(time.perf_counter() - started, 2)
        result.warnings = warnings
        update_summary(root, part.group_id, result.summary_row())
        results.append(result)
        if on_part is not None:
            on_part(result)
    return results


def _import_part(
    root: Any,
    store_path: str,
    part: Part,
    settings: ImportSettings,
    overwrite: bool,
    warnings: list[str],
    on_planned: Callable[[int], None] | None,
    on_patches: Callable[[int], None] | None,
) -> ImportResult:
    part.check()
    settings = replace(settings, patch_mpp=settings.patch_mpp or part.patch_mpp)
    source = str(part.source.resolve())
    digest = fingerprint(
        {
            "dataset": part.dataset,
            "split": part.split,
            "source": part.identity(),
            "settings": asdict(settings),
        }
    )
    done = completed_attrs(root, part.group_id)
    if done is not None and not overwrite:
        if done.get("source") != source:
            raise DatasetError(
                part.source,
                f"group {part.group_id!r} of {store_path} is already complete from "
                f"{done.get('source')}; pass --name to import under another name, or --overwrite",
            )
        if done.get("fingerprint") == digest:
            return ImportResult(
                part.group_id,
                part.split,
                source,
                "skipped",
                patches=int(done.get("patches", 0)),
                tumor_patches=int(done.get("tumor_patches", 0)),
                reason="complete with the same inputs and settings",
            )
    if on_planned is not None:
        on_planned(part.n_patches)
    attrs = {
        "dataset": part.dataset,
        "source": source,
        "split": part.split,
        **part.meaning(),
        "patch_px": part.patch_px,
        "patch_mpp": settings.patch_mpp,
        "config": asdict(settings),
        "wsiflow_version": __version__,
        "fingerprint": digest,
    }
    group = create_slide_group(
        root,
        part.group_id,
        n_patches=part.n_patches,
        patch_px=part.patch_px,
        chunk_patches=settings.chunk_patches,
        codec=settings.codec,
        codec_quality=settings.codec_quality,
        attrs=attrs,
    )
    array = open_patches(store_path, part.group_id)
    labels = np.zeros(part.n_patches, dtype=np.int8)
    block = settings.chunk_patches * max(1, BLOCK_PATCHES // settings.chunk_patches)
    count = 0
    for patches, block_labels in part.blocks(block, warnings.append):
        array[count : count + len(patches)] = patches
        labels[count : count + len(patches)] = block_labels
        count += len(patches)
        if on_patches is not None:
            on_patches(len(patches))
    if count == 0:
        raise DatasetError(part.source, f"no readable patch for the {part.split} split")
    if count < part.n_patches:  # images left out: the arrays end at the last one stored
        for key in ("patches", "labels", "tumor_fraction", "tissue_fraction", "coords"):
            group[key].resize((count, *group[key].shape[1:]))
    group["labels"][:] = labels[:count]
    group["tumor_fraction"][:] = np.float32(np.nan)  # unknown: a dataset records no fraction
    group["tissue_fraction"][:] = np.float32(np.nan)
    group["coords"][:] = -1  # unknown: no position on a slide
    tumor = int(labels[:count].sum())
    mark_complete(group, {"patches": count, "tumor_patches": tumor})
    return ImportResult(
        part.group_id, part.split, source, "done", patches=count, tumor_patches=tumor
    )
