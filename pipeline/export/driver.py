"""``wsiflow export``: an inference folder's results as files QuPath and ASAP open.

::

    OUT_DIR/                       (default RESULTS/export; a wsiflow "export" folder)
      <slide_id>.geojson           QuPath GeoJSON: tumor regions and detections
      <slide_id>.xml               ASAP XML: the same, as CAMELYON16's annotations are laid out
      <slide_id>_heatmap.tif       the heatmap as a pyramidal TIFF the size of the slide's level 0

The heatmap TIFF's pixels are ``round(255 * probability)`` in all three
channels, each cell of the heatmap filling the level-0 pixels it covers
(lossless deflate, so a pixel read back is the heatmap's value); its
resolution tags carry the slide's µm/px, so it lies over the slide in QuPath
and ASAP (ASAP: open it as the slide's overlay). Only slides that inference
lists as complete are exported; a slide whose files cannot be read is
reported and the others go on. Every file is written under a temporary name
and renamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, ResultsError, WsiflowError, failure_reason
from pipeline.export.formats import asap_xml, geojson_collection
from pipeline.export.regions import DEFAULT_TOLERANCE_UM, Region, tumor_regions
from pipeline.inference.heatmap import HeatmapGrid, sample_level0
from pipeline.inference.results import (
    MANIFEST,
    detections_path,
    heatmap_path,
    read_detections,
    read_heatmap,
    read_manifest,
    stored_grid,
    stored_mpp,
)
from pipeline.outputs import atomic, claim_folder, write_atomic
from pipeline.slides.pyramid import write_pyramid_tiff

FORMATS = ("geojson", "asap", "tiff")
KIND = "export"


@dataclass(frozen=True)
class ExportResult:
    """One slide's export: ``status`` is ``done`` or ``failed`` (``reason`` says why)."""

    slide_id: str
    status: str
    files: tuple[str, ...] = ()
    regions: dict[str, int] = field(default_factory=dict)  # per threshold
    detections: int = 0
    reason: str = ""


def export_results(
    results_dir: Path | str,
    out_dir: Path | str,
    *,
    formats: Sequence[str] = FORMATS,
    thresholds: Sequence[float] = (0.5,),
    tolerance_um: float = DEFAULT_TOLERANCE_UM,
    slides: Sequence[str] | None = None,
    on_slide: Callable[[ExportResult], None] | None = None,
) -> list[ExportResult]:
    """Export every complete slide of ``results_dir`` (or those in ``slides``) into ``out_dir``.

    Raises :class:`ConfigError` for options :func:`check_options` refuses and
    :class:`ResultsError` when ``results_dir`` is not an inference folder or lacks
    one of ``slides``, before anything is written.
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    check_options(formats, thresholds, tolerance_um)
    if not (results_dir / MANIFEST).is_file():
        raise ResultsError(results_dir, f"has no {MANIFEST}: not a folder written by wsiflow infer")
    manifest = read_manifest(results_dir)
    done = [
        slide_id
        for slide_id, entry in manifest.get("slides", {}).items()
        if entry.get("status") == "done"
    ]
    if slides:
        missing = sorted(set(slides) - set(done))
        if missing:
            raise ResultsError(
                results_dir, f"no complete results for slide(s) {', '.join(missing)}"
            )
        done = [s for s in done if s in set(slides)]
    if not done:
        raise ResultsError(results_dir, "holds no complete slide to export")
    claim_folder(out_dir, KIND)
    results = []
    for slide_id in sorted(done):
        try:
            result = export_slide(
                results_dir,
                slide_id,
                out_dir,
                formats=formats,
                thresholds=thresholds,
                tolerance_um=tolerance_um,
            )
        except (WsiflowError, OSError, ValueError) as exc:
            result = ExportResult(slide_id, "failed", reason=failure_reason(results_dir, exc))
        results.append(result)
        if on_slide is not None:
            on_slide(result)
    return results


def check_options(formats: Sequence[str], thresholds: Sequence[float], tolerance_um: float) -> None:
    """Raise :class:`ConfigError` (named by the CLI option) for unusable export options."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        problems = [(f, f"not one of {', '.join(FORMATS)}", None) for f in bad or ["(none)"]]
        raise ConfigError("--format", problems)
    if any(not 0 < t <= 1 for t in thresholds):
        raise ConfigError("--threshold", [(str(list(thresholds)), "each must be in (0, 1]", None)])
    if tolerance_um < 0:
        raise ConfigError("--tolerance-um", [(str(tolerance_um), "must be >= 0", None)])


def export_slide(
    results_dir: Path,
    slide_id: str,
    out_dir: Path,
    *,
    formats: Sequence[str],
    thresholds: Sequence[float],
    tolerance_um: float,
) -> ExportResult:
    """Write one slide's files (see the module); return what was written."""
    path = heatmap_path(results_dir, slide_id)
    heatmap, attrs = read_heatmap(path)
    grid = stored_grid(heatmap.shape, attrs)
    mpp_xy = stored_mpp(attrs)
    if mpp_xy is None:
        raise ResultsError(path, "records no µm/px: cannot state areas or a tolerance in µm")
    level0_wh = (int(attrs["level0_wh"][0]), int(attrs["level0_wh"][1]))
    confidences, level0_xy = read_detections(detections_path(results_dir, slide_id))
    regions: list[Region] = []
    for threshold in sorted(set(thresholds)):
        regions += tumor_regions(heatmap, grid, threshold, tolerance_px=tolerance_um / min(mpp_xy))
    files = []
    if "geojson" in formats:
        target = out_dir / f"{slide_id}.geojson"
        collection = geojson_collection(slide_id, regions, confidences, level0_xy, mpp_xy)
        write_atomic(target, json.dumps(collection, indent=1) + "\n")
        files.append(str(target))
    if "asap" in formats:
        target = out_dir / f"{slide_id}.xml"
        write_atomic(target, asap_xml(slide_id, regions, confidences, level0_xy))
        files.append(str(target))
    if "tiff" in formats:
        target = out_dir / f"{slide_id}_heatmap.tif"
        write_heatmap_tiff(target, heatmap, grid, level0_wh, mpp_xy[0], slide_id)
        files.append(str(target))
    counts = {f"{t:g}": sum(r.threshold == t for r in regions) for t in sorted(set(thresholds))}
    return ExportResult(slide_id, "done", tuple(files), counts, len(confidences))


def heatmap_level0(
    heatmap: np.ndarray, grid: HeatmapGrid, x0: int, y0: int, w: int, h: int
) -> np.ndarray:
    """``(h, w)`` uint8: ``round(255 * p)`` of the cell under each level-0 pixel's centre."""
    values = sample_level0(heatmap, grid.level0_cell_px, (x0, y0, x0 + w, y0 + h), (w, h))
    return np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_heatmap_tiff(
    path: Path,
    heatmap: np.ndarray,
    grid: HeatmapGrid,
    level0_wh: tuple[int, int],
    mpp: float,
    slide_id: str,
) -> None:
    """The heatmap as a lossless pyramidal TIFF of the slide's level-0 size (module docstring)."""

    def render(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        grey = heatmap_level0(heatmap, grid, x0, y0, w, h)
        return np.repeat(grey[..., None], 3, axis=2)

    with atomic(path) as partial:
        write_pyramid_tiff(
            partial,
            level0_wh[0],
            level0_wh[1],
            render,
            mpp=mpp,
            tile_px=512,
            lossless=True,
            description=f"wsiflow heatmap of {slide_id}: tumor probability x 255",
        )
