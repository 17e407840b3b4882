"""The OpenSlide gate, on real files: the Aperio slide, generated TIFFs, broken files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SlideNotFoundError, SlideReadError
from pipeline.slide import find_slides, open_slide
from pipeline.synth.pyramid import write_pyramid_tiff


def _gradient(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    return np.stack([(xs // 4) % 256, (ys // 4) % 256, ((xs + ys) // 8) % 256], -1).astype(np.uint8)


def test_real_aperio_slide_geometry_and_metadata(aperio_slide):
    with open_slide(aperio_slide) as slide:
        info = slide.info
        assert info.vendor == "aperio"
        assert info.level0_wh == (2220, 2967)
        assert info.level_count == 1
        assert info.mpp_xy == pytest.approx((0.499, 0.499), abs=1e-3)
        assert info.objective_power == 20
        assert {"label", "macro", "thumbnail"} <= set(info.associated_images)
        region = slide.read_region((1000, 1000), 0, (256, 128))
        assert region.shape == (128, 256, 3) and region.dtype == np.uint8
        # H&E tissue in the middle of this slide: far from white background.
        assert region.mean() < 220
        label = slide.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3


def test_read_outside_the_slide_is_background(tmp_path):
    path = tmp_path / "g.tif"
    write_pyramid_tiff(path, 300, 200, _gradient, mpp=0.5, tile_px=128)
    with open_slide(path) as slide:
        region = slide.read_region((250, 150), 0, (100, 100))
    assert region.shape == (100, 100, 3)
    assert (region[60:, :] == 255).all() and (region[:, 60:] == 255).all()


def test_missing_slide_names_the_file(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError, match="nope.svs: no such file"):
        open_slide(missing)


def test_garbage_file_is_a_read_error_naming_the_file(tmp_path):
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SlideReadError) as info:
        open_slide(bad)
    assert str(bad) in str(info.value)
    assert "OpenSlide" in str(info.value)


def test_truncated_slide_fails_with_a_clear_error(tmp_path):
    path = tmp_path / "truncated.tif"
    write_pyramid_tiff(path, 1024, 1024, _gradient, mpp=0.25, tile_px=256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError) as info, open_slide(path) as slide:
        slide.read_region((0, 0), 0, (1024, 1024))
    assert "truncated.tif" in str(info.value)


def test_find_slides_recurses_and_skips_hidden(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".scratch").mkdir()
    for name in ("a/x.svs", "a/b/y.tif", "a/notes.txt", ".scratch/z.tif", "a/.hidden.tif"):
        (tmp_path / name).write_bytes(b"")
    found = find_slides([tmp_path, tmp_path / "a" / "x.svs"])
    assert found == [tmp_path / "a" / "b" / "y.tif", tmp_path / "a" / "x.svs"]
