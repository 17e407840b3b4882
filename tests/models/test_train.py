"""Training from real patch stores of a generated cohort: MirroredStrategy, phases, resume, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.classifier import WeightsError, build_classifier, preprocess_fn  # noqa: E402
from models.inputs import check_training_inputs  # noqa: E402
from models.saved import METADATA_FILE, load_model_dir, read_metadata  # noqa: E402
from models.train import distribution_strategy, train_classifier  # noqa: E402
from pipeline.config import TrainingConfig  # noqa: E402
from pipeline.errors import ConfigError, ModelError, StoreError  # noqa: E402
from tests.conftest import WSIFLOW, last_json, run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(patch_store):
    return patch_store


def _cfg(**changes) -> TrainingConfig:
    base = dict(
        backbone="small_cnn",
        head_epochs=1,
        fine_tune_epochs=0,
        batch_per_replica=16,
        steps_per_epoch=4,
        validation_max_patches=256,
    )
    return TrainingConfig(**{**base, **changes})


def test_two_replicas_train_to_a_high_validation_auc(store, tmp_path):
    """The CLI in a fresh process: 2 logical CPU devices, the loss falls, val AUC >= 0.95."""
    out = tmp_path / "model"
    result = run(
        "train", str(store), "--out", str(out), "--backbone", "small_cnn",
        "--replicas", "2", "--batch-size", "16", "--epochs", "4", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert summary["replicas"] == 2 and summary["global_batch"] == 32
    losses = [epoch["loss"] for epoch in summary["history"]]
    assert losses[-1] < losses[0] * 0.7, losses
    assert summary["val_auc"] >= 0.95, summary["history"]
    assert not set(summary["train_slides"]) & set(summary["validation_slides"])
    metadata = read_metadata(out)
    assert metadata["devices"][1].endswith("CPU:1")
    assert metadata["patch_px"] == 64 and metadata["patch_mpp"] == pytest.approx(0.243)
    assert metadata["class_names"] == ["normal", "tumor"]
    assert metadata["preprocessing"] == "unit_scale"
    assert metadata["training"]["replicas"] == 2
    assert metadata["stores"] == [str(store)]
    with (out / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert not (out / "checkpoints").exists()
    # The saved best model reproduces the recorded validation AUC on the validation slides.
    model, _ = load_model_dir(out)
    from models.data import make_dataset, open_stores

    val_ids = set(summary["validation_slides"])
    val = [s for s in open_stores([store]) if s.slide_id in val_ids]
    data = make_dataset(val, batch_size=64, training=False, preprocess=preprocess_fn("unit_scale"))
    auc = keras.metrics.AUC(num_thresholds=500)
    for x, y in data:
        auc.update_state(y, model.predict_on_batch(x))
    assert float(auc.result()) >= 0.95
    # Same stores and settings again: reused, not retrained.
    again = run("train", str(store), "--out", str(out), "--backbone", "small_cnn",
                "--replicas", "2", "--batch-size", "16", "--epochs", "4", "--json")  # fmt: skip
    assert again.returncode == 0 and last_json(again)["reused"] is True


def test_phase_one_keeps_pretrained_weights_and_phase_two_changes_only_the_top(store, tmp_path):
    """A backbone weights file: the head trains first (base frozen), then the top layers."""
    keras.utils.set_random_seed(123)  # not the weights training itself would start from
    _, base = build_classifier("mobilenetv2", 64)
    weights = tmp_path / "base.weights.h5"
    base.save_weights(weights)
    pretrained = [w.copy() for w in base.get_weights()]
    per_layer = [[w.copy() for w in layer.get_weights()] for layer in base.layers]

    cfg = _cfg(backbone="mobilenetv2", weights=str(weights), head_epochs=1, fine_tune_epochs=0)
    head_only = train_classifier([store], tmp_path / "head", cfg)
    assert [p["name"] for p in head_only.metadata["phases"]] == ["head"]
    model, metadata = load_model_dir(tmp_path / "head")
    trained_base = model.get_layer(metadata["base_layer"])
    for before, after in zip(pretrained, trained_base.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    head = model.get_layer("tumor_probability").get_weights()[0]
    assert not np.allclose(head, 0) and head.std() > 0

    cfg = _cfg(
        backbone="mobilenetv2", weights=str(weights), head_epochs=1, fine_tune_epochs=1,
        fine_tune_layers=10, early_stopping_patience=5,
    )  # fmt: skip
    both = train_classifier([store], tmp_path / "both", cfg)
    assert [p["name"] for p in both.metadata["phases"]] == ["head", "fine_tune"]
    assert both.metadata["metrics"]["epochs_run"] == 2
    tuned = both.last_model.get_layer(both.metadata["base_layer"])
    changed = [
        layer.name
        for layer, start in zip(tuned.layers, per_layer, strict=True)
        if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), start, strict=True))
    ]
    top = {layer.name for layer in tuned.layers[-10:]}
    assert changed and set(changed) <= top, changed
    assert not any(isinstance(tuned.get_layer(n), keras.layers.BatchNormalization) for n in changed)


def test_cosine_decays_each_phase_from_its_rate_and_runs_it_to_the_end(store, tmp_path):
    """Head then fine-tune under lr_schedule: cosine; patience 1 stops neither phase early."""
    _, base = build_classifier("mobilenetv2", 64)
    weights = tmp_path / "base.weights.h5"
    base.save_weights(weights)
    cfg = _cfg(
        backbone="mobilenetv2", weights=str(weights), head_epochs=2, fine_tune_epochs=3,
        learning_rate=1e-3, fine_tune_learning_rate=1e-4, lr_schedule="cosine",
        early_stopping_patience=1,
    )  # fmt: skip
    result = train_classifier([store], tmp_path / "model", cfg)
    history = result.metadata["history"]
    assert [(e["epoch"], e["phase"]) for e in history] == [
        (1, "head"), (2, "head"), (3, "fine_tune"), (4, "fine_tune"), (5, "fine_tune"),
    ]  # fmt: skip
    # Each phase restarts at its own rate: 1e-3 * (1 + cos(pi * k / 2)) / 2, then 1e-4 * ... / 3.
    expected = [1e-3, 5e-4, 1e-4, 7.5e-5, 2.5e-5]
    np.testing.assert_allclose([e["learning_rate"] for e in history], expected, rtol=1e-6)
    # Another schedule trains another model: the finished run is not reused for plateau.
    cosine = check_training_inputs([store], cfg).fingerprint
    plateau = check_training_inputs([store], cfg.model_copy(update={"lr_schedule": "plateau"}))
    assert result.metadata["fingerprint"] == cosine != plateau.fingerprint


def test_fine_tune_from_a_previous_wsiflow_model(store, tmp_path):
    first = train_classifier([store], tmp_path / "first", _cfg(backbone="mobilenetv2"))
    assert [p["name"] for p in first.metadata["phases"]] == ["full"]  # from scratch: one phase
    # One epoch, so the saved best model is the last one: loading it changes no prediction.
    saved, _ = load_model_dir(tmp_path / "first")
    x = np.random.default_rng(0).uniform(-1, 1, (32, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(
        saved.predict(x, verbose=0), first.last_model.predict(x, verbose=0)
    )
    cfg = _cfg(backbone="resnet50", weights=str(tmp_path / "first"), fine_tune_epochs=1)
    second = train_classifier([store], tmp_path / "second", cfg)
    meta = second.metadata
    assert meta["backbone"] == "mobilenetv2"  # the parent's, whatever the config says
    assert meta["parent_model"] == str(tmp_path / "first")
    assert [p["name"] for p in meta["phases"]] == ["head", "fine_tune"]
    assert meta["base_layer"] == first.metadata["base_layer"]


def test_a_killed_run_resumes_and_never_looks_finished(store, tmp_path):
    out = tmp_path / "model"
    args = ["train", str(store), "--out", str(out), "--backbone", "small_cnn",
            "--epochs", "3", "--steps-per-epoch", "6", "--batch-size", "16"]  # fmt: skip
    process = subprocess.Popen(
        [WSIFLOW, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    state = out / "checkpoints" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not state.is_file():
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 3
    assert not (out / METADATA_FILE).exists()
    with pytest.raises(ModelError, match="not a wsiflow model directory"):
        load_model_dir(out)
    resumed = run(*args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = last_json(resumed)
    assert summary["resumed_at_epoch"] == done
    assert [e["epoch"] for e in summary["history"]] == [1, 2, 3]
    assert f"resumed after epoch {done}" in resumed.stderr
    # Other settings into the same directory: refused, unless --overwrite.
    other = run(*args[:-2], "--batch-size", "8", "--json")
    assert other.returncode == 1
    assert f"{out}: holds a model trained on other stores or settings" in other.stderr
    replaced = run(*args[:-2], "--batch-size", "8", "--epochs", "1", "--overwrite", "--json")
    assert replaced.returncode == 0, replaced.stderr
    assert last_json(replaced)["global_batch"] == 8 and last_json(replaced)["epochs_run"] == 1


def test_mixed_precision_trains_and_restores_the_policy(store, tmp_path):
    result = train_classifier([store], tmp_path / "m", _cfg(mixed_precision=True))
    assert keras.mixed_precision.global_policy().name == "float32"
    model, _ = load_model_dir(tmp_path / "m")
    assert model.get_layer("block1_conv1").dtype_policy.compute_dtype == "bfloat16"
    assert model.output.dtype == "float32"
    assert np.isfinite(result.metadata["metrics"]["val_loss"])


def test_bad_inputs_fail_before_training(store, tmp_path):
    out = tmp_path / "never"
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(StoreError, match="not a Zarr patch store"):
        train_classifier([empty], out, _cfg())
    with pytest.raises(ValueError, match="at least 75 px for inceptionv3"):
        train_classifier([store], out, _cfg(backbone="inceptionv3"))
    with pytest.raises(WeightsError, match="absent.weights.h5: no such weights file"):
        train_classifier([store], out, _cfg(weights=str(tmp_path / "absent.weights.h5")))
    with pytest.raises(ValueError, match="at least one training epoch"):
        train_classifier([store], out, _cfg(head_epochs=0))
    assert not out.exists()
    # One tumor slide is not enough for a slide-level split with tumor on both sides.
    import zarr

    single = tmp_path / "single.zarr"
    shutil.copytree(store, single)
    tumor_slides = [
        k for k in zarr.open_group(str(single)).group_keys()
        if np.asarray(zarr.open_array(str(single / k / "labels"))[:]).any()
    ]  # fmt: skip
    shutil.rmtree(single / tumor_slides[0])
    with pytest.raises(StoreError, match="have no tumor patch"):
        train_classifier([single], out, _cfg())
    # training.exclude_slides: leaving that slide out is the same as its absence.
    with pytest.raises(StoreError, match="have no tumor patch"):
        train_classifier([store], out, _cfg(exclude_slides=(tumor_slides[0],)))
    with pytest.raises(ConfigError, match=r"training.exclude_slides: not a slide of .*: absent"):
        train_classifier([store], out, _cfg(exclude_slides=("absent",)))
    assert not out.exists()


def test_cli_usage_errors(store, tmp_path):
    unknown = run("train", str(store), "--out", str(tmp_path / "m"), "--backbone", "vgg16")
    assert unknown.returncode == 2
    assert "training.backbone" in unknown.stderr and "vgg16" in unknown.stderr
    # Bad inputs are refused before Keras is imported (~3 s of a CPU each time).
    imports = {"PYTHONPROFILEIMPORTTIME": "1"}  # Python lists every import on stderr
    missing = run("train", str(tmp_path / "absent.zarr"), "--out", str(tmp_path / "m"), env=imports)
    small = run("train", str(store), "--out", str(tmp_path / "m"), "--backbone", "inceptionv3",
                env=imports)  # fmt: skip
    for result, code, reason in (
        (missing, 1, f"{tmp_path / 'absent.zarr'}: not a Zarr patch store"),
        (small, 2, "Expected patches of at least 75 px for inceptionv3"),
    ):
        assert result.returncode == code
        lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert reason in "\n".join(lines)
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}  # fmt: skip
        assert "json" in imported  # the listing works
        assert not {"keras", "tensorflow"} & imported
    assert not (tmp_path / "m").exists()


def test_replicas_cannot_grow_once_tensorflow_runs():
    import tensorflow as tf

    tf.constant(1.0)  # the runtime is up in this process
    have = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(RuntimeError, match="choose the replicas before TensorFlow runs"):
        distribution_strategy(have + 1)


def test_mlflow_autolog_records_the_run(store, tmp_path, monkeypatch):
    import mlflow  # the dev extra installs mlflow-skinny

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(mlflow=True, mlflow_tracking_uri=uri, head_epochs=2)
    result = train_classifier([store], tmp_path / "m", cfg)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("wsiflow").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    assert run.data.metrics["wsiflow_val_auc"] == pytest.approx(
        result.metadata["metrics"]["val_auc"]
    )
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2  # autologged epochs
    assert run.data.params["wsiflow.backbone"] == "small_cnn"
    assert "wsiflow_model.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_patches_without_mpp_must_share_one_pyramid_level():
    """A model of patches without µm/px is read at their level: one level for all, or a reason."""
    from models.data import SlidePatches
    from models.inputs import _common_level

    def slide(slide_id: str, level: int | None) -> SlidePatches:
        labels = np.zeros(4, dtype=np.int8)
        return SlidePatches("s.zarr", slide_id, labels, 64, None, 4, level=level)

    assert _common_level([slide("a", 2), slide("b", 2)]) == 2
    assert _common_level([slide("a", None)]) is None  # a store that records no level
    with pytest.raises(StoreError) as error:
        _common_level([slide("a", 0), slide("b", 1), slide("c", 0)])
    assert str(error.value) == (
        "s.zarr: patches read at different pyramid levels (0, 1) and none records µm/px; "
        "tile every slide at one --level to train one model"
    )
