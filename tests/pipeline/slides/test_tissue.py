"""Tissue detection on real and generated slides."""

from __future__ import annotations

import numpy as np

from pipeline.slides.pyramid import write_pyramid_tiff
from pipeline.slides.reader import open_slide
from pipeline.slides.tissue import (
    _SATURATION,
    channel_pairs,
    detect_tissue,
    disk_closing,
    drop_small_components,
    otsu_of_counts,
)
from pipeline.synth.scene import make_scene


def test_real_aperio_slide_tissue_and_background(aperio_slide):
    with open_slide(aperio_slide) as slide:
        mpp = slide.info.mpp_xy[0]
        overview, scale = slide.overview(8.0 / mpp)
    mask = detect_tissue(overview, mpp=mpp * scale[0])
    assert 0.2 < mask.mean() < 0.6  # a strip of tissue on glass
    grey = overview.mean(axis=2)
    assert grey[mask].mean() < 200 and grey[~mask].mean() > 225
    # The slide's left and top-right margins are glass.
    assert not mask[: mask.shape[0] // 4, : mask.shape[1] // 8].any()


def test_generated_slide_tissue_matches_its_scene(tmp_path):
    scene = make_scene(4096, 4096, 0.243, seed=2, tumor=True)
    path = tmp_path / "s.tif"
    write_pyramid_tiff(path, 4096, 4096, scene.render, mpp=0.243)
    with open_slide(path) as slide:
        overview, scale = slide.overview(32)
    assert scale == (32.0, 32.0)
    mask = detect_tissue(overview, mpp=0.243 * 32)
    truth = scene.tissue_mask(0, 0, 4096, 4096)[16::32, 16::32]
    assert (mask == truth).mean() > 0.97


def test_blank_and_uniform_images_have_no_tissue():
    white = np.full((64, 64, 3), 245, dtype=np.uint8)
    assert not detect_tissue(white, mpp=8).any()
    noisy = np.clip(240 + np.random.default_rng(0).normal(0, 3, (64, 64, 3)), 0, 255).astype(
        np.uint8
    )
    assert not detect_tissue(noisy, mpp=8).any()


def test_disk_closing_matches_skimage():
    # The fast closing must give skimage's pixels, edges (reflected) and tiny masks included.
    from skimage.morphology import closing, disk

    rng = np.random.default_rng(3)
    for mask in random_masks(rng, 60, max_side=48):
        radius = int(rng.integers(1, 9))
        expected = closing(mask, disk(radius))
        np.testing.assert_array_equal(
            disk_closing(mask, radius), expected, err_msg=f"{mask.shape} r{radius}"
        )


def random_masks(rng: np.random.Generator, n: int, *, max_side: int):
    """``n`` random bool masks, 1 to ``max_side`` - 1 px a side, each of a random density."""
    for _ in range(n):
        h, w = rng.integers(1, max_side, 2)
        yield rng.random((h, w)) < rng.random()


def test_otsu_from_pair_counts_matches_skimage_on_saturation(tmp_path):
    # detect_tissue thresholds saturation from counts of (max, min) channel pairs:
    # the threshold must be skimage's on the saturation image itself.
    from skimage.filters import threshold_otsu

    scene = make_scene(2048, 2048, 0.243, seed=4, tumor=True)
    write_pyramid_tiff(tmp_path / "s.tif", 2048, 2048, scene.render, mpp=0.243)
    with open_slide(tmp_path / "s.tif") as slide:
        images = [slide.overview(8)[0]]
    rng = np.random.default_rng(5)
    for _ in range(150):
        h, w = rng.integers(1, 120, 2)
        if rng.random() < 0.5:
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:  # pale, nearly grey pixels, as on glass: few distinct saturations
            images.append(rng.normal(220, 6, (h, w, 3)).clip(0, 255).astype(np.uint8))
    images.append(np.full((5, 7, 3), (200, 100, 50), dtype=np.uint8))  # one value
    for image in images:
        high = image.max(axis=2).astype(np.float32)
        low = image.min(axis=2).astype(np.float32)
        saturation = (high - low) / np.maximum(high, 1)
        pair = channel_pairs(image)
        counts = np.bincount(pair.ravel(), minlength=65536)
        np.testing.assert_array_equal(_SATURATION[pair], saturation)
        expected = 0.0 if np.ptp(saturation) <= 1e-6 else float(threshold_otsu(saturation))
        assert otsu_of_counts(_SATURATION, counts) == expected, image.shape


def test_dropping_small_components_matches_skimage():
    from skimage.morphology import remove_small_holes, remove_small_objects

    rng = np.random.default_rng(6)
    for mask in random_masks(rng, 80, max_side=64):
        max_px = int(rng.integers(1, 40))
        np.testing.assert_array_equal(
            drop_small_components(mask, max_px), remove_small_objects(mask, max_size=max_px)
        )
        np.testing.assert_array_equal(
            ~drop_small_components(~mask, max_px), remove_small_holes(mask, max_size=max_px)
        )
