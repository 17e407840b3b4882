"""Planning one slide's tiling: resolution, tissue, labels and which patches to extract.

Pure reads of the slide (an overview) and its annotation file; runs as one
Dask task per slide and returns a :class:`SlidePlan` for the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import TilingConfig, annotation_groups
from pipeline.errors import NoTissueError
from pipeline.identity import file_identity, fingerprint
from pipeline.slides.annotations import check_within, read_annotations
from pipeline.slides.masks import rasterize_tumor
from pipeline.slides.reader import SlideReader, open_slide
from pipeline.slides.tissue import tissue_mask
from pipeline.store.codecs import PatchImageCodec
from pipeline.tiling.grid import PatchTable, Resolution, choose_resolution, select_patches

#: Tumor masks are rasterised at this many samples per patch side.
TUMOR_SAMPLES_PER_PATCH = 16


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile and the annotation file that goes with it (None: all normal)."""

    slide_id: str
    path: Path
    annotation: Path | None


@dataclass(frozen=True)
class SlidePlan:
    """Everything the extraction tasks and the store need for one slide."""

    job: SlideJob
    resolution: Resolution
    table: PatchTable
    attrs: dict[str, Any] = field(repr=False)
    passthrough: bool = False
    verify_copied_tiles: bool = True


def job_fingerprint(job: SlideJob, config: TilingConfig) -> str:
    """Identity of the inputs (slide, annotation) and the tiling config.

    Settings that only refuse slides (``max_upsample``, ``verify_copied_tiles``)
    leave stored patches alone, so changing them redoes nothing; an unset
    ``slide_mpp`` leaves earlier stores' fingerprints as they were.
    """
    unfingerprinted = {"max_upsample", "verify_copied_tiles"}
    if config.slide_mpp is None:
        unfingerprinted.add("slide_mpp")
    settings = config.model_dump(mode="json", exclude=unfingerprinted)
    payload: dict[str, Any] = {"config": settings, "version": __version__}
    payload["slide"] = file_identity(job.path) if job.path.exists() else str(job.path)
    payload["annotation"] = None if job.annotation is None else file_identity(job.annotation)
    return fingerprint(payload)


def plan_slide(job: SlideJob, config: TilingConfig) -> SlidePlan:
    """Open the slide, find tissue, rasterise annotations and choose and label the patches."""
    stride_px = config.stride_px or config.patch_px
    with open_slide(job.path) as reader:
        info = reader.info
        resolution = choose_resolution(
            info,
            patch_px=config.patch_px,
            stride_px=stride_px,
            target_mpp=config.target_mpp,
            level=config.level,
            max_upsample=config.max_upsample,
            slide_mpp=config.slide_mpp,
        )
        tissue, _ = tissue_mask(reader, config.tissue_mpp)
        passthrough = _can_pass_through(reader, resolution, stride_px, config)
    polygons, warnings = [], []
    if resolution.note:
        warnings.append(f"{job.path}: {resolution.note}")
    if job.annotation is not None:
        polygons = read_annotations(job.annotation, annotation_groups(config), warnings)
        check_within(job.annotation, polygons, info.level0_wh)
    level_w, level_h = info.level_wh[resolution.level]
    level_scale = (info.level0_wh[0] / level_w, info.level0_wh[1] / level_h)
    tumor = rasterize_tumor(
        polygons, resolution.level0_patch_px / TUMOR_SAMPLES_PER_PATCH, info.level0_wh
    )
    table = select_patches(
        (level_w, level_h),
        level_scale,
        resolution,
        tissue,
        tumor,
        min_tissue_fraction=config.min_tissue_fraction,
        label_rule=config.label_rule,
        tumor_threshold=config.tumor_threshold,
    )
    if len(table) == 0:
        raise NoTissueError(
            job.path,
            f"no patch has >= {config.min_tissue_fraction:.0%} tissue "
            "(blank slide, or lower tiling.min_tissue_fraction)",
        )
    attrs = {
        "slide": file_identity(job.path),
        "annotation": None if job.annotation is None else file_identity(job.annotation),
        "annotation_warnings": warnings,
        "vendor": info.vendor,
        "level0_wh": list(info.level0_wh),
        "mpp": None if info.mpp_xy is None else list(info.mpp_xy),
        "mpp_assumed": resolution.note,
        "level": resolution.level,
        "downsample": resolution.downsample,
        "level_mpp": resolution.level_mpp,
        "patch_mpp": resolution.patch_mpp,
        "patch_px": resolution.patch_px,
        "stride_px": stride_px,
        "read_px": resolution.read_px,
        "read_stride_px": resolution.read_stride_px,
        "resampled": resolution.resampled,
        "passthrough": passthrough,
        "config": config.model_dump(mode="json"),
        "wsiflow_version": __version__,
    }
    return SlidePlan(
        job=job,
        resolution=resolution,
        table=table,
        attrs=attrs,
        passthrough=passthrough,
        verify_copied_tiles=config.verify_copied_tiles,
    )


def _can_pass_through(
    reader: SlideReader, resolution: Resolution, stride_px: int, config: TilingConfig
) -> bool:
    """Whether patches are exactly the level's stored JPEG tiles, decoding to the same pixels.

    Then the tiles' bytes go into the store as they are: no decode, no
    re-encode, no generation loss (the source quality is kept, not
    ``codec_quality``).
    """
    direct = reader.direct_level(resolution.level)
    if (
        not config.passthrough
        or config.codec != "jpeg"
        or direct is None
        or not direct.jpeg_tiles
        or resolution.resampled
        or not (resolution.read_px == stride_px == direct.tile_w == direct.tile_h)
        or direct.width < direct.tile_w
        or direct.height < direct.tile_h
    ):
        return False
    # The store will decode the copied bytes with its codec: check it agrees with the TIFF
    # decoder on the first tile and a central one (likely tissue: on a neutral grey tile a
    # wrong colour space could go unseen).
    codec = PatchImageCodec(format="jpeg")
    try:
        for x, y in ((0, 0), (direct.width // 2, direct.height // 2)):
            index = direct.tile_index(x, y)
            if not np.array_equal(codec.decode_image(direct.jpeg_tile(index)), direct.tile(index)):
                return False
    except Exception:  # any doubt: decode and re-encode instead
        return False
    return True
