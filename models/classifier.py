"""Patch classifiers: a keras.applications backbone (or the small CNN) with a new head.

Weights: ``imagenet`` (Keras downloads ``~/.keras/models/<file>`` once),
``none``, or a path to a weights file for the backbone. Two-phase
fine-tuning: :func:`freeze_backbone` trains the head with the base frozen
(a pretrained base's BatchNorm always runs in inference mode),
:func:`unfreeze_top` then opens the top N layers for a lower learning rate.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import FileError


class WeightsError(FileError, ValueError):
    """Pretrained weights are missing, cannot be downloaded, or do not fit the backbone."""


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone family and prepare its inputs."""

    name: str
    min_px: int
    preprocessing: str  # name recorded in model metadata; see preprocess_fn()


BACKBONES = {
    "mobilenetv2": Backbone("mobilenetv2", 32, "mobilenet_v2"),
    "resnet50": Backbone("resnet50", 32, "resnet50"),
    "inceptionv3": Backbone("inceptionv3", 75, "inception_v3"),
    "efficientnetb0": Backbone("efficientnetb0", 32, "efficientnet"),
    "small_cnn": Backbone("small_cnn", 16, "unit_scale"),
}


def preprocess_fn(preprocessing: str):
    """The backbone's own input preprocessing for 0-255 float images."""
    import keras

    apps = keras.applications
    functions = {
        "mobilenet_v2": apps.mobilenet_v2.preprocess_input,
        "resnet50": apps.resnet50.preprocess_input,
        "inception_v3": apps.inception_v3.preprocess_input,
        "efficientnet": apps.efficientnet.preprocess_input,  # identity: the model rescales
        "unit_scale": lambda x: x / 255.0,
    }
    return functions[preprocessing]


def build_classifier(backbone: str, patch_px: int, *, weights: str = "none", dropout: float = 0.2):
    """Return ``(model, base)``: a sigmoid tumor probability per ``(patch_px, patch_px, 3)`` input.

    ``base`` is the backbone sub-model (``None`` for ``small_cnn``). Raises
    ``ValueError`` for an unknown backbone or a patch too small for it, and
    :class:`WeightsError` naming the file for weights that cannot be had.
    """
    import keras
    from keras import layers

    from .cnn import build_cnn  # Keras: imported when a model is built, not for a check

    check_backbone(backbone, patch_px)
    shape = (patch_px, patch_px, 3)
    if backbone == "small_cnn":
        if weights not in ("none", None):
            raise WeightsError(
                Path(str(weights)), "small_cnn has no pretrained weights; use --weights none"
            )
        # One conv per block from 16 filters: ~36 M multiply-adds per 96 px patch,
        # less than MobileNetV2's ~55 M, for quick CPU runs and tests.
        model = build_cnn(
            shape,
            1,
            filters=(16, 32, 64, 128),
            convs_per_block=1,
            pooling="global_average",
            batch_norm=True,
            dense_units=(64,),
            dropout=dropout,
            name="small_cnn_classifier",
        )
        _settle_batch_norm(model)
        return model, None
    base = _backbone(backbone, shape, weights)
    inputs = keras.Input(shape=shape, name="image")
    # Pretrained: BatchNorm stays in inference mode. From scratch: it learns its statistics.
    x = base(inputs) if weights in ("none", None) else base(inputs, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # float32 output also under a mixed-precision policy (a stable sigmoid and loss).
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="tumor_probability")(x)
    if weights in ("none", None):
        _settle_batch_norm(base)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier"), base


def _settle_batch_norm(model, momentum: float = 0.9) -> None:
    """From scratch, let BatchNorm's moving statistics follow the data within ~20 steps.

    keras.applications use momentum 0.99-0.999, made for long ImageNet runs:
    after a few hundred steps the moving statistics still sit near their
    initial values and validation (which uses them) sees a different model.
    """
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def check_backbone(backbone: str, patch_px: int) -> Backbone:
    """The backbone's spec; ``ValueError`` if unknown or ``patch_px`` is too small for it."""
    if backbone not in BACKBONES:
        raise ValueError(
            f"Expected backbone in {sorted(BACKBONES)}. Received: backbone={backbone!r}"
        )
    spec = BACKBONES[backbone]
    if patch_px < spec.min_px:
        raise ValueError(
            f"Expected patches of at least {spec.min_px} px for {backbone}. "
            f"Received: patch_px={patch_px}"
        )
    return spec


def _backbone(backbone: str, shape: tuple[int, int, int], weights: str):
    import keras

    constructors = {
        "mobilenetv2": keras.applications.MobileNetV2,
        "resnet50": keras.applications.ResNet50,
        "inceptionv3": keras.applications.InceptionV3,
        "efficientnetb0": keras.applications.EfficientNetB0,
    }
    build = constructors[backbone]
    if weights in ("none", None):
        return build(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        try:
            return build(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # offline, proxy, truncated download...
            name = _file_in(str(exc)) or f"the {backbone} no-top ImageNet weights file"
            cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
            raise WeightsError(
                cache / "models" / name,
                f"ImageNet weights for {backbone} are not cached and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Put {name} in {cache / 'models'} "
                "(Keras' cache) on a machine that is online, or pass --weights PATH or none",
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(path, "no such weights file (expected imagenet, none or a file path)")
    model = build(include_top=False, weights=None, input_shape=shape)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise WeightsError(path, f"does not fit the {backbone} backbone: {exc}") from exc
    return model


def _file_in(message: str) -> str | None:
    match = re.search(r"/([^/\s'\"]+\.(?:h5|keras|weights\.h5))", message)
    return match.group(1) if match else None


def freeze_backbone(base) -> None:
    """Phase one: the base does not train (its BatchNorm layers run in inference mode)."""
    if base is not None:
        base.trainable = False


def unfreeze_top(base, n_layers: int | Literal["all"]) -> int:
    """Phase two: the top ``n_layers`` of the base train, BatchNorm excepted; returns how many.

    ``"all"``: every layer of the base (BatchNorm excepted).
    """
    import keras

    if base is None:
        return 0
    if n_layers == "all":
        n_layers = len(base.layers)
    base.trainable = True
    opened = 0
    for i, layer in enumerate(base.layers):
        top = i >= len(base.layers) - n_layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
        opened += int(layer.trainable)
    return opened
