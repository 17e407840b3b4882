"""Shared fixtures: small real slides generated with the project's own writer."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect servers started by tests (and their subprocesses) must not phone home: offline here.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
APERIO_SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
#: The organisers' CAMELYON16 evaluation script (a Python 3 port), the FROC's reference.
OFFICIAL_FROC = REPO_ROOT.parent / "shared" / "reference" / "camelyon16" / "Evaluation_FROC_py3.py"
WSIFLOW = str(Path(sys.executable).parent / "wsiflow")
#: The bucket of the ``s3_env`` fixture's server.
S3_BUCKET = "wsiflow-test"


def run(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (``env``: extra environment variables)."""
    return subprocess.run(
        [WSIFLOW, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def write_official_mask(path: Path, tumor_level5, *, mpp: float | None = None) -> None:
    """A CAMELYON16-style ``*_Mask.tif``: 255 on tumor, 6 pyramid levels (deflate tiles).

    ``tumor_level5`` is the bool mask at level 5 (downsample 32); ``mpp`` the
    level-0 µm/px recorded in the resolution tags (None: none).
    """
    import numpy as np
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for level in range(6):
            factor = 2 ** (5 - level)
            plane = np.repeat(np.repeat(tumor_level5, factor, 0), factor, 1).astype(np.uint8) * 255
            resolution = None if mpp is None else (1e4 / (mpp * 2**level),) * 2
            tif.write(
                np.stack([plane] * 3, axis=-1), tile=(16, 16), photometric="rgb",
                compression="zlib", subfiletype=0 if level == 0 else 1, metadata=None,
                resolution=resolution, resolutionunit="CENTIMETER" if resolution else "NONE",
            )  # fmt: skip


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON summary a command prints as its last stdout line with --json."""
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def aperio_slide() -> Path:
    """The real Aperio slide from ../shared/data (skips where this checkout has none)."""
    if not APERIO_SLIDE.is_file():
        pytest.skip(
            f"real slide not present: {APERIO_SLIDE} (../shared/data is beside CI's clone only)"
        )
    return APERIO_SLIDE


@contextlib.contextmanager
def shared_folder(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder every pytest-xdist worker of this run shares, held under a lock while in use.

    The session fixtures build their output there with wsiflow's own
    builders, which reuse what is complete (a cohort's ``synth.json``, a
    store group's fingerprint, a finished model): the first worker builds,
    the others wait and reuse, instead of each building its own.
    """
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield root / name


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A 4-slide CAMELYON16-format cohort of 3072 x 2560 px slides (generated once)."""
    from pipeline.config import SyntheticConfig
    from pipeline.synth.cohort import write_cohort

    params = SyntheticConfig(slides=4, seed=7, width_px=3072, height_px=2560)
    with shared_folder(tmp_path_factory, "cohort") as root:
        return write_cohort(root, params, workers=2)


@pytest.fixture(scope="session")
def cohort_annotations(small_cohort, tmp_path_factory) -> Path:
    """Every lesion annotation of ``small_cohort`` in one folder (training and testing)."""
    with shared_folder(tmp_path_factory, "annotations") as annotations:
        annotations.mkdir(exist_ok=True)
        for xml in small_cohort.root.glob("*/lesion_annotations/*.xml"):
            if not (annotations / xml.name).is_file():
                shutil.copy(xml, annotations)
    return annotations


@pytest.fixture(scope="session")
def patch_store(small_cohort, cohort_annotations, tmp_path_factory) -> Path:
    """Every slide of the 4-slide cohort (2 with tumor) tiled at level 0 into 64 px patches."""
    from pipeline.cluster import dask_client
    from pipeline.config import TilingConfig
    from pipeline.tiling.driver import tile_slides

    slides = [small_cohort.root / r.image for r in small_cohort.slides]
    with shared_folder(tmp_path_factory, "train-store") as folder:
        out = folder / "patches.zarr"
        with dask_client(workers=1) as client:
            results = tile_slides(
                client,
                slides,
                out,
                TilingConfig(target_mpp=0.243, patch_px=64),
                annotations_dir=cohort_annotations,
            )
    assert all(r.status in ("done", "skipped") for r in results), results
    assert sum(r.tumor_patches > 0 for r in results) == 2
    return out


@pytest.fixture(scope="session")
def trained_model(patch_store, tmp_path_factory) -> Path:
    """A small CNN trained on ``patch_store`` (val AUC checked), for inference tests."""
    from models.train import train_classifier
    from pipeline.config import TrainingConfig

    cfg = TrainingConfig(
        backbone="small_cnn",
        head_epochs=4,
        fine_tune_epochs=0,
        batch_per_replica=32,
        validation_max_patches=512,
    )
    with shared_folder(tmp_path_factory, "trained") as folder:
        out = folder / "model"
        result = train_classifier([patch_store], out, cfg)
    metrics = result.metadata["metrics"]
    # Accuracy too: heatmaps need calibrated probabilities, not only a good ranking.
    assert metrics["val_auc"] >= 0.95 and metrics["val_accuracy"] >= 0.9, result.metadata["history"]
    return out


def wait_for(check, timeout: float, what: str, logs: list[Path], interval: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail with the logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables that reach it."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert server, "moto_server is missing: `make test` installs it (the dev extra)"
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    env = {
        "AWS_ACCESS_KEY_ID": "wsiflow",
        "AWS_SECRET_ACCESS_KEY": "wsiflow-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"moto did not start:\n{log.read_text()}"
                time.sleep(0.3)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(S3_BUCKET)
            yield env
            # Close the clients this process opened (zarr's are asynchronous and have no
            # finalizer): aiohttp would warn of unclosed sessions when the suite ends.
            from zarr.core.sync import sync

            for fs in list(s3fs.S3FileSystem._cache.values()):
                if fs._s3 is None:
                    continue
                if fs.asynchronous:  # zarr's, on zarr's event loop
                    sync(fs._s3.__aexit__(None, None, None))
                else:
                    s3fs.S3FileSystem.close_session(fs.loop, fs._s3)
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        process.terminate()
        process.wait(timeout=30)
