"""A full disk and an unwritable output folder: one line, exit 1, nothing half-written left.

A small tmpfs stands in for a full disk (mounting needs root, as CI runs;
elsewhere these tests skip), a read-only one for a folder the user cannot
write to.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import last_json, run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root, as CI has"
)


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system, remountable larger (``remount(size)``)."""
    where = tmp_path / "disk"
    _mount(where, "size=1m")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    yield where, remount
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only(tmp_path):
    where = tmp_path / "ro"
    _mount(where, "ro,size=1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _one_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Compute Failed" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial" in p.name or ".tmp" in p.name]


def test_tile_on_a_full_disk_is_one_line_then_resumes(small_cohort, small_disk):
    disk, remount = small_disk
    slides = [str(small_cohort.root / r.image) for r in small_cohort.slides[:2]]
    store = disk / "s.zarr"
    args = ("tile", *slides, "--out", str(store), "--level", "0", "--patch-size", "128")
    result = run(*args, "-w", "1", "--json")
    assert result.returncode == 1, result.stderr
    _one_line(result, "No space left on device", str(store))
    assert last_json(result)["ok"] is False
    assert _leftovers(disk) == []
    import zarr

    root = zarr.open_group(str(store), mode="r")
    complete = {name for name in root.group_keys() if root[name].attrs.get("complete")}
    assert len(complete) < 2  # the slide the disk ran out under is not marked complete
    for name in complete:  # a slide finished before that is whole
        assert root[name]["patches"][:].shape[0] == root[name].attrs["patches"]
    remount("64m")
    again = run(*args, "-w", "1", "--json")
    assert again.returncode == 0, again.stderr
    summary = last_json(again)
    assert (summary["done"], summary["skipped"]) == (2 - len(complete), len(complete))


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_leaves_no_temporary_model(patch_store, small_disk):
    disk, _ = small_disk
    out = disk / "model"
    result = run(
        "train",
        str(patch_store),
        "--out",
        str(out),
        "--backbone",
        "small_cnn",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
    )
    assert result.returncode == 1, result.stderr
    _one_line(result, "No space left on device", str(out))
    assert _leftovers(disk) == []
    assert not (out / "wsiflow_model.json").exists()


@pytest.mark.parametrize("command", ["tile", "infer", "train", "synth"])
def test_an_unwritable_output_folder_is_one_line(
    command, read_only, small_cohort, patch_store, trained_model
):
    slide = str(small_cohort.root / small_cohort.slides[0].image)
    out = read_only / "out"
    args = {
        "tile": ["tile", slide, "--out", str(out), "-w", "1"],
        "infer": ["infer", str(trained_model), slide, "--out", str(out)],
        "train": ["train", str(patch_store), "--out", str(out), "--epochs", "1"],
        "synth": ["synth", str(out), "--slides", "4", "--size", "1024x1024"],
    }[command]
    result = run(*args)
    assert result.returncode == 1, result.stderr
    _one_line(result, "Read-only file system", str(out))
