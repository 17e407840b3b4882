"""The per-patch image codec inside real Zarr arrays, read back by a plain Zarr process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline.store.codecs import PatchImageCodec, image_formats


def _patches(n: int = 10, px: int = 64) -> np.ndarray:
    ys, xs = np.mgrid[0:px, 0:px]
    base = np.stack([128 + 60 * np.sin(xs / 5), 128 + 60 * np.cos(ys / 7), 150 + 0 * xs], -1)
    return np.stack([np.roll(base, i * 3, axis=1) for i in range(n)]).astype(np.uint8)


def _write(path, patches: np.ndarray, codec: PatchImageCodec) -> None:
    """Patches into a real Zarr array with 4-patch chunks (10 patches: a partial last chunk)."""
    array = zarr.create_array(
        store=str(path),
        shape=patches.shape,
        chunks=(4, *patches.shape[1:]),
        dtype="uint8",
        serializer=codec,
        compressors=None,
    )
    array[:] = patches


@pytest.mark.parametrize("fmt", image_formats())
def test_round_trip_in_zarr(tmp_path, fmt):
    patches = _patches()
    _write(tmp_path / "a.zarr", patches, PatchImageCodec(format=fmt, quality=90))
    back = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:]
    assert back.shape == patches.shape
    assert np.abs(back.astype(int) - patches).mean() < 3


def test_plain_zarr_process_reads_the_store_through_the_entry_point(tmp_path):
    _write(tmp_path / "a.zarr", _patches(), PatchImageCodec())
    # No wsiflow import here: Zarr finds the codec through the installed entry point.
    code = "import sys, zarr; print(zarr.open_array(sys.argv[1], mode='r')[:].shape)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a.zarr")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "(10, 64, 64, 3)"


def test_bad_arguments():
    with pytest.raises(ValueError, match="Expected format in"):
        PatchImageCodec(format="gif")
    with pytest.raises(ValueError, match="Expected quality in 1..100"):
        PatchImageCodec(quality=0)
    with pytest.raises(ValueError, match=r"stores \(n, h, w, 3\) uint8 patches"):
        zarr.create_array(
            store={}, shape=(4, 8, 8), chunks=(2, 8, 8), dtype="uint8", serializer=PatchImageCodec()
        )
