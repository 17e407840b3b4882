"""Output folders: wsiflow never adopts, overwrites or deletes what it did not write.

Each test reproduces a way a user's files were lost or a result silently
replaced, and checks the one line wsiflow now prints instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ForeignOutputError, OutputLockedError
from pipeline.outputs import LOCK, MARKER, OutputLock, claim_folder
from tests.conftest import last_json, run


@pytest.fixture(scope="module")
def one_slide(small_cohort, tmp_path_factory) -> Path:
    """One small generated slide in a folder of its own, named tumor_001.tif."""
    record = next(r for r in small_cohort.slides if r.slide_id.startswith("tumor"))
    folder = tmp_path_factory.mktemp("one")
    return Path(shutil.copy(small_cohort.root / record.image, folder / "tumor_001.tif"))


TILE = ("--mpp", "0.972", "--patch-size", "64", "-w", "1")


def _one_error_line(result: subprocess.CompletedProcess, *names: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_tile_never_adopts_a_folder_of_the_users(one_slide, tmp_path):
    """The issue's repro: a folder of PNGs with a subfolder named like the slide."""
    pngs = tmp_path / "pngs"
    (pngs / "tumor_001").mkdir(parents=True)
    (pngs / "tumor_001" / "p1.png").write_bytes(b"mine")
    result = run("tile", str(one_slide), "--out", str(pngs), *TILE)
    assert result.returncode == 2, result.stderr
    _one_error_line(result, str(pngs), "not written by wsiflow")
    assert (pngs / "tumor_001" / "p1.png").read_bytes() == b"mine"
    assert sorted(p.name for p in pngs.iterdir()) == ["tumor_001"]


def test_tile_never_adopts_a_zarr_group_it_did_not_write(one_slide, tmp_path):
    import zarr

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_group("tumor_001")
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    result = run("tile", str(one_slide), "--out", str(other), *TILE)
    assert result.returncode == 2
    _one_error_line(result, "no wsiflow_store attribute")
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before


@pytest.mark.parametrize("command", ["infer", "train", "synth", "evaluate", "demo"])
def test_every_command_refuses_a_folder_it_did_not_make(
    command, tmp_path, trained_model, patch_store, one_slide
):
    """The same rule for every output folder, with inputs that would otherwise run."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    args = {
        "infer": ["infer", str(trained_model), str(one_slide), "--out", str(mine)],
        "train": ["train", str(patch_store), "--out", str(mine), "--epochs", "1"],
        "synth": ["synth", str(mine), "--slides", "4", "--size", "1024x1024"],
        "evaluate": [
            "evaluate",
            str(tmp_path),
            "--reference",
            str(mine / "notes.txt"),
            "--annotations",
            str(tmp_path),
            "--slides",
            str(tmp_path),
            "--out",
            str(mine),
        ],
        "demo": ["demo", "--out", str(mine)],
    }[command]
    result = run(*args, "--json")
    assert result.returncode == 2, result.stderr
    _one_error_line(result, str(mine), "not written by wsiflow")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert last_json(result)["ok"] is False


def test_claim_folder_rules(tmp_path):
    fresh = claim_folder(tmp_path / "a" / "b", "inference")
    assert json.loads((fresh / MARKER).read_text()) == {"wsiflow_output": "inference"}
    assert claim_folder(fresh, "inference") == fresh  # its own kind again
    assert claim_folder(fresh, "evaluation", accept=("inference",)) == fresh
    with pytest.raises(ForeignOutputError, match="is a wsiflow inference folder, not a model"):
        claim_folder(fresh, "model")
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "inference.json").write_text('{"slides": {}}')
    (legacy / "scores.csv").write_text("slide,score\n")
    claim_folder(legacy, "inference")  # written by a wsiflow before markers: recognised
    assert (legacy / MARKER).is_file()
    empty_but_for_os_files = tmp_path / "empty"
    empty_but_for_os_files.mkdir()
    (empty_but_for_os_files / ".DS_Store").write_bytes(b"")
    claim_folder(empty_but_for_os_files, "cohort")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignOutputError, match="is not a folder"):
        claim_folder(tmp_path / "file", "model")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for name in "abcde":
        (crowded / name).write_text("")
    with pytest.raises(ForeignOutputError, match=r"holds 'a', 'b', 'c' and 2 more"):
        claim_folder(crowded, "model")


@pytest.mark.slow
def test_a_slide_id_complete_from_another_file_is_not_replaced(one_slide, tmp_path):
    """dirA/case1.tif then dirB/case1.tif: the second fails naming both files."""
    a, b = tmp_path / "dirA", tmp_path / "dirB"
    a.mkdir(), b.mkdir()
    first = Path(shutil.copy(one_slide, a / "case1.tif"))
    second = Path(shutil.copy(one_slide, b / "case1.tif"))
    store = tmp_path / "s.zarr"
    assert run("tile", str(first), "--out", str(store), *TILE).returncode == 0
    attrs = json.loads((store / "case1" / "zarr.json").read_text())["attributes"]
    result = run("tile", str(second), "--out", str(store), *TILE, "--json")
    assert result.returncode == 1
    summary = last_json(result)
    assert summary["failed"] == 1
    reason = summary["failures"][0]["reason"]
    assert str(second) in reason and str(first.resolve()) in reason and "--overwrite" in reason
    after = json.loads((store / "case1" / "zarr.json").read_text())["attributes"]
    assert after == attrs  # untouched
    replaced = run("tile", str(second), "--out", str(store), *TILE, "--overwrite", "--json")
    assert replaced.returncode == 0, replaced.stderr
    after = json.loads((store / "case1" / "zarr.json").read_text())["attributes"]
    assert after["slide"]["path"] == str(second.resolve())


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = (
        "import sys, time; from pipeline.outputs import OutputLock; "
        f"lock = OutputLock({str(folder)!r}, 'wsiflow tile (the other run)').__enter__(); "
        "print('locked', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.slow
def test_a_store_in_use_by_another_run_is_refused(one_slide, tmp_path):
    store = tmp_path / "s.zarr"
    assert run("tile", str(one_slide), "--out", str(store), *TILE).returncode == 0
    holder = _hold_lock(store)
    try:
        result = run("tile", str(one_slide), "--out", str(store), *TILE, "--overwrite")
        assert result.returncode == 1
        line = _one_error_line(result, str(store), f"pid {holder.pid}", "the other run")
        assert "in use by" in line
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: the next run takes the lock over and says so.
    assert json.loads((store / LOCK).read_text())["pid"] == holder.pid
    result = run("tile", str(one_slide), "--out", str(store), *TILE)
    assert result.returncode == 0, result.stderr
    assert f"took over the lock left by `wsiflow tile (the other run)` (pid {holder.pid}" in (
        result.stderr
    )
    assert not (store / LOCK).exists()


@pytest.mark.parametrize("command", ["infer", "train"])
def test_an_inference_or_model_folder_in_use_is_refused(
    command, tmp_path, trained_model, patch_store, one_slide
):
    kind = {"infer": "inference", "train": "model"}[command]
    out = claim_folder(tmp_path / kind, kind)
    holder = _hold_lock(out)
    inputs = [str(trained_model), str(one_slide)] if command == "infer" else [str(patch_store)]
    try:
        result = run(command, *inputs, "--out", str(out))
        assert result.returncode == 1
        _one_error_line(result, str(out), f"pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK])
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()


def test_the_lock_is_exclusive_and_released(tmp_path):
    with OutputLock(tmp_path, "first") as first:
        assert first.took_over is None
        with (
            pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"),
            OutputLock(tmp_path, "second"),
        ):
            pass
    assert not (tmp_path / LOCK).exists()
    with OutputLock(tmp_path, "third") as third:
        assert third.took_over is None  # released cleanly: nothing to take over
