"""The Prefect flows, run for real: a temporary Prefect API, Dask clusters, persisted results."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import InferenceConfig
from pipeline.errors import SlideReadError
from tests.conftest import S3_BUCKET, SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server and database; results persisted under a temporary folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        prefect_test_harness(server_startup_timeout=180),
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
    ):
        yield


def task_states(flow_run_id) -> dict[str, str]:
    """Task run name -> state name of a flow run and its subflows, read back from the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id, *(child.id for child in children)])
            )
        )
    # A subflow call leaves a stand-in task run in its parent: not a task of ours.
    return {
        run.name: run.state.name
        for run in runs
        if run.state.state_details.child_flow_run_id is None
    }


def artifact(key: str):
    """The newest artifact with ``key``."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r}"
    return max(found, key=lambda a: a.created)


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_io_tasks_retry_transient_errors_but_not_bad_input(prefect_api, tmp_path):
    from prefect import flow, task

    from flows.runtime import task_options
    from pipeline.config import OrchestrationConfig

    attempts = tmp_path / "attempts"
    attempts.mkdir()

    @task
    def flaky(name: str, error: str) -> str:
        log = attempts / name
        log.write_text(log.read_text() + "x" if log.exists() else "x")
        if len(log.read_text()) == 1:  # the first attempt fails
            raise (
                OSError("network file system hiccup")
                if error == "os"
                else SlideReadError(tmp_path / f"{name}.tif", "truncated")
            )
        return name

    @flow
    def both() -> list[str]:
        options = task_options(OrchestrationConfig(retries=2, retry_delay_s=0), io=True)
        futures = [flaky.with_options(**options).submit(n, n) for n in ("os", "slide")]
        for future in futures:
            future.wait()
        return [future.state.name for future in futures]

    assert both() == ["Completed", "Failed"]
    assert (attempts / "os").read_text() == "xx"  # retried once, then passed
    assert (attempts / "slide").read_text() == "x"  # a bad slide is not retried


def test_tile_flow_lists_a_corrupt_slide_and_skips_the_rest_when_run_again(
    prefect_api, small_cohort, cohort_annotations, patch_store, tmp_path
):
    from flows.runtime import run_flow

    slides = tmp_path / "slides"
    slides.mkdir()
    for record in small_cohort.slides:
        (slides / Path(record.image).name).symlink_to(small_cohort.root / record.image)
    (slides / "broken.tif").write_bytes(b"II*\x00 truncated")
    store = tmp_path / "flow.zarr"
    # The patch_store fixture's settings, through a YAML file as a user gives them.
    config = write_config(tmp_path / "tile.yaml", "tiling:\n  target_mpp: 0.243\n  patch_px: 64\n")
    parameters = {
        "slides": [str(slides)],
        "store": str(store),
        "annotations": str(cohort_annotations),
        "config": config,
        "settings": {"orchestration.workers": 2, "orchestration.retry_delay_s": 0},
    }
    state = run_flow("tile", parameters, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    good = sorted(Path(r.image).stem for r in small_cohort.slides)
    assert [f["slide"] for f in summary["failures"]] == ["broken"]
    assert "broken.tif" in summary["failures"][0]["reason"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (len(good), 0, 1)
    states = task_states(state.state_details.flow_run_id)
    assert states == {"tile-broken": "Failed", **{f"tile-{s}": "Completed" for s in good}}

    # The same patches as the CLI's driver writes (the patch_store fixture, same config).
    cli, flow_root = zarr.open_group(str(patch_store), mode="r"), zarr.open_group(str(store))
    for slide_id in good:
        assert flow_root[slide_id].attrs["complete"] is True
        np.testing.assert_array_equal(flow_root[slide_id]["coords"][:], cli[slide_id]["coords"][:])
        np.testing.assert_array_equal(flow_root[slide_id]["labels"][:], cli[slide_id]["labels"][:])
        np.testing.assert_array_equal(
            flow_root[slide_id]["patches"][:16], cli[slide_id]["patches"][:16]
        )
    # One writer of the cohort summary: every slide, the failure included.
    rows = flow_root.attrs["slides"]
    assert sorted(rows) == sorted([*good, "broken"]) and rows["broken"]["status"] == "failed"
    table = artifact("tile-slides")
    assert "broken" in table.data and "tumor_001" in table.data

    # Done once: the store's fingerprints, not Prefect's cache, say what is complete.
    again = run_flow("tile", parameters, return_state=True)
    assert again.is_completed()
    assert (again.result()["done"], again.result()["skipped"]) == (0, len(good))
    assert again.result()["patches"] == summary["patches"]
    states = task_states(again.state_details.flow_run_id)
    assert states == {"tile-broken": "Failed", **{f"tile-{s}": "Completed" for s in good}}

    # A group gone from the store is redone.
    shutil.rmtree(store / good[0])
    third = run_flow("tile", parameters, return_state=True).result()
    assert (third["done"], third["skipped"]) == (1, len(good) - 1)
    assert zarr.open_group(str(store))[good[0]].attrs["complete"] is True


@pytest.mark.parametrize("flow", ["tile", "train"])
def test_flows_refuse_a_folder_another_run_is_writing(
    flow, prefect_api, small_cohort, patch_store, tmp_path
):
    """The flows hold the output folder's lock as the commands do: a held one is refused."""
    from flows.runtime import run_flow
    from pipeline.errors import OutputLockedError
    from pipeline.outputs import LOCK, claim_folder
    from pipeline.store.patch_store import open_root
    from tests.reliability.test_outputs import _hold_lock

    if flow == "tile":
        out = tmp_path / "s.zarr"
        open_root(out)
        slide = str(small_cohort.root / small_cohort.slides[0].image)
        parameters = {"slides": [slide], "store": str(out)}
    else:
        out = claim_folder(tmp_path / "m", "model")
        parameters = {"stores": [str(patch_store)], "model_dir": str(out),
                      "settings": {"training.backbone": "small_cnn"}}  # fmt: skip
    holder = _hold_lock(out)
    before = sorted(p.name for p in out.iterdir())
    try:
        state = run_flow(flow, parameters, return_state=True)
    finally:
        holder.kill()
        holder.wait()
    assert state.is_failed()
    with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
        state.result()
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    if flow == "tile":  # the dead holder's lock is taken over, and released at the end
        assert run_flow(flow, parameters, return_state=True).is_completed()
        assert not (out / LOCK).exists()


def test_train_flow_reports_metrics_and_is_cached(prefect_api, patch_store, tmp_path):
    from flows.runtime import run_flow

    config = write_config(
        tmp_path / "train.yaml",
        "training:\n  backbone: small_cnn\n  head_epochs: 2\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 25\n  batch_per_replica: 32\n  validation_max_patches: 512\n",
    )
    parameters = {"stores": [str(patch_store)], "model_dir": str(tmp_path / "m"), "config": config}
    state = run_flow("train", parameters, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["backbone"] == "small_cnn" and summary["epochs_run"] == 2
    assert 0.5 < summary["val_auc"] <= 1
    assert (tmp_path / "m" / "model.keras").is_file()
    assert f"{summary['val_auc']:.4f}" in artifact("train-summary").data

    again = run_flow("train", parameters, return_state=True)
    assert list(task_states(again.state_details.flow_run_id).values()) == ["Cached"]
    assert again.result()["val_auc"] == summary["val_auc"]


def test_train_flow_runs_one_training_process_per_worker_of_a_dask_cluster(
    prefect_api, patch_store, tmp_path
):
    """``orchestration.training_workers`` 2 on a cluster started from Dask's command lines.

    More training workers than Dask workers is refused in one line before
    anything is made; 2 train one model (global batch 2 x 16) whose epochs
    reach the flow's log; the cluster is left as it was, no temporary
    folder of wsiflow's is left behind, and a second run is cached. A
    killed Dask worker takes its training process (the chief) with it, the
    flow fails in one line from worker 1, and the next run takes over the
    dead chief's lock and resumes.
    """
    from distributed import Client
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.runtime import run_flow
    from pipeline.errors import ConfigError, TrainingClusterError
    from tests.scaleout.conftest import dask_cli_cluster

    config = write_config(
        tmp_path / "train.yaml",
        "training:\n  backbone: small_cnn\n  head_epochs: 2\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 10\n  batch_per_replica: 16\n  validation_max_patches: 256\n",
    )
    model = tmp_path / "m"
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    with dask_cli_cluster(
        tmp_path / "dask", workers=2, worker_env={"TMPDIR": str(worker_tmp)}
    ) as address:
        with Client(address, set_as_default=False) as client:
            workers = sorted(client.scheduler_info()["workers"])

        def train(n: int):
            settings = {"orchestration.scheduler": address, "orchestration.training_workers": n}
            parameters = {"stores": [str(patch_store)], "model_dir": str(model),
                          "config": config, "settings": settings}  # fmt: skip
            return run_flow("train", parameters, return_state=True)

        state = train(3)
        assert state.is_failed()
        with pytest.raises(ConfigError) as error:
            state.result()
        assert str(error.value) == (
            f"{address}: orchestration.training_workers: Expected at most 2: one training "
            "process per Dask worker, and the cluster has 2. Got 3 instead."
        )
        assert not model.exists()

        state = train(2)
        assert state.is_completed(), state.message
        summary = state.result()
        assert (summary["workers"], summary["replicas"], summary["global_batch"]) == (2, 2, 32)
        assert summary["epochs_run"] == 2 and 0.5 < summary["val_auc"] <= 1
        metadata = json.loads((model / "wsiflow_model.json").read_text())
        assert metadata["workers"] == 2
        assert [w.split(":")[0] for w in metadata["cluster"]] == ["127.0.0.1", "127.0.0.1"]
        with get_client(sync_client=True) as api:
            logs = api.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )
        messages = [log.message for log in logs]
        assert any(m.startswith("training on 2 Dask workers as a cluster of") for m in messages)
        assert any(m.startswith("epoch 2/2 full: loss") for m in messages), messages
        with Client(address, set_as_default=False) as client:
            assert sorted(client.scheduler_info()["workers"]) == workers  # left running
        assert [p for p in worker_tmp.iterdir() if p.name.startswith("wsiflow")] == []

        again = train(2)
        assert list(task_states(again.state_details.flow_run_id).values()) == ["Cached"]
        assert again.result()["val_auc"] == summary["val_auc"]

        # The chief's Dask worker SIGKILLed after the first epoch (a machine lost): its
        # training process dies with it, worker 1 says so in one line, the next run resumes.
        model = tmp_path / "m2"
        config = write_config(
            tmp_path / "longer.yaml",
            "training:\n  backbone: small_cnn\n  head_epochs: 6\n  fine_tune_epochs: 0\n"
            "  steps_per_epoch: 20\n  batch_per_replica: 16\n  validation_max_patches: 256\n"
            "  early_stopping_patience: 6\n",  # all 6 epochs run, whatever validation does
        )
        with Client(address, set_as_default=False) as client:
            chief_worker = client.run(os.getpid, workers=workers[:1])[workers[0]]
        killer = threading.Thread(target=_kill_when_committed, args=(chief_worker, model))
        killer.start()
        state = train(2)
        killer.join()
        assert state.is_failed()
        with pytest.raises(TrainingClusterError) as error:
            state.result()
        assert re.fullmatch(
            rf"{model}: a worker of the training cluster \(127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+\) "
            r"stopped or cannot be reached \(.*\); run the flow again to resume after epoch \d",
            str(error.value),
        ), str(error.value)
        assert not (model / "wsiflow_model.json").exists()  # nothing looks finished
        assert _training_processes() == []  # none orphaned, none left waiting
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed one
        resumed = train(2).result()
        assert resumed["resumed_at_epoch"] >= 1 and resumed["epochs_run"] == 6
        assert [p for p in worker_tmp.iterdir() if p.name.startswith("wsiflow")] == []


def _training_processes() -> list:
    import psutil

    return [
        p for p in psutil.process_iter(["cmdline"])
        if "flows.train_workers" in (p.info["cmdline"] or [])
    ]  # fmt: skip


def _kill_when_committed(pid: int, model: Path) -> None:
    """SIGKILL process ``pid`` once the chief has committed an epoch to ``model``."""
    deadline = time.monotonic() + 300
    while not (model / "checkpoints" / "state.json").is_file():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_tile_and_train_flows_on_an_object_store(
    prefect_api, s3_env, small_cohort, cohort_annotations, tmp_path
):
    """A store URL through the flows: Dask workers write to the bucket, caching holds."""
    from flows.runtime import run_flow

    url = f"s3://{S3_BUCKET}/flow.zarr"
    slides = [str(small_cohort.root / r.image) for r in small_cohort.slides]
    config = write_config(
        tmp_path / "c.yaml",
        "tiling:\n  target_mpp: 0.243\n  patch_px: 64\n"
        "training:\n  backbone: small_cnn\n  head_epochs: 1\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 4\n  batch_per_replica: 16\n  validation_max_patches: 256\n",
    )
    tile = {"slides": slides, "store": url, "annotations": str(cohort_annotations),
            "config": config, "settings": {"orchestration.workers": 1}}  # fmt: skip
    summary = run_flow("tile", tile)
    assert summary["store"] == url and summary["done"] == len(slides) and not summary["failures"]
    root = zarr.open_group(url, mode="r")
    assert all(root[Path(s).stem].attrs["complete"] is True for s in slides)
    assert summary["store_bytes"] > 0
    again = run_flow("tile", tile)
    assert (again["done"], again["skipped"]) == (0, len(slides))

    train = {"stores": [url], "model_dir": str(tmp_path / "m"), "config": config}
    trained = run_flow("train", train)
    assert trained["backbone"] == "small_cnn" and (tmp_path / "m" / "model.keras").is_file()
    again = run_flow("train", train, return_state=True)
    assert list(task_states(again.state_details.flow_run_id).values()) == ["Cached"]


def test_infer_and_evaluate_flows_match_the_drivers(
    prefect_api, small_cohort, cohort_annotations, trained_model, tmp_path
):
    from flows.runtime import run_flow
    from pipeline.cluster import dask_client
    from pipeline.config import EvaluationConfig
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.inference.driver import infer_slides
    from pipeline.inference.results import read_heatmap, read_scores

    testing = small_cohort.root / "testing"
    images = tmp_path / "images"
    images.mkdir()
    for tif in (testing / "images").glob("*.tif"):
        (images / tif.name).symlink_to(tif)
    (images / "broken.tif").write_bytes(b"not a slide")
    out = tmp_path / "flow-out"
    parameters = {"model_dir": str(trained_model), "slides": [str(images)], "out_dir": str(out)}
    state = run_flow("infer", parameters, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    ids = sorted(p.stem for p in (testing / "images").glob("*.tif"))
    assert [f["slide"] for f in summary["failures"]] == ["broken"]
    assert summary["done"] == len(ids)
    assert sorted(read_scores(out / "scores.csv")) == ids

    # The CLI's driver on the same slides gives the same heatmaps and scores.
    driver_out = tmp_path / "driver-out"
    with dask_client(workers=1) as client:
        infer_slides(
            client, trained_model, sorted(images.glob("test_*.tif")), driver_out, InferenceConfig()
        )
    for slide_id in ids:
        flow_map, _ = read_heatmap(out / "heatmaps" / f"{slide_id}.zarr")
        driver_map, _ = read_heatmap(driver_out / "heatmaps" / f"{slide_id}.zarr")
        np.testing.assert_allclose(flow_map, driver_map, atol=1e-6)
    assert read_scores(out / "scores.csv") == pytest.approx(read_scores(driver_out / "scores.csv"))

    again = run_flow("infer", parameters, return_state=True).result()
    assert (again["done"], again["skipped"]) == (0, len(ids))
    assert again["failures"] == summary["failures"] and again["scores"] == summary["scores"]

    evaluation = run_flow(
        "evaluate",
        {
            "results_dir": str(out),
            "reference": str(testing / "reference.csv"),
            "annotations_dir": str(testing / "lesion_annotations"),
            "slides_dir": str(testing / "images"),
        },
        return_state=True,
    )
    assert evaluation.is_completed(), evaluation.message
    direct = evaluate(
        out,
        testing / "reference.csv",
        testing / "lesion_annotations",
        testing / "images",
        EvaluationConfig(),
        out_dir=tmp_path / "direct",
    ).report
    report = evaluation.result()
    assert report["slide_auc"] == direct["slide_auc"] and report["froc"] == direct["froc"]
    assert (out / "roc.png").is_file() and (out / "evaluation.json").is_file()
    assert "slide AUC" in artifact("evaluate-summary").data


def test_slide_classifier_flow_fits_on_out_of_fold_heatmaps(
    prefect_api, patch_store, small_cohort, trained_model, tmp_path
):
    """folds: 2, hard negatives mined. Each fold's slides are inferred by a model trained
    without them, by the same recipe: trained, mined, trained again."""
    from flows.slide_classifier import slide_classifier_flow
    from pipeline.inference.results import read_heatmap
    from pipeline.inference.slide_classifier import assign_folds

    # 8 slides, 4 with tumor: the cohort's 4, and each again under another name.
    store, images = tmp_path / "patches.zarr", tmp_path / "slides"
    shutil.copytree(patch_store, store)
    images.mkdir()
    slides = []
    for record in small_cohort.slides:
        for slide_id in (record.slide_id, f"{record.slide_id}_b"):
            if slide_id != record.slide_id:
                shutil.copytree(store / record.slide_id, store / slide_id)
            (images / f"{slide_id}.tif").symlink_to(small_cohort.root / record.image)
            path = str(images / f"{slide_id}.tif")
            slides.append({"slide_id": slide_id, "path": path, "tumor": record.label == "Tumor"})
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    config = write_config(
        tmp_path / "c.yaml",
        "training:\n  backbone: small_cnn\n  head_epochs: 1\n  fine_tune_epochs: 0\n"
        "  steps_per_epoch: 4\n  batch_per_replica: 16\n  validation_max_patches: 256\n"
        "mining:\n  enabled: true\n  threshold: 0.3\n"
        "slide_classifier:\n  folds: 2\n  trees: 20\n",
    )
    arguments = (str(store), str(model), slides, str(tmp_path / "work"), config)
    state = slide_classifier_flow(*arguments, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["folds"], summary["slides"], summary["tumor"]) == (2, 8, 4)
    assert summary["in_sample"] == 0 and summary["reused"] is False
    labels = {s["slide_id"]: s["tumor"] for s in slides}
    for k, held_out in enumerate(assign_folds(labels, 2, 0)):
        fold = tmp_path / "work" / f"fold{k}"
        for name in ("model", "model_hnm"):
            metadata = json.loads((fold / name / "wsiflow_model.json").read_text())
            splits = metadata["slides"]
            seen = {s["slide_id"] for part in ("train", "validation") for s in splits[part]}
            assert seen == set(labels) - set(held_out)
        assert metadata["hard_negatives"]["share"] == 0.3  # model_hnm's, mined by model
        mined_by = {m["model_dir"] for m in metadata["hard_negatives"]["mining"].values()}
        assert mined_by == {str((fold / "model").resolve())}
        for slide_id in held_out:
            _, attrs = read_heatmap(fold / "inference" / "heatmaps" / f"{slide_id}.zarr")
            assert attrs["model_dir"] == str((fold / "model_hnm").resolve())
    record = json.loads((model / "slide_classifier.json").read_text())
    assert sorted(s["slide_id"] for s in record["slides"]) == sorted(labels)
    assert summary["maximum_auc"] == record["maximum_auc"] is not None  # what it must beat

    written = {
        p: p.stat().st_mtime_ns
        for p in (tmp_path / "work").rglob("*")
        if p.is_file() and (p.name == "model.keras" or "heatmaps" in p.parts)
    }
    written |= {
        p: p.stat().st_mtime_ns
        for p in store.rglob("*")
        if p.is_file() and "hard_negatives" in p.parts
    }
    again = slide_classifier_flow(*arguments, return_state=True)
    assert again.result()["reused"] is True  # and nothing was trained or inferred again:
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_infer_flow_fails_naming_a_missing_model(prefect_api, small_cohort, tmp_path):
    from flows.runtime import run_flow

    state = run_flow(
        "infer",
        {
            "model_dir": str(tmp_path / "no-model"),
            "slides": [str(small_cohort.root / "testing" / "images")],
            "out_dir": str(tmp_path / "out"),
        },
        return_state=True,
    )
    assert state.is_failed()
    assert str(tmp_path / "no-model") in state.message


@pytest.mark.shared_data
def test_mnist_flow_on_the_real_test_split(prefect_api, tmp_path):
    from flows.runtime import run_flow

    data = SHARED_DATA / "mnist"
    if not data.is_dir():
        pytest.skip(f"MNIST not present: {data} (../shared/data is beside CI's clone only)")
    parameters = {"data_dir": str(data), "epochs": 1, "model_path": str(tmp_path / "mnist.keras")}
    summary = run_flow("mnist", parameters)
    assert summary["train_samples"] == 8000 and summary["held_out_samples"] == 2000
    assert summary["held_out_accuracy"] > 0.85
    assert (tmp_path / "mnist.keras").is_file()
    again = run_flow("mnist", parameters, return_state=True)
    assert list(task_states(again.state_details.flow_run_id).values()) == ["Cached"]
