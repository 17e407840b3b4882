"""Patch geometry: which level to read, the patch grid, per-patch fractions and labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import MissingMppError, SlideError
from pipeline.slides.masks import PlacedMask
from pipeline.slides.reader import SlideInfo

#: Levels within 1% of the target resolution are read as they are, without resampling.
MPP_TOLERANCE = 0.01
#: µm/px x objective power: a slide without mpp is assumed at 10 / power (20x: 0.5 µm/px).
OBJECTIVE_MPP_UM = 10.0
#: PatchCamelyon's rule looks at the central 32 x 32 px of a 96 px patch: the middle third.
CENTER_FRACTION = 1 / 3


@dataclass(frozen=True)
class Resolution:
    """How patches are read: ``read_px`` pixels of ``level``, resized to ``patch_px``.

    ``level_mpp`` and ``patch_mpp`` are None for slides without mpp read by level.
    """

    level: int
    downsample: float
    level_mpp: float | None
    patch_mpp: float | None
    patch_px: int
    read_px: int
    read_stride_px: int
    #: Set when the slide records no mpp and it was taken from --slide-mpp or its objective.
    note: str | None = None

    @property
    def resampled(self) -> bool:
        return self.read_px != self.patch_px

    @property
    def level0_patch_px(self) -> float:
        return self.read_px * self.downsample


def choose_resolution(
    info: SlideInfo,
    *,
    patch_px: int,
    stride_px: int,
    target_mpp: float | None = None,
    level: int | None = None,
    max_upsample: float | None = None,
    slide_mpp: float | None = None,
) -> Resolution:
    """Pick the pyramid level for patches of ``patch_px`` at ``target_mpp`` (or at ``level``).

    With ``target_mpp`` the coarsest level no coarser than the target is read
    (within :data:`MPP_TOLERANCE`) and resampled to the target when it does
    not match. A slide that records no mpp is read at ``slide_mpp`` when given
    (``--slide-mpp``), else at :data:`OBJECTIVE_MPP_UM` / its objective power,
    and ``note`` says so. Raises :class:`MissingMppError` when it records neither,
    and :class:`SlideError` for a level the slide lacks, a target finer than
    level 0 by more than ``max_upsample`` (when given; ``tiling.max_upsample``)
    and a patch larger than the slide.
    """
    if (target_mpp is None) == (level is None):
        raise ValueError(
            "Expected exactly one of target_mpp and level. "
            f"Received: target_mpp={target_mpp}, level={level}"
        )
    mpp0, note = info.mpp, None
    if mpp0 is None and slide_mpp is not None:
        mpp0 = slide_mpp
        note = f"the slide records no pixel size (mpp): read at {mpp0:g} µm/px from --slide-mpp"
    elif mpp0 is None and info.objective_power and level is None:  # --level needs no guess
        mpp0 = OBJECTIVE_MPP_UM / info.objective_power
        note = (
            f"the slide records no pixel size (mpp): assumed {mpp0:g} µm/px from its "
            f"{info.objective_power:g}x objective (20x ~ 0.5, 40x ~ 0.25 µm/px; scanners "
            "differ by up to ~10%); give --slide-mpp to set it"
        )
    if level is not None:
        if not 0 <= level < info.level_count:
            raise SlideError(
                info.path,
                f"Expected a level in 0..{info.level_count - 1}. Got level {level} instead.",
            )
        downsample = info.level_downsamples[level]
        level_mpp = None if mpp0 is None else mpp0 * downsample
        return _fitting(
            info,
            Resolution(
                level, downsample, level_mpp, level_mpp, patch_px, patch_px, stride_px, note
            ),
        )
    if mpp0 is None:
        raise MissingMppError(
            info.path,
            "the slide records neither a pixel size (mpp) nor an objective power, so --mpp "
            "cannot be honoured; give --slide-mpp M (the scan's µm/px) or use --level to "
            "read a pyramid level at the scan's own resolution",
        )
    assert target_mpp is not None  # narrowed above
    candidates = [
        k
        for k, d in enumerate(info.level_downsamples)
        if mpp0 * d <= target_mpp * (1 + MPP_TOLERANCE)
    ]
    level = max(candidates, key=lambda k: info.level_downsamples[k]) if candidates else 0
    downsample = info.level_downsamples[level]
    level_mpp = mpp0 * downsample
    upsample = level_mpp / target_mpp
    if max_upsample is not None and upsample > max_upsample * (1 + MPP_TOLERANCE):
        raise SlideError(
            info.path,
            f"patches at {target_mpp:g} µm/px would be upsampled {upsample:.1f}x from the "
            f"slide's finest level ({level_mpp:.3g} µm/px); more than {max_upsample:g}x is "
            "refused (tiling.max_upsample); check --mpp (tiling.target_mpp)",
        )
    if abs(upsample - 1) <= MPP_TOLERANCE:
        read_px, read_stride = patch_px, stride_px
    else:
        ratio = target_mpp / level_mpp
        read_px, read_stride = round(patch_px * ratio), max(1, round(stride_px * ratio))
    return _fitting(
        info,
        Resolution(level, downsample, level_mpp, target_mpp, patch_px, read_px, read_stride, note),
    )


def _fitting(info: SlideInfo, resolution: Resolution) -> Resolution:
    """``resolution``, or :class:`SlideError` when one patch is larger than the slide."""
    width, height = info.level_wh[resolution.level]
    if resolution.read_px <= min(width, height):
        return resolution
    if resolution.patch_mpp is None or info.mpp is None:
        reason = (
            f"one patch ({resolution.read_px:,} px) is larger than level {resolution.level} "
            f"of the slide ({width:,} x {height:,} px)"
        )
    else:
        w0, h0 = info.level0_wh
        reason = (
            f"one patch ({resolution.patch_px} px at {resolution.patch_mpp:g} µm/px = "
            f"{resolution.patch_px * resolution.patch_mpp:,.0f} µm) is larger than the slide "
            f"({w0 * info.mpp:,.0f} x {h0 * info.mpp:,.0f} µm)"
        )
    raise SlideError(info.path, reason)


def patch_grid(level_wh: tuple[int, int], read_px: int, stride_px: int) -> np.ndarray:
    """Return ``(N, 2)`` int64 level-pixel x, y of every patch lying fully inside the level."""
    width, height = level_wh
    xs = np.arange(0, width - read_px + 1, stride_px, dtype=np.int64)
    ys = np.arange(0, height - read_px + 1, stride_px, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def level0_boxes(
    level_xy: np.ndarray, read_px: int, level_scale_xy: tuple[float, float]
) -> np.ndarray:
    """``(N, 4)`` level-0 x0, y0, x1, y1 of patches at ``level_xy`` on a level of that scale."""
    sx, sy = level_scale_xy
    x0 = level_xy[:, 0] * sx
    y0 = level_xy[:, 1] * sy
    return np.stack([x0, y0, x0 + read_px * sx, y0 + read_px * sy], axis=1)


def central_boxes(boxes: np.ndarray, fraction: float = CENTER_FRACTION) -> np.ndarray:
    """The centred sub-box of each box, ``fraction`` of its side."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = (boxes[:, 2] - boxes[:, 0]) * fraction / 2
    half_h = (boxes[:, 3] - boxes[:, 1]) * fraction / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


@dataclass(frozen=True)
class PatchTable:
    """Selected patches of one slide: level-pixel and level-0 positions, fractions, labels."""

    level_xy: np.ndarray  # (N, 2) int64
    level0_xy: np.ndarray  # (N, 2) int32
    tissue_fraction: np.ndarray  # (N,) float32
    tumor_fraction: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int8

    def __len__(self) -> int:
        return len(self.labels)


def select_patches(
    level_wh: tuple[int, int],
    level_scale_xy: tuple[float, float],
    resolution: Resolution,
    tissue: PlacedMask,
    tumor: PlacedMask | None,
    *,
    min_tissue_fraction: float,
    label_rule: str,
    tumor_threshold: float,
) -> PatchTable:
    """Lay the grid, keep patches with enough tissue, and label them by ``label_rule``.

    ``label_rule`` is ``fraction`` (tumor fraction >= ``tumor_threshold``) or
    ``center`` (any tumor in the central third of the patch, as PatchCamelyon).
    """
    grid = patch_grid(level_wh, resolution.read_px, resolution.read_stride_px)
    boxes = level0_boxes(grid, resolution.read_px, level_scale_xy)
    tissue_fraction = tissue.fractions(boxes)
    keep = tissue_fraction >= min_tissue_fraction
    grid, boxes, tissue_fraction = grid[keep], boxes[keep], tissue_fraction[keep]
    if tumor is None:
        tumor_fraction = np.zeros(len(grid), dtype=np.float32)
        labels = np.zeros(len(grid), dtype=np.int8)
    else:
        tumor_fraction = tumor.fractions(boxes)
        if label_rule == "fraction":
            labels = (tumor_fraction >= tumor_threshold).astype(np.int8)
        elif label_rule == "center":
            labels = (tumor.fractions(central_boxes(boxes)) > 0).astype(np.int8)
        else:
            raise ValueError(
                f"Expected label_rule 'fraction' or 'center'. Received: {label_rule!r}"
            )
    # Stored positions use OpenSlide's level downsample, so read_region(level0_xy, level)
    # returns exactly the patch's pixels.
    level0 = np.rint(grid * resolution.downsample).astype(np.int32)
    return PatchTable(grid, level0, tissue_fraction, tumor_fraction, labels)
