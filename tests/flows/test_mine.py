"""The second training's settings for each ``mining.retrain`` (the flow's own run: test_cli)."""

from __future__ import annotations

import pytest

from flows.mine import retrain_settings
from models.phases import Phase, plan_phases
from pipeline.config import WsiflowConfig, with_overrides

MINED = {"training.hard_negative_share": 0.3, "training.hard_negatives_from": "runs/model"}


@pytest.mark.parametrize(
    ("retrain", "expected", "phases"),
    [
        ("scratch", MINED, [Phase("full", 7, 1e-3)]),
        (
            "fine_tune",
            {**MINED, "training.weights": "runs/model"},
            [Phase("head", 2, 1e-3), Phase("fine_tune", 5, 1e-4)],
        ),
        (
            "continue",
            {
                **MINED,
                "training.weights": "runs/model",
                "training.head_epochs": 0,
                "training.fine_tune_epochs": 7,  # the first training's 2 + 5
                "training.fine_tune_layers": "all",
            },
            [Phase("fine_tune", 7, 1e-4)],  # the whole budget, every layer, the slower rate
        ),
    ],
)
def test_retrain_settings(retrain, expected, phases):
    cfg = with_overrides(
        WsiflowConfig(),
        {"mining.retrain": retrain, "training.head_epochs": 2, "training.fine_tune_epochs": 5},
    )
    settings = retrain_settings(cfg, "runs/model")
    assert settings == expected
    # Valid over the first training's config, and the schedule the second training runs.
    second = with_overrides(cfg, settings).training
    assert plan_phases(second, pretrained=second.weights != "none") == phases
