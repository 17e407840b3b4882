"""How the ``camelyon`` difficulty paints tissue, tumor patterns, mimics and artefacts.

Each tissue kind is a :class:`Texture`: a field of nuclei with a size, shape,
density and tone, over a background of eosin and haematoxylin. What makes the
cohort hard is which textures look alike, as in real lymph nodes:

- **ductal** carcinoma: cohesive large pleomorphic nuclei, pale with nucleoli;
  with ``nuclear_overlap`` their sizes shrink towards lymphocytes' and a share
  of them is dark and solid like a lymphocyte's;
- **lobular** carcinoma: small, discohesive, dark cells in single files, each
  in a thin clear halo: lymphocyte-like, the classic miss;
- mimics, all normal: **germinal centres** (larger, paler, looser nuclei),
  **sinus histiocytes** (pale oval nuclei in abundant pink cytoplasm),
  **capsule** and **vessel walls** (dense pink fibres with spindle nuclei,
  red cells in the lumen), **fat** (large clear cells);
- artefacts on top: **pen** ink, tissue **folds** (double thickness),
  out-of-focus **blur**, air **bubbles** (a dark rim) and **dust** specks.

Every pixel is a pure function of its level-0 coordinates and the slide's
seed, so any tile grid renders the same image; blur is computed on a margin
wide enough that this still holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import correlate1d

from pipeline.config import HardCohortConfig
from pipeline.synth.centres import Centre
from pipeline.synth.layout import ISLAND, LUMEN, Feature, draw_hard_layout
from pipeline.synth.noise import hash_uniform, value_noise
from pipeline.synth.scene import (
    LYMPHOCYTES,
    VACUOLES,
    NucleusField,
    SlideScene,
    Stain,
    draw_pieces,
    draw_stain,
)


@dataclass(frozen=True)
class Texture:
    """A tissue kind: nuclei (``field``), their haematoxylin by tone, and the background."""

    field: NucleusField
    e_bg: float
    h_bg: float
    nucleus_h: tuple[float, float]  # haematoxylin from tone 0 to tone 1
    nucleus_e: float = 0.12
    rim: float = 0.0  # extra haematoxylin at the membrane: vesicular (pale centre) nuclei
    nucleolus: bool = False
    halo_e: float | None = None  # eosin in a ring around each nucleus (clear cytoplasm)
    dark_share: float = 0.0  # share of nuclei drawn dark and solid (hyperchromatic)


def ductal(overlap: float) -> Texture:
    """Cohesive carcinoma; ``overlap`` moves its nuclei towards lymphocytes' size and tone."""
    return Texture(
        field=NucleusField(
            cell_um=17.0 - 5.0 * overlap,
            radius_um=(4.5 - 1.4 * overlap, 7.0 - 2.4 * overlap),
            elongation=(1.0, 1.7),
            presence=0.95,
            key=23,
        ),
        e_bg=0.48 - 0.18 * overlap,  # towards the node's background too
        h_bg=0.16 - 0.06 * overlap,
        nucleus_h=(0.55, 0.9),
        rim=0.75,
        nucleolus=True,
        dark_share=0.6 * overlap,
    )


def lobular(overlap: float) -> Texture:
    """Discohesive small cells: a little larger, looser and paler than lymphocytes."""
    return Texture(
        field=NucleusField(
            cell_um=12.0 - 2.0 * overlap,
            radius_um=(3.3 - 0.4 * overlap, 4.4 - 0.8 * overlap),
            elongation=(1.0, 1.5),
            presence=0.7 + 0.15 * overlap,
            key=29,
        ),
        e_bg=0.36,
        h_bg=0.10,
        nucleus_h=(1.3, 1.65),
        halo_e=0.18,
    )


# Mimics are normal tissue a weak model calls tumor: paler or larger nuclei than the
# node's. They stay closer to the node than tumor does (calibrated with
# benchmarks/recipe.py), so a baseline is fooled sometimes, not on every slide.
GERMINAL_CENTRE = Texture(
    # Centroblasts (larger, vesicular) among a majority of centrocytes (small, dark).
    field=NucleusField(
        cell_um=10.5, radius_um=(2.9, 4.0), elongation=(1.0, 1.35), presence=0.85, key=41
    ),
    e_bg=0.28,
    h_bg=0.11,
    nucleus_h=(0.95, 1.25),
    rim=0.3,
    dark_share=0.65,
)
HISTIOCYTES = Texture(
    # Sparse oval nuclei in abundant pale cytoplasm.
    field=NucleusField(
        cell_um=20.0, radius_um=(2.8, 3.8), elongation=(1.5, 2.2), presence=0.6, key=43
    ),
    e_bg=0.32,
    h_bg=0.05,
    nucleus_h=(1.0, 1.25),
    rim=0.25,
)
FIBROUS = Texture(
    field=NucleusField(
        cell_um=16.0, radius_um=(2.2, 3.0), elongation=(3.0, 5.0), presence=0.6, key=47
    ),
    e_bg=0.80,
    h_bg=0.05,
    nucleus_h=(1.2, 1.4),
)
LYMPH_NODE = Texture(field=LYMPHOCYTES, e_bg=0.30, h_bg=0.10, nucleus_h=(1.55, 1.8), nucleus_e=0.15)
# Red blood cells in a vessel's lumen: eosin discs without a nucleus.
_RED_CELLS = NucleusField(
    cell_um=8.5, radius_um=(3.3, 3.8), elongation=(1.0, 1.2), presence=0.5, key=53
)
_FAT_CELLS = NucleusField(
    cell_um=70.0, radius_um=(30.0, 36.0), elongation=(1.0, 1.3), presence=1.0, key=59
)
_DUST = NucleusField(
    cell_um=40.0, radius_um=(1.5, 6.0), elongation=(1.0, 2.0), presence=0.5, key=61
)
# Ink optical densities: blue absorbs red and green, green absorbs red and blue, black all.
_INK_OD = (np.array([0.95, 0.55, 0.08]), np.array([0.85, 0.22, 0.70]), np.array([0.95, 0.95, 0.95]))
_BLUR_UM = 2.5  # about the sigma of an out-of-focus region
_BOX_PASSES = 3  # blurs are repeated box filters: Gaussian-like, at a cost that ignores sigma


@dataclass(frozen=True)
class CamelyonScene(SlideScene):
    """A slide of the ``camelyon`` difficulty: the truth is ``features``, not the annotations."""

    features: tuple[Feature, ...] = field(default=())
    blur_um: float = 0.0
    overlap: float = 0.0
    centre: str = ""

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB of the level-0 region at ``(x0, y0)``."""
        box = (x0, y0, x0 + w, y0 + h)
        blurs = [f for f in self.features if f.kind == "blur" and _meets(f.bounds(), box)]
        optics = _box_width(self.blur_um / self.mpp) if self.blur_um > 0 else 0
        defocus = _box_width(_BLUR_UM / self.mpp) if blurs else 0
        # Blurs apply one after another: their reaches add up.
        margin = _reach(optics) + _reach(defocus)
        mx0, my0, mw, mh = x0 - margin, y0 - margin, w + 2 * margin, h + 2 * margin
        grain = hash_uniform(
            np.arange(x0, x0 + w)[None, :], np.arange(y0, y0 + h)[:, None], self.seed ^ 0x5EED
        )
        if not self._anything_in((mx0, my0, mx0 + mw, my0 + mh)):
            # Bare glass: what the full path gives, at a fraction of the cost.
            rgb = np.asarray(self.stain.light_rgb) + (grain[..., None] - 0.5) * 8.0
            return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        masks: dict[int, np.ndarray] = {}
        rgb, tissue = self._render_sharp(mx0, my0, mw, mh, masks)
        if optics:
            rgb = _box_blur(rgb, optics)
        if blurs:  # one pass over the union: overlapping regions are not blurred twice
            core = (slice(margin, margin + h), slice(margin, margin + w))
            inside = np.zeros((h, w), dtype=bool)
            for blur in blurs:
                inside |= self._mask(blur, mx0, my0, mw, mh, masks)[core]
            if inside.any():
                _blur_where(rgb, inside, margin, defocus)
        rgb = rgb[margin : margin + h, margin : margin + w]
        tissue = tissue[margin : margin + h, margin : margin + w]
        rgb = rgb + (grain[..., None] - 0.5) * np.where(tissue, 14.0, 8.0)[..., None]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def _anything_in(self, box: tuple[int, int, int, int]) -> bool:
        """Whether a tissue section or a feature may reach into ``box`` (bounding boxes)."""
        for piece in self.pieces:
            r = piece.max_radius_px
            cx, cy = piece.center_xy
            if _meets((cx - r, cy - r, cx + r, cy + r), box):
                return True
        return any(_meets(f.bounds(), box) for f in self.features)

    def truth_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w)`` bool: pixels drawn as tumor (not the annotator's outline)."""
        xs = np.arange(x0, x0 + w, dtype=np.float64) + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float64) + 0.5
        tumor = np.zeros((h, w), dtype=bool)
        for f in self.features:
            if f.kind in ("ductal", "lobular"):
                tumor |= self._mask(f, x0, y0, w, h)
        for f in self.features:
            if f.kind == ISLAND:
                tumor &= ~self._mask(f, x0, y0, w, h)
        return tumor & self._tissue_mask(xs, ys)

    def _mask(
        self,
        feature: Feature,
        x0: int,
        y0: int,
        w: int,
        h: int,
        masks: dict[int, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The feature's pixels in the region; ``masks`` caches them for one region."""
        if masks is not None and id(feature) in masks:
            return masks[id(feature)]
        if not _meets(feature.bounds(), (x0, y0, x0 + w, y0 + h)):
            mask = np.zeros((h, w), dtype=bool)
        else:
            mask = polygon_mask(feature.level0_xy, x0, y0, w, h)
        if masks is not None:
            masks[id(feature)] = mask
        return mask

    def _render_sharp(
        self, x0: int, y0: int, w: int, h: int, masks: dict[int, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(h, w, 3)`` float32 RGB before optics and sensor grain, and the tissue mask."""
        xs = np.arange(x0, x0 + w, dtype=np.float64) + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float64) + 0.5
        tissue = self._tissue_mask(xs, ys)
        box = (x0, y0, x0 + w, y0 + h)
        here = [f for f in self.features if _meets(f.bounds(), box)]
        h_conc = np.zeros((h, w), dtype=np.float32)
        e_conc = np.zeros((h, w), dtype=np.float32)
        if tissue.any():
            haze = value_noise(xs, ys, 60.0 / self.mpp, self.seed ^ 0xA11)
            # Later kinds paint over earlier ones: node, mimics, tumor, islands in tumor.
            kind_of = np.zeros((h, w), dtype=np.int8)  # 0 lymph node
            layers: list[tuple[int, str, Texture | None]] = [
                (1, "fat", None),
                (2, "germinal_centre", GERMINAL_CENTRE),
                (3, "histiocytes", HISTIOCYTES),
                (4, "capsule", FIBROUS),
                (4, "vessel", FIBROUS),
                (5, LUMEN, None),
                (6, "ductal", ductal(self.overlap)),
                (7, "lobular", lobular(self.overlap)),
            ]
            for code, kind, _ in layers:
                for f in here:
                    if f.kind == kind:
                        kind_of[self._mask(f, x0, y0, w, h, masks)] = code
            for f in here:
                if f.kind == ISLAND:
                    kind_of[self._mask(f, x0, y0, w, h, masks)] = 3 if f.variant else 0
            kind_of[~tissue] = -1
            textures = {0: LYMPH_NODE, **{code: t for code, _, t in layers if t is not None}}
            for code, texture in textures.items():
                region = kind_of == code
                if region.any():
                    self._paint(texture, region, xs, ys, haze, h_conc, e_conc)
            node = kind_of == 0
            if node.any():  # sinuses: sparse clear holes in the node
                d_vac, _ = self._nuclei(VACUOLES, xs, ys)
                vacuole = node & (d_vac < 1.0)
                h_conc[vacuole] = 0.02
                e_conc[vacuole] = 0.04 + 0.05 * (d_vac[vacuole] > 0.85)
            self._paint_fat(kind_of == 1, xs, ys, h_conc, e_conc)
            self._paint_lumen(kind_of == 5, xs, ys, h_conc, e_conc)
        stain: Stain = self.stain
        od = h_conc[..., None] * np.float32(stain.h_scale) * np.asarray(stain.h_od, np.float32)
        od += e_conc[..., None] * np.float32(stain.e_scale) * np.asarray(stain.e_od, np.float32)
        for f in here:
            od = self._artefact(f, od, xs, ys, x0, y0, masks).astype(np.float32, copy=False)
        return np.asarray(stain.light_rgb, np.float32) * np.exp(-od), tissue

    def _paint(
        self,
        texture: Texture,
        region: np.ndarray,
        xs: np.ndarray,
        ys: np.ndarray,
        haze: np.ndarray,
        h_conc: np.ndarray,
        e_conc: np.ndarray,
    ) -> None:
        e_conc[region] = texture.e_bg + 0.25 * haze[region]
        h_conc[region] = texture.h_bg + 0.08 * haze[region]
        d, tone = self._nuclei(texture.field, xs, ys, 1.6 if texture.halo_e is not None else 1.0)
        if texture.halo_e is not None:
            halo = region & (d >= 1.0) & (d < 1.5)
            e_conc[halo] = texture.halo_e
        nucleus = region & (d < 1.0)
        lo, hi = texture.nucleus_h
        level = lo + (hi - lo) * tone
        if texture.rim:
            level = level + texture.rim * np.clip((d - 0.62) / 0.38, 0.0, 1.0)
        if texture.dark_share:
            # Hyperchromatic nuclei: solid and dark, like a lymphocyte's.
            dark = tone < texture.dark_share
            level = np.where(dark, 1.45 + 0.25 * (1.0 - d), level)
        h_conc[nucleus] = level[nucleus]
        e_conc[nucleus] = texture.nucleus_e
        if texture.nucleolus:
            dot = nucleus & (d < 0.17)
            if texture.dark_share:
                dot &= tone >= texture.dark_share
            h_conc[dot] = 1.6
            e_conc[dot] = 0.35

    def _paint_fat(self, region, xs, ys, h_conc, e_conc) -> None:
        if not region.any():
            return
        d, _ = self._nuclei(_FAT_CELLS, xs, ys)
        h_conc[region] = 0.05
        e_conc[region] = np.where(d[region] < 0.93, 0.02, 0.55)

    def _paint_lumen(self, region, xs, ys, h_conc, e_conc) -> None:
        if not region.any():
            return
        d, _ = self._nuclei(_RED_CELLS, xs, ys)
        h_conc[region] = 0.0
        e_conc[region] = np.where(d[region] < 1.0, 1.1, 0.08)

    def _artefact(self, f: Feature, od, xs, ys, x0: int, y0: int, masks) -> np.ndarray:
        h, w = od.shape[:2]
        if f.kind == "fold":
            inside = self._mask(f, x0, y0, w, h, masks)
            return np.where(inside[..., None], od * np.float32(1.85), od)
        if f.kind == "pen":
            ink = self._mask(f, x0, y0, w, h, masks)
            streaks = value_noise(xs, ys, 12.0 / self.mpp, self.seed ^ 0x1AC)
            return od + (ink * (0.7 + 0.5 * streaks))[..., None] * _INK_OD[f.variant]
        if f.kind == "bubble":
            cx, cy = f.center_xy
            radius = float(np.linalg.norm(f.level0_xy - np.asarray(f.center_xy), axis=1).mean())
            r = np.hypot(xs[None, :] - cx, ys[:, None] - cy) / radius
            rim_px = 4.0 / self.mpp / radius
            od = np.where((r < 1.0)[..., None], od * 0.8, od)
            return od + (0.45 * np.clip(1.0 - np.abs(r - 1.0) / rim_px, 0.0, 1.0))[..., None]
        if f.kind == "dust":
            inside = self._mask(f, x0, y0, w, h, masks)
            d, _ = self._nuclei(_DUST, xs, ys)
            return od + (1.3 * (inside & (d < 1.0)))[..., None]
        return od


def _box_width(sigma_px: float) -> int:
    """The odd box width whose ``_BOX_PASSES`` passes blur about like a Gaussian of ``sigma_px``.

    Each pass adds the box's variance, ``(width**2 - 1) / 12``.
    """
    width = math.sqrt(12.0 * sigma_px * sigma_px / _BOX_PASSES + 1.0)
    return 2 * max(1, round((width - 1.0) / 2.0)) + 1


def _reach(width: int) -> int:
    """How far (px) a blur of this box width carries a pixel; 0 for no blur."""
    return _BOX_PASSES * (width // 2)


def _box_blur(rgb: np.ndarray, width: int) -> np.ndarray:
    """Blur ``(h, w, 3)`` along both image axes; pixels within the reach of an edge are not exact.

    Every pixel's value depends only on its neighbours, never on where the array
    starts, so any tile grid renders the same bytes: a narrow blur (the optics) is
    one pass of the passes' combined kernel; a wide one (defocus) sums boxes
    exactly in fixed-point integers, at a cost that does not grow with the width.
    """
    if width <= 3:
        kernel = np.ones(1)
        for _ in range(_BOX_PASSES):
            kernel = np.convolve(kernel, np.full(width, 1.0 / width))
        for axis in (0, 1):
            rgb = correlate1d(rgb, kernel, axis=axis, mode="nearest")
        return rgb
    scale = width**_BOX_PASSES
    # An eighth of a grey level; the passes' sums (< 2**31) are exact in int32.
    fixed = np.rint(rgb * 8.0).astype(np.int32)
    for _ in range(2):  # rows, then columns (as rows of the transpose)
        for _ in range(_BOX_PASSES):
            fixed = _box_sum_rows(fixed, width)
        fixed = np.ascontiguousarray(((fixed + scale // 2) // scale).transpose(1, 0, 2))
    return fixed.astype(np.float32) / 8.0


def _box_sum_rows(values: np.ndarray, width: int) -> np.ndarray:
    """Sums over the odd ``width`` rows centred on each row; edge rows repeat.

    The running total may wrap around int32; differences of it are exact all the same.
    """
    half = width // 2
    padded = np.concatenate(
        [np.repeat(values[:1], half + 1, axis=0), values, np.repeat(values[-1:], half, axis=0)]
    )
    with np.errstate(over="ignore"):
        total = np.cumsum(padded, axis=0, dtype=np.int32)
        return total[width:] - total[:-width]


def _blur_where(rgb: np.ndarray, inside: np.ndarray, margin: int, width: int) -> None:
    """Blur ``rgb`` in place where ``inside`` (the region less ``margin`` px on each side) is set.

    Only the box around ``inside``, grown by the blur's reach, is filtered.
    """
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    r0, r1 = rows[0] + margin, rows[-1] + margin + 1
    c0, c1 = cols[0] + margin, cols[-1] + margin + 1
    reach = _reach(width)
    s0, s1 = max(r0 - reach, 0), min(r1 + reach, rgb.shape[0])
    t0, t1 = max(c0 - reach, 0), min(c1 + reach, rgb.shape[1])
    blurred = _box_blur(rgb[s0:s1, t0:t1], width)[r0 - s0 : r1 - s0, c0 - t0 : c1 - t0]
    keep = inside[r0 - margin : r1 - margin, c0 - margin : c1 - margin, None]
    rgb[r0:r1, c0:c1] = np.where(keep, blurred, rgb[r0:r1, c0:c1])


def _meets(bounds: tuple[float, float, float, float], box: tuple[int, int, int, int]) -> bool:
    """Whether two ``(x_min, y_min, x_max, y_max)`` boxes overlap (touching counts)."""
    return not (
        bounds[2] < box[0] or bounds[3] < box[1] or bounds[0] > box[2] or bounds[1] > box[3]
    )


def polygon_mask(level0_xy: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Return ``(h, w)`` bool: pixel centres of the region at ``(x0, y0)`` inside the polygon.

    Even-odd rule, counting edge crossings left of each pixel centre; only edges
    that cross the region's rows matter, so a large outline costs as little as a small one.
    """
    px = np.arange(w, dtype=np.float64) + 0.5  # local x of pixel centres
    py = y0 + np.arange(h, dtype=np.float64) + 0.5
    a = np.asarray(level0_xy, dtype=np.float64)
    b = np.roll(a, -1, axis=0)
    keep = (np.maximum(a[:, 1], b[:, 1]) > py[0]) & (np.minimum(a[:, 1], b[:, 1]) <= py[-1])
    keep &= np.minimum(a[:, 0], b[:, 0]) <= x0 + w  # edges right of the region cross no ray
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return np.zeros((h, w), dtype=bool)
    ay, by = a[None, :, 1], b[None, :, 1]
    spans = (ay > py[:, None]) != (by > py[:, None])  # (h, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (py[:, None] - ay) / (by - ay)
    cross = a[None, :, 0] + t * (b[None, :, 0] - a[None, :, 0]) - x0
    cross = np.where(spans, np.clip(cross, -1.0, w + 1.0), w + 2.0)  # no crossing: far right
    n = cross.shape[1]
    stride = w + 4.0
    rows = np.arange(h, dtype=np.float64)[:, None] * stride
    keys = np.sort((cross + 1.0 + rows).ravel())
    counts = np.searchsorted(keys, (px[None, :] + 1.0 + rows).ravel()).reshape(h, w)
    counts -= np.arange(h)[:, None] * n
    return (counts % 2).astype(bool)


def make_camelyon_scene(
    width: int,
    height: int,
    seed: int,
    *,
    tumor: bool,
    centre: Centre,
    params: HardCohortConfig,
    stain_jitter: float = 0.08,
) -> CamelyonScene:
    """Draw one slide of the ``camelyon`` difficulty, scanned at ``centre``."""
    rng = np.random.default_rng(seed)
    pieces = draw_pieces(rng, width, height, tumor=tumor)
    base = Stain(centre.h_od, centre.e_od, centre.h_scale, centre.e_scale, centre.light_rgb)
    stain = draw_stain(rng, stain_jitter, base)
    layout = draw_hard_layout(rng, pieces, centre.mpp, params, tumor=tumor)
    return CamelyonScene(
        width=width,
        height=height,
        mpp=centre.mpp,
        seed=seed,
        pieces=tuple(pieces),
        stain=stain,
        lesions=layout.lesions,
        exclusions=layout.exclusions,
        features=layout.features,
        blur_um=centre.blur_um,
        overlap=params.nuclear_overlap,
        centre=centre.name,
    )
