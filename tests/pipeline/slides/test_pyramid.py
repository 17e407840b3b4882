"""The streaming pyramid writer: geometry OpenSlide sees, pixels, determinism, memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest

from pipeline.slides.pyramid import pyramid_level_sizes, write_pyramid_tiff
from pipeline.slides.reader import open_slide
from pipeline.synth.scene import make_scene


def _smooth(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """A smooth pattern JPEG keeps almost exactly (any region renders the same)."""
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    r = 128 + 100 * np.sin(xs / 97.0)
    g = 128 + 100 * np.cos(ys / 131.0)
    b = 128 + 60 * np.sin((xs + ys) / 173.0)
    return np.stack([r, g, b], -1).astype(np.uint8)


def test_level_sizes_halve_until_one_tile():
    assert pyramid_level_sizes(4000, 3001, 256) == [
        (4000, 3001),
        (2000, 1500),
        (1000, 750),
        (500, 375),
        (250, 187),
    ]
    assert pyramid_level_sizes(256, 100, 256) == [(256, 100)]


@pytest.mark.parametrize(("width", "height", "tile_px"), [(2000, 1501, 256), (777, 1000, 128)])
def test_openslide_sees_the_pyramid(tmp_path, width, height, tile_px):
    path = tmp_path / "slide.tif"
    info = write_pyramid_tiff(path, width, height, _smooth, mpp=0.243, tile_px=tile_px)
    expected = pyramid_level_sizes(width, height, tile_px)
    with open_slide(path) as slide:
        i = slide.info
        assert i.vendor == "generic-tiff"
        assert i.level_wh == tuple(expected) == info.level_wh
        assert i.level_downsamples == pytest.approx(
            [np.mean([width / w, height / h]) for w, h in expected]
        )
        assert i.mpp_xy == pytest.approx((0.243, 0.243), rel=1e-9)
        assert i.properties["tiff.ResolutionUnit"] == "centimeter"
        level0 = slide.read_region((0, 0), 0, (width, height)).astype(np.int16)
        assert np.abs(level0 - _smooth(0, 0, width, height)).mean() < 2.0
        # Each level is the 2x2 mean of the previous one.
        level1 = slide.read_region((0, 0), 1, expected[1]).astype(np.float64)
        w1, h1 = expected[1]
        halved = level0[: 2 * h1, : 2 * w1].reshape(h1, 2, w1, 2, 3).mean((1, 3))
        assert np.abs(level1 - halved).mean() < 2.0
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".pyramid-*"))


def test_synthetic_tissue_matches_its_render(tmp_path):
    scene = make_scene(2048, 1536, 0.243, seed=3, tumor=True)
    path = tmp_path / "tumor.tif"
    write_pyramid_tiff(path, 2048, 1536, scene.render, mpp=0.243, jpeg_quality=80)
    with open_slide(path) as slide:
        pixels = slide.read_region((512, 256), 0, (1024, 1024)).astype(np.int16)
    difference = np.abs(pixels - scene.render(512, 256, 1024, 1024))
    assert difference.mean() < 7  # JPEG q80 on grainy texture
    assert np.percentile(difference, 99) < 40


def test_same_input_gives_identical_bytes(tmp_path):
    digests = []
    for name in ("a.tif", "b.tif"):
        scene = make_scene(1024, 1024, 0.243, seed=11, tumor=True)
        write_pyramid_tiff(tmp_path / name, 1024, 1024, scene.render, mpp=0.243)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    other = make_scene(1024, 1024, 0.243, seed=12, tumor=True)
    write_pyramid_tiff(tmp_path / "c.tif", 1024, 1024, other.render, mpp=0.243)
    assert digests[0] == digests[1]
    assert hashlib.sha256((tmp_path / "c.tif").read_bytes()).hexdigest() != digests[0]


def test_failed_render_leaves_no_file(tmp_path):
    def broken(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if y0 >= 512:
            raise RuntimeError("renderer died")
        return _smooth(x0, y0, w, h)

    path = tmp_path / "broken.tif"
    with pytest.raises(RuntimeError, match="renderer died"):
        write_pyramid_tiff(path, 1024, 1024, broken, mpp=0.5)
    assert list(tmp_path.iterdir()) == []


def _peak_bytes(path, width: int, height: int) -> int:
    tile = np.full((256, 256, 3), 200, dtype=np.uint8)

    def flat(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return tile[:h, :w]

    tracemalloc.start()
    try:
        write_pyramid_tiff(path, width, height, flat, mpp=0.25)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_stays_bounded_by_tile_rows(tmp_path):
    """A 16k x 16k slide (768 MiB of pixels) needs no more memory than a 16k x 2k one."""
    width = 16384
    short = _peak_bytes(tmp_path / "short.tif", width, 2048)
    tall = _peak_bytes(tmp_path / "tall.tif", width, 16384)
    row = 256 * width * 3  # one level-0 tile row: 12 MiB
    assert tall < 8 * row, f"peak {tall / 2**20:.0f} MiB for 768 MiB of pixels"
    assert tall < 1.25 * short, (
        f"peak grows with height: {short / 2**20:.0f} -> {tall / 2**20:.0f} MiB"
    )
    with open_slide(tmp_path / "tall.tif") as slide:
        assert slide.info.level0_wh == (width, 16384)
        assert slide.info.level_count == 7
        assert (slide.read_region((16000, 16000), 0, (64, 64)) == 200).all()
