"""Transfer-learning classifiers: every backbone builds, phase one freezes the base, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.classifier import (  # noqa: E402
    BACKBONES,
    WeightsError,
    build_classifier,
    freeze_backbone,
    preprocess_fn,
    unfreeze_top,
)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_with_a_new_head(backbone):
    px = 75 if backbone == "inceptionv3" else 64
    model, base = build_classifier(backbone, px)
    assert model.input_shape == (None, px, px, 3)
    assert model.output_shape == (None, 1)
    x = preprocess_fn(BACKBONES[backbone].preprocessing)(np.full((2, px, px, 3), 128.0, "float32"))
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 1) and ((p >= 0) & (p <= 1)).all()
    assert (base is None) == (backbone == "small_cnn")


def test_phase_one_leaves_the_backbone_unchanged_and_phase_two_opens_the_top():
    model, base = build_classifier("mobilenetv2", 64)
    freeze_backbone(base)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    before_base = [w.copy() for w in base.get_weights()]
    before_head = model.get_layer("tumor_probability").get_weights()[0].copy()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 2, (16, 1)).astype("float32")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for old, new in zip(before_base, base.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # weights and BatchNorm statistics alike
    assert not np.array_equal(before_head, model.get_layer("tumor_probability").get_weights()[0])
    opened = unfreeze_top(base, 20)
    assert 0 < opened <= 20
    assert not any(layer.trainable for layer in base.layers[:-20])
    assert not any(
        layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    # "all" (mining's `continue`): every layer with weights opens, BatchNorm excepted, and
    # training moves the bottom of the base too.
    with_weights = {layer.name for layer in base.layers if layer.weights}
    batch_norm = {
        layer.name for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert unfreeze_top(base, "all") == sum(
        not isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers
    )
    assert {layer.name for layer in base.layers if layer.trainable and layer.weights} == (
        with_weights - batch_norm
    )
    bottom = base.get_layer("Conv1").get_weights()[0].copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(bottom, base.get_layer("Conv1").get_weights()[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vgg16", 96), r"Expected backbone in \[.*\]\. Received: backbone='vgg16'"),
        (("inceptionv3", 64), "at least 75 px for inceptionv3. Received: patch_px=64"),
    ],
)
def test_bad_backbone_or_patch_size(args, message):
    with pytest.raises(ValueError, match=message):
        build_classifier(*args)


def test_missing_or_mismatched_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="absent.h5: no such weights file"):
        build_classifier("mobilenetv2", 64, weights=str(tmp_path / "absent.h5"))
    other, _ = build_classifier("small_cnn", 64)
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(WeightsError, match="does not fit the mobilenetv2 backbone"):
        build_classifier("mobilenetv2", 64, weights=str(path))


def test_imagenet_offline_names_the_file_to_provide(tmp_path):
    """No network (a refusing proxy) and an empty Keras cache: the error says what to put where."""
    code = (
        "from models.classifier import build_classifier, WeightsError\n"
        "try:\n    build_classifier('mobilenetv2', 96, weights='imagenet')\n"
        "except WeightsError as e:\n    print(e)\n"
    )
    proxy = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "http_proxy": proxy,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    message = out.stdout.strip()
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in message, (
        out.stderr[-2000:]
    )
    assert str(tmp_path / "models") in message
    assert "--weights PATH or none" in message
