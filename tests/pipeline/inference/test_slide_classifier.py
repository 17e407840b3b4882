"""The slide classifier on heatmap features: fitting, saving, and scoring slides in ``infer``."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from pipeline.config import SlideClassifierConfig
from pipeline.errors import ModelError
from pipeline.inference.slide_classifier import (
    LabelledSlide,
    SlideClassifier,
    assign_folds,
    describe,
    fit_slide_classifier,
    save_slide_classifier,
)
from tests.conftest import last_json, run


def _slides(n: int, *, separable: bool = True) -> list[LabelledSlide]:
    rng = np.random.default_rng(0)
    slides = []
    for i in range(n):
        tumor = i % 2 == 0
        features = rng.random(17) + (2.0 if tumor and separable else 0.0)
        slides.append(LabelledSlide(f"s{i:02d}", tumor, features, i < 3, "results"))
    return slides


def test_fit_records_the_slides_and_its_own_out_of_fold_auc(tmp_path):
    estimator, metadata = fit_slide_classifier(_slides(20), (0.5, 0.9), trees=50)
    assert metadata["out_of_fold_auc"] == 1.0 and metadata["out_of_fold_folds"] == 5
    assert metadata["in_sample"] == 3 and len(metadata["slides"]) == 20
    assert metadata["features"][0] == "tumor_fraction_t50" and len(metadata["features"]) == 17
    save_slide_classifier(tmp_path, estimator, metadata)
    classifier = SlideClassifier(tmp_path)
    assert classifier.metadata["estimator"].startswith("sha256:")
    # A changed estimator file is refused rather than used.
    (tmp_path / "slide_classifier.joblib").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not the estimator slide_classifier.json names"):
        SlideClassifier(tmp_path)


def test_fit_records_the_heatmap_maximums_auc_on_the_same_slides():
    """What the classifier has to beat: the share of tumor-normal pairs the maximum orders
    right (ties count half), worked by hand."""
    slides = _slides(20, separable=False)
    _, metadata = fit_slide_classifier(slides, (0.5, 0.9), trees=5)
    maximum = [s.features[metadata["features"].index("max_probability")] for s in slides]
    tumor = [m for m, s in zip(maximum, slides, strict=True) if s.tumor]
    normal = [m for m, s in zip(maximum, slides, strict=True) if not s.tumor]
    wins = sum((t > n) + 0.5 * (t == n) for t in tumor for n in normal)
    assert metadata["maximum_auc"] == pytest.approx(wins / (len(tumor) * len(normal)), abs=1e-12)
    assert 0.2 < metadata["maximum_auc"] < 0.8


def test_fit_needs_both_labels_and_says_when_its_auc_is_undefined():
    with pytest.raises(ValueError, match="Got 2 tumor and 0 normal instead"):
        fit_slide_classifier([s for s in _slides(4) if s.tumor], (0.5,), trees=5)
    _, metadata = fit_slide_classifier(_slides(3), (0.5,), trees=5)  # one normal slide
    assert metadata["out_of_fold_auc"] is None and metadata["out_of_fold_folds"] == 0


def test_one_line_for_every_front_end():
    summary = {"kind": "random_forest", "slides": 8, "tumor": 3, "normal": 5, "in_sample": 8,
               "out_of_fold_auc": 0.875, "maximum_auc": 0.8}  # fmt: skip
    assert describe(summary) == (
        "random_forest on 8 heatmaps (3 tumor, 5 normal; 8 in-sample); its own out-of-fold "
        "AUC 0.8750 (the heatmap maximum's: 0.8000)"
    )
    # A flow's folds; too few slides for its own AUC; fitted before the maximum was recorded.
    summary |= {"folds": 2, "out_of_fold_auc": None, "maximum_auc": None}
    assert describe(summary) == (
        "random_forest on 8 heatmaps (3 tumor, 5 normal; 2 folds, 8 in-sample); its own "
        "out-of-fold AUC undefined (too few slides)"
    )


def test_folds_spread_each_label_and_hold_every_slide_once():
    labels = {f"t{i}": True for i in range(7)} | {f"n{i}": False for i in range(5)}
    folds = assign_folds(labels, 3, seed=0)
    assert sorted(s for fold in folds for s in fold) == sorted(labels)
    # Tumor slides dealt to folds 0, 1, 2, 0, 1, 2, 0; the normal ones go on from fold 1.
    assert [sum(labels[s] for s in fold) for fold in folds] == [3, 2, 2]
    assert [len(fold) for fold in folds] == [4, 4, 4]
    assert assign_folds(labels, 3, seed=0) == folds != assign_folds(labels, 3, seed=1)
    with pytest.raises(ValueError, match="at least 6 normal slides for 6 folds. Got 5"):
        assign_folds(labels, 6, seed=0)


def test_thresholds_are_probabilities():
    assert SlideClassifierConfig(thresholds=(0.9, 0.5)).thresholds == (0.5, 0.9)
    with pytest.raises(ValueError, match="distinct probabilities"):
        SlideClassifierConfig(thresholds=(0.5, 1.0))


@pytest.mark.slow
def test_fitted_on_heatmaps_and_used_by_infer(trained_model, small_cohort, tmp_path):
    """CLI end to end: fit from an infer folder, then ``infer --slide-score classifier``."""
    import joblib

    from pipeline.inference.results import read_heatmap, read_scores
    from pipeline.inference.slide_features import slide_features

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([[r.slide_id, r.label] for r in small_cohort.slides])
    slides = [str(small_cohort.root / r.image) for r in small_cohort.slides]
    out = tmp_path / "o"

    result = run("infer", str(model), *slides, "--out", str(out), "--slide-score", "classifier")
    assert result.returncode == 1
    assert "slide_classifier.json: the model has no slide classifier" in result.stderr
    assert not out.exists()  # refused before anything was made

    first = tmp_path / "first"
    assert run("infer", str(model), *slides, "--out", str(first)).returncode == 0
    result = run("slide-classifier", str(model), str(first), "--labels", str(labels),
                 "--trees", "25", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    # The patch model trained on every slide of the cohort: said on stderr and recorded.
    assert (summary["slides"], summary["tumor"], summary["in_sample"]) == (4, 2, 4)
    assert "4 of 4 heatmaps are of slides the patch model trained or validated on" in (
        result.stderr
    )
    record = json.loads((model / "slide_classifier.json").read_text())
    assert record["trees"] == 25 and all(s["in_sample"] for s in record["slides"])
    assert summary["maximum_auc"] == record["maximum_auc"] is not None
    assert f"{describe(summary)}; in {model / 'slide_classifier.json'}\n" in result.stderr
    # The same heatmaps, labels and settings: the classifier is kept, not refitted.
    result = run("slide-classifier", str(model), str(first), "--labels", str(labels),
                 "--trees", "25", "--json")  # fmt: skip
    assert last_json(result)["reused"] is True
    assert json.loads((model / "slide_classifier.json").read_text()) == record

    result = run("infer", str(model), *slides, "--out", str(out), "--slide-score", "classifier",
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = read_scores(out / "scores.csv")
    estimator = joblib.load(model / "slide_classifier.joblib")
    for slide_id, score in scores.items():
        heat, attrs = read_heatmap(out / "heatmaps" / f"{slide_id}.zarr")
        assert attrs["slide_score"] == "classifier" and attrs["max_probability"] == heat.max()
        cell_um = attrs["stride_px"] * attrs["patch_mpp"]
        features = slide_features(heat, (cell_um, cell_um), (0.5, 0.9))
        assert score == pytest.approx(estimator.predict_proba(features[None])[0, 1], abs=1e-6)
    assert sorted(scores.values()) != sorted(read_scores(first / "scores.csv").values())

    # The same classifier: skipped. Refitted: every slide is scored again.
    again = run("infer", str(model), *slides, "--out", str(out), "--slide-score", "classifier",
                "--json")  # fmt: skip
    assert {r["status"] for r in last_json(again)["per_slide"]} == {"skipped"}
    assert run("slide-classifier", str(model), str(first), "--labels", str(labels),
               "--trees", "30").returncode == 0  # fmt: skip
    again = run("infer", str(model), *slides, "--out", str(out), "--slide-score", "classifier",
                "--json")  # fmt: skip
    assert {r["status"] for r in last_json(again)["per_slide"]} == {"done"}
