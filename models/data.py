"""Patch stores to ``tf.data``: slide-level splits, class balance, augmentation, prefetching.

A random single-patch read from Zarr decodes a whole chunk, so the
training stream reads whole chunks (64 patches) in a random order across
slides, keeps every tumor patch and a matching random share of normal ones,
and mixes them in a shuffle buffer. Validation reads every patch, in order,
unaugmented.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import StoreError
from pipeline.importing.parts import SPLITS
from pipeline.store.patch_store import join, location, open_store, read_some

#: Rows of H&E optical density (Ruifrok & Johnston), as skimage's rgb2hed uses.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


@dataclass(frozen=True)
class SlidePatches:
    """One complete slide group of a patch store: where it is and its labels."""

    store: str
    slide_id: str
    labels: np.ndarray  # (N,) int8
    patch_px: int
    patch_mpp: float | None
    chunk_patches: int
    fingerprint: str | None = None  # of the tiling inputs and config (resume, model metadata)
    split: str | None = None  # training, validation or test when the store says (wsiflow import)
    #: Rows of mined hard negatives (``wsiflow mine``) and their record; None: not read or none.
    hard_negatives: np.ndarray | None = None
    mining: dict | None = None
    #: The pyramid level the patches were read at (what inference needs when no µm/px is known).
    level: int | None = None

    @property
    def tumor(self) -> int:
        return int((self.labels == 1).sum())

    def __len__(self) -> int:
        return len(self.labels)

    def open_patches(self) -> zarr.Array:
        """The slide's ``patches`` array, read-only."""
        return zarr.open_array(join(self.store, self.slide_id, "patches"), mode="r")


def open_stores(
    paths: list[Path | str] | tuple[Path | str, ...],
    *,
    hard_negatives: bool = False,
    mining_key: str | None = None,
) -> list[SlidePatches]:
    """The complete slide groups of every store, checked for what training needs.

    Raises :class:`StoreError` naming the store for a missing or empty store,
    a group without labels, mixed patch sizes, or data of a single class.
    With ``hard_negatives``, each slide's complete mining record is read too,
    that of the model ``mining_key`` names or the only one
    (:mod:`pipeline.mining.driver`; a slide without one has ``mining`` None).
    """
    from pipeline.mining.driver import read_mined

    slides: list[SlidePatches] = []
    for path in paths:
        root = open_store(path)
        path = location(path)
        complete = [k for k in sorted(root.group_keys()) if root[k].attrs.get("complete") is True]
        if not complete:
            raise StoreError(
                path, "holds no complete slide (empty store, or tiling never finished)"
            )
        for slide_id in complete:
            group = root[slide_id]
            if "labels" not in group or "patches" not in group:
                raise StoreError(path, f"slide {slide_id!r} has no labels/patches arrays")
            patches = group["patches"]
            mined = read_mined(group, mining_key) if hard_negatives else None
            slides.append(
                SlidePatches(
                    store=path,
                    slide_id=slide_id,
                    labels=np.asarray(group["labels"][:], dtype=np.int8),
                    patch_px=int(patches.shape[1]),
                    patch_mpp=group.attrs.get("patch_mpp"),
                    chunk_patches=int(patches.chunks[0]),
                    fingerprint=group.attrs.get("fingerprint"),
                    split=_split_of(path, slide_id, group.attrs.get("split")),
                    hard_negatives=None if mined is None else mined[0],
                    mining=None if mined is None else mined[1],
                    level=group.attrs.get("level"),
                )
            )
    sizes = {s.patch_px for s in slides}
    if len(sizes) > 1:
        raise StoreError(slides[0].store, f"Expected one patch size. Got {sorted(sizes)} instead.")
    tumor = sum(s.tumor for s in slides)
    total = sum(len(s) for s in slides)
    if tumor == 0 or tumor == total:
        which = "tumor" if tumor == 0 else "normal"
        raise StoreError(slides[0].store, f"has no {which} patch: a classifier needs both classes")
    return slides


def _split_of(store: str, slide_id: str, split: object) -> str | None:
    if split is None or split in SPLITS:
        return split  # type: ignore[return-value]
    raise StoreError(
        store, f"group {slide_id!r}: Expected a split in {list(SPLITS)}. Got {split!r} instead."
    )


def split_slides(
    slides: list[SlidePatches], validation_fraction: float, seed: int = 0
) -> tuple[list[SlidePatches], list[SlidePatches], list[SlidePatches]]:
    """Training, validation and held-out test groups.

    Groups whose store gives their split (``wsiflow import``: PCam's train,
    valid and test files, split folders) keep it; the others (tiled slides)
    are split by slide (:func:`split_by_slide`), which needs two or more of
    them.
    """
    given = {name: [s for s in slides if s.split == name] for name in SPLITS}
    rest = [s for s in slides if s.split is None]
    train, val = given["training"], given["validation"]
    if rest:
        more_train, more_val = split_by_slide(rest, validation_fraction, seed)
        train, val = train + more_train, val + more_val
    if not train or not val:
        missing = "training" if not train else "validation"
        raise StoreError(
            slides[0].store,
            f"no {missing} data: the stores give splits, and none is {missing} "
            "(import a validation split, or add tiled slides to split by slide)",
        )
    return train, val, given["test"]


def split_by_slide(
    slides: list[SlidePatches], validation_fraction: float, seed: int = 0
) -> tuple[list[SlidePatches], list[SlidePatches]]:
    """Split whole slides into training and validation; no slide is in both.

    Slides with tumor and slides without are split separately, so both sides
    get tumor slides whenever there are at least two.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for group in ([s for s in slides if s.tumor], [s for s in slides if not s.tumor]):
        order = rng.permutation(len(group))
        # At least one slide on each side when the group has two or more.
        n_val = round(len(group) * validation_fraction)
        n_val = min(max(n_val, 1), len(group) - 1) if len(group) >= 2 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    if not val:  # each label has one slide at most: validating on one would train on none
        tumor = sum(1 for s in slides if s.tumor)
        raise ValueError(
            "Expected at least two slides with tumor or two without, to split by slide. "
            f"Received: {tumor} with tumor and {len(slides) - tumor} without"
        )
    return train, val


#: ``transform(slide_index, patches)``: applied to each chunk's patches (stain normalisation).
Transform = Callable[[int, np.ndarray], np.ndarray]


def balanced_chunks(
    slides: list[SlidePatches],
    seed: int,
    hard_share: float = 0.0,
    transform: Transform | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(patches, labels)`` from whole chunks in random order, classes balanced.

    Every tumor patch is kept; normal patches are kept with probability
    #tumor / #normal, so the stream is balanced in expectation. With
    ``hard_share``, that share of the normal patches in expectation comes
    from the slides' mined hard negatives (each drawn #tumor x share / #hard
    times per pass, oversampled when that is above 1) and the rest from the
    other normal patches.
    """
    tumor = sum(s.tumor for s in slides)
    normal = sum(len(s) - s.tumor for s in slides)
    hard = [_hard_mask(s) if hard_share else np.zeros(len(s), dtype=bool) for s in slides]
    n_hard = int(sum(h.sum() for h in hard))
    share = hard_share if n_hard else 0.0
    keep_normal = min(1.0, (1 - share) * tumor / max(normal - n_hard, 1))
    hard_rate = share * tumor / n_hard if n_hard else 0.0
    chunks = [
        (i, start) for i, s in enumerate(slides) for start in range(0, len(s), s.chunk_patches)
    ]
    arrays = {}
    rng = np.random.default_rng(seed)
    while True:
        for k in rng.permutation(len(chunks)):
            i, start = chunks[k]
            slide = slides[i]
            labels = slide.labels[start : start + slide.chunk_patches]
            is_hard = hard[i][start : start + len(labels)]
            keep = (labels == 1) | (~is_hard & (rng.random(len(labels)) < keep_normal))
            rows = np.flatnonzero(keep)
            if is_hard.any():  # each drawn floor(rate) times, once more with the rest's odds
                hard_rows = np.flatnonzero(is_hard)
                draws = int(hard_rate) + (rng.random(len(hard_rows)) < hard_rate % 1)
                rows = np.sort(np.concatenate([rows, np.repeat(hard_rows, draws)]))
            if not len(rows):
                continue
            if i not in arrays:
                arrays[i] = slide.open_patches()
            patches = read_some(arrays[i], start, len(labels), rows)
            yield (patches if transform is None else transform(i, patches)), labels[rows]


def stain_sources(slides: list[SlidePatches], method: str, target: dict) -> list[dict]:
    """Each slide's own ``method`` fit (its source, for mapping onto ``target``).

    :func:`~pipeline.store.patch_store.stored_stain_fit`, as mining fits it
    (inference reads the same spread from the slide). Raises
    :class:`StoreError` for a slide whose sample has too little stain to fit.
    """
    from pipeline.store.patch_store import stored_stain_fit

    sources = []
    for slide in slides:
        try:
            sources.append(stored_stain_fit(slide.open_patches(), method, target))
        except ValueError as exc:
            raise StoreError(slide.store, f"slide {slide.slide_id}: {exc}") from exc
    return sources


def stain_transform(sources: list[dict], target: dict) -> Transform:
    """A transform normalising slide ``i``'s patches from ``sources[i]`` onto ``target``."""
    from pipeline.slides.stain import normalize

    def transform(index: int, patches: np.ndarray) -> np.ndarray:
        return normalize(patches, sources[index], target)

    return transform


def pooled_stain_target(slides: list[SlidePatches], method: str, per_slide: int = 16) -> dict:
    """The ``method`` fit of ``per_slide`` patches from each slide, pooled (the default target)."""
    from pipeline.slides.stain import fit_stain
    from pipeline.store.patch_store import sample_patches

    pooled = [sample_patches(s.open_patches(), per_slide) for s in slides]
    try:
        return fit_stain(np.concatenate(pooled), method)
    except ValueError as exc:
        raise StoreError(slides[0].store, f"the training slides' stain: {exc}") from exc


def _hard_mask(slide: SlidePatches) -> np.ndarray:
    """``(N,)`` bool: the slide's mined hard negatives (labelled normal)."""
    mask = np.zeros(len(slide), dtype=bool)
    if slide.hard_negatives is not None:
        mask[slide.hard_negatives] = True
    return mask & (slide.labels == 0)


def all_patches(
    slides: list[SlidePatches],
    max_patches: int | None = None,
    seed: int = 0,
    transform: Transform | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every patch once, slide by slide and chunk by chunk (validation, inference).

    With ``max_patches``, a fixed subset of whole chunks (the same on every
    pass): chunks holding tumor first, then a seeded random share of the rest.
    """
    open_index, array = None, None
    for i, start in _chosen_chunks(slides, max_patches, seed):
        slide = slides[i]
        if i != open_index:  # chunks come slide by slide: keep one array open
            open_index, array = i, slide.open_patches()
        stop = start + slide.chunk_patches
        patches = array[start:stop]
        yield (patches if transform is None else transform(i, patches)), slide.labels[start:stop]


def count_patches(slides: list[SlidePatches], max_patches: int | None = None, seed: int = 0) -> int:
    """How many patches :func:`all_patches` yields with the same arguments."""
    return sum(
        min(slides[i].chunk_patches, len(slides[i]) - start)
        for i, start in _chosen_chunks(slides, max_patches, seed)
    )


def _chosen_chunks(
    slides: list[SlidePatches], max_patches: int | None, seed: int
) -> list[tuple[int, int]]:
    chunks = [
        (i, start) for i, s in enumerate(slides) for start in range(0, len(s), s.chunk_patches)
    ]
    if max_patches is not None and sum(len(s) for s in slides) > max_patches:
        chunks = _chunk_subset(slides, chunks, max_patches, seed)
    return chunks


def _chunk_subset(slides, chunks, max_patches: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    order = [chunks[k] for k in rng.permutation(len(chunks))]
    size = {c: len(slides[c[0]].labels[c[1] : c[1] + slides[c[0]].chunk_patches]) for c in chunks}
    has_tumor = {c: bool(slides[c[0]].labels[c[1] : c[1] + size[c]].any()) for c in chunks}
    order.sort(key=lambda c: not has_tumor[c])  # stable: tumor chunks first, each group shuffled
    chosen, total = [], 0
    for chunk in order:
        if total >= max_patches:
            break
        chosen.append(chunk)
        total += size[chunk]
    return sorted(chosen)


def make_dataset(
    slides: list[SlidePatches],
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    preprocess: Callable | None = None,
    shuffle_buffer: int = 2048,
    max_patches: int | None = None,
    hard_share: float = 0.0,
    transform: Transform | None = None,
    stain_jitter: float = 1.0,
):
    """A ``tf.data.Dataset`` of ``(float32 images, float32 labels)`` batches.

    Training: balanced endless stream, shuffled, augmented (flips, 90°
    rotations, brightness/contrast, H&E stain jitter); validation: every
    patch once (or the fixed subset of :func:`all_patches` with
    ``max_patches``), as stored. ``hard_share``: see :func:`balanced_chunks`;
    ``transform`` (stain normalisation) applies to every chunk, before
    augmentation; ``stain_jitter`` scales the H&E jitter (0: none).
    ``preprocess`` (the backbone's own) maps 0-255
    float images; without it images are scaled to 0-1. Prefetched.
    """
    import tensorflow as tf

    px = slides[0].patch_px

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # A new source each time the dataset is iterated (one pass per validation run).
        if training:
            return balanced_chunks(slides, seed, hard_share, transform)
        return all_patches(slides, max_patches, seed, transform)

    # Whole chunks cross from Python (one call per chunk, not per patch), then
    # every per-patch step runs in TensorFlow on whole batches.
    dataset = tf.data.Dataset.from_generator(
        chunks,
        output_signature=(
            tf.TensorSpec((None, px, px, 3), tf.uint8),
            tf.TensorSpec((None,), tf.int8),
        ),
    ).unbatch()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=training)
    augment = _augment_fn(seed, stain_jitter) if training else (lambda x: tf.cast(x, tf.float32))
    scale = preprocess or (lambda x: x / 255.0)
    dataset = dataset.map(
        lambda x, y: (scale(augment(x)), tf.cast(y, tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if not training:  # a known length: Keras shows progress and expects the end
        n = count_patches(slides, max_patches, seed)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _augment_fn(seed: int, stain_jitter: float = 1.0):
    """Augment a ``(b, h, w, 3)`` uint8 batch, independently per patch, into 0-255 floats.

    ``stain_jitter`` scales the H&E jitter: each stain's OD times 1 +/- 0.05 s,
    plus +/- 0.02 s; 0 leaves the stains alone.
    """
    import tensorflow as tf

    hed_from_rgb = tf.constant(_HED_FROM_RGB)
    rgb_from_hed = tf.constant(_RGB_FROM_HED)
    generator = tf.random.Generator.from_seed(seed)

    def augment(images):
        x = tf.cast(images, tf.float32)
        b = tf.shape(x)[0]

        def per_patch(low, high, channels=1):
            return generator.uniform((b, 1, 1, channels), low, high)

        # The 8 flips/rotations of a square: optional transpose, then optional flips.
        x = tf.where(per_patch(0.0, 1.0) < 0.5, tf.transpose(x, (0, 2, 1, 3)), x)
        x = tf.where(per_patch(0.0, 1.0) < 0.5, tf.reverse(x, axis=[2]), x)
        x = tf.where(per_patch(0.0, 1.0) < 0.5, tf.reverse(x, axis=[1]), x)
        if stain_jitter:  # H&E stain jitter: scale and shift each stain's optical density
            od = -tf.math.log((x + 1.0) / 256.0)
            hed = tf.einsum("bhwc,cd->bhwd", od, hed_from_rgb)
            scale, shift = 0.05 * stain_jitter, 0.02 * stain_jitter
            hed = hed * per_patch(1 - scale, 1 + scale, 3) + per_patch(-shift, shift, 3)
            x = tf.exp(-tf.einsum("bhwd,dc->bhwc", hed, rgb_from_hed)) * 256.0 - 1.0
        x = x + per_patch(-12.0, 12.0)  # brightness
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * per_patch(0.9, 1.1) + mean  # contrast
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment
