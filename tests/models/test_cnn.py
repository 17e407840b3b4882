"""The CNN builder: shapes, argument checks, and a save/load round trip with real Keras."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.cnn import build_cnn  # noqa: E402


@pytest.mark.parametrize(
    ("shape", "classes", "pooling", "out"),
    [
        ((28, 28, 1), 10, "flatten", (10,)),
        ((64, 64, 3), 2, "global_average", (2,)),
        ((32, 32, 3), 1, "global_max", (1,)),
    ],
)
def test_builds_the_classic_shape(shape, classes, pooling, out):
    model = build_cnn(shape, classes, filters=(8, 16), pooling=pooling, dense_units=(16,))
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, *out)
    names = [layer.name for layer in model.layers]
    assert names.index("block1_pool") < names.index("block2_conv1") < names.index("block2_pool")
    assert model.get_layer("block2_conv1").filters == 16  # filters grow block by block
    probabilities = model.predict(np.zeros((2, *shape), dtype="float32"), verbose=0)
    if classes > 1:
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (28, 28)}, "Received: input_shape=(28, 28)"),
        ({"num_classes": 0}, "Received: num_classes=0"),
        ({"filters": ()}, "Received: filters=()"),
        ({"pooling": "avg"}, "Received: pooling='avg'"),
        ({"dropout": 1.0}, "Received: dropout=1.0"),
        (
            {"input_shape": (8, 8, 1), "filters": (4, 4, 4, 4)},
            "at least 16 px for 4 pooling blocks",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"input_shape": (28, 28, 1), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_cnn(args.pop("input_shape"), args.pop("num_classes"), **args)


def test_save_load_gives_identical_predictions(tmp_path):
    model = build_cnn((32, 32, 3), 3, filters=(8, 16), batch_norm=True, dense_units=(16,))
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
