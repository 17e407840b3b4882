"""`wsiflow deploy` against a real `prefect server start` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.inference.results import read_scores
from tests.conftest import REPO_ROOT, WSIFLOW

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, logs: list[Path]):
    """Poll ``check()`` until it returns something truthy; fail with the logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def stop(process: subprocess.Popen) -> None:
    """Interrupt a process group as Ctrl+C would, then kill what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_scheduled_deployment_runs_to_completed(small_cohort, trained_model, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    out = tmp_path / "nightly"
    images = small_cohort.root / "testing" / "images"
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

            triggered = subprocess.run(
                [PREFECT, "deployment", "run", "infer/nightly"],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert triggered.returncode == 0, triggered.stdout + triggered.stderr
            run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)

            def finished() -> dict | None:
                state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
                return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

            state = wait_for(finished, 400, f"flow run {run_id}", [serve_log])
            assert state["type"] == "COMPLETED", state
        finally:
            stop(serve)
    finally:
        stop(server)
    expected = sorted(p.stem for p in images.glob("*.tif"))
    assert sorted(read_scores(out / "scores.csv")) == expected
    assert all((out / "heatmaps" / f"{s}_overlay.png").is_file() for s in expected)
