"""Multi-worker training: two `wsiflow train` processes on 127.0.0.1 as one run (issue 28).

The workers train one model under MultiWorkerMirroredStrategy with the
global batch of both; worker 0 alone writes the model directory; a worker
killed mid-run stops the run with one line, and every worker started again
resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from models.distribute import TrainingCluster, training_cluster
from pipeline.errors import ConfigError
from tests.conftest import WSIFLOW, free_port, last_json


def test_the_cluster_comes_from_the_options_or_from_tf_config():
    cluster = training_cluster("10.0.0.1:2222,10.0.0.2:2222", 1, environ={})
    assert cluster == TrainingCluster(("10.0.0.1:2222", "10.0.0.2:2222"), 1)
    assert not cluster.is_chief and json.loads(cluster.tf_config()) == {
        "cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    environ = {"TF_CONFIG": cluster.tf_config()}
    assert training_cluster(None, None, environ=environ) == cluster
    assert training_cluster(None, None, environ={}) is None
    one = {"TF_CONFIG": TrainingCluster(("h:1",), 0).tf_config()}
    assert training_cluster(None, None, environ=one) is None  # one worker: one machine


@pytest.mark.parametrize(
    ("workers", "index", "environ", "expected"),
    [
        ("h:1,h:2", None, {}, "--worker-index: Expected --cluster HOST:PORT,HOST:PORT,... and "
         "--worker-index I together. Got only --cluster instead."),
        ("h:1,h", 0, {}, "--cluster: Expected HOST:PORT for each worker. Got 'h' instead."),
        ("h:1,h:1", 0, {}, "--cluster: Expected distinct workers. Got h:1,h:1 instead."),
        ("h:1,h:2", 2, {}, "--worker-index: Expected a worker index from 0 to 1. Got 2 instead."),
        (None, None, {"TF_CONFIG": "{"}, "TF_CONFIG: Expected {\"cluster\":"),
        (None, None, {"TF_CONFIG": json.dumps({"cluster": {"chief": ["h:1"], "worker": ["h:2"]},
                                               "task": {"type": "chief", "index": 0}})},
         "TF_CONFIG: Expected a cluster of workers only"),
    ],
)  # fmt: skip
def test_a_bad_cluster_is_one_line_naming_the_option(workers, index, environ, expected):
    with pytest.raises(ConfigError) as error:
        training_cluster(workers, index, environ=environ)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_cluster_worker_keeps_one_replica_and_nothing_is_made_otherwise(tmp_path):
    from models.train import train_classifier
    from pipeline.config import TrainingConfig

    cluster = TrainingCluster(("127.0.0.1:1", "127.0.0.1:2"), 0)
    with pytest.raises(ConfigError, match="--replicas: Expected 1 replica per worker"):
        train_classifier([tmp_path / "s.zarr"], tmp_path / "m", TrainingConfig(replicas=2),
                         cluster=cluster)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _start(args: list[str], index: int, cluster: str, log_dir) -> subprocess.Popen:
    """``wsiflow train ARGS`` as worker ``index``; its own TMPDIR, so leftovers would show."""
    tmp = log_dir / f"tmp{index}"
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [WSIFLOW, "train", *args, "--cluster", cluster, "--worker-index", str(index), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip


def _ours(tmp) -> list:
    """What wsiflow left in a worker's TMPDIR (TensorFlow leaves its autograph files)."""
    return [p for p in tmp.iterdir() if p.name.startswith("wsiflow")]


@pytest.mark.slow
def test_two_workers_train_one_model_resume_after_a_kill_and_only_the_chief_writes(
    patch_store, trained_model, tmp_path
):
    """Worker 1 SIGKILLed after the first epoch: one line from the chief, then a resume.

    The same settings as ``trained_model`` (one process, batch 32), but
    16 per replica on 2 workers: the same global batch and steps per epoch,
    and a model as good.
    """
    out = tmp_path / "model"
    cluster = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    args = [str(patch_store), "--out", str(out), "--backbone", "small_cnn", "--epochs", "4",
            "--batch-size", "16", "--seed", "0"]  # fmt: skip
    config = tmp_path / "train.yaml"  # trained_model's settings besides
    config.write_text("training:\n  validation_max_patches: 512\n  early_stopping_patience: 4\n")
    args += ["--config", str(config)]
    second = _start(args, 1, cluster, tmp_path)
    chief = _start(args, 0, cluster, tmp_path)
    state = out / "checkpoints" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert chief.poll() is None, chief.communicate()
        assert time.monotonic() < deadline, "no epoch was committed"
        time.sleep(0.1)
    second.send_signal(signal.SIGKILL)
    second.wait()
    stdout, stderr = chief.communicate(timeout=300)
    assert chief.returncode == 1, stderr
    error = last_json(subprocess.CompletedProcess([], 1, stdout))["error"]
    assert error.startswith(
        f"{out}: a worker of the training cluster ({cluster.replace(',', ', ')})"
    )
    assert error.endswith("start every worker again with the same command to resume after epoch 1")
    assert f"error: {error}" in stderr and "Traceback" not in stderr
    assert not (out / "wsiflow_model.json").exists()  # nothing looks finished
    assert len(_ours(tmp_path / "tmp1")) == 1  # the killed worker's epochs

    workers = [_start(args, 1, cluster, tmp_path), _start(args, 0, cluster, tmp_path)]
    results = [w.communicate(timeout=600) for w in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr
    second_summary, summary = (json.loads(stdout.splitlines()[-1]) for stdout, _ in results)
    reference = json.loads((trained_model / "wsiflow_model.json").read_text())
    assert summary["resumed_at_epoch"] >= 1 and summary["epochs_run"] == 4
    assert (summary["workers"], summary["replicas"], summary["global_batch"]) == (2, 2, 32)
    assert reference["global_batch"] == 32 and reference["replicas"] == 1
    assert summary["steps_per_epoch"] == reference["steps_per_epoch"]

    # One all-reduce: both workers saw the same losses and metrics every epoch.
    def metrics(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "patches_per_s")}
                for row in history]  # fmt: skip

    assert metrics(second_summary["history"]) == metrics(summary["history"])
    assert summary["val_auc"] >= 0.9, summary["history"]
    metadata = json.loads((out / "wsiflow_model.json").read_text())
    assert metadata["cluster"] == cluster.split(",") and metadata["complete"] is True
    # The chief's files only; worker 1's temporary folder is gone, the killed run's too.
    assert sorted(p.name for p in out.iterdir()) == [
        ".wsiflow", "history.csv", "logs", "model.keras", "wsiflow_model.json"
    ]  # fmt: skip
    assert _ours(tmp_path / "tmp1") == []
