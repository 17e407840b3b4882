"""The DeepZoom viewer against real slides and a real heatmap folder: Flask test client."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from pipeline.inference.heatmap import MAX_ALPHA, Detections, heatmap_grid
from pipeline.inference.results import write_manifest, write_slide_outputs
from pipeline.viewer import OVERLAP, TILE_PX, create_app

# The heatmap: 64 px cells, probability 1 on cells rows 10-19, cols 20-29, i.e. level-0
# x in [1280, 1920), y in [640, 1280); 0.3 (drawn, faint) on one cell at row 2, col 3.
CELL = 64
BLOB = (1280, 640, 1920, 1280)
#: The alpha of probability 1: the highest, and never opaque.
FULL = round(255 * MAX_ALPHA)


@pytest.fixture(scope="module")
def folders(small_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    slides = root / "slides"
    (slides / "sub").mkdir(parents=True)
    tumor = next(r for r in small_cohort.slides if r.label == "Tumor")
    normal = next(r for r in small_cohort.slides if r.label == "Normal")
    shutil.copy(small_cohort.root / tumor.image, slides / "sub" / "tumor_a.tif")
    shutil.copy(small_cohort.root / normal.image, slides / "normal_a.tif")
    (slides / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(3000))
    elsewhere = root / "elsewhere.tif"
    shutil.copy(small_cohort.root / normal.image, elsewhere)
    (slides / "outside.tif").symlink_to(elsewhere)

    out = root / "inference"
    with openslide.OpenSlide(str(slides / "sub" / "tumor_a.tif")) as osr:
        level0_wh = osr.dimensions
    grid = heatmap_grid(level0_wh, level0_wh, read_px=CELL, read_stride_px=CELL)
    heat = np.zeros(grid.shape, dtype=np.float32)
    heat[10:20, 20:30] = 1.0
    heat[2, 3] = 0.3
    detections = Detections(np.array([0.99]), np.array([[1600, 960]]), np.array([100]))
    blank = np.zeros((8, 8, 3), dtype=np.uint8)
    write_slide_outputs(
        out, "tumor_a", heat, grid, detections, np.zeros((8, 8, 4), np.uint8), blank,
        {"level0_wh": list(level0_wh), "score": 1.0},
    )  # fmt: skip
    write_manifest(out, {"slides": {"tumor_a": {"status": "done", "score": 1.0}}})
    (out / "scores.csv").write_text("slide,score\ntumor_a,1.0\n")
    return slides, out


# Ground truth of tumor_a: lesion 1 around the heatmap's blob and its detection (found),
# lesion 2 below it (missed: nothing predicted there), an exclusion region top right.
LESION_FOUND = (1000, 500, 2400, 1500)
LESION_MISSED = (100, 1950, 1500, 2450)
EXCLUDED = (2500, 200, 2900, 600)


@pytest.fixture(scope="module")
def reviewed(folders, tmp_path_factory):
    """Annotations for tumor_a and a real `evaluate` of the heatmaps folder against them."""
    from pipeline.config import EvaluationConfig
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.slides.annotations import Polygon, write_asap_xml

    slides, out = folders
    root = tmp_path_factory.mktemp("review")
    annotations = root / "annotations"
    annotations.mkdir()

    def box(name, group, x0, y0, x1, y1):
        xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        return Polygon(name=name, group=group, level0_xy=xy)

    write_asap_xml(
        annotations / "tumor_a.xml",
        [box("found", "_0", *LESION_FOUND), box("missed", "_0", *LESION_MISSED),
         box("doubtful", "_2", *EXCLUDED)],
    )  # fmt: skip
    (annotations / "normal_a.xml").write_text("<ASAP_Annotations><Annotations>")  # truncated
    reference = root / "reference.csv"
    reference.write_text("tumor_a,Tumor,Macro,Primary\nnormal_a,Normal\n")
    evaluate(out, reference, annotations, slides, EvaluationConfig())
    return annotations


@pytest.fixture(scope="module")
def client(folders):
    slides, out = folders
    app = create_app(slides, out)
    return app.test_client()


def _dz(path):
    return DeepZoomGenerator(openslide.OpenSlide(str(path)), TILE_PX, OVERLAP, False)


def test_slide_list_marks_unreadable_slides_and_leaves_out_links_outside(client):
    listed = {s["id"]: s for s in client.get("/api/slides").get_json()}
    assert sorted(listed) == ["corrupt", "normal_a", "tumor_a"]  # not "outside"
    assert listed["corrupt"]["readable"] is False
    assert "truncated or corrupt: a TIFF of" in listed["corrupt"]["error"]
    assert listed["tumor_a"]["heatmap"] is True and listed["normal_a"]["heatmap"] is False
    assert listed["tumor_a"]["path"] == "sub/tumor_a.tif"
    assert listed["tumor_a"]["mpp"] == pytest.approx(0.243)
    page = client.get("/").get_data(as_text=True)
    assert "unreadable" in page and "/view/tumor_a" in page and "outside" not in page


def test_dzi_and_tiles_match_openslides_deepzoom_generator(client, folders):
    slides, _ = folders
    dz = _dz(slides / "sub" / "tumor_a.tif")
    response = client.get("/slides/tumor_a.dzi")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == dz.get_dzi("jpeg")
    top = dz.level_count - 1
    for level, address in [(top, (0, 0)), (top, (5, 3)), (top - 3, (1, 1)), (3, (0, 0))]:
        response = client.get(f"/slides/tumor_a_files/{level}/{address[0]}_{address[1]}.jpeg")
        assert response.status_code == 200 and response.mimetype == "image/jpeg"
        tile = Image.open(io.BytesIO(response.data))
        assert tile.size == dz.get_tile_dimensions(level, address)
        # Exactly OpenSlide's tile, encoded at the viewer's JPEG quality.
        expected = io.BytesIO()
        dz.get_tile(level, address).convert("RGB").save(expected, format="JPEG", quality=80)
        assert response.data == expected.getvalue()


def test_heatmap_tiles_share_the_slides_geometry_and_align(client, folders):
    slides, _ = folders
    dz = _dz(slides / "sub" / "tumor_a.tif")
    dzi = client.get("/heatmaps/tumor_a.dzi").get_data(as_text=True)
    assert dzi == dz.get_dzi("png")
    top = dz.level_count - 1
    for address in [(5, 2), (6, 3), (7, 4), (0, 0)]:
        response = client.get(f"/heatmaps/tumor_a_files/{top}/{address[0]}_{address[1]}.png")
        assert response.status_code == 200 and response.mimetype == "image/png"
        rgba = np.asarray(Image.open(io.BytesIO(response.data)))
        assert rgba.shape == (*dz.get_tile_dimensions(top, address)[::-1], 4)
        (x0, y0), _, _ = dz.get_tile_coordinates(top, address)
        xs = x0 + np.arange(rgba.shape[1])
        ys = y0 + np.arange(rgba.shape[0])
        inside = ((ys >= BLOB[1]) & (ys < BLOB[3]))[:, None] & ((xs >= BLOB[0]) & (xs < BLOB[2]))
        faint = ((ys >= 128) & (ys < 192))[:, None] & ((xs >= 192) & (xs < 256))
        np.testing.assert_array_equal(rgba[..., 3] == FULL, inside)
        np.testing.assert_array_equal((rgba[..., 3] > 0) & (rgba[..., 3] < FULL), faint)
    # A coarser level: the blob is where the slide tile has it, to within a pixel.
    level = top - 3  # downsample 8: one 254 px tile holds the whole blob
    rgba = np.asarray(
        Image.open(io.BytesIO(client.get(f"/heatmaps/tumor_a_files/{level}/0_0.png").data))
    )
    rows, cols = np.nonzero(rgba[..., 3] == FULL)
    assert abs(cols.min() - BLOB[0] / 8) <= 1 and abs(cols.max() + 1 - BLOB[2] / 8) <= 1
    assert abs(rows.min() - BLOB[1] / 8) <= 1 and abs(rows.max() + 1 - BLOB[3] / 8) <= 1


def test_detections_and_slide_page(client):
    assert client.get("/api/slides/tumor_a/detections").get_json() == [
        {"confidence": 0.99, "x": 1600, "y": 960}
    ]
    assert client.get("/api/slides/normal_a/detections").get_json() == []
    page = client.get("/view/tumor_a").get_data(as_text=True)
    assert "openseadragon.min.js" in page and "/heatmaps/" in page and "opacity" in page
    script = client.get("/static/openseadragon/openseadragon.min.js")
    assert script.status_code == 200 and b"OpenSeadragon" in script.data
    assert "No heatmap" in client.get("/view/normal_a").get_data(as_text=True)


@pytest.mark.parametrize(
    "url",
    [
        "/slides/../../etc/passwd.dzi",
        "/slides/..%2F..%2Fetc%2Fpasswd.dzi",
        "/slides/%2Fetc%2Fpasswd.dzi",
        "/slides/outside.dzi",
        "/slides/corrupt.dzi",
        "/slides/corrupt_files/0/0_0.jpeg",
        "/slides/sub%2Ftumor_a.dzi",
        "/slides/tumor_a_files/99/0_0.jpeg",
        "/slides/tumor_a_files/14/500_0.jpeg",
        "/slides/tumor_a_files/14/0_-1.jpeg",
        "/slides/tumor_a_files/x/0_0.jpeg",
        "/slides/tumor_a_files/14/0_0.png",
        "/slides/tumor_a_files/14/0_0.jpeg/..",
        "/heatmaps/normal_a.dzi",
        "/heatmaps/normal_a_files/14/0_0.png",
        "/heatmaps/tumor_a_files/99/0_0.png",
        "/heatmaps/tumor_a_files/14/0_0.jpeg",
        "/slides/tumor_a/associated/label.jpeg",
        "/slides/tumor_a/associated/..%2F..%2Fx.jpeg",
        "/view/nope",
        "/view/corrupt",
        "/static/../pipeline/viewer/__init__.py",
        "/static/%2E%2E/__init__.py",
    ],
)
def test_traversal_and_bad_requests_are_404(client, url):
    assert client.get(url).status_code == 404


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def live_server(folders, reviewed):
    """The viewer on a real threaded HTTP server on 127.0.0.1 (a free port), with ground truth."""
    import threading

    from werkzeug.serving import make_server

    slides, out = folders
    app = create_app(slides, out, annotations_dir=reviewed)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through chromedriver (`make test` installs both)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing: `make test` installs chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _screenshot(driver) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


def _wait(driver, script: str, timeout: float = 120, steady: float = 0.0) -> None:
    """Poll `script` until it returns true (and keeps returning true for `steady` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        if driver.execute_script(script):
            since = since or time.monotonic()
            if time.monotonic() - since >= steady:
                return
        else:
            since = None
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def _settled_screenshot(driver, timeout: float = 60) -> np.ndarray:
    """A screenshot once the page stops changing (two in a row alike): tiles have painted."""
    import time

    deadline = time.monotonic() + timeout
    last = _screenshot(driver)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        shot = _screenshot(driver)
        if np.array_equal(shot, last):
            return shot
        changed = np.abs(shot.astype(int) - last.astype(int)).sum(axis=-1) > 0
        last = shot
    ys, xs = np.nonzero(changed)
    raise AssertionError(
        f"the page kept changing: {changed.mean():.1%} of pixels in rows"
        f" {ys.min()}-{ys.max()}, columns {xs.min()}-{xs.max()}"
    )


def _red(r, g, b):
    """Pixels of the heatmap's red over H&E: pink tissue (g ~150) and purple nuclei (r < 150) are not."""
    return (r > 150) & (g < 110) & (r - b > 90)


@pytest.mark.slow
def test_browser_shows_tissue_and_the_overlay_toggle_changes_pixels(live_server, browser):
    browser.get(f"{live_server}/view/tumor_a")
    ready = (
        "const w = window.wsiflow; return !!(w && w.heatmap && w.viewer.world.getItemCount() == 2"
        " && w.viewer.world.getItemAt(0).getFullyLoaded() && w.heatmap.getFullyLoaded()"
        " && w.detections.length == 1);"
    )
    _wait(browser, ready)
    # Zoom onto the heatmap's blob, then wait for the sharper tiles: right after the zoom the
    # items still say fully loaded, so also wait for an empty tile queue and nothing to draw.
    browser.execute_script(
        "const v = window.wsiflow.viewer, item = v.world.getItemAt(0);"
        "v.viewport.fitBounds(item.imageToViewportRectangle(1000, 400, 1200, 1100), true);"
    )
    idle = (
        ready[: -len(";")] + " && w.viewer.imageLoader.jobsInProgress == 0"
        " && w.viewer.imageLoader.jobQueue.length == 0 && !w.viewer.world.needsDraw();"
    )
    _wait(browser, idle, steady=1.0)
    with_overlay = _settled_screenshot(browser)
    viewer_px = with_overlay[:, :800]  # the side panel is on the right
    r, g, b = (viewer_px[..., i].astype(int) for i in range(3))
    tissue = (r - g > 30) & (b - g > 30)  # H&E purple/pink
    assert tissue.mean() > 0.05, "no tissue on screen"
    heat = _red(r, g, b)  # probability 1: saturated red, the tissue seen through it
    assert heat.mean() > 0.05, "no heatmap on screen"

    browser.find_element("id", "show-heatmap").click()
    browser.find_element("id", "show-detections").click()
    _wait(browser, "return window.wsiflow.heatmap.getOpacity() == 0;")
    _wait(browser, idle, steady=1.0)
    without = _settled_screenshot(browser)[:, :800]
    changed = np.abs(without.astype(int) - viewer_px.astype(int)).sum(axis=-1) > 30
    assert changed.mean() > 0.05
    r, g, b = (without[..., i].astype(int) for i in range(3))
    assert _red(r, g, b).mean() < heat.mean() / 5
    assert browser.execute_script("return window.wsiflow.heatmap.getOpacity()") == 0
    # The scale bar follows the slide's µm/px.
    assert browser.find_element("id", "scalebar-text").text.endswith(("µm", "mm"))


def _on_screen(driver, x: float, y: float) -> tuple[int, int]:
    """Screenshot pixel of level-0 point (x, y)."""
    return tuple(
        round(v)
        for v in driver.execute_script(
            "const v = window.wsiflow.viewer, item = v.world.getItemAt(0);"
            "const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(arguments[0],"
            " arguments[1])); const r = v.element.getBoundingClientRect();"
            "return [(p.x + r.left) * devicePixelRatio, (p.y + r.top) * devicePixelRatio];",
            x,
            y,
        )
    )


def _cyan_near(shot: np.ndarray, xy: tuple[int, int], reach: int = 4) -> bool:
    x, y = xy
    r, g, b = (
        shot[y - reach : y + reach + 1, x - reach : x + reach + 1, i].astype(int) for i in range(3)
    )
    return bool(((r < 90) & (g > 170) & (b > 170)).any())


@pytest.mark.slow
def test_browser_draws_ground_truth_and_review_and_a_row_click_pans(live_server, browser):
    browser.get(f"{live_server}/view/tumor_a")
    _wait(
        browser,
        "const w = window.wsiflow; return !!(w && w.loaded.annotations && w.loaded.regions"
        " && w.loaded.review && w.viewer.world.getItemCount() == 2"
        " && w.viewer.world.getItemAt(0).getFullyLoaded() && !w.viewer.world.needsDraw());",
        steady=1.0,
    )
    counts = browser.execute_script(
        "return ['#gt-tumor path', '#gt-exclusion path', '#predicted path', '.marker.tp',"
        " '.marker.missed', '#review-table tr.row'].map(q => document.querySelectorAll(q).length);"
    )
    assert counts == [2, 1, 1, 1, 1, 3]  # 2 lesions, 1 exclusion, 1 region, 1 TP, 1 missed, rows
    x0, y0, x1, y1 = LESION_MISSED
    edges = [((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2)]
    points = [_on_screen(browser, x, y) for x, y in edges]
    shot = _settled_screenshot(browser)
    assert all(_cyan_near(shot, p) for p in points), "lesion outline not where the polygon is"
    middle = _on_screen(browser, (x0 + x1) / 2, (y0 + y1) / 2 - 100)
    assert not _cyan_near(shot, middle), "the outline is filled"

    browser.find_element("id", "show-annotations").click()
    hidden = _settled_screenshot(browser)
    assert not any(_cyan_near(hidden, p) for p in points), "the toggle left the outline"
    browser.find_element("id", "show-annotations").click()

    whole_slide = browser.execute_script(
        "const v = window.wsiflow.viewer;"
        "return v.world.getItemAt(0).viewportToImageZoom(v.viewport.getZoom(true));"
    )
    missed = next(
        row for row in browser.find_elements("css selector", "#review-table tr.row")
        if "missed" in row.text
    )  # fmt: skip
    missed.click()
    _wait(
        browser,
        "const v = window.wsiflow.viewer, item = v.world.getItemAt(0);"
        "const c = item.viewportToImageCoordinates(v.viewport.getCenter(true));"
        f"return Math.abs(c.x - {(x0 + x1) / 2}) < 150 && Math.abs(c.y - {(y0 + y1) / 2}) < 150"
        " && !v.world.needsDraw();",
        timeout=30,
        steady=0.5,
    )
    zoom = browser.execute_script(
        "const v = window.wsiflow.viewer;"
        "return v.world.getItemAt(0).viewportToImageZoom(v.viewport.getZoom(true));"
    )
    assert zoom > 1.2 * whole_slide  # zoomed in on the lesion


def test_serve_command_serves_on_localhost(folders, tmp_path):
    """`wsiflow serve` as a user starts it: binds 127.0.0.1, answers, stops on SIGTERM."""
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    from tests.conftest import WSIFLOW

    slides, out = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A slide file and a folder, as OpenSlide's deepzoom_server.py takes a file.
    process = subprocess.Popen(
        [WSIFLOW, "serve", str(slides / "sub" / "tumor_a.tif"), str(slides / "sub"), "--heatmaps",
         str(out), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/slides", timeout=5) as r:
                    listed = json.load(r)
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
                time.sleep(0.3)
        assert [(s["id"], s["heatmap"]) for s in listed] == [("tumor_a", True)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    missing = subprocess.run(
        [WSIFLOW, "serve", str(tmp_path / "nope")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


def test_slide_files_and_several_folders_are_served_and_nothing_else(folders):
    """Issue 27: `serve SLIDE.tif` was refused with "no such folder"."""
    slides, out = folders
    one = create_app(slides / "sub" / "tumor_a.tif", out).test_client()
    assert [(s["id"], s["path"]) for s in one.get("/api/slides").get_json()] == [
        ("tumor_a", str(slides / "sub" / "tumor_a.tif"))
    ]
    assert one.get("/slides/tumor_a.dzi").status_code == 200
    assert one.get("/heatmaps/tumor_a.dzi").status_code == 200
    assert one.get("/slides/normal_a.dzi").status_code == 404
    # A file named on the command line is served even through a link; the same link found
    # by scanning a folder is not (it points outside), and a slide named twice is listed once.
    both = create_app([slides / "outside.tif", slides, slides / "sub" / "tumor_a.tif"])
    listed = {s["id"]: s for s in both.test_client().get("/api/slides").get_json()}
    assert sorted(listed) == ["corrupt", "normal_a", "outside", "tumor_a"]
    assert listed["outside"]["readable"] and listed["tumor_a"]["path"] == "sub/tumor_a.tif"
    assert not listed["corrupt"]["readable"]
    page = both.test_client().get("/").get_data(as_text=True)
    assert str(slides / "outside.tif") in page


def test_annotations_regions_and_review_over_the_api(folders, reviewed):
    slides, out = folders
    client = create_app(slides, out, annotations_dir=reviewed).test_client()
    found = client.get("/api/slides/tumor_a/annotations").get_json()
    assert found["file"] == "tumor_a.xml" and found["error"] is None
    assert [(p["name"], p["role"]) for p in found["polygons"]] == [
        ("found", "tumor"), ("missed", "tumor"), ("doubtful", "exclusion")
    ]  # fmt: skip
    assert found["polygons"][0]["exterior"][0] == [LESION_FOUND[0], LESION_FOUND[1]]
    broken = client.get("/api/slides/normal_a/annotations").get_json()
    assert broken["polygons"] == [] and "normal_a.xml" in broken["error"] + (broken["file"] or "")
    # Predicted regions: the outline of the probability-1 blob (cells of 64 px).
    regions = client.get("/api/slides/tumor_a/regions").get_json()
    assert len(regions) == 1
    xy = np.array(regions[0]["exterior"])
    assert abs(xy[:, 0].min() - BLOB[0]) <= CELL and abs(xy[:, 0].max() - BLOB[2]) <= CELL
    assert abs(xy[:, 1].min() - BLOB[1]) <= CELL and abs(xy[:, 1].max() - BLOB[3]) <= CELL
    review = client.get("/api/slides/tumor_a/review").get_json()
    assert review["summary"]["lesions_found"] == 1
    assert review["detections"] == [[1600, 960, 0.99, "tp"]]
    lesions = sorted(review["lesions"], key=lambda lesion: lesion["box"][1])
    assert [(lesion["itc"], lesion["confidence"] > 0) for lesion in lesions] == [
        (False, True), (False, False)
    ]  # fmt: skip
    assert client.get("/api/slides/normal_a/review").get_json() == {}  # no heatmap
    listed = {s["id"]: s for s in client.get("/api/slides").get_json()}
    assert listed["tumor_a"]["evaluation"] == {
        "tumor": True, "lesions": 2, "lesions_found": 1, "itcs": 0, "false_positives": 0
    }  # fmt: skip
    assert client.get("/api/slides").get_json()[0]["id"] == "tumor_a"  # the highest score first
    page = client.get("/").get_data(as_text=True)
    assert "1/2 lesions found" in page and "1.000" in page
    # Without --annotations there is no annotations route, and the page has no ground truth.
    plain = create_app(slides, out).test_client()
    assert plain.get("/api/slides/tumor_a/annotations").status_code == 404
    assert 'id="show-annotations"' not in plain.get("/view/tumor_a").get_data(as_text=True)


def test_review_older_than_the_detections_is_not_shown(folders, reviewed, tmp_path):
    slides, out = folders
    copy = tmp_path / "inference"
    shutil.copytree(out, copy)
    detections = next((copy / "detections").glob("tumor_a*"))
    evaluation = (copy / "evaluation.json").stat().st_mtime_ns
    os.utime(detections, ns=(evaluation + 10**9, evaluation + 10**9))  # inferred again later
    review = create_app(slides, copy).test_client().get("/api/slides/tumor_a/review").get_json()
    assert "stale" in review and "detections" not in review


def test_real_aperio_slide_properties_and_associated_images(aperio_slide, tmp_path):
    slides = tmp_path / "real"
    slides.mkdir()
    (slides / aperio_slide.name).symlink_to(aperio_slide)  # a link inside the folder is fine...
    client = create_app(slides).test_client()
    # ...but its target lies outside the folder, so it is not served.
    assert client.get("/api/slides").get_json() == []
    shutil.copy(aperio_slide, slides / "copy.svs")
    (slides / aperio_slide.name).unlink()
    client = create_app(slides).test_client()
    (listed,) = client.get("/api/slides").get_json()
    assert listed["vendor"] == "aperio" and listed["objective_power"] == 20.0
    assert listed["associated_images"] == ["label", "macro", "thumbnail"]
    page = client.get("/view/copy").get_data(as_text=True)
    assert "aperio" in page and "/slides/copy/associated/label.jpeg" in page
    with openslide.OpenSlide(str(slides / "copy.svs")) as osr:
        expected = osr.associated_images["label"].size
    response = client.get("/slides/copy/associated/label.jpeg")
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.data)).size == expected
    thumb = Image.open(io.BytesIO(client.get("/slides/copy/thumbnail.jpeg").data))
    assert max(thumb.size) == 256
