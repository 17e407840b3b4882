"""Patch stores to tf.data: slide-level split, balance, augmentation only in training, errors."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import (
    all_patches,
    balanced_chunks,
    make_dataset,
    open_stores,
    split_by_slide,
    split_slides,
)
from pipeline.errors import StoreError
from pipeline.store.patch_store import create_slide_group, mark_complete, open_patches, open_root


def _store(
    path, slides: dict[str, int], n: int = 100, px: int = 16, codec: str = "zstd", splits=None
):
    """A real patch store: each slide gets ``n`` patches, the first ``tumor`` labelled 1.

    ``splits`` gives some groups a ``split`` attribute, as ``wsiflow import`` does.
    """
    root = open_root(path)
    rng = np.random.default_rng(0)
    for slide_id, tumor in slides.items():
        group = create_slide_group(
            root,
            slide_id,
            n_patches=n,
            patch_px=px,
            chunk_patches=16,
            codec=codec,
            codec_quality=90,
            attrs={
                "patch_mpp": 0.5,
                **({"split": splits[slide_id]} if slide_id in (splits or {}) else {}),
            },
        )
        labels = np.zeros(n, dtype=np.int8)
        labels[:tumor] = 1
        group["labels"][:] = labels
        patches = rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8)
        patches[:, 0, 0, 0] = labels.astype(np.uint8) * 255  # label readable from the pixels
        open_patches(path, slide_id)[:] = patches
        mark_complete(group, {})
    return path


def test_open_and_split_by_slide(tmp_path):
    store = _store(tmp_path / "a.zarr", {"t1": 20, "t2": 10, "t3": 5, "n1": 0, "n2": 0, "n3": 0})
    slides = open_stores([store])
    assert [s.slide_id for s in slides] == ["n1", "n2", "n3", "t1", "t2", "t3"]
    for seed in range(5):
        train, val = split_by_slide(slides, 0.34, seed=seed)
        train_ids, val_ids = {s.slide_id for s in train}, {s.slide_id for s in val}
        assert not train_ids & val_ids and len(train_ids | val_ids) == 6
        assert any(s.tumor for s in train) and any(s.tumor for s in val)


def test_given_splits_are_kept_and_the_rest_split_by_slide(tmp_path):
    given = {"p_train": "training", "p_valid": "validation", "p_test": "test"}
    store = _store(
        tmp_path / "a.zarr",
        {"p_train": 30, "p_valid": 10, "p_test": 10, "t1": 20, "t2": 5, "n1": 0, "n2": 0},
        splits=given,
    )
    slides = open_stores([store])
    assert {s.slide_id: s.split for s in slides if s.split} == given
    for seed in range(3):
        train, val, test = split_slides(slides, 0.34, seed=seed)
        ids = [{s.slide_id for s in side} for side in (train, val, test)]
        assert ids[2] == {"p_test"} and "p_train" in ids[0] and "p_valid" in ids[1]
        assert not ids[0] & ids[1] and ids[0] | ids[1] == {
            "p_train",
            "p_valid",
            "t1",
            "t2",
            "n1",
            "n2",
        }
        assert any(s.tumor for s in train if not s.split) and any(
            s.tumor for s in val if not s.split
        )
    # Only given splits: none of them is split again.
    only = open_stores([_store(tmp_path / "b.zarr", {"p_train": 30, "p_valid": 10}, splits=given)])
    train, val, test = split_slides(only, 0.5)
    assert ([s.slide_id for s in train], [s.slide_id for s in val], test) == (
        ["p_train"],
        ["p_valid"],
        [],
    )
    no_val = open_stores([_store(tmp_path / "c.zarr", {"p_train": 30, "p_test": 10}, splits=given)])
    with pytest.raises(StoreError, match="no validation data"):
        split_slides(no_val, 0.5)
    with pytest.raises(
        StoreError,
        match=r"'odd': Expected a split in \['training', 'validation', 'test'\]. Got 'dev'",
    ):
        open_stores([_store(tmp_path / "d.zarr", {"odd": 5, "n": 0}, splits={"odd": "dev"})])


def test_balanced_stream(tmp_path):
    store = _store(tmp_path / "a.zarr", {"t1": 10, "n1": 0, "n2": 0})
    slides = open_stores([store])
    stream = balanced_chunks(slides, seed=0)
    labels = np.concatenate([next(stream)[1] for _ in range(400)])
    assert 0.4 < labels.mean() < 0.6  # 10 tumor among 300 patches, balanced to ~half


@pytest.mark.parametrize("share", [0.4, 0.9])
def test_hard_negatives_make_their_share_of_the_normal_patches(tmp_path, share):
    """5 hard negatives in n1 and 10 tumor patches: share x 10 hard draws per pass."""
    import dataclasses

    import zarr

    store = _store(tmp_path / "a.zarr", {"t1": 10, "n1": 0, "n2": 0})
    for slide_id in ("t1", "n1", "n2"):
        array = zarr.open_array(str(store / slide_id / "patches"), mode="r+")
        patches = array[:]
        patches[:, 0, 0, 1] = 0
        if slide_id == "n1":
            patches[50:55, 0, 0, 1] = 255  # the hard ones, recognisable in the stream
        array[:] = patches
    slides = [
        dataclasses.replace(s, hard_negatives=np.arange(50, 55)) if s.slide_id == "n1" else s
        for s in open_stores([store])
    ]
    stream = balanced_chunks(slides, seed=0, hard_share=share)
    draws = [next(stream) for _ in range(2000)]
    images = np.concatenate([d[0] for d in draws])
    labels = np.concatenate([d[1] for d in draws])
    normal = labels == 0
    hard = images[:, 0, 0, 1] == 255
    assert 0.45 < labels.mean() < 0.55  # still balanced
    assert share - 0.05 < hard[normal].mean() < share + 0.05
    assert not (hard & ~normal).any()


def test_stain_jitter_strength():
    """Jitter 0 leaves a grey patch grey (brightness and contrast move its channels alike);
    1 tints it, as each stain's density moves on its own."""
    import tensorflow as tf

    from models.data import _augment_fn

    grey = tf.constant(np.full((32, 16, 16, 3), 150, np.uint8))
    for jitter, same in ((0.0, True), (1.0, False)):
        out = _augment_fn(seed=0, stain_jitter=jitter)(grey).numpy()
        spread = np.ptp(out[:, 0, 0, :], axis=1)  # how far apart the channels are, per patch
        assert bool(spread.max() < 1e-3) is same, spread.max()


def test_training_is_augmented_validation_is_not(tmp_path):
    pytest.importorskip("tensorflow")
    store = _store(tmp_path / "a.zarr", {"t1": 30, "n1": 0})
    slides = open_stores([store])
    val = make_dataset(slides, batch_size=50, training=False)
    stored = np.concatenate([chunk for chunk, _ in all_patches(slides)]).astype(np.float32) / 255
    for _ in range(2):  # a full pass each time it is iterated
        seen = np.concatenate([x.numpy() for x, _ in val])
        np.testing.assert_allclose(seen, stored, atol=1e-6)
    train = make_dataset(slides, batch_size=32, training=True, seed=1)
    x, y = next(iter(train))
    assert x.shape == (32, 16, 16, 3) and y.shape == (32,)
    assert float(x.numpy().min()) >= 0.0 and float(x.numpy().max()) <= 1.0
    # Augmented patches are not stored patches (rotations, stain and brightness jitter).
    flat = stored.reshape(len(stored), -1)
    nearest = np.abs(flat[None, :, :] - x.numpy().reshape(32, 1, -1)).mean(axis=2).min(axis=1)
    assert nearest.min() > 0.005


@pytest.mark.parametrize(
    ("slides", "message"),
    [({"n1": 0, "n2": 0}, "has no tumor patch"), ({"t1": 100}, "has no normal patch")],
)
def test_single_class_data_is_refused(tmp_path, slides, message):
    with pytest.raises(StoreError, match=message):
        open_stores([_store(tmp_path / "a.zarr", slides)])


def test_empty_or_missing_store(tmp_path):
    open_root(tmp_path / "empty.zarr")
    with pytest.raises(StoreError, match="empty.zarr: holds no complete slide"):
        open_stores([tmp_path / "empty.zarr"])
    with pytest.raises(StoreError, match="not a Zarr patch store"):
        open_stores([tmp_path / "absent.zarr"])
    with pytest.raises(ValueError) as error:
        split_by_slide(open_stores([_store(tmp_path / "one.zarr", {"t1": 5})]), 0.5)
    assert str(error.value).endswith("Received: 1 with tumor and 0 without")
    # Two slides, but one of each label: still none to spare for validation.
    with pytest.raises(ValueError) as error:
        split_by_slide(open_stores([_store(tmp_path / "two.zarr", {"t1": 5, "n1": 0})]), 0.5)
    assert str(error.value) == (
        "Expected at least two slides with tumor or two without, to split by slide. "
        "Received: 1 with tumor and 1 without"
    )


def test_image_codec_chunks_decode_only_the_kept_patches(tmp_path):
    """The balanced stream decodes kept patches alone; they equal a full read of the chunk."""
    from pipeline.store.patch_store import read_some

    store = _store(tmp_path / "j.zarr", {"t1": 10, "n1": 0}, codec="jpeg")
    slide = open_stores([store])[0]
    array = slide.open_patches()
    for start in (0, 16, 96):  # first, middle and last (partial, 4 patches) chunks
        n = min(16, len(slide) - start)
        indices = np.array([i for i in (0, 3, 15, 3) if i < n])  # in any order, repeated
        np.testing.assert_array_equal(
            read_some(array, start, n, indices), array[start : start + n][indices]
        )


def test_validation_subset_is_fixed_and_keeps_tumor_chunks(tmp_path):
    from models.data import count_patches

    store = _store(tmp_path / "a.zarr", {"t1": 20, "n1": 0, "n2": 0}, n=160)
    slides = open_stores([store])
    subset = [labels for _, labels in all_patches(slides, max_patches=64, seed=3)]
    again = [labels for _, labels in all_patches(slides, max_patches=64, seed=3)]
    assert sum(map(len, subset)) == count_patches(slides, 64, 3) == 64
    assert all((a == b).all() for a, b in zip(subset, again, strict=True))
    assert sum(int(labels.sum()) for labels in subset) == 20  # every tumor chunk is in
    assert count_patches(slides) == 480
