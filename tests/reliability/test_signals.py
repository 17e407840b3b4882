"""Stopping `wsiflow infer` with Ctrl-C or SIGTERM: one line, the shell's exit code, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import WSIFLOW, last_json, run


@pytest.mark.slow
# SIGTERM goes through the same handler as in `wsiflow tile`, tested in tests/test_cli.py.
@pytest.mark.parametrize(("signal_name", "code", "word"), [("SIGINT", 130, "interrupted")])
def test_infer_stopped_is_one_line_and_resumes(
    signal_name, code, word, small_cohort, trained_model, tmp_path
):
    slides = tmp_path / "slides"
    slides.mkdir()
    for copy in range(2):
        for record in small_cohort.slides:
            os.link(small_cohort.root / record.image, slides / f"{record.slide_id}_{copy}.tif")
    total = 2 * len(small_cohort.slides)
    out = tmp_path / "inference"
    args = ["infer", str(trained_model), str(slides), "--out", str(out)]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [WSIFLOW, *args], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + 180
        manifest = out / "inference.json"
        while time.monotonic() < deadline and not (
            manifest.is_file() and '"done"' in manifest.read_text()
        ):
            time.sleep(0.05)
        sent = getattr(signal, signal_name)
        if sent == signal.SIGTERM:
            os.kill(process.pid, sent)  # as `kill` or a batch scheduler sends it
        else:
            os.killpg(process.pid, sent)  # as a terminal sends Ctrl-C: the whole group
        returned = process.wait(timeout=120)
    lines = stderr.read_text().splitlines()
    assert returned == code, "\n".join(lines)
    assert lines[-1].startswith(f"{word}: ") and f"of {total} slides finished" in lines[-1]
    noise = ("Traceback", "KeyboardInterrupt", "leaked semaphore")
    assert not any(n in line for line in lines for n in noise), "\n".join(lines)
    rerun = run(*args, "--json")
    summary = last_json(rerun)
    assert rerun.returncode == 0, rerun.stderr
    assert summary["done"] + summary["skipped"] == total and summary["done"] < total
