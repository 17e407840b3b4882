"""The second training's settings for each ``mining.retrain`` (the flow's own run: test_cli)."""

from __future__ import annotations

import pytest

from flows.mine import retrain_settings
from pipeline.config import WsiflowConfig, with_overrides

MINED = {"training.hard_negative_share": 0.3, "training.hard_negatives_from": "runs/model"}


@pytest.mark.parametrize(
    ("retrain", "expected"),
    [
        ("scratch", MINED),
        ("fine_tune", {**MINED, "training.weights": "runs/model"}),
        (
            "continue",
            {
                **MINED,
                "training.weights": "runs/model",
                "training.head_epochs": 0,
                "training.fine_tune_epochs": 7,  # the first training's 2 + 5
                "training.fine_tune_layers": "all",
            },
        ),
    ],
)
def test_retrain_settings(retrain, expected):
    cfg = with_overrides(
        WsiflowConfig(),
        {"mining.retrain": retrain, "training.head_epochs": 2, "training.fine_tune_epochs": 5},
    )
    settings = retrain_settings(cfg, "runs/model")
    assert settings == expected
    # Each one is a valid configuration over the first's.
    second = with_overrides(cfg, settings).training
    assert second.hard_negative_share == 0.3
