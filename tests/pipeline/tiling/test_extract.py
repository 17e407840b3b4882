"""Resampling patches to the requested mpp, against an exact area average."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.slides.patches import LINEAR_MAX_SCALE, resize_patch
from pipeline.synth.scene import make_scene


def _area_average(region: np.ndarray, out_px: int) -> np.ndarray:
    """Each output pixel the exact mean of the source area it covers (float)."""
    n = region.shape[0]
    scale = n / out_px
    weights = np.zeros((out_px, n))
    for i in range(out_px):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(lo), min(n, int(np.ceil(hi)))):
            weights[i, j] = min(hi, j + 1) - max(lo, j)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.einsum("ij,jkc->ikc", weights, region.astype(float))
    return np.einsum("kl,ilc->ikc", weights, rows)


@pytest.fixture(scope="module")
def tissue():
    """512 x 512 px of rendered H&E around a tissue piece's centre."""
    scene = make_scene(2048, 2048, 0.25, seed=3, tumor=True)
    x, y = (int(v) for v in scene.pieces[0].center_xy)
    region = scene.render(x - 256, y - 256, 512, 512)
    assert region.std() > 30  # texture, not background
    return region


@pytest.mark.parametrize("read_px", [384, 508, 512])
def test_large_downscales_are_exact_area_averages(tissue, read_px):
    assert read_px / 256 > LINEAR_MAX_SCALE
    patch = resize_patch(tissue[:read_px, :read_px], 256)
    assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
    assert np.abs(patch - _area_average(tissue[:read_px, :read_px], 256)).max() <= 0.5 + 1e-9


@pytest.mark.parametrize(("read_px", "patch_px"), [(263, 256), (99, 96), (320, 256), (51, 64)])
def test_small_rescales_are_bilinear_and_in_place(tissue, read_px, patch_px):
    """Bilinear (CAMELYON16's 0.243 -> 0.5 µm/px reads 263 px of level 1 for 256).

    Within 0.8 grey levels of the area average on average, as Pillow's
    antialiased bilinear is (0.5-0.65), while the same patch read one source
    pixel off differs by more than 3: the geometry is right, not only the
    colours.
    """
    region = tissue[:read_px, :read_px]
    patch = resize_patch(region, patch_px)
    assert patch.shape == (patch_px, patch_px, 3)
    if read_px > patch_px:
        assert np.abs(patch - _area_average(region, patch_px)).mean() < 0.8
    shifted = resize_patch(tissue[1 : read_px + 1, 1 : read_px + 1], patch_px)
    assert np.abs(patch.astype(int) - shifted).mean() > 3


def test_a_thread_keeps_decoded_tiles_of_the_slide_it_reads_only(tmp_path):
    from pipeline.slides.patches import cached_reader
    from pipeline.slides.pyramid import write_pyramid_tiff

    scene = make_scene(1024, 512, 0.25, seed=4, tumor=False)
    paths = [str(tmp_path / f"{name}.tif") for name in ("a", "b")]
    for path in paths:
        write_pyramid_tiff(path, 1024, 512, scene.render, mpp=0.25, tile_px=128)
    first = cached_reader(paths[0])
    first.read_level(0, (100, 100), (137, 137))
    decoded = first.direct_level(0).tiles_decoded
    assert cached_reader(paths[0]) is first
    first.read_level(0, (100, 100), (137, 137))
    assert first.direct_level(0).tiles_decoded == decoded  # kept
    cached_reader(paths[1]).read_level(0, (100, 100), (137, 137))
    assert cached_reader(paths[0]) is first
    first.read_level(0, (100, 100), (137, 137))
    assert first.direct_level(0).tiles_decoded == 2 * decoded  # dropped while b was read
