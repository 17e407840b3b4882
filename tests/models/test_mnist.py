"""MNIST loading from real and generated files, and the CNN reaching 97% on the real digits."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.mnist import holdout_split, load_mnist, read_idx
from pipeline.errors import DatasetError
from tests.conftest import SHARED_DATA

MNIST_DIR = SHARED_DATA / "mnist"


def _idx(images: np.ndarray) -> bytes:
    magic = (2051 if images.ndim == 3 else 2049).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    return magic + dims + images.astype(np.uint8).tobytes()


def test_reads_gzipped_and_raw_idx_files(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = np.arange(5, dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(y))  # raw, not gzipped
    data = load_mnist(tmp_path, download=False)
    assert data.train is None
    np.testing.assert_array_equal(data.test[0], x)
    np.testing.assert_array_equal(data.test[1], y)


def test_reads_mnist_npz(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "y_train": np.arange(6, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": np.arange(3, dtype=np.uint8),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    data = load_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(data.train[0], arrays["x_train"])
    np.testing.assert_array_equal(data.test[1], arrays["y_test"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x00\x00\x08\x01\x00\x00\x00\x01\x05",
            "Expected IDX magic number 2051. Got 2049 instead.",
        ),
        (
            b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02\x00",
            "Expected 8 bytes of data",
        ),
        (b"\x00\x00", "Expected an IDX file. Got 2 bytes instead."),
    ],
)
def test_bad_idx_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path, 2051)
    assert str(info.value).startswith(str(path))


def test_missing_files_offline_say_what_to_put_where(tmp_path):
    with pytest.raises(
        DatasetError, match=r"Expected mnist.npz or the IDX files \(train-images-idx3-ubyte.gz"
    ):
        load_mnist(tmp_path, download=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte\\(.gz\\) is missing"):
        load_mnist(tmp_path, download=False)


def test_holdout_split_is_fixed_and_disjoint():
    x = np.arange(100)
    (a, _), (b, _) = holdout_split(x, x, n_train=80, n_holdout=20, seed=0)
    (a2, _), _ = holdout_split(x, x, n_train=80, n_holdout=20, seed=0)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 100
    np.testing.assert_array_equal(a, a2)


@pytest.mark.slow
def test_cnn_reaches_97_percent_on_real_mnist(tmp_path):
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"real MNIST not present: {MNIST_DIR} (../shared/data is beside CI's clone only)"
        )
    wsiflow = str(Path(sys.executable).parent / "wsiflow")
    model = tmp_path / "mnist.keras"
    result = subprocess.run(
        [
            wsiflow,
            "mnist",
            "--data",
            str(MNIST_DIR),
            "--out",
            str(model),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["train_samples"], summary["held_out_samples"], summary["epochs"]) == (
        8000,
        2000,
        6,
    )
    assert summary["held_out_accuracy"] >= 0.97, summary
    assert model.is_file()
    assert "oneDNN" not in result.stderr  # TensorFlow's C++ log noise is silenced by default
