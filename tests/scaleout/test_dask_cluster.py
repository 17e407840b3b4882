"""``wsiflow tile`` and ``infer`` on an external Dask cluster started from Dask's CLIs.

The results equal a LocalCluster run's, the cluster is left running, and a
worker killed mid-run has its task retried (Dask's default) or, once the
scheduler gives up on the task, its slide reported failed in one line and
resumed by the next run: nothing is marked complete that is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.inference.results import read_scores
from tests.conftest import WSIFLOW, last_json, run
from tests.scaleout.conftest import dask_cli_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    with dask_cli_cluster(tmp_path_factory.mktemp("dask")) as address:
        yield address


@pytest.fixture(scope="module")
def local_inference(trained_model, small_cohort, tmp_path_factory) -> Path:
    """``wsiflow infer`` of the cohort on wsiflow's own LocalCluster of 2 workers."""
    out = tmp_path_factory.mktemp("local") / "inference"
    result = run("infer", str(trained_model), str(small_cohort.root), "--out", str(out),
                 "--workers", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert last_json(result)["done"] == 4
    return out


def _workers(address: str) -> dict[str, int]:
    """Each worker's address and process id."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return client.run(os.getpid)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    arrays = {name: array[:] for name, array in group.arrays()}
    for name, sub in group.groups():
        arrays.update({f"{name}/{k}": v for k, v in _arrays(path / name).items()})
        arrays[f"{name}/complete"] = np.array(sub.attrs.get("complete"))
    return arrays


def _assert_same_arrays(a: Path, b: Path) -> None:
    first, second = _arrays(a), _arrays(b)
    assert sorted(first) == sorted(second)
    for name, values in first.items():
        np.testing.assert_array_equal(values, second[name], err_msg=name)


def _assert_same_inference(a: Path, b: Path) -> None:
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
    slides = sorted(read_scores(a / "scores.csv"))
    assert len(slides) == 4
    for slide_id in slides:
        detections = f"detections/{slide_id}.csv"
        assert (a / detections).read_bytes() == (b / detections).read_bytes()
        _assert_same_arrays(
            a / "heatmaps" / f"{slide_id}.zarr", b / "heatmaps" / f"{slide_id}.zarr"
        )


def test_tile_and_infer_on_it_equal_a_local_cluster_and_leave_it_running(
    cluster, small_cohort, cohort_annotations, trained_model, local_inference, tmp_path
):
    workers = _workers(cluster)
    stores = {}
    for name, where in (("external", ["--scheduler", cluster]), ("local", ["--workers", "2"])):
        stores[name] = tmp_path / f"{name}.zarr"
        result = run("tile", str(small_cohort.root), "--annotations", str(cohort_annotations),
                     "--out", str(stores[name]), "--patch-size", "64", *where, "--json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert last_json(result)["done"] == 4
    _assert_same_arrays(stores["external"], stores["local"])
    out = tmp_path / "inference"
    result = run("infer", str(trained_model), str(small_cohort.root), "--out", str(out),
                 "--scheduler", cluster, "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_same_inference(out, local_inference)
    assert _workers(cluster) == workers  # the same processes, still there


def _infer_killing_a_worker(address: str, model: Path, slides: Path, out: Path):
    """``wsiflow infer`` on ``address``, whose worker running a block is SIGKILLed mid-run."""
    from distributed import Client

    process = subprocess.Popen(
        [WSIFLOW, "infer", str(model), str(slides), "--out", str(out), "--scheduler", address,
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with Client(address, set_as_default=False) as client:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no block of predictions ever ran"
            busy = [
                worker
                for worker, keys in client.processing().items()
                if any(str(key).startswith("predict_block") for key in keys)
            ]
            if busy:
                # A block's first run on a worker loads TensorFlow and the model (seconds).
                os.kill(client.run(os.getpid, workers=busy[:1])[busy[0]], signal.SIGKILL)
                break
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=600)
        # The nanny restarted the worker; the run was not over when it was killed.
        client.wait_for_workers(2, timeout=120)
    return process.returncode, stdout, stderr


def test_a_worker_killed_mid_run_has_its_task_retried(
    cluster, small_cohort, trained_model, local_inference, tmp_path
):
    out = tmp_path / "inference"
    code, stdout, stderr = _infer_killing_a_worker(cluster, trained_model, small_cohort.root, out)
    assert code == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["done"] == 4
    _assert_same_inference(out, local_inference)


def test_a_task_whose_worker_dies_fails_its_slide_in_one_line_and_the_rerun_resumes(
    small_cohort, trained_model, local_inference, tmp_path
):
    """A scheduler that allows no worker failure per task: the killed task's slide fails."""
    strict = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    with dask_cli_cluster(tmp_path / "dask", scheduler_env=strict) as address:
        out = tmp_path / "inference"
        code, stdout, stderr = _infer_killing_a_worker(
            address, trained_model, small_cohort.root, out
        )
        assert code == 1, stderr
        summary = json.loads(stdout.splitlines()[-1])
        failed = {f["slide"]: f["reason"] for f in summary["failures"]}
        assert failed and summary["done"] + len(failed) == 4
        for slide_id, reason in failed.items():
            assert reason.startswith(f"{small_cohort.root}/") and f"/{slide_id}.tif: " in reason
            assert reason.endswith(
                ": the Dask worker running its task predict_block died, once (killed, or out "
                "of memory: see the workers' logs); run again to resume it"
            )
            assert f"failed: {reason}\n" in stderr
        assert "Traceback" not in stderr
        # Nothing of a failed slide looks complete.
        manifest = json.loads((out / "inference.json").read_text())
        assert {k for k, v in manifest["slides"].items() if v["status"] != "done"} == set(failed)
        assert set(read_scores(out / "scores.csv")) == {
            r.slide_id for r in small_cohort.slides
        } - set(failed)
        for slide_id in failed:
            assert not (out / "detections" / f"{slide_id}.csv").exists()
        rerun = run("infer", str(trained_model), str(small_cohort.root), "--out", str(out),
                    "--scheduler", address, "--json")  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
        assert last_json(rerun)["done"] == len(failed)
        _assert_same_inference(out, local_inference)
