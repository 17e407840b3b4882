"""The ``camelyon`` difficulty: centres, tumor patterns, lesion classes, mimics, artefacts."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import zarr
from scipy import ndimage
from skimage.color import rgb2hed

from pipeline.config import HardCohortConfig, SyntheticConfig, TilingConfig
from pipeline.evaluation.froc import evaluation_mask, itc_labels, tumor_mask
from pipeline.slides.annotations import read_asap_xml, write_asap_xml
from pipeline.slides.pyramid import write_pyramid_tiff
from pipeline.slides.reader import open_slide
from pipeline.slides.stain import angle_deg, macenko_vectors
from pipeline.store.patch_store import open_root
from pipeline.synth.centres import CENTRES
from pipeline.synth.cohort import plan_cohort, write_cohort, write_slide
from pipeline.synth.layout import ARTEFACT_KINDS, MIMIC_KINDS
from pipeline.synth.painting import make_camelyon_scene, polygon_mask
from pipeline.synth.scene import diameter_px
from tests.conftest import SHARED_DATA, run, shared_folder

REAL_HE = {
    "radboud": SHARED_DATA / "slides" / "CMU-1-Small-Region.svs",
    "utrecht": SHARED_DATA / "formats" / "aperio-jp2k" / "tcga-cr-7395-01a-01-ts1.svs",
}
#: The stated realism: each centre's stain vectors within this angle of its real slide's.
MAX_STAIN_ANGLE_DEG = 8.0
# Busy slides, so that a 4-slide cohort holds most kinds of mimic and artefact.
BUSY = HardCohortConfig(mimics_per_slide=(4, 6), artefacts_per_slide=(3, 5))


@pytest.fixture(scope="session")
def camelyon_cohort(tmp_path_factory):
    """Built once for all test workers (they would each build it under ``-n``)."""
    params = SyntheticConfig(
        difficulty="camelyon", slides=4, seed=2, width_px=3072, height_px=3072, camelyon=BUSY
    )
    with shared_folder(tmp_path_factory, "camelyon-cohort") as root:
        return write_cohort(root, params, workers=2)


def _scene(seed: int, *, tumor: bool = True, centre: str = "radboud", size: int = 8192, **kw):
    params = HardCohortConfig(**kw) if kw else HardCohortConfig()
    return make_camelyon_scene(size, size, seed, tumor=tumor, centre=CENTRES[centre], params=params)


@pytest.mark.slow  # generates a cohort
def test_centres_are_recorded_and_set_resolution_and_compression(camelyon_cohort):
    root = camelyon_cohort.root
    manifest = json.loads((root / "synth.json").read_text())
    records = {r["slide_id"]: r for r in manifest["slides"]}
    for split in ("training", "testing"):  # each split mixes both centres
        assert {r["centre"] for r in records.values() if r["split"] == split} == set(CENTRES)
    for record in records.values():
        centre = CENTRES[record["centre"]]
        assert (record["mpp"], record["jpeg_quality"]) == (centre.mpp, centre.jpeg_quality)
        with open_slide(root / record["image"]) as slide:
            assert slide.info.mpp == pytest.approx(centre.mpp, rel=1e-6)
    rows = list(csv.reader((root / "testing" / "reference.csv").open()))
    assert {row[0]: row[-1] for row in rows} == {
        sid: r["centre"] for sid, r in records.items() if r["split"] == "testing"
    }
    assert {row[1] for row in rows} == {"Tumor", "Normal"}


@pytest.mark.slow  # generates a cohort
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (real H&E slides)")
def test_stain_vectors_match_real_slides_per_centre(tmp_path):
    """Macenko vectors of each centre's slides against those of a real H&E slide, printed.

    Slides without artefacts: ink is not a stain (Macenko users mask pen marks).
    """
    real = {}
    for name, path in REAL_HE.items():
        with open_slide(path) as slide:
            level = slide.info.level_count - 1
            real[name] = macenko_vectors(
                slide.read_region((0, 0), level, slide.info.level_wh[level])
            )
    clean = HardCohortConfig(artefacts_per_slide=(0, 0))
    params = SyntheticConfig(
        difficulty="camelyon", slides=8, seed=4, width_px=2048, height_px=2048, camelyon=clean
    )
    cohort = write_cohort(tmp_path / "c", params, workers=2)
    pixels: dict[str, list[np.ndarray]] = {}
    for record in cohort.slides:
        with open_slide(cohort.root / record.image) as slide:
            rgb = slide.read_region((0, 0), 1, slide.info.level_wh[1])
        pixels.setdefault(record.centre, []).append(rgb.reshape(-1, 3))
    estimated = {c: macenko_vectors(np.concatenate(p)) for c, p in pixels.items()}
    for centre, (h_od, e_od) in estimated.items():
        other = next(c for c in CENTRES if c != centre)
        angles = {
            "H": angle_deg(h_od, real[centre][0]),
            "E": angle_deg(e_od, real[centre][1]),
            "H vs other real slide": angle_deg(h_od, real[other][0]),
        }
        print(f"{centre}: " + ", ".join(f"{k} {v:.1f}°" for k, v in angles.items()))
        assert angles["H"] < MAX_STAIN_ANGLE_DEG and angles["E"] < MAX_STAIN_ANGLE_DEG
        assert angles["H vs other real slide"] > 20.0  # the centres differ as configured
    assert angle_deg(estimated["radboud"][0], estimated["utrecht"][0]) > 20.0


def test_lesions_come_in_the_challenge_size_classes():
    """ITCs under 0.2 mm (and ITCs for the official evaluation), micro 0.2-2 mm, macro > 2 mm."""
    seen = {"itc": 0, "micro": 0, "macro": 0}
    near = 0
    for seed in range(12):
        scene = _scene(seed, size=32000, lesions_per_slide=(3, 4))  # macro needs ~8 mm
        mpp = scene.mpp
        lesions = [f for f in scene.features if f.kind in ("ductal", "lobular")]
        assert len(lesions) == len(scene.lesions) >= 1
        ds = 32
        full = tumor_mask(scene.annotations, (scene.width, scene.height), ds)
        labels = evaluation_mask(full, mpp, ds)
        assert labels.max() == len(lesions), "grown lesions must not merge"
        itcs = itc_labels(labels, mpp, ds)
        for feature, outline in zip(lesions, scene.lesions, strict=True):
            size_um = diameter_px(outline.level0_xy) * mpp
            seen[feature.size_class] += 1
            bounds = {"itc": (0, 200), "micro": (200, 2000), "macro": (2000, 1e9)}
            assert bounds[feature.size_class][0] <= size_um < bounds[feature.size_class][1]
            x, y = (int(v / ds) for v in outline.level0_xy.mean(axis=0))
            assert (labels[y, x] in itcs) == (feature.size_class == "itc")
        centres = [f.level0_xy.mean(axis=0) for f in lesions]
        gaps = [np.hypot(*(a - b)) * mpp for i, a in enumerate(centres) for b in centres[:i]]
        near += any(g < 1200 for g in gaps)
    assert min(seen.values()) >= 2, seen
    assert near >= 2, "some lesions lie near each other"


@pytest.mark.slow  # generates a cohort
def test_mimics_are_apart_from_lesions_and_tiled_as_normal(camelyon_cohort, tmp_path):
    for seed in range(6):  # by construction, on many slides
        scene = _scene(seed, size=8192, mimics_per_slide=(5, 8))
        for f in scene.features:
            if f.kind in MIMIC_KINDS and f.kind != "capsule":  # capsule: the section's rim
                x0, y0, x1, y1 = (int(v) for v in f.bounds())
                inside = polygon_mask(f.level0_xy, x0, y0, x1 - x0, y1 - y0)
                assert not (scene.tumor_mask(x0, y0, x1 - x0, y1 - y0) & inside).any()
    # ...and through the real tiling: patches centred in a mimic are labelled normal.
    from pipeline.tiling.driver import tile_slide
    from pipeline.tiling.plan import SlideJob

    root = camelyon_cohort.root
    config = TilingConfig(target_mpp=0.5, patch_px=32, codec="zstd", min_tissue_fraction=0.5)
    in_mimic = 0
    open_root(tmp_path / "s.zarr")
    for record in json.loads((root / "synth.json").read_text())["slides"]:
        xml = root / record["annotation"] if record["annotation"] else None
        job = SlideJob(record["slide_id"], root / record["image"], xml)
        assert tile_slide(job, tmp_path / "s.zarr", config).status == "done"
        group = zarr.open_group(str(tmp_path / "s.zarr"))[record["slide_id"]]
        coords, labels = group["coords"][:], group["labels"][:]
        span = 32 * 0.5 / record["mpp"]
        centres = coords + span / 2
        for f in record["features"]:
            if f["kind"] in ("germinal_centre", "histiocytes", "fat", "vessel"):
                x0, y0, x1, y1 = f["bounds"]
                hit = (centres[:, 0] > x0) & (centres[:, 0] < x1)
                hit &= (centres[:, 1] > y0) & (centres[:, 1] < y1)
                assert (labels[hit] == 0).all(), f"{record['slide_id']}: {f['kind']}"
                in_mimic += int(hit.sum())
    assert in_mimic > 10


def test_exclusions_are_honoured_by_tiling_and_evaluation(tmp_path):
    """A `_2` island inside a lesion: drawn as normal, tiled as normal, not a lesion pixel."""

    def inside(polygon, xy) -> bool:
        x, y = (int(v) for v in xy)
        return bool(polygon_mask(polygon.level0_xy, x, y, 1, 1)[0, 0])

    for seed in range(60):  # a lesion of at most ~0.45 mm holding an island
        scene = _scene(seed, size=12288)
        pairs = [
            (lesion, exclusion)
            for exclusion in scene.exclusions
            for lesion in scene.lesions
            if inside(lesion, exclusion.level0_xy.mean(axis=0))
            and diameter_px(lesion.level0_xy) < 1800
        ]
        if pairs:
            break
    lesion, exclusion = pairs[0]
    island = next(
        f for f in scene.features if f.kind == "island" and inside(exclusion, f.center_xy)
    )
    # A window around the lesion, written as a slide with these two annotations.
    x0, y0, x1, y1 = (int(v) for v in lesion.bounds())
    side = max(x1 - x0, y1 - y0) + 128
    ox, oy = (x0 + x1) // 2 - side // 2, (y0 + y1) // 2 - side // 2
    path = tmp_path / "tumor_001.tif"
    write_pyramid_tiff(
        path, side, side, lambda x, y, w, h: scene.render(x + ox, y + oy, w, h), mpp=scene.mpp
    )
    shifted = [
        dataclasses.replace(p, level0_xy=p.level0_xy - np.array([ox, oy]))
        for p in (lesion, exclusion)
    ]
    write_asap_xml(tmp_path / "tumor_001.xml", shifted)
    polygons = read_asap_xml(tmp_path / "tumor_001.xml")
    assert any(p.is_exclusion for p in polygons)

    from pipeline.tiling.driver import tile_slide
    from pipeline.tiling.plan import SlideJob

    config = TilingConfig(target_mpp=None, level=0, patch_px=32, codec="zstd")
    job = SlideJob("tumor_001", path, tmp_path / "tumor_001.xml")
    open_root(tmp_path / "s.zarr")
    assert tile_slide(job, tmp_path / "s.zarr", config).status == "done"
    group = zarr.open_group(str(tmp_path / "s.zarr"))["tumor_001"]
    centres = group["coords"][:] + 16
    xy = exclusion.level0_xy - np.array([ox, oy])
    in_island = polygon_mask(island.level0_xy - np.array([ox, oy]), 0, 0, side, side)
    deep = in_island[centres[:, 1].astype(int), centres[:, 0].astype(int)]
    assert deep.sum() >= 2 and (group["labels"][:][deep] == 0).all()
    assert (group["labels"][:] == 1).any()  # the lesion around it is tumor
    # The evaluation's tumor mask carves the exclusion out too.
    mask = tumor_mask(polygons, (side, side), 1)
    ex = polygon_mask(xy, 0, 0, side, side)
    assert not mask[ex].any() and mask.any()
    # And the island is drawn as normal tissue: no tumor in the truth there.
    assert not scene.truth_mask(ox, oy, side, side)[in_island].any()


def _texture(rgb: np.ndarray) -> np.ndarray:
    """Mean haematoxylin, dark-pixel share and haematoxylin autocorrelation at 4 µm."""
    h = rgb2hed(rgb)[..., 0]
    z = (h - h.mean()) / h.std()
    lag = 16
    auto = ((z[:, lag:] * z[:, :-lag]).mean() + (z[lag:] * z[:-lag]).mean()) / 2
    return np.array([h.mean() * 10, (rgb.mean(axis=2) < 120).mean(), auto])


def _patch_of(scene, kind: str, side: int = 256) -> np.ndarray:
    for f in scene.features:
        if f.kind == kind:
            x, y = (int(v) for v in f.center_xy)
            return scene.render(x - side // 2, y - side // 2, side, side)
    raise LookupError(kind)


def _mean_texture(kind: str, **params) -> np.ndarray:
    """Mean :func:`_texture` of 160 px patches of ``kind`` lesions, over nine slides."""
    found = []
    for seed in range(3, 12):
        scene = _scene(seed, lesions_per_slide=(1, 1), lesion_mix=(0, 1, 0), **params)
        with contextlib.suppress(LookupError):
            found.append(_texture(_patch_of(scene, kind, 160)))
    assert len(found) >= 5
    return np.mean(found, axis=0)


@pytest.fixture(scope="module")
def node_texture() -> np.ndarray:
    found = []
    for seed in range(3):
        quiet = _scene(seed, tumor=False, mimics_per_slide=(0, 0), artefacts_per_slide=(0, 0))
        x, y = (int(v) for v in quiet.pieces[0].center_xy)
        found.append(_texture(quiet.render(x, y, 160, 160)))
    return np.mean(found, axis=0)


def test_lobular_tumor_resembles_lymphocytes_more_than_ductal(node_texture):
    ductal = _mean_texture("ductal", lobular_fraction=0.0)
    lobular = _mean_texture("lobular", lobular_fraction=1.0)
    print(f"node {node_texture.round(3)} ductal {ductal.round(3)} lobular {lobular.round(3)}")
    far = np.linalg.norm(ductal - node_texture)
    assert np.linalg.norm(lobular - node_texture) < 0.8 * far


def test_nuclear_overlap_brings_ductal_tumor_towards_lymphocytes(node_texture):
    apart, close = (
        np.linalg.norm(
            _mean_texture("ductal", lobular_fraction=0.0, nuclear_overlap=o) - node_texture
        )
        for o in (0.0, 1.0)
    )
    print(f"ductal-to-node texture distance: overlap 0 {apart:.3f}, overlap 1 {close:.3f}")
    assert close < 0.8 * apart


@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_each_artefact_changes_only_its_region_as_described(kind):
    """The slide rendered with and without one artefact: what changes, where and how."""
    scene = feature = None
    for seed in range(40):
        scene = _scene(seed, size=6144, artefacts_per_slide=(4, 6), mimics_per_slide=(0, 0))
        feature = next((f for f in scene.features if f.kind == kind), None)
        if feature is not None:
            break
    assert feature is not None
    others = tuple(f for f in scene.features if f is not feature)
    without = dataclasses.replace(scene, features=others)
    x, y = (int(v) for v in feature.anchor_xy)
    side = 512
    box = (x - side // 2, y - side // 2, side, side)
    with_it, plain = scene.render(*box).astype(float), without.render(*box).astype(float)
    changed = np.abs(with_it - plain).max(axis=2) > 3
    assert changed.any()
    near = ndimage.binary_dilation(scene._mask(feature, *box), iterations=20)
    assert not (changed & ~near).any(), "only its own region changes"
    darker = (plain - with_it).mean(axis=2)
    if kind == "blur":  # sharp detail is lost: less gradient energy

        def grad(image):
            return np.abs(np.diff(image.mean(axis=2), axis=1))[changed[:, 1:]].mean()

        assert grad(with_it) < 0.8 * grad(plain)
    elif kind == "bubble":  # a dark rim, a lighter inside
        assert darker.max() > 20 and darker[changed].min() < 0
    else:  # ink, double thickness and dust absorb light
        assert darker[changed].mean() > 10


def test_same_seed_same_bytes_and_any_tile_grid(tmp_path):
    params = SyntheticConfig(difficulty="camelyon", slides=4, seed=5, width_px=1536, height_px=1024)
    spec = next(s for s in plan_cohort(params) if s.is_tumor and s.centre == "utrecht")
    for name in ("a", "b"):
        spec.image_path(tmp_path / name).parent.mkdir(parents=True)
        write_slide(tmp_path / name, spec, params)
    digest = [hashlib.sha256(spec.image_path(tmp_path / n).read_bytes()).hexdigest() for n in "ab"]
    assert digest[0] == digest[1]
    first = write_cohort(tmp_path / "c", params, workers=2)
    assert write_cohort(tmp_path / "c", params).reused and not first.reused
    # Blurred regions (Utrecht's optics) render the same whatever tiles ask for them.
    scene = _scene(4, centre="utrecht", size=4096, artefacts_per_slide=(5, 5))
    blur = next((f for f in scene.features if f.kind == "blur"), None)
    x, y = (int(v) for v in (blur.anchor_xy if blur else scene.pieces[0].center_xy))
    whole = scene.render(x - 200, y - 200, 400, 400)
    parts = [[scene.render(x - 200 + i, y - 200 + j, 200, 200) for i in (0, 200)] for j in (0, 200)]
    tiled = np.concatenate([np.concatenate(row, axis=1) for row in parts], axis=0)
    assert (tiled == whole).all()


@pytest.mark.slow  # generates a cohort
def test_contact_sheet_shows_every_element_the_cohort_holds(camelyon_cohort, tmp_path):
    root = camelyon_cohort.root
    out = tmp_path / "sheet.png"
    result = run("preview", str(root), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    kinds = {
        "itc" if f["size_class"] == "itc" else f["kind"]
        for r in json.loads((root / "synth.json").read_text())["slides"]
        for f in r["features"]
    }
    assert {row for row, n in shown["elements"].items() if n} >= kinds - {"island", "lumen"}
    assert shown["centres"] == sorted(CENTRES) and out.stat().st_size > 10_000
    # The command is one line on a folder that is no generated cohort of this difficulty.
    easy = tmp_path / "easy"
    easy.mkdir()
    (easy / "synth.json").write_text('{"slides": [{"slide_id": "x", "centre": ""}]}')
    failed = run("preview", str(easy), "--out", str(tmp_path / "x.png"))
    assert failed.returncode == 2 and "camelyon difficulty" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_synth_command_takes_the_difficulty(tmp_path):
    result = run(
        "synth", str(tmp_path / "c"), "--difficulty", "camelyon", "--slides", "4",
        "--size", "1024x768", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["params"]["difficulty"] == "camelyon"
    bad = run("synth", str(tmp_path / "d"), "--difficulty", "hard")
    assert bad.returncode == 2 and "difficulty" in bad.stderr
