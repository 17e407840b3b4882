"""Config files: the shipped ones validate; every mistake names file, line, key, expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import WsiflowConfig, load_config, with_overrides
from pipeline.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "camelyon16.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert isinstance(config, WsiflowConfig)


def test_demo_config_values():
    config = load_config(next(p for p in CONFIGS if p.name == "demo.yaml"))
    assert config.slides.synthetic.mpp == 0.243
    assert config.tiling.target_mpp == 0.5 and config.tiling.level is None
    assert config.evaluation.fp_rates == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_key_and_choices(tmp_path):
    path = _write(tmp_path, "tiling:\n  patch_px: 128\n  patchsize: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: tiling.patchsize: unknown key. Expected one of: ")
    assert "patch_px" in message and "stride_px" in message


def test_unknown_section(tmp_path):
    path = _write(tmp_path, "slides: {}\ntrainig:\n  epochs: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml:2: trainig: unknown key\. Expected one of: .*training"
    ):
        load_config(path)


def test_wrong_type_names_expectation_and_value(tmp_path):
    path = _write(tmp_path, "slides:\n  synthetic:\n    seed: 1\n    width_px: wide\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:4: slides.synthetic.width_px: Input should be a valid integer, "
        "unable to parse string as an integer. Got 'wide' instead."
    )


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, "tiling:\n  patch_px: -1\n  codec: gif\ntraining:\n  backbone: vgg\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = [key for key, _, _ in info.value.problems]
    assert keys == ["tiling.patch_px", "tiling.codec", "training.backbone"]
    assert "'mobilenetv2'" in str(info.value)  # the allowed backbones are listed


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("notaurl", "missing port number in address 'notaurl'"),
        ("tcp://host", "missing port number in address 'host'"),
        ("http://host:8786", "unknown address scheme 'http'"),
    ],
)
def test_scheduler_address_is_checked_before_any_connection(tmp_path, address, reason):
    path = _write(tmp_path, f"orchestration:\n  scheduler: {address}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}:2: orchestration.scheduler: Expected a Dask scheduler address such as "
        f"tcp://host:8786. Got {address!r} instead ("
    )
    assert reason in message
    for good in ("tcp://10.0.0.5:8786", "127.0.0.1:8786", "tls://scheduler.lab:8786"):
        config = with_overrides(WsiflowConfig(), {"orchestration.scheduler": good})
        assert config.orchestration.scheduler == good


def test_cross_field_rule(tmp_path):
    path = _write(tmp_path, "tiling:\n  target_mpp: 0.5\n  level: 1\n")
    with pytest.raises(ConfigError, match="Expected either target_mpp or level. Got both"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiling:\n  patch_px: [1\n", r"bad.yaml:3: <yaml>: malformed YAML"),
        ("- 1\n- 2\n", r"Expected a mapping of sections. Got list instead."),
    ],
)
def test_malformed_yaml(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml: <file>: cannot read the file"):
        load_config(tmp_path / "absent.yaml")


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == WsiflowConfig()


def test_overrides_replace_validate_and_skip_none():
    base = WsiflowConfig()
    changed = with_overrides(base, {"slides.synthetic.seed": 5, "tiling.patch_px": None})
    assert changed.slides.synthetic.seed == 5
    assert changed.tiling.patch_px == base.tiling.patch_px
    with pytest.raises(
        ConfigError,
        match="command-line options: slides.synthetic.slides: .*greater than or equal to 4",
    ):
        with_overrides(base, {"slides.synthetic.slides": 2})


def test_configs_are_frozen():
    config = WsiflowConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.tiling.patch_px = 3  # type: ignore[misc]
