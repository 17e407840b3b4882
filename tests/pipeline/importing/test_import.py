"""`wsiflow import`: PCam HDF5 files and class-per-folder images into real patch stores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.errors import DatasetError
from pipeline.importing.dataset import find_parts
from pipeline.importing.write import ImportSettings, import_parts
from pipeline.store.patch_store import open_root
from pipeline.store.preview import contact_sheet
from tests.conftest import WSIFLOW, last_json, run

h5py = pytest.importorskip("h5py")

#: Lossless, so that stored pixels can be compared exactly; 16 patches a chunk.
EXACT = ImportSettings("zstd", 90, 16)
STEM = "camelyonpatch_level_2_split"


def _write_pcam(folder: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """PCam's layout: dataset ``x`` (N, P, P, 3) uint8 and ``y`` (N, 1, 1, 1), gzip-chunked."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{STEM}_{split}_x.h5", "w") as handle:
        handle.create_dataset(
            "x", data=x, chunks=(min(32, max(len(x), 1)), *x.shape[1:]), compression="gzip"
        )
    with h5py.File(folder / f"{STEM}_{split}_y.h5", "w") as handle:
        handle.create_dataset("y", data=y, compression="gzip")


def _pcam(folder: Path, sizes=(("train", 1100), ("valid", 70), ("test", 50)), px: int = 96):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in sizes:
        x = rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8)
        y = rng.integers(0, 2, (n, 1, 1, 1), dtype=np.uint8)
        _write_pcam(folder, split, x, y)
        data[split] = (x, y)
    return data


def _import(source, store, settings=EXACT, **options):
    open_root(store)
    return import_parts(find_parts(source, **options), str(store), settings)


def test_pcam_splits_become_groups_with_the_exact_patches_and_labels(tmp_path):
    data = _pcam(tmp_path / "pcam")
    results = _import(tmp_path / "pcam", tmp_path / "s.zarr")
    assert [(r.group_id, r.split, r.status) for r in results] == [
        ("pcam_train", "training", "done"),
        ("pcam_valid", "validation", "done"),
        ("pcam_test", "test", "done"),
    ]
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for (split, (x, y)), result in zip(data.items(), results, strict=True):
        group = root[f"pcam_{split}"]
        # 1100 patches: two read-and-write blocks, the second partial.
        np.testing.assert_array_equal(group["patches"][:], x)
        np.testing.assert_array_equal(group["labels"][:], y.reshape(-1))
        assert result.patches == len(x) and result.tumor_patches == int(y.sum())
        assert np.isnan(group["tumor_fraction"][:]).all()  # a dataset records none
        assert (group["coords"][:] == -1).all()
        attrs = group.attrs
        assert attrs["complete"] is True and attrs["dataset"] == "pcam"
        assert attrs["patch_mpp"] == pytest.approx(0.972) and attrs["patch_px"] == 96
        assert attrs["source"] == str((tmp_path / "pcam" / f"{STEM}_{split}_x.h5").resolve())
    assert root.attrs["slides"]["pcam_valid"]["status"] == "done"


def test_a_rerun_skips_and_changed_or_interrupted_splits_are_redone(tmp_path):
    data = _pcam(tmp_path / "pcam", sizes=(("train", 40), ("valid", 30), ("test", 20)))
    store = tmp_path / "s.zarr"
    _import(tmp_path / "pcam", store)
    assert [r.status for r in _import(tmp_path / "pcam", store)] == ["skipped"] * 3
    # New labels for valid; the test group left as an interrupted import leaves it.
    x, y = data["valid"]
    _write_pcam(tmp_path / "pcam", "valid", x, 1 - y)
    zarr.open_group(str(store / "pcam_test"), mode="r+").update_attributes({"complete": False})
    results = _import(tmp_path / "pcam", store)
    assert [r.status for r in results] == ["skipped", "done", "done"]
    root = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(root["pcam_valid"]["labels"][:], 1 - y.reshape(-1))
    assert root["pcam_test"].attrs["complete"] is True


def test_bad_pcam_files_fail_one_line_each_and_the_other_splits_import(tmp_path):
    folder = tmp_path / "pcam"
    _pcam(folder, sizes=(("train", 40), ("valid", 30), ("test", 20)))
    (folder / f"{STEM}_test_y.h5").unlink()
    (folder / f"{STEM}_valid_x.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    results = _import(folder, tmp_path / "s.zarr")
    assert [r.status for r in results] == ["done", "failed", "failed"]
    assert results[1].reason.startswith(f"{folder / f'{STEM}_valid_x.h5'}: not a readable HDF5")
    assert (
        results[2].reason
        == f"{folder / f'{STEM}_test_y.h5'}: missing: the labels of {STEM}_test_x.h5"
    )
    assert all("\n" not in r.reason for r in results)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert sorted(root.group_keys()) == ["pcam_train"]  # nothing half-made for the failures


@pytest.mark.parametrize(
    ("x_shape", "labels", "message"),
    [
        ((10, 96, 96), [0] * 10, r"Expected x of shape \(N, P, P, 3\) uint8. Got \(10, 96, 96\)"),
        ((10, 96, 96, 3), [0] * 9, r"Expected y of shape \(10, 1, 1, 1\)"),
        ((10, 96, 96, 3), [0] * 9 + [2], r"Expected labels 0 or 1. Got 2 at patch 9"),
    ],
)
def test_malformed_pcam_files_are_named(tmp_path, x_shape, labels, message):
    folder = tmp_path / "pcam"
    y = np.array(labels, dtype=np.uint8).reshape(-1, 1, 1, 1)
    _write_pcam(folder, "train", np.zeros(x_shape, dtype=np.uint8), y)
    (result,) = _import(folder, tmp_path / "s.zarr")
    assert result.status == "failed"
    assert result.reason.startswith(str(folder / STEM))
    assert re.search(message, result.reason), result.reason


def test_gzipped_downloads_and_empty_folders_are_refused(tmp_path):
    folder = tmp_path / "pcam"
    folder.mkdir()
    (folder / f"{STEM}_train_x.h5.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError, match=r"gzip-compressed as downloaded; run `gunzip "):
        find_parts(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="Expected PCam files"):
        find_parts(tmp_path / "empty", dataset="pcam")
    with pytest.raises(DatasetError, match="no such folder"):
        find_parts(tmp_path / "absent")


def test_a_group_complete_from_another_source_is_not_replaced(tmp_path):
    _pcam(tmp_path / "a", sizes=(("train", 20),))
    _pcam(tmp_path / "b", sizes=(("train", 30),))
    store = tmp_path / "s.zarr"
    _import(tmp_path / "a", store)
    (result,) = _import(tmp_path / "b", store)
    assert result.status == "failed" and "already complete from" in result.reason
    assert zarr.open_group(str(store), mode="r")["pcam_train"].attrs["patches"] == 20
    (other,) = _import(tmp_path / "b", store, name="pcam_b")
    assert (other.group_id, other.status, other.patches) == ("pcam_b_train", "done", 30)


def _image(path: Path, pixels: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def _folders(root: Path, classes=("normal", "tumor"), per_class: int = 20, px: int = 32):
    """Class folders of PNG images, each with its index written into its pixels."""
    rng = np.random.default_rng(1)
    written = {}
    for label, cls in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (px, px, 3), dtype=np.uint8)
            path = root / cls / f"{cls}_{i:03d}.png"
            _image(path, pixels)
            written[path] = (pixels, label)
    return written


def test_class_folders_are_split_here_per_class_and_read_exactly(tmp_path):
    written = _folders(tmp_path / "patches")
    # Left out, one line each: not an image, another size. Kept: grey and RGBA images.
    (tmp_path / "patches" / "tumor" / "notes.png").write_text("not an image")
    _image(tmp_path / "patches" / "normal" / "big.png", np.zeros((40, 40, 3), np.uint8))
    grey = tmp_path / "patches" / "tumor" / "sub" / "grey.png"
    _image(grey, np.full((32, 32, 3), 77, np.uint8), mode="L")
    (tmp_path / "patches" / "tumor" / "readme.txt").write_text("ignored: not an image suffix")
    results = _import(tmp_path / "patches", tmp_path / "s.zarr", validation_fraction=0.25)
    assert [(r.group_id, r.split) for r in results] == [
        ("patches_train", "training"),
        ("patches_valid", "validation"),
    ]
    warnings = [w for r in results for w in r.warnings]
    assert sorted(w.split(": left out: ")[0] for w in warnings) == sorted(
        [
            str(tmp_path / "patches" / "normal" / "big.png"),
            str(tmp_path / "patches" / "tumor" / "notes.png"),
        ]
    )
    assert any("40x40 px, not the 32x32 px" in w for w in warnings)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    train, valid = root["patches_train"], root["patches_valid"]
    # A quarter of each class's files validate: 6 of 22 tumor, 5 of 21 normal.
    parts = find_parts(tmp_path / "patches", validation_fraction=0.25)
    assert [(len(p.files), int(p.labels.sum())) for p in parts] == [(32, 16), (11, 6)]
    bad = {Path(w.split(": left out: ")[0]) for w in warnings}
    for part, group in zip(parts, (train, valid), strict=True):
        kept = [label for f, label in zip(part.files, part.labels, strict=True) if f not in bad]
        assert group.attrs["patches"] == len(kept) and group["labels"][:].tolist() == kept
        assert group["patches"].shape == (len(kept), 32, 32, 3)  # ends at the last image stored
    assert train.attrs["classes"] == {"tumor": "tumor", "normal": "normal"}
    # Every stored patch is one image, exactly, with its class's label; none twice.
    expected = {pixels.tobytes(): label for pixels, label in written.values()}
    expected[np.full((32, 32, 3), 77, np.uint8).tobytes()] = 1
    seen = set()
    for group in (train, valid):
        for patch, label in zip(group["patches"][:], group["labels"][:], strict=True):
            assert expected[patch.tobytes()] == label
            seen.add(patch.tobytes())
    assert seen == set(expected)
    # Classes mixed within the first chunk (a seeded random order), and the same split again.
    assert 0 < train["labels"][:16].sum() < 16
    again = _import(tmp_path / "patches", tmp_path / "s.zarr", validation_fraction=0.25)
    assert [r.status for r in again] == ["skipped", "skipped"]
    # A contact sheet of an imported store (no coordinates: captions give the index).
    shown = contact_sheet(tmp_path / "s.zarr", tmp_path / "sheet.png", per_class=3)
    assert (shown["tumor"], shown["normal"], shown["slides"]) == (3, 3, 2)


def test_split_folders_are_kept_and_the_tumor_class_is_told_or_named(tmp_path):
    for split, n in (("train", 6), ("valid", 3), ("test", 2)):
        _folders(tmp_path / "ds" / split, classes=("0", "1"), per_class=n)
    results = _import(tmp_path / "ds", tmp_path / "s.zarr")
    assert [(r.group_id, r.split, r.patches, r.tumor_patches) for r in results] == [
        ("ds_train", "training", 12, 6),
        ("ds_valid", "validation", 6, 3),
        ("ds_test", "test", 4, 2),
    ]
    _folders(tmp_path / "ab", classes=("benign", "malignant"), per_class=3)
    with pytest.raises(
        DatasetError,
        match=r"cannot tell which of the classes \['benign', 'malignant'\] is tumor; name it with --tumor-class",
    ):
        find_parts(tmp_path / "ab")
    parts = find_parts(tmp_path / "ab", tumor_class="malignant")
    assert sum(int(p.labels.sum()) for p in parts) == 3
    with pytest.raises(DatasetError, match=r"Expected --tumor-class to be one of"):
        find_parts(tmp_path / "ab", tumor_class="tumor")
    _folders(tmp_path / "three", classes=("a", "b", "tumor"), per_class=2)
    with pytest.raises(
        DatasetError, match=r"Expected two class folders .* Got \['a', 'b', 'tumor'\]"
    ):
        find_parts(tmp_path / "three")


def test_cli_imports_reports_and_refuses_what_it_must(tmp_path):
    _pcam(tmp_path / "pcam", sizes=(("train", 40), ("valid", 20)))
    store = tmp_path / "s.zarr"
    result = run("import", str(tmp_path / "pcam"), "--out", str(store), "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert (summary["patches"], summary["patch_px"], summary["failures"]) == (60, 96, [])
    assert [s["status"] for s in summary["per_split"]] == ["done", "done"]
    # A bad image is one warning line naming it; the import goes on.
    written = _folders(tmp_path / "folders", per_class=4)
    bad = next(iter(written))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run("import", str(tmp_path / "folders"), "--out", str(store), "--mpp", "0.5")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {bad}: left out: cannot read")
    assert zarr.open_group(str(store), mode="r")["folders_train"].attrs["patch_mpp"] == 0.5
    # Usage errors: one line, exit 2, nothing written.
    for args, message in (
        ([str(tmp_path / "absent")], "no such folder"),
        ([str(tmp_path / "folders"), "--format", "tar"], "Expected pcam or folders"),
        ([str(tmp_path / "folders"), "--tumor-class", "x"], "Expected --tumor-class"),
    ):
        result = run("import", *args, "--out", str(tmp_path / "new.zarr"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "new.zarr").exists()
    # A folder of the user's files is never written into.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = run("import", str(tmp_path / "pcam"), "--out", str(mine))
    assert result.returncode == 2 and os.listdir(mine) == ["notes.txt"], result.stderr


@pytest.mark.slow
def test_training_keeps_the_given_splits_and_scores_the_test_split(patch_store, tmp_path):
    """Real tissue patches in PCam's layout: train on train, validate on valid, score test."""
    pytest.importorskip("keras")
    from models.train import train_classifier
    from pipeline.config import TrainingConfig

    source = zarr.open_group(str(patch_store), mode="r")
    patches, labels = [], []
    for slide_id in sorted(source.group_keys()):
        patches.append(source[slide_id]["patches"][:])
        labels.append(source[slide_id]["labels"][:])
    x, y = np.concatenate(patches), np.concatenate(labels)
    rng = np.random.default_rng(0)
    tumor = np.flatnonzero(y == 1)
    normal = rng.choice(np.flatnonzero(y == 0), size=len(tumor), replace=False)
    order = rng.permutation(np.concatenate([tumor, normal]))
    n = len(order)
    cuts = {
        "train": order[: n * 3 // 5],
        "valid": order[n * 3 // 5 : n * 4 // 5],
        "test": order[n * 4 // 5 :],
    }
    for split, index in cuts.items():
        _write_pcam(tmp_path / "pcam", split, x[index], y[index].reshape(-1, 1, 1, 1))
    store = tmp_path / "pcam.zarr"
    _import(tmp_path / "pcam", store, settings=ImportSettings("jpeg", 90, 64))
    cfg = TrainingConfig(
        backbone="small_cnn", head_epochs=2, fine_tune_epochs=0, batch_per_replica=32,
        steps_per_epoch=30,  # enough that the 0.9 bar holds however the threads interleave
    )  # fmt: skip
    result = train_classifier([store], tmp_path / "model", cfg)
    meta = result.metadata
    assert [s["slide_id"] for s in meta["slides"]["train"]] == ["pcam_train"]
    assert [s["slide_id"] for s in meta["slides"]["validation"]] == ["pcam_valid"]
    assert meta["slides"]["test"] == [
        {"store": str(store), "slide_id": "pcam_test", "patches": len(cuts["test"]),
         "tumor": int(y[cuts["test"]].sum())}
    ]  # fmt: skip
    metrics = meta["metrics"]
    assert metrics["test_auc"] >= 0.9, metrics
    assert metrics["test_loss"] > 0 and 0.5 < metrics["test_accuracy"] <= 1
    assert meta["patch_mpp"] == pytest.approx(0.972)
    summary = result.summary()
    assert summary["test_slides"] == ["pcam_test"] and summary["test_auc"] == metrics["test_auc"]
    assert json.loads((tmp_path / "model" / "wsiflow_model.json").read_text())["metrics"] == metrics


def test_an_interrupted_import_is_one_line_and_resumes(tmp_path):
    """Ctrl-C while a split is written: exit 130, one line, the split redone on the rerun."""
    folder = tmp_path / "pcam"
    _pcam(folder, sizes=(("valid", 20),))
    # A train split large enough to be stopped while written: smooth, so the file stays small.
    n, block = 12_000, 2_000
    ramp = np.linspace(0, 200, 96, dtype=np.uint8)[None, :, None, None] * np.ones(
        (block, 96, 96, 3), dtype=np.uint8
    )
    with h5py.File(folder / f"{STEM}_train_x.h5", "w") as handle:
        x = handle.create_dataset(
            "x", (n, 96, 96, 3), np.uint8, chunks=(32, 96, 96, 3), compression="gzip"
        )
        for start in range(0, n, block):
            x[start : start + block] = (
                ramp + np.arange(block, dtype=np.uint8)[:, None, None, None] % 50
            )
    with h5py.File(folder / f"{STEM}_train_y.h5", "w") as handle:
        handle.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(-1, 1, 1, 1))
    store = tmp_path / "s.zarr"
    args = ["import", str(folder), "--out", str(store)]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [WSIFLOW, *args], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and len(list((store / "pcam_train" / "patches").glob("c.*"))) < 20
        ):
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
        returned = process.wait(timeout=60)
    lines = stderr.read_text().splitlines()
    assert returned == 130, "\n".join(lines)
    assert lines[-1].startswith("interrupted: 0 of 2 splits finished"), "\n".join(lines)
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines)
    assert zarr.open_group(str(store / "pcam_train"), mode="r").attrs["complete"] is False
    rerun = run(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert [s["status"] for s in last_json(rerun)["per_split"]] == ["done", "done"]
    train = zarr.open_group(str(store / "pcam_train"), mode="r")
    assert train.attrs["complete"] is True and train["labels"].shape == (n,)
