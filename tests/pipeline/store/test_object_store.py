"""Patch stores on object storage: a real S3 API (moto's server on 127.0.0.1) through s3fs.

The commands run as users run them, with the endpoint and credentials in the
standard AWS_* variables that s3fs (and Dask workers started from the
command) read.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from models.saved import METADATA_FILE
from tests.conftest import S3_BUCKET as BUCKET
from tests.conftest import free_port, last_json, run


def _s3():
    import s3fs

    return s3fs.S3FileSystem()


def _tile_args(small_cohort, annotations, out: str) -> list[str]:
    slides = [str(small_cohort.root / r.image) for r in small_cohort.slides]
    return ["tile", *slides, "--annotations", str(annotations), "--out", out,
            "--mpp", "0.243", "--patch-size", "64", "--workers", "1", "--json"]  # fmt: skip


@pytest.mark.slow
def test_tile_train_preview_on_s3(s3_env, small_cohort, cohort_annotations, patch_store, tmp_path):
    url = f"s3://{BUCKET}/cohort.zarr"
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(2048))
    work = tmp_path / "cwd"
    work.mkdir()

    first = run(*_tile_args(small_cohort, cohort_annotations, url), str(corrupt), cwd=work,
                env=s3_env)  # fmt: skip
    # The corrupt slide is named and fails alone; the others are stored in the bucket.
    assert first.returncode == 1, first.stderr
    summary = last_json(first)
    assert summary["store"] == url and summary["done"] == len(small_cohort.slides)
    assert [f["slide"] for f in summary["failures"]] == ["corrupt"]
    assert summary["store_bytes"] > 0
    assert list(work.iterdir()) == [], "a URL was taken for a local path"
    fs = _s3()
    assert fs.exists(f"{BUCKET}/cohort.zarr/zarr.json")

    # Byte for byte what the local driver wrote with the same settings (patch_store).
    remote, here = zarr.open_group(url, mode="r"), zarr.open_group(str(patch_store), mode="r")
    slide_ids = sorted(here.group_keys())
    assert sorted(k for k in remote.group_keys()) == slide_ids
    assert remote.attrs["slides"]["corrupt"]["status"] == "failed"
    for sid in slide_ids:
        assert remote[sid].attrs["complete"] is True
        for name in ("patches", "labels", "coords", "tumor_fraction", "tissue_fraction"):
            np.testing.assert_array_equal(remote[sid][name][:], here[sid][name][:], err_msg=name)

    # Resume: complete groups are skipped; a group left incomplete is redone.
    tumor_id = next(s for s in slide_ids if here[s].attrs["tumor_patches"] > 0)
    zarr.open_group(url, mode="r+")[tumor_id].attrs["complete"] = False
    again = run(*_tile_args(small_cohort, cohort_annotations, url), env=s3_env)
    assert again.returncode == 0, again.stderr
    status = {row["slide_id"]: row["status"] for row in last_json(again)["per_slide"]}
    assert status.pop(tumor_id) == "done" and set(status.values()) == {"skipped"}
    assert zarr.open_group(url, mode="r")[tumor_id].attrs["complete"] is True

    sheet = tmp_path / "sheet.png"
    preview = run("preview", url, "--out", str(sheet), "--json", env=s3_env)
    assert preview.returncode == 0, preview.stderr
    assert last_json(preview)["tumor"] > 0 and sheet.stat().st_size > 0

    model = tmp_path / "model"
    train = run("train", url, "--out", str(model), "--backbone", "small_cnn", "--epochs", "1",
                "--steps-per-epoch", "4", "--batch-size", "16", "--json", env=s3_env)  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (model / "model.keras").is_file()
    metadata = json.loads((model / METADATA_FILE).read_text())
    assert metadata["stores"] == [url]


def test_training_stream_reads_the_same_chunks_from_s3(s3_env, patch_store):
    """The stream's encoded-chunk path (decode only kept patches) works on an object store."""
    from models.data import open_stores
    from pipeline.store.patch_store import read_some

    fs = _s3()
    fs.put(str(patch_store), f"{BUCKET}/copy.zarr", recursive=True)
    remote = open_stores([f"s3://{BUCKET}/copy.zarr"])
    local = open_stores([patch_store])
    assert [s.slide_id for s in remote] == [s.slide_id for s in local]
    for r, h in zip(remote, local, strict=True):
        np.testing.assert_array_equal(r.labels, h.labels)
        n = min(len(r), r.chunk_patches)
        keep = np.flatnonzero(np.arange(n) % 3 == 0)
        np.testing.assert_array_equal(
            read_some(r.open_patches(), 0, n, keep), read_some(h.open_patches(), 0, n, keep)
        )


@pytest.mark.slow
def test_bad_store_locations_are_named(s3_env, small_cohort, tmp_path):
    slide = str(small_cohort.root / small_cohort.slides[0].image)
    no_bucket = run("tile", slide, "--out", "s3://no-such-bucket/x.zarr", env=s3_env)
    assert no_bucket.returncode == 1
    assert "s3://no-such-bucket/x.zarr: cannot create a patch store here" in no_bucket.stderr
    assert "bucket does not exist" in no_bucket.stderr

    unknown = run("tile", slide, "--out", "nosuch://bucket/x.zarr", env=s3_env)
    assert unknown.returncode == 1
    assert "nosuch://bucket/x.zarr: not a store location: Protocol not known" in unknown.stderr

    # An endpoint nobody listens on: one line, not a trail of asyncio tracebacks.
    closed = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
              "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    down = run("tile", slide, "--out", f"s3://{BUCKET}/x.zarr", env=closed)
    assert down.returncode == 1
    assert f"s3://{BUCKET}/x.zarr: cannot open (EndpointConnectionError" in down.stderr
    assert "Traceback" not in down.stderr and "Exception ignored" not in down.stderr

    absent = f"s3://{BUCKET}/absent.zarr"
    train = run("train", absent, "--out", str(tmp_path / "m"), env=s3_env)
    assert train.returncode == 1 and f"{absent}: not a Zarr patch store" in train.stderr
    assert not (tmp_path / "m").exists()
    preview = run("preview", absent, "--out", str(tmp_path / "s.png"), env=s3_env)
    assert preview.returncode == 2 and f"{absent}: not a Zarr patch store" in preview.stderr
