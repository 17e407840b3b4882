"""The OpenSlide gate, on real files: the Aperio slide, generated TIFFs, broken files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SlideNotFoundError, SlideReadError
from pipeline.slides.pyramid import write_pyramid_tiff
from pipeline.slides.reader import find_slides, open_slide


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


def test_empty_file_says_it_is_empty(tmp_path):
    empty = tmp_path / "tumor_001.tif"
    empty.write_bytes(b"")
    with pytest.raises(SlideReadError, match=r"tumor_001.tif: empty file \(0 bytes\)"):
        open_slide(empty)


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


def test_find_slides_follows_links_to_folders_once(tmp_path):
    """A cohort folder linked in from another disk is searched; a loop of links ends."""
    elsewhere = tmp_path / "nas" / "tumor"
    elsewhere.mkdir(parents=True)
    (elsewhere / "tumor_001.tif").write_bytes(b"")
    cohort = tmp_path / "cohort"
    (cohort / "normal").mkdir(parents=True)
    (cohort / "normal" / "normal_001.tif").write_bytes(b"")
    (cohort / "tumor").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop
    (cohort / "normal" / "again").symlink_to(cohort / "normal", target_is_directory=True)
    found = find_slides([cohort])
    assert found == [cohort / "normal" / "normal_001.tif", cohort / "tumor" / "tumor_001.tif"]


def test_regions_read_row_by_row_decode_each_tile_once(tmp_path):
    """Regions that are not whole tiles keep two rows of tiles decoded, as a grid reads them."""
    path = tmp_path / "g.tif"
    # 40 tiles across: two rows of them are more than a fixed cache of 64 would keep.
    write_pyramid_tiff(path, 5120, 512, _gradient, mpp=0.25, tile_px=128)
    read_px = 137  # regions straddle rows of tiles; the next row of regions reads the lower one
    positions = [
        (x, y) for y in range(0, 512 - read_px, read_px) for x in range(0, 5120 - read_px, read_px)
    ]
    with open_slide(path) as slide, open_slide(path, direct=False) as reference:
        direct = slide.direct_level(0)
        touched = set()
        for x, y in positions:
            np.testing.assert_array_equal(
                slide.read_level(0, (x, y), (read_px, read_px)),
                reference.read_region((x, y), 0, (read_px, read_px)),
            )
            touched |= {
                (tx, ty)
                for tx in range(x // 128, (x + read_px - 1) // 128 + 1)
                for ty in range(y // 128, (y + read_px - 1) // 128 + 1)
            }
        assert direct.tiles_decoded == len(touched) == 160
        # Dropped, the tiles are decoded again.
        slide.drop_tile_caches()
        slide.read_level(0, (0, 0), (read_px, read_px))
        assert direct.tiles_decoded == 160 + 4
        # Whole tiles are not kept: a grid of them never reads one twice.
        for _ in range(2):
            slide.read_level(0, (1024, 256), (128, 128))
        assert direct.tiles_decoded == 164 + 2
