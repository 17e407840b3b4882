"""Real files from other projects' test suites (../shared/data/formats): formats and failures.

A DICOM WSI series is one slide; a slide without mpp is read by its objective
power with a warning, or refused in one line; files OpenSlide cannot use say
why, each in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from tests.conftest import SHARED_DATA, last_json, run

FORMATS = SHARED_DATA / "formats"
pytestmark = pytest.mark.skipif(
    not FORMATS.is_dir(), reason=f"real format files not present: {FORMATS} (beside CI's clone)"
)


def test_a_dicom_series_is_one_slide_named_by_its_folder(tmp_path):
    from pipeline.slides.reader import find_slides
    from pipeline.viewer.catalog import Catalog

    series = FORMATS / "dicom-series"
    assert find_slides([series]) == [series]
    assert find_slides([series / "boxes_0.dcm", series / "boxes_1.dcm"]) == [series]
    info = run("info", str(series / "boxes_0.dcm"), str(series / "boxes_1.dcm"), "--json")
    assert info.returncode == 0, info.stderr
    (row,) = last_json(info)["slides"]
    assert row["path"] == str(series) and row["vendor"] == "dicom"

    cohort = tmp_path / "cohort"
    shutil.copytree(series, cohort / "case_7")
    tiled = run(
        "tile", str(cohort), "--out", str(tmp_path / "s.zarr"), "--level", "0",
        "--patch-size", "8", "-w", "1", "--json",
    )  # fmt: skip
    assert tiled.returncode == 0, tiled.stderr
    summary = last_json(tiled)
    assert [r["slide_id"] for r in summary["per_slide"]] == ["case_7"]
    assert summary["patches"] == 4 and summary["slide_file_bytes"] > 10_000

    catalog = Catalog(cohort)
    try:
        (entry,) = catalog.refresh()
        assert entry.slide_id == "case_7" and entry.error is None
    finally:
        catalog.close()


@pytest.mark.slow
def test_a_dicom_series_is_inferred_and_served_as_one_slide(tmp_path):
    """`infer` writes one set of outputs for the series and `serve` shows them over HTTP."""
    import io
    import json
    import threading
    import urllib.request

    from PIL import Image
    from werkzeug.serving import make_server

    from models.classifier import build_classifier
    from models.saved import METADATA_FILE, MODEL_FILE
    from pipeline.viewer import create_app

    cohort = tmp_path / "cohort"
    shutil.copytree(FORMATS / "dicom-series", cohort / "case_7")
    # A real (untrained) Keras model for the series' 16 x 16 px at 0.5 µm/px: one patch.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model, _ = build_classifier("small_cnn", 16)
    model.save(model_dir / MODEL_FILE)
    metadata = {
        "complete": True, "backbone": "small_cnn", "patch_px": 16, "patch_mpp": 0.5,
        "preprocessing": "unit_scale", "config": {"tiling": {"min_tissue_fraction": 0.0}},
    }  # fmt: skip
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata))
    out = tmp_path / "inference"
    inferred = run("infer", str(model_dir), str(cohort), "--out", str(out), "--json")
    assert inferred.returncode == 0, inferred.stderr
    (row,) = last_json(inferred)["per_slide"]
    assert row["slide_id"] == "case_7" and row["status"] == "done"
    assert row["patches"] == 1 and 0 <= row["score"] <= 1

    server = make_server("127.0.0.1", 0, create_app(cohort, out), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with urllib.request.urlopen(f"{base}/api/slides", timeout=30) as response:
            (listed,) = json.load(response)
        assert listed["id"] == "case_7" and listed["heatmap"], listed
        for url in ("/slides/case_7.dzi", "/heatmaps/case_7.dzi"):
            with urllib.request.urlopen(base + url, timeout=30) as response:
                assert b'Width="16" Height="16"' in response.read()
        with urllib.request.urlopen(f"{base}/slides/case_7_files/4/0_0.jpeg", timeout=30) as r:
            assert Image.open(io.BytesIO(r.read())).size == (16, 16)
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.slow
def test_a_slide_without_mpp_or_objective_power_is_refused_in_one_line_or_read_by_level(
    tmp_path,
):
    slide = FORMATS / "aperio-jp2k" / "tcga-cr-7395-01a-01-ts1.svs"
    by_mpp = run("tile", str(slide), "--out", str(tmp_path / "a.zarr"), "-w", "1", "--json")
    assert by_mpp.returncode == 1
    errors = [line for line in by_mpp.stderr.splitlines() if line.startswith("failed:")]
    assert len(errors) == 1 and "Traceback" not in by_mpp.stderr
    assert "neither a pixel size (mpp) nor an objective power" in errors[0]
    assert "give --slide-mpp M" in errors[0] and "use --level" in errors[0]
    by_level = run(
        "tile", str(slide), "--out", str(tmp_path / "b.zarr"), "--level", "1",
        "--patch-size", "256", "-w", "1", "--json",
    )  # fmt: skip
    assert by_level.returncode == 0, by_level.stderr
    assert last_json(by_level)["patches"] > 0

    # --slide-mpp supplies the missing pixel size, warned about and kept in the store.
    by_slide_mpp = run(
        "tile", str(slide), "--out", str(tmp_path / "c.zarr"), "--slide-mpp", "0.25",
        "--patch-size", "128", "-w", "1", "--json",
    )  # fmt: skip
    assert by_slide_mpp.returncode == 0, by_slide_mpp.stderr
    (row,) = last_json(by_slide_mpp)["per_slide"]
    assert row["status"] == "done" and "0.25 µm/px from --slide-mpp" in row["warnings"][0]
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")[slide.stem]
    assert group.attrs["level"] == 1 and group.attrs["patch_mpp"] == 0.5
    assert "--slide-mpp" in group.attrs["mpp_assumed"]


def test_a_slide_with_only_an_objective_power_is_read_with_a_warning(tmp_path):
    import tifffile

    image = np.full((512, 512, 3), 230, np.uint8)
    image[64:448, 64:448] = (150, 80, 160)  # tissue-coloured
    slide = tmp_path / "objective.svs"
    description = "Aperio Image Library v10.0.51\n512x512 (256x256) JPEG/RGB Q=80|AppMag = 20"
    with tifffile.TiffWriter(slide) as tif:
        tif.write(
            image, tile=(256, 256), photometric="rgb", compression="jpeg",
            description=description, metadata=None,
        )  # fmt: skip
    result = run(
        "tile", str(slide), "--out", str(tmp_path / "s.zarr"), "--patch-size", "64",
        "-w", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "assumed 0.5 µm/px from its 20x objective" in result.stderr
    (row,) = last_json(result)["per_slide"]
    assert row["status"] == "done" and "20x objective" in row["warnings"][0]


def test_files_openslide_cannot_use_each_say_why_in_one_line(tmp_path):
    cases = {
        FORMATS
        / "plain-tiff"
        / "kidney-48-5.tif": "a TIFF that is not tiled (one plain 1493 x 901",
        FORMATS / "openslide-fixtures" / "unopenable.tiff": "Unsupported TIFF compression: 52479",
        FORMATS / "broken" / "broken.svs": "not a slide format OpenSlide can read",
    }
    result = run("info", *map(str, cases), "--json")
    lines = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(lines) == len(cases), result.stderr
    for path, reason in cases.items():
        (line,) = [line for line in lines if line.startswith(f"failed: {path}: ")]
        assert reason in line, line
    assert "Traceback" not in result.stderr

    # Opens, but every read fails: the slide fails naming the read, the others go on.
    unreadable = FORMATS / "openslide-fixtures" / "unreadable.svs"
    small = FORMATS / "openslide-fixtures" / "small.svs"
    tiled = run(
        "tile", str(unreadable), str(small), "--out", str(tmp_path / "s.zarr"), "--level", "0",
        "--patch-size", "8", "-w", "1", "--json",
    )  # fmt: skip
    assert tiled.returncode == 1
    failed = [line for line in tiled.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and f"{unreadable}: cannot decode level 0" in failed[0]
    assert "Traceback" not in tiled.stderr
    rows = {r["slide_id"]: r["status"] for r in last_json(tiled)["per_slide"]}
    assert rows == {"unreadable": "failed", "small": "done"}
