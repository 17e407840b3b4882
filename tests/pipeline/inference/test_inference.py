"""Whole-slide inference and CAMELYON16 evaluation with a model trained on a generated cohort."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.predict import Predictor  # noqa: E402
from models.saved import METADATA_FILE  # noqa: E402
from pipeline.cluster import dask_client  # noqa: E402
from pipeline.config import InferenceConfig  # noqa: E402
from pipeline.errors import ModelError  # noqa: E402
from pipeline.inference.driver import infer_slides  # noqa: E402
from pipeline.inference.results import read_detections, read_heatmap, read_scores  # noqa: E402
from pipeline.slides.annotations import read_asap_xml  # noqa: E402
from pipeline.slides.masks import rasterize_tumor  # noqa: E402
from pipeline.slides.pyramid import write_pyramid_tiff  # noqa: E402
from pipeline.slides.reader import open_slide  # noqa: E402
from tests.conftest import last_json, run, write_official_mask  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slides(small_cohort):
    return {r.slide_id: small_cohort.root / r.image for r in small_cohort.slides}


@pytest.fixture(scope="module")
def inferred(trained_model, small_cohort, tmp_path_factory):
    """``wsiflow infer`` over the whole cohort folder, as a user runs it, exporting GeoJSON."""
    out = tmp_path_factory.mktemp("infer") / "out"
    result = run(
        "infer", str(trained_model), str(small_cohort.root), "--out", str(out), "--export",
        "geojson", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr  # TensorFlow's banner, from the workers too
    return out, last_json(result)


@pytest.fixture(scope="module")
def reference(small_cohort, tmp_path_factory):
    """A CAMELYON16-style reference.csv covering every slide of the cohort."""
    path = tmp_path_factory.mktemp("reference") / "reference.csv"
    rows = [
        [r.slide_id, r.label, "Macro"] if r.label == "Tumor" else [r.slide_id, "Normal"]
        for r in small_cohort.slides
    ]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _tumor_cell_fraction(annotation, attrs):
    """Per heatmap cell, the fraction of it inside the annotated tumor."""
    rows, cols = attrs["shape"]
    cx, cy = attrs["level0_cell_px"]
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    boxes = np.stack([jj * cx, ii * cy, (jj + 1) * cx, (ii + 1) * cy], axis=-1).reshape(-1, 4)
    placed = rasterize_tumor(read_asap_xml(annotation), 4.0, tuple(attrs["level0_wh"]))
    return placed.fractions(boxes).reshape(rows, cols)


def test_infer_export_writes_qupath_geojson_of_every_complete_slide(
    inferred, trained_model, tmp_path
):
    from pipeline.slides.annotations import read_geojson

    out, summary = inferred
    assert summary["export"] == {"out": str(out / "export"), "failed": []}
    written = sorted(p.stem for p in (out / "export").glob("*.geojson"))
    assert written == sorted(summary["scores"]) and not list((out / "export").glob("*.xml"))
    for path in (out / "export").glob("*.geojson"):
        read_geojson(path)  # wsiflow's own reader takes it back
    # A format export does not know is refused before any slide is read.
    bad = run(
        "infer", str(trained_model), str(out), "--out", str(tmp_path / "o"), "--export", "shp"
    )
    assert bad.returncode == 2 and "shp" in bad.stderr and not (tmp_path / "o").exists()


def test_heatmaps_are_high_inside_tumor_and_low_elsewhere(inferred, small_cohort):
    out, summary = inferred
    assert summary["done"] == 4 and summary["failed"] == 0
    inside, outside = [], []
    for record in small_cohort.slides:
        heat, attrs = read_heatmap(out / "heatmaps" / f"{record.slide_id}.zarr")
        attrs["shape"] = heat.shape
        assert heat.dtype == np.float32 and attrs["patch_px"] == 64
        tissue = heat > 0
        assert tissue.sum() == attrs["patches"]  # stride = patch: one cell per patch
        if record.annotation is None:
            outside.append(heat[tissue])
            continue
        tumor = _tumor_cell_fraction(small_cohort.root / record.annotation, attrs)
        inside.append(heat[tissue & (tumor >= 0.9)])
        outside.append(heat[tissue & (tumor == 0)])
    inside, outside = np.concatenate(inside), np.concatenate(outside)
    assert len(inside) > 20 and len(outside) > 1000
    assert np.median(inside) > 0.8, np.percentile(inside, [10, 50, 90])
    # A 4-epoch small CNN: with the packages resolved on 2026-11-28 (tensorflow-cpu 2.21.0,
    # keras 3.15.1) 6.3% of the cells outside tumor are above 0.5, the same on the code
    # before that day's changes; below 10% still says the heatmap separates the two.
    assert np.median(outside) < 0.1 and np.mean(outside > 0.5) < 0.1


def _cell_patches(slide, heat, attrs, seed: int):
    """8 random predicted cells ``(rows, cols)`` and their 64 px patches, read by OpenSlide."""
    rows, cols = np.nonzero(heat)
    pick = np.random.default_rng(seed).choice(len(rows), size=8, replace=False)
    cell_x, cell_y = attrs["level0_cell_px"]
    with open_slide(slide, direct=False) as reader:
        patches = np.stack(
            [
                reader.read_region((round(cols[i] * cell_x), round(rows[i] * cell_y)), 0, (64, 64))
                for i in pick
            ]
        )
    return (rows[pick], cols[pick]), patches


def test_heatmap_cells_are_the_model_on_openslide_patches(inferred, slides, trained_model):
    """Each cell is the prediction for the patch at its level-0 position, read by OpenSlide."""
    out, _ = inferred
    slide_id = "tumor_001" if "tumor_001" in slides else sorted(slides)[0]
    heat, attrs = read_heatmap(out / "heatmaps" / f"{slide_id}.zarr")
    cells, patches = _cell_patches(slides[slide_id], heat, attrs, seed=0)
    expected = Predictor(trained_model, batch_size=8)(patches)
    np.testing.assert_allclose(heat[cells], expected, atol=1e-5)


def test_outputs_layout_detections_and_scores(inferred, small_cohort):
    out, _ = inferred
    scores = read_scores(out / "scores.csv")
    assert sorted(scores) == sorted(r.slide_id for r in small_cohort.slides)
    tumor = {r.slide_id for r in small_cohort.slides if r.label == "Tumor"}
    assert min(scores[s] for s in tumor) > max(scores[s] for s in scores if s not in tumor)
    for record in small_cohort.slides:
        files = [
            out / "heatmaps" / f"{record.slide_id}.png",
            out / "heatmaps" / f"{record.slide_id}_overlay.png",
            out / "detections" / f"{record.slide_id}.csv",
        ]
        assert all(f.is_file() and f.stat().st_size > 0 for f in files)
        header = files[2].read_text().splitlines()[0]
        assert header == "Confidence,X coordinate,Y coordinate"
        confidences, level0_xy = read_detections(files[2])
        if record.label == "Tumor":
            # The best detection lies on an annotated lesion.
            placed = rasterize_tumor(
                read_asap_xml(small_cohort.root / record.annotation), 8.0, (3072, 2560)
            )
            x, y = level0_xy[0]
            box = np.array([[x - 1, y - 1, x + 1, y + 1]], dtype=np.float64)
            assert placed.fractions(box)[0] > 0, (record.slide_id, level0_xy[:3])
            assert confidences[0] >= 0.5
    manifest = json.loads((out / "inference.json").read_text())
    assert {r["status"] for r in manifest["slides"].values()} == {"done"}
    assert not list(out.rglob("*.partial"))


def test_evaluate_gives_slide_auc_and_froc(
    inferred, reference, cohort_annotations, small_cohort, tmp_path
):
    out, _ = inferred
    args = [
        "evaluate", str(out), "--reference", str(reference), "--annotations",
        str(cohort_annotations), "--slides", str(small_cohort.root), "--json",
    ]  # fmt: skip
    # The small cohort's lesions are all isolated tumor cells by CAMELYON16's rule.
    result = run(*args)
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert summary["slide_auc"] == 1.0 and summary["froc"] is None
    assert summary["lesions"] == 0 and summary["isolated_tumor_cells"] >= 2
    assert "at least one tumor lesion (not an ITC)" in summary["undefined"]["froc"]
    assert "froc undefined" in result.stderr
    # Counting lesions from 100 µm (the config), the FROC is defined.
    config = tmp_path / "eval.yaml"
    config.write_text("evaluation:\n  itc_major_axis_um: 100\n")
    result = run(*args, "--config", str(config))
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert summary["slide_auc"] == 1.0
    assert len(summary["froc_sensitivities"]) == 6
    assert summary["froc"] >= 0.5, summary["per_slide"]
    per_slide = {row["slide"]: row for row in summary["per_slide"]}
    for record in small_cohort.slides:
        if record.label == "Tumor":
            assert per_slide[record.slide_id]["lesions_found"] >= 1
    assert (out / "roc.png").stat().st_size > 1000 and (out / "froc.png").stat().st_size > 1000
    report = json.loads((out / "evaluation.json").read_text())
    assert report["froc"] == summary["froc"]


def test_second_run_skips_and_a_bad_slide_does_not_sink_the_cohort(
    inferred, trained_model, slides, tmp_path
):
    out, _ = inferred
    again = run(
        "infer", str(trained_model), *map(str, slides.values()), "--out", str(out), "--json"
    )
    assert again.returncode == 0, again.stderr
    assert last_json(again)["skipped"] == 4 and last_json(again)["patches_predicted"] == 0

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(4000))
    blank = tmp_path / "blank.tif"
    write_pyramid_tiff(
        blank, 1024, 1024, lambda x, y, w, h: np.full((h, w, 3), 243, np.uint8), mpp=0.243
    )
    tiny = tmp_path / "tiny.tif"  # smaller than one of the model's patches
    write_pyramid_tiff(tiny, 40, 40, lambda x, y, w, h: np.zeros((h, w, 3), np.uint8), mpp=0.243)
    first = next(iter(slides.values()))
    mixed_out = tmp_path / "mixed"
    result = run(
        "infer", str(trained_model), str(corrupt), str(first), str(blank), str(tmp_path / "nope.tif"),
        str(tiny), "--out", str(mixed_out), "--json",
    )  # fmt: skip
    assert result.returncode == 1
    summary = last_json(result)
    by_slide = {row["slide_id"]: row for row in summary["per_slide"]}
    assert by_slide["corrupt"]["status"] == "failed"
    assert str(corrupt) in by_slide["corrupt"]["reason"]
    assert "truncated or corrupt: a TIFF of" in by_slide["corrupt"]["reason"]
    assert by_slide["nope"]["status"] == "failed" and "no such file" in by_slide["nope"]["reason"]
    assert by_slide[first.stem]["status"] == "done"
    assert by_slide["tiny"]["status"] == "failed"
    assert by_slide["tiny"]["reason"].startswith(f"{tiny}: one patch (")
    assert by_slide["tiny"]["reason"].endswith("µm) is larger than the slide (10 x 10 µm)")
    # No tissue: an empty heatmap and no detections, not a crash.
    assert by_slide["blank"]["status"] == "done" and by_slide["blank"]["patches"] == 0
    heat, _ = read_heatmap(mixed_out / "heatmaps" / "blank.zarr")
    assert heat.max() == 0
    assert len(read_detections(mixed_out / "detections" / "blank.csv")[0]) == 0
    assert sorted(read_scores(mixed_out / "scores.csv")) == sorted([first.stem, "blank"])
    assert f"{corrupt}: truncated or corrupt" in result.stderr
    # One line for it, no worker's log of a failed task (and traceback) besides.
    assert result.stderr.count(str(corrupt)) == 1 and "Traceback" not in result.stderr


def test_overlapping_stride_doubles_the_grid_and_averages(trained_model, slides, tmp_path):
    slide = sorted(slides.values())[0]
    config = InferenceConfig(stride_px=32, batch_size=32)
    with dask_client(workers=1) as client:
        results = infer_slides(client, trained_model, [slide], tmp_path / "o", config)
    assert [r.status for r in results] == ["done"]
    heat, attrs = read_heatmap(tmp_path / "o" / "heatmaps" / f"{slide.stem}.zarr")
    assert attrs["cells_per_patch"] == 2 and attrs["level0_cell_px"] == [32.0, 32.0]
    assert heat.shape == (80, 96)  # 2560 / 32, 3072 / 32
    assert heat.min() >= 0 and heat.max() <= 1


def test_maxima_detection_is_recorded_and_redoes_slides_detected_by_regions(
    trained_model, small_cohort, tmp_path
):
    """``--detection maxima``: the stored heatmap's NMS, at the distance in level-0 px."""
    from pipeline.inference.heatmap import detect_local_maxima
    from pipeline.inference.results import stored_grid

    tumor = next(r for r in small_cohort.slides if r.label == "Tumor")
    slide = small_cohort.root / tumor.image
    out = tmp_path / "o"
    result = run("infer", str(trained_model), str(slide), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    regions, _ = read_detections(out / "detections" / f"{slide.stem}.csv")
    result = run("infer", str(trained_model), str(slide), "--out", str(out), "--json",
                 "--detection", "maxima", "--min-distance-um", "60")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = last_json(result)["per_slide"]
    assert row["status"] == "done"  # not skipped: another detection, another fingerprint
    heat, attrs = read_heatmap(out / "heatmaps" / f"{slide.stem}.zarr")
    assert (attrs["detection"], attrs["detection_min_distance_um"]) == ("maxima", 60.0)
    grid = stored_grid(heat.shape, attrs)
    expected = detect_local_maxima(heat, grid, 0.5, 60 / float(np.mean(attrs["mpp"])))
    confidences, xy = read_detections(out / "detections" / f"{slide.stem}.csv")
    assert len(confidences) == len(expected) > len(regions) >= 1
    np.testing.assert_array_equal(xy, expected.level0_xy)


def test_maxima_on_a_slide_without_mpp_by_a_level_model_need_its_mpp(
    small_cohort, cohort_annotations, slides, tmp_path
):
    """A model trained by level reads a slide that records no µm/px by level, but a
    distance in µm has no pixels there: the slide fails with one reason, and
    ``slide_mpp`` places the maxima at the distance it gives."""
    from models.train import train_classifier
    from pipeline.config import TilingConfig, TrainingConfig
    from pipeline.inference.heatmap import detect_local_maxima
    from pipeline.inference.results import stored_grid, stored_mpp
    from pipeline.tiling.driver import tile_slides

    # The cohort again, recorded without µm/px (as some scanners' exports), tiled by level.
    bare = {}
    for slide_id, path in slides.items():
        with open_slide(path, direct=False) as reader:
            width, height = reader.info.level0_wh
            rgb = reader.read_region((0, 0), 0, (width, height))
        bare[slide_id] = write_pyramid_tiff(
            tmp_path / f"{slide_id}.tif", width, height,
            lambda x, y, w, h, rgb=rgb: rgb[y : y + h, x : x + w], mpp=None,
        ).path  # fmt: skip
    store = tmp_path / "level.zarr"
    with dask_client(workers=1) as client:
        tiled = tile_slides(
            client, sorted(bare.values()), store, TilingConfig(target_mpp=None, level=0, patch_px=64),
            annotations_dir=cohort_annotations,
        )  # fmt: skip
    assert {r.status for r in tiled} == {"done"}
    model = tmp_path / "model"
    cfg = TrainingConfig(
        backbone="small_cnn", head_epochs=1, fine_tune_epochs=0, batch_per_replica=16,
        steps_per_epoch=4, validation_max_patches=128,
    )  # fmt: skip
    # The level comes from the store, not from a config naming it (here none).
    train_classifier([store], model, cfg)
    assert json.loads((model / "wsiflow_model.json").read_text())["patch_level"] == 0
    tumor = next(r for r in small_cohort.slides if r.label == "Tumor")
    slide = bare[tumor.slide_id]
    maxima = InferenceConfig(detection="maxima", detection_threshold=0.3)
    with dask_client(workers=1) as client:
        (failed,) = infer_slides(client, model, [slide], tmp_path / "a", maxima)
        given = maxima.model_copy(update={"slide_mpp": 0.5})
        (done,) = infer_slides(client, model, [slide], tmp_path / "b", given)
    assert failed.status == "failed"
    assert failed.reason == (
        f"{slide}: lesion detection by local maxima needs the slide's µm/px, which it does not "
        "record: give --slide-mpp, or use inference.detection: regions"
    )
    assert not (tmp_path / "a" / "heatmaps" / f"{slide.stem}.zarr").exists()
    assert done.status == "done"
    heat, attrs = read_heatmap(tmp_path / "b" / "heatmaps" / f"{slide.stem}.zarr")
    assert attrs["mpp"] is None and "--slide-mpp" in attrs["mpp_assumed"]
    assert stored_mpp(attrs) == pytest.approx((0.5, 0.5), abs=1e-12)  # as export, the viewer
    expected = detect_local_maxima(heat, stored_grid(heat.shape, attrs), 0.3, 200 / 0.5)
    confidences, xy = read_detections(tmp_path / "b" / "detections" / f"{slide.stem}.csv")
    assert len(confidences) == len(expected) >= 1
    np.testing.assert_array_equal(xy, expected.level0_xy)


def test_tta_cells_are_the_mean_of_the_eight_flips_and_rotations(
    inferred, slides, trained_model, tmp_path
):
    """``--tta``: each cell averages the model over the patch's dihedral group, order-free."""
    slide_id = "tumor_001" if "tumor_001" in slides else sorted(slides)[0]
    out = tmp_path / "o"
    result = run("infer", str(trained_model), str(slides[slide_id]), "--out", str(out), "--json",
                 "--tta")  # fmt: skip
    assert result.returncode == 0, result.stderr
    heat, attrs = read_heatmap(out / "heatmaps" / f"{slide_id}.zarr")
    plain, _ = read_heatmap(inferred[0] / "heatmaps" / f"{slide_id}.zarr")
    assert attrs["tta"] is True and np.array_equal(heat > 0, plain > 0)
    cells, patches = _cell_patches(slides[slide_id], heat, attrs, seed=1)
    views = [np.rot90(p, k, axes=(1, 2)) for p in (patches, patches[:, :, ::-1]) for k in range(4)]
    plain_predictor = Predictor(trained_model, batch_size=8)
    expected = np.mean([plain_predictor(np.ascontiguousarray(v)) for v in views], axis=0)
    np.testing.assert_allclose(heat[cells], expected, atol=1e-5)
    assert not np.allclose(expected, plain[cells], atol=1e-3)
    # The 8 views are a group: any of them as input gives the same mean.
    tta = Predictor(trained_model, batch_size=8, tta=True)
    for view in views[1:]:
        np.testing.assert_allclose(tta(np.ascontiguousarray(view)), expected, atol=1e-5)


def _narrow_stained_copy(slide, path):
    """The middle quarter of ``slide`` recoloured with H and E only 15° apart (magenta-toned,
    weakly separated stains, as in some labs), written losslessly so its fit finds them."""
    from pipeline.slides.stain import fit_stain, normalize

    with open_slide(slide, direct=False) as reader:
        width, height = (v // 2 for v in reader.info.level0_wh)
        rgb = reader.read_region((width // 2, height // 2), 0, (width, height))
    utrecht_h, utrecht_e = np.array([0.374, 0.761, 0.529]), np.array([0.153, 0.878, 0.453])
    fitted = fit_stain(rgb, "macenko")
    narrow = {
        **fitted,
        "stains": [list(v / np.linalg.norm(v)) for v in (utrecht_h, utrecht_e)],
    }
    recoloured = normalize(rgb, fitted, narrow)
    write_pyramid_tiff(
        path, width, height, lambda x, y, w, h: recoloured[y : y + h, x : x + w], mpp=0.243,
        lossless=True,
    )  # fmt: skip
    return path


def test_stain_normalisation_is_applied_alike_in_training_and_inference(
    patch_store, slides, tmp_path
):
    """Macenko: the model records its target; each cell is the model on the patch mapped
    from the slide's own fit (recorded in the heatmap) onto that target. A slide whose
    stains are too close to unmix is fitted on the target's vectors, alike in training
    (recorded in the model) and inference (recorded, and one warning)."""
    from models.saved import read_metadata
    from models.train import train_classifier
    from pipeline.config import TilingConfig, TrainingConfig
    from pipeline.slides.stain import MIN_STAIN_ANGLE_DEG, normalize
    from pipeline.tiling.driver import tile_slides

    narrow = _narrow_stained_copy(slides["normal_001"], tmp_path / "normal_narrow.tif")
    narrow_store = tmp_path / "narrow.zarr"
    with dask_client(workers=1) as client:
        tiled = tile_slides(
            client, [narrow], narrow_store, TilingConfig(target_mpp=0.243, patch_px=64)
        )
    assert [r.status for r in tiled] == ["done"]
    cfg = TrainingConfig(
        backbone="small_cnn", head_epochs=1, fine_tune_epochs=0, batch_per_replica=16,
        steps_per_epoch=4, validation_max_patches=256, stain_normalization="macenko",
        stain_jitter=0.5,
    )  # fmt: skip
    model = tmp_path / "model"
    train_classifier([patch_store, narrow_store], model, cfg)
    stain = read_metadata(model)["stain"]
    assert stain["normalization"] == "macenko" and stain["jitter"] == 0.5
    assert np.asarray(stain["target"]["stains"]).shape == (2, 3)
    assert stain["target"]["angle_deg"] >= MIN_STAIN_ANGLE_DEG
    assert [(r["store"], r["slide_id"]) for r in stain["fallback"]] == [
        (str(narrow_store), "normal_narrow")
    ]
    assert "unmixed with the target's vectors" in stain["fallback"][0]["reason"]
    slide_id = "tumor_001" if "tumor_001" in slides else sorted(slides)[0]
    with dask_client(workers=1) as client:
        results = infer_slides(
            client, model, [slides[slide_id], narrow], tmp_path / "o", InferenceConfig()
        )
    assert [r.status for r in results] == ["done", "done"]
    assert results[0].warnings == ()
    for slide, name in ((slides[slide_id], slide_id), (narrow, "normal_narrow")):
        heat, attrs = read_heatmap(tmp_path / "o" / "heatmaps" / f"{name}.zarr")
        source = attrs["stain_source"]
        assert source["method"] == "macenko" and source != stain["target"]
        cells, patches = _cell_patches(slide, heat, attrs, seed=2)
        predictor = Predictor(model, batch_size=8)
        expected = predictor(normalize(patches, source, stain["target"]))
        np.testing.assert_allclose(heat[cells], expected, atol=1e-5)
        assert not np.allclose(predictor(patches), expected, atol=1e-4)  # it does change them
    # The narrow slide: its own vectors found and recorded, the target's used.
    assert source["angle_deg"] < MIN_STAIN_ANGLE_DEG
    assert source["stains"] == stain["target"]["stains"]
    assert source["stains"] != source["fitted_stains"]
    assert results[1].warnings == (f"{narrow}: {source['fallback']}",)


def test_model_errors_name_the_directory(trained_model, slides, tmp_path):
    slide = str(next(iter(slides.values())))
    missing = run("infer", str(tmp_path / "no-model"), slide, "--out", str(tmp_path / "o"))
    assert missing.returncode == 1
    assert f"{tmp_path / 'no-model'}: no such model directory" in missing.stderr
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_model, unfinished)
    meta = json.loads((unfinished / METADATA_FILE).read_text())
    (unfinished / METADATA_FILE).write_text(json.dumps({**meta, "complete": False}))
    result = run("infer", str(unfinished), slide, "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "training never finished" in result.stderr
    (unfinished / "model.keras").write_bytes(b"PK\x03\x04 truncated")
    (unfinished / METADATA_FILE).write_text(json.dumps(meta))
    result = run("infer", str(unfinished), slide, "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert f"{unfinished / 'model.keras'}: cannot load the model" in result.stderr
    config = InferenceConfig()
    with (
        pytest.raises(ModelError, match="no such model directory"),
        dask_client(workers=1) as client,
    ):
        infer_slides(client, tmp_path / "nothing", [], tmp_path / "t", config)


def test_evaluate_errors_name_the_file_and_line(
    inferred, reference, cohort_annotations, small_cohort, tmp_path
):
    out, _ = inferred
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = ["--annotations", str(cohort_annotations), "--slides", str(small_cohort.root)]
    # A slide missing from the reference.
    partial_reference = tmp_path / "reference.csv"
    lines = reference.read_text().splitlines()
    partial_reference.write_text("\n".join(lines[1:]) + "\n")
    missing_name = lines[0].split(",")[0]
    result = run("evaluate", str(copy), "--reference", str(partial_reference), *args)
    assert result.returncode == 1
    assert f"slides missing from the reference {partial_reference}: {missing_name}" in result.stderr
    # A malformed detections CSV.
    bad = copy / "detections" / f"{missing_name}.csv"
    bad.write_text("Confidence,X coordinate,Y coordinate\n0.9,12,oops\n")
    result = run("evaluate", str(copy), "--reference", str(reference), *args)
    assert result.returncode == 1
    assert f"{bad}: line 2: Expected a number and two integer pixel coordinates" in result.stderr


def test_killed_run_resumes_and_never_lists_an_unfinished_slide(trained_model, slides, tmp_path):
    """SIGKILL mid-run: scores.csv and inference.json list only slides whose files all exist."""
    import signal
    import subprocess
    import time

    from tests.conftest import WSIFLOW

    many = tmp_path / "slides"
    many.mkdir()
    for copy in range(3):  # 12 slides: hard links under other names
        for slide_id, path in slides.items():
            os.link(path, many / f"{slide_id}_{copy}.tif")
    out = tmp_path / "out"
    args = [WSIFLOW, "infer", str(trained_model), str(many), "--out", str(out), "--batch-size", "8"]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    done: list[str] = []
    while time.monotonic() < deadline and not done:
        try:
            manifest = json.loads((out / "inference.json").read_text())
            done = [k for k, v in manifest["slides"].items() if v["status"] == "done"]
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    scores = read_scores(out / "scores.csv")
    assert 1 <= len(scores) < 12
    # scores.csv lists only slides the manifest records complete, and none it once did is lost.
    manifest = json.loads((out / "inference.json").read_text())
    complete = {k for k, v in manifest["slides"].items() if v["status"] == "done"}
    assert set(done) <= complete and set(scores) <= complete
    for slide_id in scores:
        assert (out / "heatmaps" / f"{slide_id}.zarr").is_dir()
        assert (out / "detections" / f"{slide_id}.csv").is_file()
        assert (out / "heatmaps" / f"{slide_id}_overlay.png").is_file()
    rerun = run("infer", str(trained_model), str(many), "--out", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = last_json(rerun)
    assert summary["skipped"] >= len(scores) and summary["done"] + summary["skipped"] == 12
    assert len(read_scores(out / "scores.csv")) == 12
    assert not list(out.rglob("*.partial"))


def test_evaluate_with_the_challenges_mask_files_equals_the_xml(
    inferred, reference, cohort_annotations, small_cohort, tmp_path
):
    """--masks reads <slide>_Mask.tif as the official script does; same masks, same numbers."""
    from pipeline.evaluation.froc import tumor_mask

    out, _ = inferred
    masks = tmp_path / "masks"
    masks.mkdir()
    for record in small_cohort.slides:
        if record.label == "Tumor":
            polygons = read_asap_xml(small_cohort.root / record.annotation)
            write_official_mask(
                masks / f"{record.slide_id}_Mask.tif", tumor_mask(polygons, (3072, 2560), 32)
            )
    config = tmp_path / "eval.yaml"
    config.write_text("evaluation:\n  itc_major_axis_um: 100\n")
    args = [
        "evaluate", str(out), "--reference", str(reference), "--annotations",
        str(cohort_annotations), "--slides", str(small_cohort.root), "--config", str(config),
        "--json",
    ]  # fmt: skip
    from_xml = last_json(run(*args, "--out", str(tmp_path / "xml")))
    result = run(*args, "--out", str(tmp_path / "masks-report"), "--masks", str(masks))
    assert result.returncode == 0, result.stderr
    from_masks = last_json(result)
    for key in ("slide_auc", "froc", "froc_sensitivities", "lesions", "isolated_tumor_cells"):
        assert from_masks[key] == from_xml[key], key
    assert from_masks["lesions"] > 0
    first = sorted(masks.iterdir())[0]
    first.unlink()
    missing = run(*args, "--masks", str(masks))
    assert missing.returncode == 1
    assert f"{first}: no such mask file" in missing.stderr


def test_a_slide_with_only_an_objective_power_is_inferred_with_a_warning(trained_model, tmp_path):
    """No mpp but a 20x objective: 0.5 µm/px is assumed, and the run says so."""
    import tifffile

    image = np.full((768, 768, 3), 230, np.uint8)
    image[96:672, 96:672] = (150, 80, 160)
    slide = tmp_path / "objective.svs"
    with tifffile.TiffWriter(slide) as tif:
        tif.write(
            image, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
            description="Aperio Image Library v10.0.51\n768x768 (256x256) JPEG/RGB|AppMag = 20",
        )  # fmt: skip
    result = run("infer", str(trained_model), str(slide), "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    assert f"warning: {slide}: the slide records no pixel size (mpp): assumed 0.5" in result.stderr
    (row,) = last_json(result)["per_slide"]
    assert row["status"] == "done" and "20x objective" in row["warnings"][0]
