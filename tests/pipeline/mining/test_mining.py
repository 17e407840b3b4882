"""``wsiflow mine`` on a real store with a trained model, and training again on what it found."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from tests.conftest import last_json, run

pytestmark = pytest.mark.slow


def test_mined_patches_are_what_the_model_calls_tumor_away_from_lesions(
    trained_model, patch_store, tmp_path
):
    from models.predict import Predictor
    from pipeline.mining.driver import mining_key
    from pipeline.mining.rules import candidates, near_annotations
    from pipeline.slides.annotations import read_annotations

    store = tmp_path / "patches.zarr"
    shutil.copytree(patch_store, store)
    result = run("mine", str(store), "--model", str(trained_model), "--threshold", "0.3",
                 "--margin-um", "20", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    first = json.loads((trained_model / "wsiflow_model.json").read_text())
    expected_slides = sorted(s["slide_id"] for s in first["slides"]["train"])
    key = mining_key(first["fingerprint"])
    assert [r["slide_id"] for r in summary["per_slide"]] == expected_slides
    assert summary["mined"] > 0 and summary["done"] == len(expected_slides)

    predictor = Predictor(trained_model, batch_size=64)
    for slide_id in expected_slides:
        group = zarr.open_group(str(store / slide_id), mode="r")
        mined = group[f"hard_negatives/{key}"]
        attrs = dict(group.attrs)
        assert mined.attrs["complete"] is True and mined.attrs["threshold"] == 0.3
        assert mined.attrs["model_dir"] == str(trained_model.resolve())
        labels, fraction = group["labels"][:], group["tumor_fraction"][:]
        polygons = read_annotations(attrs["annotation"]["path"]) if attrs["annotation"] else []
        level0_mpp = attrs["level_mpp"] / attrs["downsample"]
        near = near_annotations(
            group["coords"][:], attrs["read_px"] * attrs["downsample"], polygons, 20 / level0_mpp
        )
        rows = np.flatnonzero(candidates(labels, fraction, near))
        probability = predictor(group["patches"][:][rows])
        index = mined["index"][:]
        np.testing.assert_array_equal(index, rows[probability >= 0.3])
        np.testing.assert_allclose(
            mined["probability"][:], probability[probability >= 0.3], atol=1e-5
        )
        assert (labels[index] == 0).all() and (fraction[index] == 0).all() and not near[index].any()
        if polygons:  # the margin left out some normal patches of the tumor slide
            assert mined.attrs["near_annotations"] > 0

    again = last_json(run("mine", str(store), "--model", str(trained_model), "--threshold", "0.3",
                          "--margin-um", "20", "--json"))  # fmt: skip
    assert again["skipped"] == len(expected_slides) and again["mined"] == summary["mined"]
    stricter = last_json(run("mine", str(store), "--model", str(trained_model), "--threshold",
                             "0.6", "--margin-um", "20", "--json"))  # fmt: skip
    assert stricter["done"] == len(expected_slides) and stricter["mined"] < summary["mined"]

    # Training again, from the first model, with the mined patches as half the normal ones.
    out = tmp_path / "second"
    result = run("train", str(store), "--out", str(out), "--weights", str(trained_model),
                 "--hard-negative-share", "0.5", "--epochs", "1", "--steps-per-epoch", "4",
                 "--batch-size", "16", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / "wsiflow_model.json").read_text())
    record = metadata["hard_negatives"]
    assert record["share"] == 0.5 and record["patches"] == stricter["mined"]
    assert sorted(record["mining"]) == expected_slides
    assert metadata["parent_model"] == str(trained_model)

    # A second model mines the same store: its records sit beside the first's, and training
    # must then say whose to use.
    result = run("mine", str(store), "--model", str(out), "--json")
    assert result.returncode == 0, result.stderr
    result = run("train", str(store), "--out", str(tmp_path / "third"), "--hard-negative-share",
                 "0.5", "--epochs", "1", "--steps-per-epoch", "2")  # fmt: skip
    assert result.returncode == 1 and "was mined by 2 models: choose one" in result.stderr
    result = run("train", str(store), "--out", str(tmp_path / "third"), "--hard-negative-share",
                 "0.5", "--hard-negatives-from", str(trained_model), "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "16", "--backbone", "small_cnn")  # fmt: skip
    assert result.returncode == 0, result.stderr
    third = json.loads((tmp_path / "third" / "wsiflow_model.json").read_text())
    assert third["hard_negatives"]["mining"] == record["mining"]

    # Asking for hard negatives from a store nobody mined: one line saying what to run.
    result = run("train", str(patch_store), "--out", str(tmp_path / "none"),
                 "--hard-negative-share", "0.5", "--epochs", "1")  # fmt: skip
    assert result.returncode == 1
    assert "have none: run `wsiflow mine" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "none").exists()
