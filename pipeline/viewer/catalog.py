"""What the viewer may serve: slide files given, slides found under folders given, heatmaps.

Only slide files named when the viewer starts, or found by scanning the
folders named, are ever opened, looked up by slide id: a request cannot
name a path. Files found in a folder whose real location (symlinks resolved)
lies outside it are left out: slides, heatmaps and detections alike. Open
slides and loaded heatmaps are kept (a few, oldest closed) and reopened when
the file changes.

A slide handle is shared by the requests reading it and counted: one that is
replaced (its file changed, a read failed and left OpenSlide's error on it)
or pushed out of the cache is closed only when its last reader is done, never
under one.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import WsiflowError
from pipeline.identity import file_identity, slide_id_of
from pipeline.inference.results import (
    EVALUATION,
    MANIFEST,
    read_heatmap,
    read_manifest,
    slide_files,
    stored_grid,
    stored_mpp,
)
from pipeline.slides.annotations import annotation_of, read_annotations
from pipeline.slides.reader import SlideReader, find_slides, open_slide

#: Open slides kept at once (each holds an OpenSlide handle and its tile cache).
OPEN_SLIDES = 16


@dataclass
class SlideEntry:
    """One slide of the catalogue; ``error`` says why it cannot be shown (None: readable)."""

    slide_id: str
    path: Path
    relative: str
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Heatmap:
    """A loaded heatmap: probabilities and their level-0 cell size."""

    probability: np.ndarray
    level0_cell_px: tuple[float, float]
    attrs: dict[str, Any]
    stamp: tuple[int, int]  # size and mtime of its zarr.json: changes when it is rewritten


class Handle:
    """An open slide shared by concurrent requests; closed when retired and unused."""

    def __init__(self, reader: SlideReader, stamp: tuple[int, int]):
        self.reader = reader
        self.stamp = stamp
        self.users = 0
        self.retired = False
        self._deepzoom: Any = None
        self._lock = threading.Lock()

    def deepzoom(self, tile_px: int, overlap: int) -> Any:
        """This handle's Deep Zoom generator (made once)."""
        with self._lock:
            if self._deepzoom is None:
                self._deepzoom = self.reader.deepzoom(tile_px, overlap)
            return self._deepzoom


class Catalog:
    """Slide files and the slides under folders (``sources``), and heatmaps of one inference run."""

    def __init__(
        self,
        sources: Path | Sequence[Path],
        heatmaps_dir: Path | None = None,
        annotations_dir: Path | None = None,
    ):
        given = [sources] if isinstance(sources, str | Path) else list(sources)
        #: (as given, resolved): folders are scanned, files served as they are.
        self.sources = [(Path(s), Path(s).resolve()) for s in given]
        self.heatmaps_dir = None if heatmaps_dir is None else Path(heatmaps_dir).resolve()
        self.annotations_dir = None if annotations_dir is None else Path(annotations_dir).resolve()
        self._derived: dict[tuple, Any] = {}  # annotations, regions, evaluation: by file stamp
        self._lock = threading.RLock()
        self._entries: dict[str, SlideEntry] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._open: OrderedDict[str, Handle] = OrderedDict()
        self._heatmaps: dict[str, tuple[tuple[int, int], Heatmap | None]] = {}
        self._manifest_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self.refresh()

    def refresh(self) -> list[SlideEntry]:
        """Rescan the folders (new, changed and removed slides); return the entries by id."""
        found: dict[str, SlideEntry] = {}
        for path, real, relative in self._candidates():
            slide_id = slide_id_of(path)
            if slide_id in found:
                other = found[slide_id].relative
                found[f"{slide_id}@{relative}"] = SlideEntry(
                    slide_id, real, relative, error=f"duplicate slide id (also {other})"
                )
                continue
            found[slide_id] = self._entry(slide_id, real, relative)
        with self._lock:
            self._entries = found
        return sorted(found.values(), key=lambda e: e.slide_id)

    def _candidates(self) -> Iterator[tuple[Path, Path, str]]:
        """``(path, real path, name shown)`` of every slide the sources offer, each once."""
        several = sum(real.is_dir() for _, real in self.sources) > 1
        seen: set[Path] = set()
        for given, real_source in self.sources:
            if real_source.is_dir():
                prefix = f"{given.name}/" if several else ""
                offered = [
                    (path, prefix + str(path.relative_to(real_source)))
                    for path in find_slides([real_source])
                    # a symlink pointing out of the folder: never served
                    if path.resolve().is_relative_to(real_source)
                ]
            else:  # a file named on the command line: served as given (links included)
                offered = [(path, str(given)) for path in find_slides([given])]  # or its series
            for path, shown in offered:
                real = path.resolve()
                if real not in seen and (real.is_file() or real.is_dir()):
                    seen.add(real)
                    yield path, real, shown

    def _entry(self, slide_id: str, path: Path, relative: str) -> SlideEntry:
        stamp = _stamp(path)
        with self._lock:
            previous = self._entries.get(slide_id)
            if previous is not None and previous.path == path and self._stamps.get(path) == stamp:
                return previous
            self._stamps[path] = stamp
        entry = SlideEntry(slide_id, path, relative)
        try:
            with open_slide(path) as reader:
                info = reader.info
        except WsiflowError as exc:
            entry.error = _reason(exc)
            return entry
        entry.info = {
            "vendor": info.vendor,
            "level0_wh": list(info.level0_wh),
            "levels": info.level_count,
            "mpp": info.mpp,
            "objective_power": info.objective_power,
            "associated_images": list(info.associated_images),
        }
        return entry

    def entry(self, slide_id: str) -> SlideEntry | None:
        """The readable slide ``slide_id``, or None (unknown id or unreadable slide)."""
        with self._lock:
            entry = self._entries.get(slide_id)
        return entry if entry is not None and entry.error is None else None

    @contextlib.contextmanager
    def borrow(self, slide_id: str) -> Iterator[Handle | None]:
        """The shared open handle of ``slide_id`` for one request (None: not servable).

        OpenSlide reads are thread-safe; the handle stays open until every
        request that borrowed it is done, even if it is replaced meanwhile.
        """
        handle = self._acquire(slide_id)
        try:
            yield handle
        finally:
            if handle is not None:
                self._release(handle)

    def discard(self, slide_id: str, handle: Handle) -> None:
        """Retire ``handle`` (a read failed: OpenSlide's error sticks to it); reopen next time."""
        with self._lock:
            if self._open.get(slide_id) is handle:
                del self._open[slide_id]
            self._retire(handle)

    def _acquire(self, slide_id: str) -> Handle | None:
        entry = self.entry(slide_id)
        if entry is None:
            return None
        stamp = _stamp(entry.path)
        with self._lock:
            handle = self._open.get(slide_id)
            if handle is None or handle.stamp != stamp:
                try:
                    reader = open_slide(entry.path, direct=False)
                except WsiflowError:
                    return None
                if handle is not None:
                    self._retire(handle)
                handle = self._open[slide_id] = Handle(reader, stamp)
                while len(self._open) > OPEN_SLIDES:
                    self._retire(self._open.popitem(last=False)[1])
            self._open.move_to_end(slide_id)
            handle.users += 1
            return handle

    def _release(self, handle: Handle) -> None:
        with self._lock:
            handle.users -= 1
            if handle.retired and handle.users == 0:
                handle.reader.close()

    def _retire(self, handle: Handle) -> None:
        """Close ``handle`` now if no request uses it, else when the last one is done."""
        if handle.retired:
            return
        handle.retired = True
        if handle.users == 0:
            handle.reader.close()

    def heatmap(self, slide_id: str) -> Heatmap | None:
        """The complete heatmap of ``slide_id`` in the heatmaps folder, if there is one."""
        entry = self.entry(slide_id)
        if entry is None or self.heatmaps_dir is None:
            return None
        files = slide_files(self.heatmaps_dir, slide_id)
        zarr_json = files["heatmap"] / "zarr.json"
        if not zarr_json.is_file() or not self._inside_heatmaps(files["heatmap"]):
            return None
        record = self._manifest()["slides"].get(slide_id, {})
        if record.get("status") not in ("done", "skipped"):
            return None  # an interrupted or failed run: not shown as if complete
        stamp = _stamp(zarr_json)
        with self._lock:
            cached = self._heatmaps.get(slide_id)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            probability, attrs = read_heatmap(files["heatmap"])
        except WsiflowError:
            heatmap = None
        else:
            if list(attrs.get("level0_wh", [])) != entry.info.get("level0_wh"):
                heatmap = None  # made from another slide with the same name
            else:
                cell = attrs["level0_cell_px"]
                heatmap = Heatmap(probability, (float(cell[0]), float(cell[1])), attrs, stamp)
        with self._lock:
            self._heatmaps[slide_id] = (stamp, heatmap)
        return heatmap

    def _manifest(self) -> dict[str, Any]:
        """The heatmap folder's ``inference.json``, parsed again only when it changes."""
        path = self.heatmaps_dir / MANIFEST
        stamp = _stamp(path)
        with self._lock:
            if self._manifest_cache is None or self._manifest_cache[0] != stamp:
                self._manifest_cache = (stamp, read_manifest(self.heatmaps_dir))
            return self._manifest_cache[1]

    def detections_path(self, slide_id: str) -> Path | None:
        if self.heatmap(slide_id) is None:
            return None
        path = slide_files(self.heatmaps_dir, slide_id)["detections"]
        return path if path.is_file() and self._inside_heatmaps(path) else None

    def annotations(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's ground truth outlines (None: no ``annotations_dir`` or unknown slide).

        ``{"file", "polygons": [{"role", "name", "group", "exterior", "holes"}], "error"}``
        in level-0 px; an unreadable file gives its reason in ``error``, never an exception.
        """
        if self.annotations_dir is None or self.entry(slide_id) is None:
            return None
        try:
            path = annotation_of(slide_id, self.annotations_dir, any_case=True)
        except WsiflowError as exc:
            return {"file": None, "polygons": [], "error": _reason(exc)}
        if path is None or not path.resolve().is_relative_to(self.annotations_dir):
            return {"file": None, "polygons": [], "error": None}

        def load() -> dict[str, Any]:
            try:
                polygons = read_annotations(path)
            except WsiflowError as exc:
                return {"file": path.name, "polygons": [], "error": _reason(exc)}
            return {
                "file": path.name,
                "polygons": [
                    {
                        "role": p.role,
                        "name": p.name,
                        "group": p.group,
                        "exterior": np.round(p.level0_xy, 1).tolist(),
                        "holes": [np.round(h, 1).tolist() for h in p.holes],
                    }
                    for p in polygons
                ],
                "error": None,
            }

        return self._cached(("annotations", path), _stamp(path), load)

    def regions(self, slide_id: str) -> list[dict[str, Any]]:
        """Predicted tumor regions: the heatmap's outlines at its detection threshold."""
        heatmap = self.heatmap(slide_id)
        if heatmap is None:
            return []

        def load() -> list[dict[str, Any]]:
            from pipeline.export.regions import DEFAULT_TOLERANCE_UM, tumor_regions

            grid = stored_grid(heatmap.probability.shape, heatmap.attrs)
            threshold = float(heatmap.attrs.get("detection_threshold") or 0.5)
            mpp_xy = stored_mpp(heatmap.attrs)
            tolerance = (
                DEFAULT_TOLERANCE_UM / min(mpp_xy) if mpp_xy else min(heatmap.level0_cell_px) / 4
            )
            return [
                {
                    "threshold": r.threshold,
                    "exterior": np.round(r.exterior, 1).tolist(),
                    "holes": [np.round(h, 1).tolist() for h in r.holes],
                    "max_probability": r.max_probability,
                }
                for r in tumor_regions(heatmap.probability, grid, threshold, tolerance_px=tolerance)
            ]

        return self._cached(("regions", slide_id), heatmap.stamp, load)

    def review(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's record in the heatmaps folder's ``evaluation.json`` (None: none).

        A record older than the slide's detections (inference ran again after
        the evaluation) is not used: ``{"stale": reason}``.
        """
        if self.heatmap(slide_id) is None:
            return None
        path = self.heatmaps_dir / EVALUATION
        if not path.is_file() or not self._inside_heatmaps(path):
            return None

        def load() -> dict[str, dict[str, Any]]:
            try:
                report = json.loads(path.read_text())
                return {str(r["slide"]).casefold(): r for r in report["per_slide"]}
            except (OSError, ValueError, KeyError, TypeError):
                return {}

        record = self._cached(("evaluation",), _stamp(path), load).get(slide_id.casefold())
        if record is None:
            return None
        detections = self.detections_path(slide_id)
        if detections is not None and detections.stat().st_mtime_ns > path.stat().st_mtime_ns:
            return {"stale": f"{EVALUATION} is older than the detections: evaluate again"}
        return record

    def _cached(self, key: tuple, stamp: tuple[int, int], load: Any) -> Any:
        with self._lock:
            cached = self._derived.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        value = load()
        with self._lock:
            self._derived[key] = (stamp, value)
        return value

    def _inside_heatmaps(self, path: Path) -> bool:
        """Whether ``path``, links resolved, lies in the heatmaps folder (never serve beyond)."""
        return path.resolve().is_relative_to(self.heatmaps_dir)

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                self._retire(handle)
            self._open.clear()


def _reason(exc: Exception) -> str:
    return exc.reason if hasattr(exc, "reason") else str(exc)


def _stamp(path: Path) -> tuple[int, int]:
    """Size and time of a slide file, or of a DICOM series' files (a folder)."""
    try:
        identity = file_identity(path)
    except OSError:
        return (-1, -1)
    return (identity["size"], identity["mtime_ns"])
