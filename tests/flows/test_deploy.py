"""`wsiflow deploy` against a real `prefect server start` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pipeline.inference.results import read_scores
from tests.conftest import REPO_ROOT, WSIFLOW, free_port, wait_for

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


def stop(process: subprocess.Popen) -> None:
    """Interrupt a process group as Ctrl+C would, then kill what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with the repository's prefect.yaml deployed.

    Yields the environment a user's shell has after the steps prefect.yaml
    lists: ``PREFECT_API_URL`` set, the ``wsiflow`` process work pool
    created, ``prefect deploy --all`` run from the checkout.
    """
    folder = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_log = folder / "server.log"
    with server_log.open("w") as log:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 240, "prefect server start", [server_log])
        # The repository's prefect.yaml registers its deployments on a work pool as documented.
        for command in (
            [PREFECT, "work-pool", "create", "wsiflow", "--type", "process"],
            [PREFECT, "--no-prompt", "deploy", "--all"],
        ):
            done = subprocess.run(
                command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
            )
            assert done.returncode == 0, done.stdout + done.stderr
        yield env
    finally:
        stop(server)


def test_scheduled_deployment_runs_to_completed(
    prefect_server, small_cohort, trained_model, tmp_path
):
    env = prefect_server
    api = env["PREFECT_API_URL"]
    serve_log = tmp_path / "serve.log"
    out = tmp_path / "nightly"
    images = small_cohort.root / "testing" / "images"
    nightly = httpx.get(f"{api}/deployments/name/infer/nightly-inference", timeout=5).json()
    assert nightly["work_pool_name"] == "wsiflow"
    assert nightly["entrypoint"] == "flows/infer.py:infer_flow"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    with serve_log.open("w") as log:
        serve = subprocess.Popen(
            [
                WSIFLOW, "deploy", "infer", str(images),
                "--model", str(trained_model), "--out", str(out),
                "--cron", "0 2 * * *", "--name", "nightly",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def deployment() -> dict | None:
            response = httpx.get(f"{api}/deployments/name/infer/nightly", timeout=5)
            return response.json() if response.status_code == 200 else None

        found = wait_for(deployment, 120, "the deployment", [serve_log])
        assert [s["schedule"]["cron"] for s in found["schedules"]] == ["0 2 * * *"]
        assert found["parameters"]["out_dir"] == str(out)
        run_id = trigger("infer/nightly", {}, env)
        state = wait_for(finished(api, run_id), 400, f"flow run {run_id}", [serve_log])
        assert state["type"] == "COMPLETED", state
    finally:
        stop(serve)
    expected = sorted(p.stem for p in images.glob("*.tif"))
    assert sorted(read_scores(out / "scores.csv")) == expected
    assert all((out / "heatmaps" / f"{s}_overlay.png").is_file() for s in expected)


def trigger(deployment: str, parameters: dict, env: dict) -> str:
    """`prefect deployment run` with ``parameters`` over the deployment's own; the run's id."""
    triggered = subprocess.run(
        [PREFECT, "deployment", "run", deployment, "--params", json.dumps(parameters)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)


def finished(api: str, run_id: str):
    """A check for :func:`wait_for`: the flow run's final state, or None while it runs."""

    def check() -> dict | None:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

    return check


def test_a_prefect_worker_runs_each_deployment_of_prefect_yaml_to_completed(
    prefect_server, tmp_path
):
    """`prefect worker start` on the pool picks up a run of each deployment and finishes it.

    The worker starts where a user's shell would be (not the checkout), with
    ``WSIFLOW_HOME`` naming the checkout as prefect.yaml asks; the runs'
    parameters point at a small generated cohort, the rest (the nightly
    run's ``configs/camelyon16.yaml``) are the deployments' own.
    """
    env = {**prefect_server, "WSIFLOW_HOME": str(REPO_ROOT)}
    api = env["PREFECT_API_URL"]
    cohort = tmp_path / "cohort"
    made = subprocess.run(
        [WSIFLOW, "synth", str(cohort), "--slides", "6", "--size", "2048x2048", "--seed", "3"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "tiling:\n  patch_px: 48\n"
        "training:\n  backbone: small_cnn\n  head_epochs: 1\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 5\n"
    )
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "wsiflow", "--name", "test-worker"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        out = tmp_path / "camelyon"
        run_id = trigger(
            "camelyon/camelyon16",
            {"root": str(cohort), "out_dir": str(out), "config": str(config)},
            env,
        )
        state = wait_for(finished(api, run_id), 600, f"flow run {run_id}", [worker_log])
        assert state["type"] == "COMPLETED", (state, worker_log.read_text()[-3000:])
        flow_run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()
        assert flow_run["work_pool_name"] == "wsiflow"
        assert (out / "model" / "model.keras").is_file()
        evaluation = json.loads((out / "inference" / "evaluation.json").read_text())
        assert 0 <= evaluation["slide_auc"] <= 1
        images = cohort / "testing" / "images"
        expected = sorted(p.stem for p in images.glob("*.tif"))
        assert sorted(read_scores(out / "inference" / "scores.csv")) == expected

        nightly = tmp_path / "incoming"
        run_id = trigger(
            "infer/nightly-inference",
            {"model_dir": str(out / "model"), "slides": [str(images)], "out_dir": str(nightly)},
            env,
        )
        state = wait_for(finished(api, run_id), 400, f"flow run {run_id}", [worker_log])
        assert state["type"] == "COMPLETED", (state, worker_log.read_text()[-3000:])
        parameters = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["parameters"]
        assert parameters["config"] == "configs/camelyon16.yaml"  # relative to WSIFLOW_HOME
        assert sorted(read_scores(nightly / "scores.csv")) == expected
        assert all((nightly / "heatmaps" / f"{s}_overlay.png").is_file() for s in expected)
    finally:
        stop(worker)
    assert str(run_id) in worker_log.read_text()
