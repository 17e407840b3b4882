"""A procedural H&E lymph-node section: tissue pieces, lymphocytes, metastases.

All geometry is in level-0 pixels and derived from physical sizes in µm, so a
slide generated at another mpp shows the same tissue at another resolution.

What a model can learn, as in real CAMELYON16 slides: normal lymph node is a
dense carpet of small, round, dark lymphocyte nuclei; metastatic carcinoma is
made of larger, pleomorphic, pale (vesicular) nuclei with nucleoli and more
eosin-pink cytoplasm. The difference is texture and cell size, not a flat
colour, and the stain varies mildly from slide to slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from skimage.draw import polygon as draw_polygon

from pipeline.slides.annotations import Polygon
from pipeline.synth.noise import hash_uniform, value_noise

# Ruifrok & Johnston optical-density vectors (normalised) for haematoxylin and eosin.
_H_OD = np.array([0.650, 0.704, 0.286])
_E_OD = np.array([0.072, 0.990, 0.105])

# Physical sizes, µm. Lesion radii are chosen against the CAMELYON16 rule that a
# lesion grown by 37.5 µm per side is an isolated tumor cell cluster (ITC) when
# its major axis is under 275 µm: 2 r + 75 < 275 <=> r < 100 µm.
_MACRO_RADIUS_UM = (200.0, 400.0)
_MEDIUM_RADIUS_UM = (125.0, 170.0)
_ITC_RADIUS_UM = (20.0, 40.0)
_LESION_GAP_UM = 90.0  # > 2 x 37.5 µm: grown lesions never merge in the evaluation mask


@dataclass(frozen=True)
class NucleusField:
    """A jittered grid of elliptic nuclei: one candidate per ``cell_um`` square."""

    cell_um: float
    radius_um: tuple[float, float]
    elongation: tuple[float, float]
    presence: float
    key: int


# Lymphocytes: ~6.5 µm round dark nuclei packed ~9 µm apart.
LYMPHOCYTES = NucleusField(
    cell_um=9.0, radius_um=(2.8, 3.5), elongation=(1.0, 1.25), presence=0.85, key=11
)
# Carcinoma cells: 9-14 µm pleomorphic nuclei ~17 µm apart.
CARCINOMA = NucleusField(
    cell_um=17.0, radius_um=(4.5, 7.0), elongation=(1.0, 1.7), presence=0.95, key=23
)
# Fat vacuoles and sinuses: sparse clear holes in normal tissue.
VACUOLES = NucleusField(
    cell_um=140.0, radius_um=(15.0, 40.0), elongation=(1.0, 1.4), presence=0.3, key=37
)


@dataclass(frozen=True)
class TissuePiece:
    """A star-shaped tissue section: radius ``r(θ) = r0 (1 + Σ a_k cos(k θ + φ_k))``."""

    center_xy: tuple[float, float]
    radius_px: float
    harmonics: tuple[tuple[int, float, float], ...]

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for k, amplitude, phase in self.harmonics:
            r = r + amplitude * np.cos(k * theta + phase)
        return self.radius_px * r

    @property
    def min_radius_px(self) -> float:
        return self.radius_px * (1.0 - sum(a for _, a, _ in self.harmonics))

    @property
    def max_radius_px(self) -> float:
        return self.radius_px * (1.0 + sum(a for _, a, _ in self.harmonics))


@dataclass(frozen=True)
class Stain:
    """Per-slide stain: OD vectors, concentration scales and the light level."""

    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    h_scale: float
    e_scale: float
    light_rgb: tuple[float, float, float]


@dataclass(frozen=True)
class SlideScene:
    """Everything needed to render any region of one synthetic slide."""

    width: int
    height: int
    mpp: float
    seed: int
    pieces: tuple[TissuePiece, ...]
    stain: Stain
    lesions: tuple[Polygon, ...] = field(default=())
    exclusions: tuple[Polygon, ...] = field(default=())

    @property
    def annotations(self) -> list[Polygon]:
        """Tumor outlines then exclusions, as written to the ASAP XML file."""
        return [*self.lesions, *self.exclusions]

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB of the level-0 region at ``(x0, y0)``."""
        xs = np.arange(x0, x0 + w, dtype=np.float64) + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float64) + 0.5
        tissue = self._tissue_mask(xs, ys)
        light = np.asarray(self.stain.light_rgb)
        grain = hash_uniform(
            np.arange(x0, x0 + w)[None, :], np.arange(y0, y0 + h)[:, None], self.seed ^ 0x5EED
        )
        if not tissue.any():
            rgb = light[None, None, :] - 4.0 + 8.0 * grain[..., None]
            return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

        tumor = self.tumor_mask(x0, y0, w, h) & tissue
        normal = tissue & ~tumor
        px_per_um = 1.0 / self.mpp
        haze = value_noise(xs, ys, 60.0 * px_per_um, self.seed ^ 0xA11)
        h_conc = np.zeros((h, w))
        e_conc = np.zeros((h, w))

        if normal.any():
            # Lymphoid tissue: pink-violet background under dense small dark nuclei.
            e_conc += normal * (0.30 + 0.25 * haze)
            h_conc += normal * (0.10 + 0.08 * haze)
            d, _ = self._nuclei(LYMPHOCYTES, xs, ys)
            nucleus = normal & (d < 1.0)
            h_conc[nucleus] = 1.55 + 0.25 * (1.0 - d[nucleus])
            e_conc[nucleus] = 0.15
            d_vac, _ = self._nuclei(VACUOLES, xs, ys)
            vacuole = normal & (d_vac < 1.0)
            h_conc[vacuole] = 0.02
            e_conc[vacuole] = 0.04 + 0.05 * (d_vac[vacuole] > 0.85)
        if tumor.any():
            # Carcinoma: pinker cytoplasm, large pale nuclei with a dark rim and a nucleolus.
            e_conc += tumor * (0.48 + 0.22 * haze)
            h_conc += tumor * (0.16 + 0.06 * haze)
            d, u = self._nuclei(CARCINOMA, xs, ys)
            nucleus = tumor & (d < 1.0)
            rim = np.clip((d - 0.62) / 0.38, 0.0, 1.0)
            h_conc[nucleus] = 0.55 + 0.35 * u[nucleus] + 0.75 * rim[nucleus]
            e_conc[nucleus] = 0.12
            nucleolus = tumor & (d < 0.17)
            h_conc[nucleolus] = 1.6
            e_conc[nucleolus] = 0.35

        h_od = np.asarray(self.stain.h_od) * self.stain.h_scale
        e_od = np.asarray(self.stain.e_od) * self.stain.e_scale
        od = h_conc[..., None] * h_od + e_conc[..., None] * e_od
        rgb = light * np.exp(-od)
        rgb += (grain[..., None] - 0.5) * np.where(tissue, 14.0, 8.0)[..., None]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def tumor_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w)`` bool: inside a lesion outline and outside every exclusion."""
        mask = np.zeros((h, w), dtype=bool)
        for lesion in self.lesions:
            _fill(mask, lesion, x0, y0, True)
        for exclusion in self.exclusions:
            _fill(mask, exclusion, x0, y0, False)
        return mask

    def tissue_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w)`` bool: pixel centres inside a tissue section."""
        xs = np.arange(x0, x0 + w, dtype=np.float64) + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float64) + 0.5
        return self._tissue_mask(xs, ys)

    def _tissue_mask(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        mask = np.zeros((ys.size, xs.size), dtype=bool)
        for piece in self.pieces:
            cx, cy = piece.center_xy
            r_max = piece.max_radius_px
            if (
                xs[-1] < cx - r_max
                or xs[0] > cx + r_max
                or ys[-1] < cy - r_max
                or ys[0] > cy + r_max
            ):
                continue
            dx = np.broadcast_to(xs[None, :] - cx, mask.shape)
            dy = np.broadcast_to(ys[:, None] - cy, mask.shape)
            dist = np.hypot(dx, dy)
            mask |= dist < piece.min_radius_px
            # Only pixels in the ring between the extreme radii need the outline's angle.
            ring = (dist >= piece.min_radius_px) & (dist < r_max)
            if ring.any():
                mask[ring] |= dist[ring] < piece.radius_at(np.arctan2(dy[ring], dx[ring]))
        return mask

    def _nuclei(
        self, spec: NucleusField, xs: np.ndarray, ys: np.ndarray, reach: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the normalised distance to the nearest nucleus and that nucleus' random tone.

        ``d < 1`` is inside a nucleus; ``d`` is exact up to ``reach`` (inf further
        out); both arrays are ``(len(ys), len(xs))``.
        """
        cell = spec.cell_um / self.mpp
        key = self.seed * 1000003 + spec.key
        cx = np.floor(xs / cell).astype(np.int64)
        cy = np.floor(ys / cell).astype(np.int64)
        gx = np.arange(cx.min() - 1, cx.max() + 2)
        gy = np.arange(cy.min() - 1, cy.max() + 2)
        ggx, ggy = gx[None, :], gy[:, None]
        present = hash_uniform(ggx, ggy, key) < spec.presence
        centre_x = (ggx + 0.15 + 0.7 * hash_uniform(ggx, ggy, key + 1)) * cell
        centre_y = (ggy + 0.15 + 0.7 * hash_uniform(ggx, ggy, key + 2)) * cell
        r_lo, r_hi = spec.radius_um
        radius = (r_lo + (r_hi - r_lo) * hash_uniform(ggx, ggy, key + 3)) / self.mpp
        e_lo, e_hi = spec.elongation
        elong = e_lo + (e_hi - e_lo) * hash_uniform(ggx, ggy, key + 4)
        angle = math.pi * hash_uniform(ggx, ggy, key + 5)
        tone = hash_uniform(ggx, ggy, key + 6)
        # Semi-axes: a along `angle`, b across; area kept close to pi r^2.
        semi_a = radius * np.sqrt(elong)
        semi_b = radius / np.sqrt(elong)
        cos_t, sin_t = np.cos(angle), np.sin(angle)

        best = np.full((ys.size, xs.size), np.inf)
        best_tone = np.zeros_like(best)
        # Loop over nuclei, each touching only its own bounding box: a tile holds a
        # few dozen, so this beats evaluating every pixel against 3x3 neighbours.
        box = semi_a * reach + 1.0
        x_first, y_first = xs[0], ys[0]
        for j, i in zip(*np.nonzero(present), strict=True):
            px0 = max(int(centre_x[j, i] - box[j, i] - x_first), 0)
            px1 = min(int(centre_x[j, i] + box[j, i] - x_first) + 2, xs.size)
            py0 = max(int(centre_y[j, i] - box[j, i] - y_first), 0)
            py1 = min(int(centre_y[j, i] + box[j, i] - y_first) + 2, ys.size)
            if px0 >= px1 or py0 >= py1:
                continue
            dx = xs[None, px0:px1] - centre_x[j, i]
            dy = ys[py0:py1, None] - centre_y[j, i]
            c, s = cos_t[j, i], sin_t[j, i]
            along = (dx * c + dy * s) / semi_a[j, i]
            across = (dy * c - dx * s) / semi_b[j, i]
            d = np.sqrt(along * along + across * across)
            window = best[py0:py1, px0:px1]
            closer = d < window
            window[closer] = d[closer]
            best_tone[py0:py1, px0:px1][closer] = tone[j, i]
        return best, best_tone


def _fill(mask: np.ndarray, polygon: Polygon, x0: int, y0: int, value: bool) -> None:
    """Set pixels of ``mask`` (origin at level-0 ``x0, y0``) whose centre lies in ``polygon``."""
    h, w = mask.shape
    x_min, y_min, x_max, y_max = polygon.bounds()
    if x_max < x0 or y_max < y0 or x_min > x0 + w or y_min > y0 + h:
        return
    # skimage samples pixel (r, c) at its integer coordinates: shift by half a pixel
    # so the test is on the pixel centre (x0 + c + 0.5, y0 + r + 0.5).
    rows, cols = draw_polygon(
        polygon.level0_xy[:, 1] - y0 - 0.5, polygon.level0_xy[:, 0] - x0 - 0.5, shape=(h, w)
    )
    mask[rows, cols] = value


def make_scene(
    width: int, height: int, mpp: float, seed: int, *, tumor: bool, stain_jitter: float = 0.08
) -> SlideScene:
    """Draw the layout of one slide: tissue pieces, stain and (if ``tumor``) lesions."""
    rng = np.random.default_rng(seed)
    pieces = draw_pieces(rng, width, height, tumor=tumor)
    stain = draw_stain(rng, stain_jitter)
    lesions: list[Polygon] = []
    exclusions: list[Polygon] = []
    if tumor:
        lesions, exclusions = _draw_lesions(rng, pieces, mpp)
    return SlideScene(
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        pieces=tuple(pieces),
        stain=stain,
        lesions=tuple(lesions),
        exclusions=tuple(exclusions),
    )


def draw_pieces(
    rng: np.random.Generator, width: int, height: int, *, tumor: bool
) -> list[TissuePiece]:
    along_x = width >= height
    long_side, short_side = (width, height) if along_x else (height, width)
    # Up to two sections on a squarish slide, three on an elongated one; tumor slides
    # get one section fewer so lesions above the ITC size fit on small test slides.
    most = (3 if long_side >= 1.5 * short_side else 2) - int(tumor)
    n_pieces = int(rng.integers(1, most + 1))
    strip = long_side / n_pieces
    pieces = []
    for i in range(n_pieces):
        harmonics = tuple(
            (k, float(rng.uniform(0.02, 0.16) / k**0.5), float(rng.uniform(0, 2 * math.pi)))
            for k in range(2, 7)
        )
        spread = 1.0 + sum(a for _, a, _ in harmonics)
        room = 0.5 * min(strip, short_side) * 0.92
        radius = room * float(rng.uniform(0.75, 1.0)) / spread
        c_long = strip * (i + 0.5) + float(rng.uniform(-0.5, 0.5)) * (room - radius * spread)
        c_short = short_side / 2 + float(rng.uniform(-0.5, 0.5)) * (room - radius * spread)
        center = (c_long, c_short) if along_x else (c_short, c_long)
        pieces.append(TissuePiece(center_xy=center, radius_px=radius, harmonics=harmonics))
    return pieces


def draw_stain(rng: np.random.Generator, jitter: float, base: Stain | None = None) -> Stain:
    """Jitter ``base`` (default: Ruifrok & Johnston's H&E, light 244) for one slide."""
    if base is None:
        base = Stain(tuple(_H_OD), tuple(_E_OD), 1.0, 1.0, (244.0, 244.0, 244.0))

    def jittered(vector: tuple[float, float, float]) -> tuple[float, float, float]:
        v = np.clip(np.asarray(vector) + rng.normal(0.0, jitter / 2, 3), 0.02, None)
        v = v / np.linalg.norm(v)
        return (float(v[0]), float(v[1]), float(v[2]))

    light = np.asarray(base.light_rgb) + rng.uniform(-4, 4, 3) * (jitter / 0.08)
    return Stain(
        h_od=jittered(base.h_od),
        e_od=jittered(base.e_od),
        h_scale=float(base.h_scale * (1.0 + rng.uniform(-1.5, 1.5) * jitter)),
        e_scale=float(base.e_scale * (1.0 + rng.uniform(-1.5, 1.5) * jitter)),
        light_rgb=(float(light[0]), float(light[1]), float(light[2])),
    )


def star_polygon(
    rng: np.random.Generator,
    center_xy: tuple[float, float],
    radius_px: float,
    n_vertices: int = 48,
) -> np.ndarray:
    """Return ``(n, 2)`` vertices of a smooth irregular outline of mean radius ``radius_px``."""
    theta = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0.0, 0.12 / k**0.5) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    r *= radius_px
    return np.stack([center_xy[0] + r * np.cos(theta), center_xy[1] + r * np.sin(theta)], axis=1)


def _draw_lesions(
    rng: np.random.Generator, pieces: list[TissuePiece], mpp: float
) -> tuple[list[Polygon], list[Polygon]]:
    """Place a macro-metastasis, medium lesions and ITCs inside the tissue, apart."""
    # Outlines can bulge ~22% past their mean radius (harmonics above).
    bulge = 1.25
    sizes_um = [("_0", _MACRO_RADIUS_UM), ("_0", _MEDIUM_RADIUS_UM)]
    sizes_um += [("_0", _MEDIUM_RADIUS_UM)] * int(rng.integers(0, 2))
    sizes_um += [("_1", _ITC_RADIUS_UM)] * int(rng.integers(1, 3))
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].min_radius_px)  # largest first
    placed: list[tuple[float, float, float]] = []
    lesions: list[Polygon] = []
    exclusions: list[Polygon] = []
    gap_px = _LESION_GAP_UM / mpp
    for n, (group, (lo, hi)) in enumerate(sizes_um):
        drawn_px = float(rng.uniform(lo, hi)) / mpp
        spot = None
        for piece_index in order:
            piece = pieces[piece_index]
            # Too small a piece for the drawn size: shrink to fit (tiny test slides).
            radius = min(drawn_px, 0.45 * piece.min_radius_px / bulge)
            spot = find_spot(rng, piece, bulge * radius, placed, bulge, gap_px)
            if spot is not None:
                break
        if spot is None:
            continue
        cx, cy = spot
        placed.append((cx, cy, radius))
        index = len(lesions)
        lesions.append(Polygon(f"Annotation {index}", group, star_polygon(rng, (cx, cy), radius)))
        if n == 0 and rng.uniform() < 0.7:
            # A non-tumor island inside the macro-metastasis, as CAMELYON16's `_2` outlines.
            offset = 0.3 * radius
            phi = float(rng.uniform(0, 2 * math.pi))
            centre = (cx + offset * math.cos(phi), cy + offset * math.sin(phi))
            exclusions.append(
                Polygon("Exclusion", "_2", star_polygon(rng, centre, 0.22 * radius, 24))
            )
    for i, exclusion in enumerate(exclusions):
        exclusions[i] = Polygon(
            f"Annotation {len(lesions) + i}", exclusion.group, exclusion.level0_xy
        )
    return lesions, exclusions


def find_spot(
    rng: np.random.Generator,
    piece: TissuePiece,
    reach_px: float,
    placed: list[tuple[float, float, float]],
    bulge: float,
    gap_px: float,
) -> tuple[float, float] | None:
    """Return a lesion centre whose outline stays in ``piece`` and clear of ``placed``."""
    room = piece.min_radius_px - reach_px
    if room <= 0:
        return None
    for _attempt in range(200):
        rho = room * math.sqrt(float(rng.uniform(0, 1)))
        phi = float(rng.uniform(0, 2 * math.pi))
        cx = piece.center_xy[0] + rho * math.cos(phi)
        cy = piece.center_xy[1] + rho * math.sin(phi)
        if clear_of(cx, cy, reach_px, placed, bulge, gap_px):
            return cx, cy
    return None


def clear_of(
    x: float,
    y: float,
    reach_px: float,
    placed: list[tuple[float, float, float]],
    bulge: float,
    gap_px: float,
) -> bool:
    """Whether an outline reaching ``reach_px`` from ``(x, y)`` stays ``gap_px`` clear of each
    ``placed`` ``(x, y, radius_px)``, whose outlines reach ``bulge`` times their radius."""
    return all(math.hypot(x - px, y - py) > reach_px + bulge * pr + gap_px for px, py, pr in placed)


def diameter_px(level0_xy: np.ndarray) -> float:
    """Largest distance between two vertices of ``(N, 2)`` ``level0_xy``."""
    diff = level0_xy[:, None, :] - level0_xy[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())
