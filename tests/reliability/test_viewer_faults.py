"""The viewer under faults: files changing under readers, corrupt tiles, odd ids, idle sockets.

Every test runs `wsiflow serve` as a user starts it (waitress on 127.0.0.1)
and talks to it over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest
import tifffile

from tests.conftest import WSIFLOW, free_port


@contextlib.contextmanager
def serving(slides: Path, *extra: str):
    """`wsiflow serve SLIDES` on a free port; yields (base URL, process); stderr is kept."""
    port = free_port()
    log = slides.parent / f"serve-{port}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [WSIFLOW, "serve", str(slides), "--port", str(port), *extra],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/slides", timeout=5).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield base, process, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def slide_folder(small_cohort, tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    record = next(r for r in small_cohort.slides if r.label == "Tumor")
    shutil.copy(small_cohort.root / record.image, folder / "case.tif")
    return folder


def _max_level_tiles(base: str, slide_id: str) -> tuple[int, int, int]:
    """The deepest Deep Zoom level and its columns and rows (254 px tiles)."""
    quoted = urllib.parse.quote(slide_id)
    dzi = urllib.request.urlopen(f"{base}/slides/{quoted}.dzi", timeout=30).read().decode()
    width = int(re.search(r'Width="(\d+)"', dzi)[1])
    height = int(re.search(r'Height="(\d+)"', dzi)[1])
    level = (max(width, height) - 1).bit_length()  # Deep Zoom: ceil(log2(the longer side))
    return level, -(-width // 254), -(-height // 254)


def test_a_slide_changing_under_16_clients_is_never_a_500(slide_folder):
    """The issue's repro: the file touched every 50 ms while 16 clients read uncached tiles."""
    with serving(slide_folder) as (base, process, log):
        level, cols, rows = _max_level_tiles(base, "case")
        stop = threading.Event()
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def touch() -> None:
            while not stop.is_set():
                os.utime(slide_folder / "case.tif")
                time.sleep(0.05)

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                col, row = i % cols, (i // cols) % rows
                code = status_of(f"{base}/slides/case_files/{level}/{col}_{row}.jpeg")
                with lock:
                    statuses[code] += 1
                i += 16

        threads = [threading.Thread(target=touch)] + [
            threading.Thread(target=client, args=(k,)) for k in range(16)
        ]
        for thread in threads:
            thread.start()
        time.sleep(6)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert process.poll() is None, log.read_text()  # alive
        assert set(statuses) == {200}, (statuses, log.read_text()[-2000:])
        assert sum(statuses.values()) > 50
        assert status_of(f"{base}/slides/case_files/{level}/0_0.jpeg") == 200


def _corrupt_level0_tile(path: Path, tile_x: int, tile_y: int) -> None:
    """An end-of-image marker in the middle of one level-0 tile's entropy-coded data."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.shape[1] // page.tilewidth)
        index = tile_y * across + tile_x
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\xff\xd9" * 4)


def test_a_corrupt_tile_is_404_and_the_rest_of_the_slide_is_served(slide_folder):
    _corrupt_level0_tile(slide_folder / "case.tif", 5, 3)
    with serving(slide_folder) as (base, _process, log):
        level, cols, rows = _max_level_tiles(base, "case")
        bad = f"{base}/slides/case_files/{level}/{5 * 256 // 254}_{3 * 256 // 254}.jpeg"
        assert status_of(bad) == 404
        # OpenSlide's error sticks to its handle: without a new one, every tile read next fails.
        for col, row in [(0, 0), (cols - 1, rows - 1), (1, rows // 2)]:
            assert status_of(f"{base}/slides/case_files/{level}/{col}_{row}.jpeg") == 200
        assert status_of(bad) == 404
        assert status_of(f"{base}/slides/case_files/{level}/0_1.jpeg") == 200
        assert "Traceback" not in log.read_text()


def test_slide_ids_with_url_characters_link_and_serve(small_cohort, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    record = next(r for r in small_cohort.slides if r.label == "Normal")
    name = "case #1?x=%41 b"
    shutil.copy(small_cohort.root / record.image, folder / f"{name}.tif")
    with serving(folder) as (base, _process, _log):
        index = urllib.request.urlopen(f"{base}/", timeout=30).read().decode()
        links = set(re.findall(r'(?:href|src)="(/[^"]+)"', index))
        assert len(links) >= 2, index
        for link in links:
            assert status_of(base + link) == 200, link
        view = next(link for link in links if link.startswith("/view/"))
        page = urllib.request.urlopen(base + view, timeout=30).read().decode()
        assert json.dumps(name) in page  # the page's JavaScript encodes it for its requests
        quoted = urllib.parse.quote(name)
        assert status_of(f"{base}/slides/{quoted}.dzi") == 200
        level, _, _ = _max_level_tiles(base, name)
        assert status_of(f"{base}/slides/{quoted}_files/{level}/0_0.jpeg") == 200


def test_detections_linked_from_outside_the_heatmaps_folder_are_not_served(slide_folder, tmp_path):
    import numpy as np

    from pipeline.inference.heatmap import Detections, heatmap_grid
    from pipeline.inference.results import write_manifest, write_slide_outputs

    out = tmp_path / "inference"
    with tifffile.TiffFile(slide_folder / "case.tif") as tif:
        level0_wh = (tif.pages[0].shape[1], tif.pages[0].shape[0])
    grid = heatmap_grid(level0_wh, level0_wh, read_px=64, read_stride_px=64)
    write_slide_outputs(
        out, "case", np.zeros(grid.shape, np.float32), grid,
        Detections(np.array([0.9]), np.array([[10, 10]]), np.array([1])),
        np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.uint8),
        {"level0_wh": list(level0_wh)},
    )  # fmt: skip
    write_manifest(out, {"slides": {"case": {"status": "done", "score": 0.9}}})
    secret = tmp_path / "secret.csv"
    secret.write_text("Confidence,X coordinate,Y coordinate\n0.5,1,2\n")
    detections = out / "detections" / "case.csv"
    detections.unlink()
    detections.symlink_to(secret)
    with serving(slide_folder, "--heatmaps", str(out)) as (base, _process, _log):
        served = json.load(urllib.request.urlopen(f"{base}/api/slides/case/detections"))
        assert served == []


def test_serve_is_quiet_and_idle_connections_take_no_thread_each(slide_folder):
    with serving(slide_folder) as (base, process, log):
        for _ in range(20):
            assert status_of(f"{base}/api/slides") == 200
        assert log.read_text().count("GET ") == 0  # no request log unless --verbose
        host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(200)]
        try:
            time.sleep(1)
            assert status_of(f"{base}/api/slides") == 200
            threads = psutil.Process(process.pid).num_threads()
            assert threads < 40, threads  # waitress: a fixed pool, not one per connection
        finally:
            for sock in idle:
                sock.close()
    with serving(slide_folder, "--verbose") as (base, process, log):
        assert status_of(f"{base}/api/slides") == 200
        time.sleep(0.5)
        assert "GET /api/slides 200" in log.read_text()
