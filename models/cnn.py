"""A configurable CNN in the classic shape: conv/pool blocks with growing filters, then a head.

``build_cnn((28, 28, 1), 10)`` is an MNIST classifier; the same builder makes
small patch classifiers (``build_cnn((96, 96, 3), 2)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

POOLINGS = ("flatten", "global_average", "global_max")


def build_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    filters: Sequence[int] = (32, 64),
    convs_per_block: int = 2,
    kernel_size: int = 3,
    pooling: str = "flatten",
    dense_units: Sequence[int] = (128,),
    dropout: float = 0.3,
    batch_norm: bool = False,
    name: str = "cnn",
) -> keras.Model:
    """Return an uncompiled functional model.

    ``input_shape`` is ``(h, w, c)``; one block per entry of ``filters``, each
    ``convs_per_block`` same-padded ReLU convolutions (optionally batch
    normalised) then 2x2 max pooling; ``pooling`` flattens or globally pools
    the last block; ``dense_units`` hidden layers with ``dropout`` before each;
    softmax over ``num_classes`` (sigmoid unit when ``num_classes == 1``).
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(
            f"Expected input_shape (height, width, channels). Received: input_shape={input_shape}"
        )
    if num_classes < 1:
        raise ValueError(f"Expected num_classes >= 1. Received: num_classes={num_classes}")
    if not filters or min(filters) < 1:
        raise ValueError(
            f"Expected at least one positive filter count. Received: filters={filters}"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"Expected pooling in {POOLINGS}. Received: pooling={pooling!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"Expected 0 <= dropout < 1. Received: dropout={dropout}")
    smallest = min(input_shape[0], input_shape[1])
    if smallest < 2 ** len(filters):
        raise ValueError(
            f"Expected an input of at least {2 ** len(filters)} px for {len(filters)} "
            f"pooling blocks. Received: input_shape={tuple(input_shape)}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for block, n_filters in enumerate(filters):
        for conv in range(convs_per_block):
            x = layers.Conv2D(
                n_filters,
                kernel_size,
                padding="same",
                use_bias=not batch_norm,
                name=f"block{block + 1}_conv{conv + 1}",
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"block{block + 1}_bn{conv + 1}")(x)
            x = layers.Activation("relu", name=f"block{block + 1}_relu{conv + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    if pooling == "flatten":
        x = layers.Flatten(name="flatten")(x)
    elif pooling == "global_average":
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    else:
        x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    for i, units in enumerate(dense_units):
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout{i + 1}")(x)
        x = layers.Dense(units, activation="relu", name=f"dense{i + 1}")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout_head")(x)
    if num_classes == 1:
        outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    else:  # float32 output also under a mixed-precision policy
        outputs = layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="probabilities"
        )(x)
    return keras.Model(inputs, outputs, name=name)
