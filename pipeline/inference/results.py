"""The inference output folder: heatmaps, detections, slide scores and their bookkeeping.

::

    OUT_DIR/
      inference.json                 model, settings, per-slide status (written after each slide)
      scores.csv                     slide,score for every complete slide (CAMELYON16 slide level)
      detections/<slide_id>.csv      Confidence,X coordinate,Y coordinate (level-0 pixels)
      heatmaps/<slide_id>.zarr       probability (rows, cols) float32; attrs: level0_cell_px,
                                     level0_wh, slide identity, resolution, model, score
      heatmaps/<slide_id>.png        the heatmap in colour (transparent where low)
      heatmaps/<slide_id>_overlay.png  the heatmap over the slide's thumbnail

Every file is written under a temporary name and renamed; a slide counts as
done only once ``inference.json`` records it complete with its fingerprint,
after all its files exist. ``scores.csv`` lists only complete slides.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from pipeline.errors import ResultsError
from pipeline.inference.heatmap import Detections, HeatmapGrid
from pipeline.outputs import atomic, write_atomic

MANIFEST = "inference.json"
SCORES = "scores.csv"
#: The report ``wsiflow evaluate`` writes (into the results folder unless told otherwise).
EVALUATION = "evaluation.json"
DETECTIONS_HEADER = ("Confidence", "X coordinate", "Y coordinate")


def heatmap_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "heatmaps" / f"{slide_id}.zarr"


def detections_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "detections" / f"{slide_id}.csv"


def slide_files(out_dir: Path, slide_id: str) -> dict[str, Path]:
    """Every output file of one slide, by kind."""
    heatmaps = Path(out_dir) / "heatmaps"
    return {
        "heatmap": heatmap_path(out_dir, slide_id),
        "heatmap_png": heatmaps / f"{slide_id}.png",
        "overlay_png": heatmaps / f"{slide_id}_overlay.png",
        "detections": detections_path(out_dir, slide_id),
    }


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """``inference.json`` (empty structure when absent or unreadable: everything is redone)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
        if isinstance(manifest, dict) and isinstance(manifest.get("slides"), dict):
            return manifest
    except (OSError, ValueError):
        pass
    return {"slides": {}}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def outputs_exist(out_dir: Path, slide_id: str) -> bool:
    """Whether every output file of ``slide_id`` is there."""
    return all(p.exists() for p in slide_files(out_dir, slide_id).values())


def is_complete(out_dir: Path, slide_id: str, digest: str, manifest: dict[str, Any]) -> bool:
    """Whether ``slide_id`` is complete with fingerprint ``digest`` and all its files exist."""
    record = manifest["slides"].get(slide_id, {})
    return (
        record.get("status") in ("done", "skipped")
        and record.get("fingerprint") == digest
        and outputs_exist(out_dir, slide_id)
    )


def write_slide_outputs(
    out_dir: Path,
    slide_id: str,
    heatmap: np.ndarray,
    grid: HeatmapGrid,
    detections: Detections,
    heatmap_rgba: np.ndarray,
    overlay_rgb: np.ndarray,
    attrs: dict[str, Any],
) -> dict[str, Path]:
    """Write one slide's heatmap (Zarr + PNGs) and detections CSV, each atomically."""
    files = slide_files(out_dir, slide_id)
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(files["detections"], detections_csv(detections))
    _write_png(files["heatmap_png"], heatmap_rgba)
    _write_png(files["overlay_png"], overlay_rgb)
    target = files["heatmap"]
    with atomic(target) as partial:
        shutil.rmtree(partial, ignore_errors=True)
        group = zarr.open_group(str(partial), mode="w")
        array = group.create_array(
            "probability", shape=heatmap.shape, dtype="float32", chunks=_chunks(heatmap.shape)
        )
        array[:] = heatmap
        group.update_attributes(
            {
                **attrs,
                "level0_cell_px": list(grid.level0_cell_px),
                "cells_per_patch": grid.cells_per_patch,
                "detections": len(detections),
            }
        )
        shutil.rmtree(target, ignore_errors=True)  # the rename needs the place free
    return files


def read_heatmap(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(probability, attrs)`` of a heatmap written by :func:`write_slide_outputs`."""
    try:
        group = zarr.open_group(str(path), mode="r")
        return np.asarray(group["probability"][:]), dict(group.attrs)
    except Exception as exc:
        raise ResultsError(path, f"not a readable wsiflow heatmap: {exc}") from exc


def stored_grid(shape: tuple[int, int], attrs: dict[str, Any]) -> HeatmapGrid:
    """The grid of a heatmap :func:`read_heatmap` returned, from its shape and attributes."""
    return HeatmapGrid(
        shape=(int(shape[0]), int(shape[1])),
        level0_cell_px=tuple(float(v) for v in attrs["level0_cell_px"]),
        cells_per_patch=int(attrs.get("cells_per_patch", 1)),
    )


def stored_mpp(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """Level-0 µm/px (x, y) a heatmap records, measured or assumed; None if it records none.

    Assumed (``mpp_assumed`` says why: ``--slide-mpp`` or the objective): the
    read level's µm/px over its downsample; heatmaps from before ``level_mpp``
    was recorded give None.
    """
    mpp = attrs.get("mpp")
    if mpp:
        return (float(mpp[0]), float(mpp[1])) if isinstance(mpp, list) else (float(mpp),) * 2
    if attrs.get("mpp_assumed") and attrs.get("level_mpp"):
        level0_mpp = float(attrs["level_mpp"]) / float(attrs["downsample"])
        return (level0_mpp, level0_mpp)
    return None


def detections_csv(detections: Detections) -> str:
    """The CAMELYON16 submission format: a header, then confidence and level-0 x, y per line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DETECTIONS_HEADER)
    for confidence, (x, y) in zip(detections.confidence, detections.level0_xy, strict=True):
        writer.writerow([f"{confidence:.6f}", int(x), int(y)])
    return buffer.getvalue()


def read_detections(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(confidences (N,), level0_xy (N, 2) int64)`` of a detections CSV.

    Accepts the official format with or without the header line; anything
    else is a :class:`ResultsError` naming the file and the line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(path, f"cannot read the detections: {exc}") from exc
    confidences, xy = [], []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if number == 1 and row[0].strip().lower() == "confidence":
            continue
        if len(row) != 3:
            raise ResultsError(
                path,
                f"line {number}: Expected 3 values (Confidence,X coordinate,Y coordinate). "
                f"Got {len(row)} instead.",
            )
        try:
            confidence = float(row[0])
            x, y = int(row[1]), int(row[2])
        except ValueError:
            raise ResultsError(
                path,
                f"line {number}: Expected a number and two integer pixel coordinates. "
                f"Got {','.join(row)!r} instead.",
            ) from None
        if not np.isfinite(confidence) or confidence < 0:
            raise ResultsError(
                path, f"line {number}: Expected a confidence >= 0. Got {row[0]!r} instead."
            )
        confidences.append(confidence)
        xy.append((x, y))
    return np.asarray(confidences, dtype=np.float64), np.asarray(xy, dtype=np.int64).reshape(-1, 2)


def write_scores(out_dir: Path, scores: dict[str, float]) -> Path:
    """``scores.csv``: ``slide,score`` per complete slide, sorted by slide."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("slide", "score"))
    for slide_id in sorted(scores):
        writer.writerow((slide_id, f"{scores[slide_id]:.6f}"))
    path = Path(out_dir) / SCORES
    write_atomic(path, buffer.getvalue())
    return path


def read_scores(path: Path) -> dict[str, float]:
    """``{slide: score}`` of a ``slide,score`` CSV (header required)."""
    try:
        rows = list(csv.reader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(path, f"cannot read the slide scores: {exc}") from exc
    if not rows or [c.strip().lower() for c in rows[0]] != ["slide", "score"]:
        raise ResultsError(path, "Expected a header line 'slide,score'.")
    scores: dict[str, float] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            name, value = row[0].strip(), float(row[1])
        except (IndexError, ValueError):
            raise ResultsError(
                path, f"line {number}: Expected 'slide,score'. Got {','.join(row)!r} instead."
            ) from None
        if not name or not np.isfinite(value):
            raise ResultsError(
                path, f"line {number}: Expected 'slide,score'. Got {','.join(row)!r} instead."
            )
        if name in scores:
            raise ResultsError(path, f"line {number}: slide {name!r} is listed twice")
        scores[name] = value
    return scores


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(max(1, s), 1024) for s in shape)


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic(path) as partial:
        Image.fromarray(image).save(partial, format="PNG", compress_level=1)  # ~5x faster than 6
