"""The installed `wsiflow` console script, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import html
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import APERIO_SLIDE, WSIFLOW, last_json, run

COMMANDS = [
    "synth",
    "info",
    "config",
    "tile",
    "preview",
    "mnist",
    "train",
    "infer",
    "evaluate",
    "export",
    "predict",
    "demo",
    "flow",
    "deploy",
]


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: wsiflow " + command in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("wsiflow ")


def test_synth_json_then_reuse(tmp_path):
    out = tmp_path / "cohort"
    args = ["synth", str(out), "--slides", "4", "--size", "1024x768", "--seed", "2", "--json"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    summary = last_json(first)
    assert summary["slides"] == 4 and summary["tumor_slides"] == 2
    assert summary["reused"] is False
    assert summary["params"]["width_px"] == 1024 and summary["params"]["height_px"] == 768
    assert (out / "training" / "tumor" / "tumor_001.tif").is_file()
    # stdout holds only the JSON line; the table went to stderr.
    assert len(first.stdout.strip().splitlines()) == 1 and "tumor_001" in first.stderr
    assert last_json(run(*args))["reused"] is True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--size", "big"], "Expected WIDTHxHEIGHT in pixels"),
        (["--slides", "2"], "slides.synthetic.slides: Input should be greater than or equal to 4"),
    ],
)
def test_synth_bad_options_exit_2_with_a_clear_line(tmp_path, args, expected):
    result = run("synth", str(tmp_path / "x"), *args, "--json")
    assert result.returncode == 2
    assert expected in result.stderr
    assert last_json(result)["ok"] is False
    assert not (tmp_path / "x").exists()


def test_info_reports_each_bad_slide_and_keeps_going(tmp_path):
    cohort = tmp_path / "c"
    assert run("synth", str(cohort), "--slides", "4", "--size", "512x512").returncode == 0
    corrupt = cohort / "training" / "normal" / "normal_999.tif"
    corrupt.write_bytes(b"II*\x00garbage")
    result = run("info", str(cohort), "--json")
    assert result.returncode == 1
    summary = last_json(result)
    assert len(summary["slides"]) == 4
    assert [f["path"] for f in summary["failures"]] == [str(corrupt)]
    assert f"{corrupt}: " in result.stderr
    assert all(s["mpp"] == 0.243 and s["vendor"] == "generic-tiff" for s in summary["slides"])


def test_config_command(tmp_path):
    good = run("config", "configs/demo.yaml", "--json", cwd=Path(__file__).resolve().parents[1])
    assert good.returncode == 0, good.stderr
    assert last_json(good)["config"]["tiling"]["patch_px"] == 96
    bad = tmp_path / "bad.yaml"
    bad.write_text("orchestration:\n  retries: many\n")
    result = run("config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: orchestration.retries: Input should be a valid integer" in result.stderr


@pytest.mark.slow
def test_demo_runs_every_stage_and_says_what_does_not_exist(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "slides:\n  synthetic:\n    slides: 6\n    width_px: 2048\n    height_px: 2048\n"
        f"  extra: [{APERIO_SLIDE.parent}, {tmp_path / 'absent'}]\n"
        "tiling:\n  patch_px: 48\n"
        "training:\n  backbone: small_cnn\n  head_epochs: 1\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 5\n"
        # Hard negatives mined and trained on again; the test slides scored by a slide
        # classifier on the training slides' own heatmaps.
        "mining:\n  enabled: true\n  threshold: 0.3\n"
        "slide_classifier:\n  enabled: true\n  folds: 1\n  trees: 20\n"
    )
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    args = ["demo", "--out", str(tmp_path / "out"), "--config", str(config), "--json"]
    result = run(*args, env=env)
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert summary["ok"] is True
    expected_real = [str(APERIO_SLIDE)] if APERIO_SLIDE.is_file() else []
    infer_real = ["infer_real"] if expected_real else []
    # tile -> train -> infer -> evaluate ran as the camelyon Prefect flow and its subflows.
    assert summary["stages_run"] == [
        "synth", "inspect", "tile", "train", "mine", "retrain", "slide_classifier", "infer",
        "evaluate", "infer_baseline", "evaluate_baseline", *infer_real, "preview",
    ]  # fmt: skip
    assert "Beginning flow run" in result.stderr and "for flow 'camelyon'" in result.stderr
    # Dask's and TensorFlow's own logs only with --verbose.
    assert "distributed." not in result.stderr and "oneDNN" not in result.stderr
    assert summary["tile"]["patches"] > 0 and summary["tile"]["tumor_patches"] > 0
    assert (tmp_path / "out" / "preview.png").is_file()
    assert summary["train"]["backbone"] == "small_cnn" and summary["train"]["epochs_run"] == 1
    assert (tmp_path / "out" / "model" / "wsiflow_model.json").is_file()
    # The 2 testing slides are inferred and evaluated against the cohort's reference.
    assert summary["infer"]["slides"] == 2 and summary["infer"]["done"] == 2
    # The second model trained on what the first one mined, and inferred everything after.
    retrained = tmp_path / "out" / "model_hnm"
    assert summary["retrain"]["model_dir"] == str(retrained)
    mining = json.loads((retrained / "wsiflow_model.json").read_text())["hard_negatives"]
    assert mining["share"] == 0.3 and mining["patches"] == summary["mine"]["mined"]
    assert summary["mine"]["model_dir"] == str(tmp_path / "out" / "model")
    # folds: 1 infers the 4 training slides with the model itself, and says so.
    classifier = summary["slide_classifier"]
    assert (classifier["slides"], classifier["in_sample"], classifier["folds"]) == (4, 4, 1)
    from pipeline.inference.results import read_heatmap
    from pipeline.inference.slide_classifier import describe

    for slide_id in ("test_001", "test_002"):
        _, attrs = read_heatmap(tmp_path / "out" / "inference" / "heatmaps" / f"{slide_id}.zarr")
        assert attrs["slide_score"] == "classifier"
    scores = (tmp_path / "out" / "inference" / "scores.csv").read_text().splitlines()
    assert scores[0] == "slide,score" and len(scores) == 3
    assert 0 <= summary["evaluate"]["slide_auc"] <= 1
    assert (tmp_path / "out" / "inference" / "evaluation.json").is_file()
    if expected_real:  # inferred apart: it is not in the reference
        assert list(summary["infer_real"]["scores"]) == [APERIO_SLIDE.stem]
    report = (tmp_path / "out" / "report.html").read_text()
    assert summary["report"] == str(tmp_path / "out" / "report.html")
    assert "Slide AUC" in report and "test_001" in report and "Training" in report
    assert html.escape(describe(classifier)) in report  # the line the CLI prints too
    # The recipe's numbers beside the first model's own (the baseline).
    baseline = summary["evaluate_baseline"]
    assert f"(baseline: {baseline['slide_auc']:.4f})" in report
    assert summary["infer_baseline"]["out"] == str(tmp_path / "out" / "inference_baseline")
    # Self-contained: training curves, ROC and both test slides' overlays embedded, nothing fetched.
    assert report.count('src="data:image/') >= 4
    assert 'src="http' not in report and "<script" not in report
    assert summary["stages_not_available"] == []
    testing = tmp_path / "out" / "cohort" / "testing"
    assert summary["serve_command"] == (
        f"wsiflow serve {testing / 'images'} --heatmaps {tmp_path / 'out' / 'inference'} "
        f"--annotations {testing / 'lesion_annotations'}"
    )
    assert "wsiflow demo results" in result.stderr and "slide AUC" in result.stderr
    assert "absent is not present" in result.stderr
    assert summary["real_slides"] == expected_real
    assert summary["slides"] == 6 + len(expected_real)
    # The demo's results open in QuPath and ASAP: every test slide exported.
    exported = run("export", str(tmp_path / "out" / "inference"), "--json")
    assert exported.returncode == 0, exported.stderr
    assert sorted(last_json(exported)["slides"]) == ["test_001", "test_002"]
    for name in ("test_001.geojson", "test_001.xml", "test_001_heatmap.tif"):
        assert (tmp_path / "out" / "inference" / "export" / name).stat().st_size > 0

    # A second run redoes nothing: every slide is skipped, training comes from the cache.
    again = last_json(run(*args, env=env))
    assert again["ok"] is True
    assert again["tile"]["skipped"] == again["tile"]["slides"]
    assert again["infer"]["skipped"] == again["infer"]["slides"] == 2
    assert again["train"]["val_auc"] == summary["train"]["val_auc"]
    assert again["slide_classifier"]["reused"] is True
    assert again["mine"]["skipped"] == again["mine"]["slides"]
    assert again["evaluate"]["slide_auc"] == summary["evaluate"]["slide_auc"]


@pytest.fixture(scope="module")
def cli_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cohort"
    result = run("synth", str(out), "--slides", "4", "--size", "2048x2048", "--seed", "5")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_tile_then_preview(cli_cohort, tmp_path):
    store = tmp_path / "s.zarr"
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    args = [
        "tile",
        str(cli_cohort / "training"),
        str(corrupt),
        "--out",
        str(store),
        "--annotations",
        str(cli_cohort / "training" / "lesion_annotations"),
        "--patch-size",
        "64",
        "--mpp",
        "0.5",
        "--workers",
        "2",
        "--json",
    ]
    result = run(*args)
    assert result.returncode == 1  # one slide failed; the others are in the store
    summary = last_json(result)
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert summary["failures"][0]["path"] == str(corrupt)
    assert f"{corrupt}: not a slide format OpenSlide can read" in result.stderr
    # One line for it, no worker's log of a failed task (and traceback) besides.
    assert result.stderr.count(str(corrupt)) == 1 and "Traceback" not in result.stderr
    assert summary["tumor_patches"] > 0 and summary["store_bytes"] > 0
    rerun = last_json(run(*[a for a in args if a != str(corrupt)]))
    assert (rerun["skipped"], rerun["done"], rerun["ok"]) == (2, 0, True)

    sheet = tmp_path / "sheet.png"
    shown = run("preview", str(store), "--out", str(sheet), "--per-class", "4", "--json")
    assert shown.returncode == 0, shown.stderr
    assert last_json(shown)["tumor"] == 4 and last_json(shown)["normal"] == 4
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.size == (8 * 128, 1 * (128 + 28))
    missing = run("preview", str(store), "--slide", "nope", "--out", str(sheet))
    assert missing.returncode == 2 and "Got 'nope' instead" in missing.stderr
    negative = run("preview", str(store), "--per-class", "-3", "--out", str(sheet))
    assert negative.returncode == 2 and "'--per-class': Input should be greater" in negative.stderr


def test_tile_uses_an_existing_scheduler_unchanged(cli_cohort, tmp_path):
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        before = set(client.scheduler_info()["workers"])
        result = run(
            "tile",
            str(cli_cohort / "training" / "normal"),
            "--out",
            str(tmp_path / "s.zarr"),
            "--scheduler",
            cluster.scheduler_address,
            "--patch-size",
            "64",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        assert last_json(result)["done"] == 1
        assert set(client.scheduler_info()["workers"]) == before  # still there, unchanged


def test_tile_names_a_scheduler_it_cannot_reach(tmp_path):
    """One line naming the address (exit 1, JSON summary too), after Dask's connect timeout.

    No store is made for a run that could not start.
    """
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    store = tmp_path / "s.zarr"
    result = run(
        "tile", str(tmp_path / "x.svs"), "--out", str(store),
        "--scheduler", address, "--json",
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )  # fmt: skip
    assert result.returncode == 1
    expected = f"{address}: cannot reach a Dask scheduler here (Timed out trying to connect"
    assert f"error: {expected}" in result.stderr and "Traceback" not in result.stderr
    assert last_json(result)["error"].startswith(expected)
    assert not store.exists()


def test_tile_rejects_mpp_and_level_together(tmp_path):
    result = run(
        "tile", str(tmp_path), "--out", str(tmp_path / "s.zarr"), "--mpp", "0.5", "--level", "1"
    )
    assert result.returncode == 2 and "give one, not both" in result.stderr


def test_tile_says_when_it_finds_no_slide(tmp_path):
    """A folder without slides is a usage error (before any store); a missing file fails."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a slide")
    store = tmp_path / "s.zarr"
    result = run("tile", str(empty), "--out", str(store))
    assert result.returncode == 2
    assert "SLIDES: Expected slide files (.bif, .dcm," in result.stderr
    assert f"in {empty}. Found none." in result.stderr
    assert not store.exists()
    missing = tmp_path / "missing.svs"
    result = run("tile", str(missing), "--out", str(store), "--workers", "1")
    assert result.returncode == 1 and f"{missing}: no such file" in result.stderr
    # Nothing stored: no size ratios of an empty store.
    assert "0 patches written in" in result.stdout and "x the slide files" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_run_leaves_no_false_complete_group(cli_cohort, tmp_path, signal_name):
    """SIGKILL, Ctrl-C or SIGTERM mid-run: every complete group is whole; a rerun does the rest.

    Ctrl-C (SIGINT to the whole process group, as a terminal sends it) ends the
    run with exit code 130 and one line, no traceback from the driver or workers;
    SIGTERM to wsiflow alone (as `kill` or a scheduler sends it) the same way, 143.
    """
    import signal
    import time

    import zarr

    # 12 slides (hard links under other names): whatever this machine's speed, some are
    # still unwritten when the first group appears.
    slides = tmp_path / "slides"
    slides.mkdir()
    sources = sorted(cli_cohort.rglob("*.tif"))
    for copy in range(3):
        for path in sources:
            os.link(path, slides / f"{path.stem}_{copy}.tif")
    total = 3 * len(sources)
    store = tmp_path / "s.zarr"
    tile_args = ["tile", str(slides), "--out", str(store), "--patch-size", "32", "--mpp", "0.25"]
    args = [WSIFLOW, *tile_args, "--workers", "2"]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(store.glob("*/zarr.json")):
            time.sleep(0.05)
        time.sleep(0.3)
        sent = getattr(signal, signal_name)
        if sent == signal.SIGTERM:
            os.kill(process.pid, sent)
        else:
            os.killpg(process.pid, sent)
        code = process.wait()
    if sent == signal.SIGKILL:
        assert code == -signal.SIGKILL, "the run ended before it could be interrupted"
    else:
        expected = {signal.SIGINT: (130, "interrupted: "), signal.SIGTERM: (143, "terminated: ")}
        assert code == expected[sent][0], stderr.read_text()
        lines = stderr.read_text().splitlines()
        assert lines[-1].startswith(expected[sent][1]), lines
        assert f"of {total} slides finished" in lines[-1]
        assert "the same command resumes" in lines[-1]
        noise = ("Traceback", "KeyboardInterrupt", "leaked semaphore")
        assert not any(word in line for line in lines for word in noise), "\n".join(lines)
    root = zarr.open_group(str(store), mode="r")
    complete = [k for k in root.group_keys() if root[k].attrs.get("complete") is True]
    assert len(complete) < total, "nothing was left to interrupt"
    for slide_id in complete:
        group = root[slide_id]
        patches = group["patches"]
        assert patches.nchunks_initialized == patches.nchunks
    rerun = run(*tile_args, "--json")
    summary = last_json(rerun)
    assert summary["ok"] and summary["skipped"] == len(complete)
    assert summary["done"] + summary["skipped"] == total


@pytest.mark.slow
def test_flow_tile_lists_the_bad_slide_then_serves_from_cache(cli_cohort, tmp_path):
    """`wsiflow flow` on its own temporary Prefect API (no server running), as a user runs it."""
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    config = tmp_path / "tile.yaml"
    config.write_text("tiling:\n  patch_px: 64\n  target_mpp: 0.5\n")
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    args = ["flow", "tile", str(cli_cohort / "training"), "--out", str(tmp_path / "s.zarr"),
            "--annotations", str(cli_cohort / "training" / "lesion_annotations"),
            "--config", str(config), "--workers", "2", "--json"]  # fmt: skip
    result = run(*args, str(corrupt), env=env)
    assert result.returncode == 1, result.stderr  # the flow completed; one slide failed
    summary = last_json(result)
    assert summary["flow"] == "tile" and (summary["done"], summary["skipped"]) == (2, 0)
    assert [f["path"] for f in summary["failures"]] == [str(corrupt)]
    assert f"{corrupt}: not a slide format OpenSlide can read" in result.stderr
    # Dask's logs (workers starting and closing, connections cut at close) only with -v.
    assert "distributed." not in result.stderr and "Traceback" not in result.stderr
    again = run(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert (last_json(again)["skipped"], last_json(again)["ok"]) == (2, True)


@pytest.mark.slow
def test_flow_evaluate_takes_rules_and_exclusions_from_the_command_line(tmp_path):
    """`--rules` and `--exclude` reach the flow as they reach `wsiflow evaluate`."""
    from tests.pipeline.evaluation.test_froc import _evaluation_inputs

    _evaluation_inputs(tmp_path, 0.226)
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    result = run(
        "flow", "evaluate", str(tmp_path / "results"), "--reference",
        str(tmp_path / "reference.csv"), "--masks", str(tmp_path / "masks"), "--slides",
        str(tmp_path / "slides"), "--rules", "corrected", "--exclude", "test_002", "--out",
        str(tmp_path / "report"), "--json",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = last_json(result)
    assert report["rules"] == "corrected" and report["excluded"] == ["Test_002"]
    assert report["lesions"] == 1 and report["froc"] == 1.0  # one lesion at 0.226 µm/px


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["flow", "evaluate", "o", "--rules", "lenient"], "rules"),
        (["flow", "tile", "slides/"], "needs --out"),
        (["flow", "infer", "slides/", "--out", "o"], "needs --model"),
        (["flow", "nope"], "unknown flow"),
        (["deploy", "infer", "slides/", "--model", "m", "--out", "o"], "PREFECT_API_URL"),
    ],
)
def test_flow_and_deploy_usage_errors_exit_2(args, expected, tmp_path):
    result = run(*args, env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert expected in result.stderr


FLOWS = ("tile", "train", "infer", "evaluate", "camelyon", "mnist")


def test_flow_parameters_keep_store_urls_and_resolve_paths(tmp_path, monkeypatch):
    """A store URL reaches the flow as given (a Path would make s3://b/x into s3:/b/x)."""
    from pipeline.cli.orchestrate import BUILDERS, Common

    monkeypatch.chdir(tmp_path)
    common = Common(None, {})
    tile = BUILDERS["tile"](common, ["slides"], out="s3://bucket/c.zarr")
    assert tile["store"] == "s3://bucket/c.zarr"
    assert tile["slides"] == [str(tmp_path / "slides")]
    train = BUILDERS["train"](common, ["s3://bucket/c.zarr/", "local.zarr"], out="m")
    assert train["stores"] == ["s3://bucket/c.zarr", str(tmp_path / "local.zarr")]
    assert train["model_dir"] == str(tmp_path / "m")
    assert train["settings"] is None
    workers = BUILDERS["train"](common, ["local.zarr"], out="m", training_workers=2)
    assert workers["settings"] == {"orchestration.training_workers": 2}
    camelyon = BUILDERS["camelyon"](common, "root", out="o", store="gs://b/c.zarr")
    assert camelyon["store"] == "gs://b/c.zarr" and camelyon["out_dir"] == str(tmp_path / "o")
    default = BUILDERS["camelyon"](common, "root", out="o")
    assert default["store"] is None


def test_flow_and_deploy_take_each_stages_own_options_written_once():
    """`flow STAGE` and `deploy STAGE` share the stage's options; each adds only its own."""
    import typer.main

    from pipeline.cli import app

    group = typer.main.get_command(app)
    flow, deploy = group.commands["flow"], group.commands["deploy"]
    assert sorted(flow.commands) == sorted(deploy.commands) == sorted(FLOWS)

    def options(command):
        return {opt for param in command.params for opt in param.opts}

    for name in FLOWS:
        in_flow, in_deploy = options(flow.commands[name]), options(deploy.commands[name])
        assert in_flow - in_deploy <= {"--json", "--overwrite"}, name
        assert in_deploy - in_flow == {"--cron", "--interval", "--name"}, name
    assert "--rules" in options(flow.commands["evaluate"])
    assert "--rules" not in options(flow.commands["tile"])
    assert "--model" in options(flow.commands["infer"])
    assert "--model" not in options(flow.commands["tile"])
