"""Where the ``camelyon`` difficulty puts lesions, mimics and artefacts, and how it annotates.

Every shape is a :class:`Feature` in level-0 pixels, sized from physical sizes
in µm. What is drawn (the truth) and what is annotated differ as in the real
CAMELYON16 annotations: lesions are outlined a little loosely, with fewer
vertices, and non-tumor islands inside them are outlined as ``_2`` exclusions.
Lesion sizes follow the challenge's classes by largest diameter: macro-metastases
(> 2 mm), micro-metastases (0.2-2 mm) and isolated tumor cells (ITC, < 0.2 mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import HardCohortConfig
from pipeline.slides.annotations import Polygon
from pipeline.synth.scene import TissuePiece, clear_of, diameter_px, find_spot, star_polygon

TUMOR_KINDS = ("ductal", "lobular")
MIMIC_KINDS = ("germinal_centre", "histiocytes", "capsule", "vessel", "fat")
ARTEFACT_KINDS = ("pen", "fold", "blur", "bubble", "dust")
#: Not tumor inside a lesion: 0 lymph node, 1 histiocytes (annotated ``_2``).
ISLAND = "island"
LUMEN = "lumen"

# Mean radius (µm) of each lesion class. The outline's harmonics reach up to 27% past
# the mean radius and annotations add a margin, so ITCs stay under 0.2 mm across
# and macro-metastases over 2 mm where the tissue is large enough to hold them.
_RADIUS_UM = {"macro": (1100.0, 1500.0), "micro": (110.0, 850.0), "itc": (12.0, 55.0)}
_SIZE_CLASSES = ("macro", "micro", "itc")
_NEAR_UM = 200.0  # satellites lie up to this much further than the least gap: near
_MIMIC_GAP_UM = 120.0  # mimics stay this far outside lesion outlines: labelled normal
_BULGE = 1.3  # star outlines bulge up to 27% past their mean radius (harmonics below)


@dataclass(frozen=True, eq=False)
class Feature:
    """One drawn shape: ``level0_xy`` ``(N, 2)`` is its closed outline in level-0 pixels."""

    kind: str
    level0_xy: np.ndarray = field(repr=False)
    variant: int = 0  # pen: 0 blue, 1 green, 2 black; island: 0 lymph node, 1 histiocytes
    size_class: str = ""  # lesions: macro, micro or itc (by the annotation's diameter)

    def bounds(self) -> tuple[float, float, float, float]:
        """Return ``(x_min, y_min, x_max, y_max)`` in level-0 pixels."""
        x, y = self.level0_xy[:, 0], self.level0_xy[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())

    @property
    def center_xy(self) -> tuple[float, float]:
        return float(self.level0_xy[:, 0].mean()), float(self.level0_xy[:, 1].mean())

    @property
    def anchor_xy(self) -> tuple[float, float]:
        """A level-0 point on the feature, where a contact sheet shows it."""
        xy = self.level0_xy
        if self.kind in ("capsule", "fold", "pen"):  # bands: one side, then the other reversed
            k = len(xy) // 4
            x, y = (xy[k] + xy[-1 - k]) / 2
        elif self.kind == "bubble":
            x, y = xy[0]  # its rim
        else:
            return self.center_xy
        return float(x), float(y)


@dataclass(frozen=True)
class HardLayout:
    """Truth (``features``) and what the annotator drew (``lesions``, ``exclusions``)."""

    features: tuple[Feature, ...]
    lesions: tuple[Polygon, ...]
    exclusions: tuple[Polygon, ...]


def draw_hard_layout(
    rng: np.random.Generator,
    pieces: list[TissuePiece],
    mpp: float,
    params: HardCohortConfig,
    *,
    tumor: bool,
) -> HardLayout:
    """Place lesions (tumor slides), mimics and artefacts on ``pieces``; annotate the lesions."""
    features: list[Feature] = []
    annotated: list[tuple[float, float, float]] = []  # (x, y, reach_px) of annotated lesions
    lesions: list[Polygon] = []
    exclusions: list[Polygon] = []
    if tumor:
        _draw_lesions(rng, pieces, mpp, params, features, annotated, lesions, exclusions)
    n_mimics = int(rng.integers(params.mimics_per_slide[0], params.mimics_per_slide[1] + 1))
    for _ in range(n_mimics):
        features += _draw_mimic(rng, pieces, mpp, annotated)
    n_artefacts = int(
        rng.integers(params.artefacts_per_slide[0], params.artefacts_per_slide[1] + 1)
    )
    for _ in range(n_artefacts):
        features.append(_draw_artefact(rng, pieces, mpp))
    named = [
        Polygon(f"Annotation {i}", p.group, p.level0_xy)
        for i, p in enumerate([*lesions, *exclusions])
    ]
    return HardLayout(
        features=tuple(features),
        lesions=tuple(named[: len(lesions)]),
        exclusions=tuple(named[len(lesions) :]),
    )


def _draw_lesions(
    rng: np.random.Generator,
    pieces: list[TissuePiece],
    mpp: float,
    params: HardCohortConfig,
    features: list[Feature],
    annotated: list[tuple[float, float, float]],
    lesions: list[Polygon],
    exclusions: list[Polygon],
) -> None:
    low, high = params.lesions_per_slide
    n_lesions = max(1, int(rng.integers(low, high + 1)))  # a tumor slide has tumor
    mix = np.asarray(params.lesion_mix, dtype=np.float64)
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].min_radius_px)  # largest first
    placed: list[tuple[float, float, float]] = []  # (x, y, mean radius px) of drawn lesions
    # Outlines grow by 37.5 µm a side in the evaluation and annotations reach out by up
    # to 1.5 margins: lesions this far apart stay apart there.
    gap_um = 75.0 + 3.0 * params.annotation_margin_um + 15.0
    gap_px = gap_um / mpp
    for n in range(n_lesions):
        size_class = _SIZE_CLASSES[int(rng.choice(3, p=mix / mix.sum()))]
        lo, hi = _RADIUS_UM[size_class]
        # Micro-metastases: log-uniform, so small ones are as common as in the challenge.
        radius_um = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        spot = radius = None
        near = n > 0 and rng.uniform() < 0.3  # a satellite of the previous lesion
        for piece_index in order:
            piece = pieces[piece_index]
            # A macro-metastasis may fill most of a section; others shrink to fit small ones.
            room = 0.8 if size_class == "macro" else 0.45
            radius = min(radius_um / mpp, room * piece.min_radius_px / _BULGE)
            if near:
                spot = _near_spot(rng, piece, _BULGE * radius, placed, gap_px, _NEAR_UM / mpp)
            if spot is None:
                spot = find_spot(rng, piece, _BULGE * radius, placed, _BULGE, gap_px)
            if spot is not None:
                break
        if spot is None or radius is None:
            continue
        placed.append((spot[0], spot[1], radius))
        kind = "lobular" if rng.uniform() < params.lobular_fraction else "ductal"
        truth = star_polygon(rng, spot, radius, 64)
        margin_px = min(params.annotation_margin_um / mpp, 0.25 * radius)
        outline = _loose_outline(rng, truth, spot, margin_px)
        size_um = diameter_px(outline) * mpp
        actual = "itc" if size_um < 200.0 else "macro" if size_um > 2000.0 else "micro"
        features.append(Feature(kind, truth, size_class=actual))
        lesions.append(Polygon("", "_1" if actual == "itc" else "_0", outline))
        annotated.append((spot[0], spot[1], _BULGE * radius + margin_px))
        if radius * mpp > 120.0 and rng.uniform() < 0.5:
            # A non-tumor island inside the lesion, outlined as an exclusion.
            phi = float(rng.uniform(0, 2 * math.pi))
            centre = (
                spot[0] + 0.35 * radius * math.cos(phi),
                spot[1] + 0.35 * radius * math.sin(phi),
            )
            island = star_polygon(rng, centre, float(rng.uniform(0.12, 0.22)) * radius, 32)
            features.append(Feature(ISLAND, island, variant=int(rng.uniform() < 0.5)))
            exclusions.append(
                Polygon("", "_2", _loose_outline(rng, island, centre, 0.3 * margin_px))
            )


def _near_spot(
    rng: np.random.Generator,
    piece: TissuePiece,
    reach_px: float,
    placed: list[tuple[float, float, float]],
    gap_px: float,
    near_px: float,
) -> tuple[float, float] | None:
    """Return a centre ``gap_px`` to ``gap_px + near_px`` outside the last lesion placed.

    It stays inside ``piece`` and at least ``gap_px`` outside every other lesion.
    """
    nx, ny, nr = placed[-1]
    px, py = piece.center_xy
    for _attempt in range(50):
        distance = _BULGE * nr + reach_px + gap_px + float(rng.uniform(0, near_px))
        phi = float(rng.uniform(0, 2 * math.pi))
        cx, cy = nx + distance * math.cos(phi), ny + distance * math.sin(phi)
        if math.hypot(cx - px, cy - py) + reach_px >= piece.min_radius_px:
            continue
        if clear_of(cx, cy, reach_px, placed, _BULGE, gap_px):
            return cx, cy
    return None


def _loose_outline(
    rng: np.random.Generator, truth: np.ndarray, centre: tuple[float, float], margin_px: float
) -> np.ndarray:
    """Return an annotator's outline of ``truth``: pushed out by ~``margin_px``, fewer vertices."""
    step = max(1, len(truth) // 24)  # annotators click a couple of dozen points
    kept = truth[::step]
    offset = kept - np.asarray(centre)
    norm = np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-9)
    push = margin_px * rng.uniform(0.5, 1.5, (len(kept), 1))
    return kept + offset / norm * push


def _random_point_in(
    rng: np.random.Generator, piece: TissuePiece, room_px: float
) -> tuple[float, float]:
    rho = max(room_px, 0.0) * math.sqrt(float(rng.uniform(0, 1)))
    phi = float(rng.uniform(0, 2 * math.pi))
    return piece.center_xy[0] + rho * math.cos(phi), piece.center_xy[1] + rho * math.sin(phi)


def _draw_mimic(
    rng: np.random.Generator,
    pieces: list[TissuePiece],
    mpp: float,
    annotated: list[tuple[float, float, float]],
) -> list[Feature]:
    """A mimic of tumor that is normal tissue, kept clear of every annotated lesion."""
    kind = MIMIC_KINDS[int(rng.integers(len(MIMIC_KINDS)))]
    piece = pieces[int(rng.integers(len(pieces)))]
    if kind == "capsule":
        # A fibrous band along part of the section's edge.
        start = float(rng.uniform(0, 2 * math.pi))
        theta = start + np.linspace(0, float(rng.uniform(1.0, 3.0)), 48)
        width = float(rng.uniform(40.0, 90.0)) / mpp
        outer = piece.radius_at(theta) * 1.02
        inner = piece.radius_at(theta) - width
        ring = np.concatenate([outer[:, None], inner[::-1, None]])
        angles = np.concatenate([theta, theta[::-1]])
        xy = np.stack(
            [
                piece.center_xy[0] + ring[:, 0] * np.cos(angles),
                piece.center_xy[1] + ring[:, 0] * np.sin(angles),
            ],
            axis=1,
        )
        return [Feature(kind, xy)]
    radius_um = {
        "germinal_centre": (150.0, 350.0),
        "histiocytes": (70.0, 200.0),
        "vessel": (40.0, 120.0),
        "fat": (150.0, 400.0),
    }[kind]
    radius = float(rng.uniform(*radius_um)) / mpp
    gap = _MIMIC_GAP_UM / mpp
    for _attempt in range(60):
        centre = _random_point_in(rng, piece, piece.min_radius_px - _BULGE * radius)
        # ``annotated`` holds each outline's full reach already: no bulge on it.
        if clear_of(centre[0], centre[1], _BULGE * radius, annotated, 1.0, gap):
            break
    else:
        return []
    if kind == "vessel":
        wall = _ellipse(rng, centre, radius, float(rng.uniform(1.0, 2.5)))
        lumen = np.asarray(centre) + (wall - np.asarray(centre)) * float(rng.uniform(0.55, 0.75))
        return [Feature(kind, wall), Feature(LUMEN, lumen)]
    return [Feature(kind, star_polygon(rng, centre, radius, 48))]


def _ellipse(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, elongation: float
) -> np.ndarray:
    theta = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    angle = float(rng.uniform(0, math.pi))
    a, b = radius * math.sqrt(elongation), radius / math.sqrt(elongation)
    x, y = a * np.cos(theta), b * np.sin(theta)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([centre[0] + x * c - y * s, centre[1] + x * s + y * c], axis=1)


def _draw_artefact(rng: np.random.Generator, pieces: list[TissuePiece], mpp: float) -> Feature:
    kind = ARTEFACT_KINDS[int(rng.integers(len(ARTEFACT_KINDS)))]
    piece = pieces[int(rng.integers(len(pieces)))]
    if kind == "pen":
        # An arc drawn around part of the section, on glass and over tissue.
        radius = piece.radius_px * float(rng.uniform(0.6, 1.2))
        start = float(rng.uniform(0, 2 * math.pi))
        theta = start + np.linspace(0, float(rng.uniform(0.6, 2.0)), 40)
        wobble = 1.0 + 0.04 * np.sin(3 * theta + float(rng.uniform(0, 6)))
        half_width = float(rng.uniform(30.0, 75.0)) / mpp
        # The stroke's outline: the arc offset by half its width on each side.
        outer = radius * wobble + half_width
        inner = radius * wobble - half_width
        ring = np.concatenate([outer, inner[::-1]])
        angles = np.concatenate([theta, theta[::-1]])
        xy = np.stack(
            [
                piece.center_xy[0] + ring * np.cos(angles),
                piece.center_xy[1] + ring * np.sin(angles),
            ],
            axis=1,
        )
        return Feature(kind, xy, variant=int(rng.integers(3)))
    if kind == "fold":
        # A narrow curved band where the section lies doubled.
        centre = _random_point_in(rng, piece, 0.6 * piece.min_radius_px)
        length = float(rng.uniform(400.0, 1200.0)) / mpp
        width = float(rng.uniform(30.0, 100.0)) / mpp
        angle = float(rng.uniform(0, math.pi))
        t = np.linspace(-0.5, 0.5, 24)
        bend = float(rng.uniform(-0.15, 0.15)) * length
        along = t * length
        across = bend * (4 * t * t - 1)
        c, s = math.cos(angle), math.sin(angle)
        spine = np.stack([along * c - across * s, along * s + across * c], axis=1) + np.asarray(
            centre
        )
        normal = np.array([-s, c]) * (width / 2) * (1 - (2 * t[:, None]) ** 4 * 0.8)
        xy = np.concatenate([spine + normal, (spine - normal)[::-1]])
        return Feature(kind, xy)
    radius_um = {"blur": (200.0, 500.0), "bubble": (100.0, 300.0), "dust": (100.0, 300.0)}[kind]
    radius = float(rng.uniform(*radius_um)) / mpp
    centre = _random_point_in(rng, piece, piece.min_radius_px)
    if kind == "bubble":
        theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        xy = np.stack(
            [centre[0] + radius * np.cos(theta), centre[1] + radius * np.sin(theta)], axis=1
        )
        return Feature(kind, xy)
    return Feature(kind, star_polygon(rng, centre, radius, 32))
