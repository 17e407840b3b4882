"""Worker side of inference: plan a slide, predict blocks of its patches.

Tasks receive a slide path, the model directory and plain numbers, and open
the slide and the model inside the worker: each worker process loads the
model once (:func:`models.predict.cached_predictor`) and each worker thread
keeps its slides open (:mod:`pipeline.tiling.extract`).

The one seam between the stages and ``models``: :func:`model_spec` and
:func:`seen_slides` read a model directory's metadata and
:func:`load_predictor` loads its model, all
through ``models`` (imported lazily: tiling and evaluation never load
TensorFlow). No other module of ``pipeline``'s stages imports ``models``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ModelError, SlideError
from pipeline.identity import file_identity, slide_id_of
from pipeline.inference.heatmap import HeatmapGrid, heatmap_grid
from pipeline.slides.patches import cached_reader, read_patch
from pipeline.slides.reader import open_slide
from pipeline.slides.stain import normalize, sample_rows
from pipeline.slides.tissue import tissue_mask
from pipeline.tiling.grid import Resolution, choose_resolution, level0_boxes, patch_grid

#: Longest side of the thumbnail under the overlay.
THUMBNAIL_PX = 1024
#: Width in level pixels of the column bands patches are read in (16 tiles of 256 px).
READ_BAND_PX = 4096


@dataclass(frozen=True)
class ModelSpec:
    """What inference needs to know about a model, from its metadata."""

    model_dir: str
    patch_px: int
    patch_mpp: float | None
    level: int | None
    tissue_mpp: float
    min_tissue_fraction: float
    identity: dict[str, Any] = field(repr=False)
    #: The identity of the slide classifier that scores slides; None: the heatmap's maximum.
    slide_classifier: dict[str, Any] | None = field(repr=False, default=None)
    #: Stain normalisation the model was trained with: {"normalization", "target"}; None: none.
    stain: dict[str, Any] | None = field(repr=False, default=None)


def model_spec(
    model_dir: Path | str, min_tissue_fraction: float | None = None, slide_score: str = "max"
) -> ModelSpec:
    """Read a finished model directory's metadata; :class:`ModelError` if it is not usable.

    ``slide_score="classifier"``: the model's slide classifier must be there too.
    """
    from models.predict import model_identity
    from models.saved import read_metadata
    from pipeline.inference.slide_classifier import cached_slide_classifier

    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    tiling = (metadata.get("config") or {}).get("tiling") or {}
    patch_mpp = metadata.get("patch_mpp")
    # The level the store recorded; where it records none (a model from before, or an
    # imported store), the level the training config asked for.
    level = metadata.get("patch_level")
    if level is None:
        level = tiling.get("level")
    if patch_mpp is None and level is None:
        raise ModelError(
            model_dir,
            "its metadata records neither the patches' µm/px nor their pyramid level, "
            "so slides cannot be read at the resolution it was trained on",
        )
    return ModelSpec(
        model_dir=str(model_dir.resolve()),
        patch_px=int(metadata["patch_px"]),
        patch_mpp=None if patch_mpp is None else float(patch_mpp),
        level=None if patch_mpp is not None else int(level),
        tissue_mpp=float(tiling.get("tissue_mpp", 8.0)),
        min_tissue_fraction=float(
            min_tissue_fraction
            if min_tissue_fraction is not None
            else tiling.get("min_tissue_fraction", 0.5)
        ),
        identity=model_identity(model_dir),
        slide_classifier=(
            cached_slide_classifier(model_dir).identity if slide_score == "classifier" else None
        ),
        stain=_stain_of(metadata),
    )


def _stain_of(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The stain normalisation a model's metadata records (None for none)."""
    stain = metadata.get("stain") or {}
    if stain.get("normalization", "none") == "none":
        return None
    return {"normalization": stain["normalization"], "target": stain["target"]}


def seen_slides(
    model_dir: Path | str, splits: tuple[str, ...] = ("train", "validation")
) -> set[str]:
    """The slide ids of a finished model's ``splits`` (:class:`ModelError` if not finished)."""
    from models.saved import read_metadata

    slides = read_metadata(model_dir).get("slides") or {}
    return {s["slide_id"] for split in splits for s in slides.get(split, [])}


@dataclass(frozen=True)
class InferencePlan:
    """One slide's patches to predict and the heatmap they go into."""

    slide_id: str
    path: str
    resolution: Resolution
    grid: HeatmapGrid
    level_xy: np.ndarray  # (N, 2) int64 level pixels of predicted patches
    grid_ij: np.ndarray  # (N, 2) int64 heatmap column, row of each
    level0_wh: tuple[int, int]
    thumbnail: np.ndarray = field(repr=False)  # (h, w, 3) uint8 of the whole slide
    attrs: dict[str, Any] = field(repr=False, default_factory=dict)
    #: The slide's stain fit (``spec.stain``'s method) its patches are normalised from.
    stain_source: dict[str, Any] | None = field(repr=False, default=None)


def plan_inference(
    slide_path: str, spec: ModelSpec, stride_px: int | None, slide_mpp: float | None = None
) -> InferencePlan:
    """Open the slide, find tissue and lay the model's patch grid over it.

    ``slide_mpp`` is the level-0 µm/px of a slide that records none (``--slide-mpp``).
    """
    path = Path(slide_path)
    stride = stride_px or spec.patch_px
    with open_slide(path) as reader:
        info = reader.info
        resolution = choose_resolution(
            info,
            patch_px=spec.patch_px,
            stride_px=stride,
            target_mpp=spec.patch_mpp,
            level=spec.level,
            slide_mpp=slide_mpp,
        )
        tissue, _ = tissue_mask(reader, spec.tissue_mpp)
        # Streamed in blocks like the tissue overview: bounded memory whatever the slide.
        thumbnail, _ = reader.overview(max(1.0, max(info.level0_wh) / THUMBNAIL_PX))
    level_wh = info.level_wh[resolution.level]
    level_scale = (info.level0_wh[0] / level_wh[0], info.level0_wh[1] / level_wh[1])
    grid_xy = patch_grid(level_wh, resolution.read_px, resolution.read_stride_px)
    fractions = tissue.fractions(level0_boxes(grid_xy, resolution.read_px, level_scale))
    keep = fractions >= spec.min_tissue_fraction
    grid_xy = grid_xy[keep]
    # Column bands, row by row within each: the reader's small tile cache then holds every
    # tile a row of patches shares with the next, so each tile is decoded about once.
    grid_xy = grid_xy[np.lexsort((grid_xy[:, 0], grid_xy[:, 1], grid_xy[:, 0] // READ_BAND_PX))]
    grid = heatmap_grid(level_wh, info.level0_wh, resolution.read_px, resolution.read_stride_px)
    stain_source = _stain_source(path, spec, resolution, grid_xy)
    attrs = {
        "slide": file_identity(path),
        "vendor": info.vendor,
        "level0_wh": list(info.level0_wh),
        "mpp": None if info.mpp_xy is None else list(info.mpp_xy),
        "mpp_assumed": resolution.note,
        "level": resolution.level,
        "downsample": resolution.downsample,
        "level_mpp": resolution.level_mpp,  # measured, or as mpp_assumed says
        "patch_px": resolution.patch_px,
        "patch_mpp": resolution.patch_mpp,
        "stride_px": stride,
        "read_px": resolution.read_px,
        "read_stride_px": resolution.read_stride_px,
        "min_tissue_fraction": spec.min_tissue_fraction,
        "patches": len(grid_xy),
        **({"stain_source": stain_source} if stain_source is not None else {}),
    }
    return InferencePlan(
        slide_id=slide_id_of(path),
        path=str(path),
        resolution=resolution,
        grid=grid,
        level_xy=grid_xy,
        grid_ij=grid_xy // resolution.read_stride_px,
        level0_wh=info.level0_wh,
        thumbnail=thumbnail,
        attrs=attrs,
        stain_source=stain_source,
    )


def _stain_source(
    path: Path, spec: ModelSpec, resolution: Resolution, level_xy: np.ndarray
) -> dict[str, Any] | None:
    """The slide's stain fit on a sample of its patches; None when the model normalises none."""
    from pipeline.slides.stain import fit_stain

    if spec.stain is None or not len(level_xy):
        return None
    rows = sample_rows(len(level_xy))
    with open_slide(path) as reader:
        patches = np.stack(
            [
                read_patch(
                    reader, resolution.level, int(x), int(y), resolution.read_px,
                    resolution.patch_px,
                )
                for x, y in level_xy[rows]
            ]
        )  # fmt: skip
    try:
        return fit_stain(patches, spec.stain["normalization"], target=spec.stain["target"])
    except ValueError as exc:
        raise SlideError(path, f"its stain cannot be normalised: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Block:
    """A block of one slide's patches to predict: what an inference task is given.

    ``level_xy`` is ``(n, 2)`` int64 top-left corners in ``level`` pixels;
    ``read_px`` level pixels are read per patch and resampled to ``patch_px``.
    At most ``queue_batches`` batches of ``batch_size`` wait between the
    ``reader_threads`` readers and the model.
    """

    slide_path: str
    model_dir: str
    level: int
    level_xy: np.ndarray
    read_px: int
    patch_px: int
    batch_size: int
    queue_batches: int
    reader_threads: int = 1
    tf_threads: int | None = None  # None: TensorFlow's own default
    tta: bool = False  # the mean of each patch's 8 flips and rotations
    stain: tuple[dict[str, Any], dict[str, Any]] | None = None  # (source, target) fits


def predict_block(block: Block) -> np.ndarray:
    """Return ``(N,)`` float32 tumor probabilities of the patches at ``block.level_xy``.

    Reader threads fill a queue of at most ``queue_batches`` batches while
    this thread predicts, so decoding overlaps the model and at most
    ``queue_batches + reader_threads + 1`` batches are in memory.
    """
    predictor = load_predictor(
        block.model_dir, batch_size=block.batch_size, threads=block.tf_threads, tta=block.tta
    )
    return predict_streamed(predictor, block)


def load_predictor(
    model_dir: Path | str, *, batch_size: int, threads: int | None = None, tta: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """This process's predictor of ``model_dir``: ``(N, px, px, 3)`` uint8 -> ``(N,)`` float32.

    Loaded once per process (:func:`models.predict.cached_predictor`);
    :class:`ModelError` for a model that cannot be loaded. ``tta``: each
    probability is the mean over the patch's 8 flips and rotations.
    """
    from models.predict import cached_predictor

    return cached_predictor(model_dir, batch_size=batch_size, threads=threads, tta=tta)


def predict_streamed(predictor: Callable[[np.ndarray], np.ndarray], block: Block) -> np.ndarray:
    """:func:`predict_block` with a given predictor (a callable on uint8 batches).

    ``reader_threads`` threads read every n-th batch each (a fast GPU needs
    more than one); batches are placed by their offset, so their order of
    arrival does not matter.
    """
    slide_path, level, level_xy = block.slide_path, block.level, block.level_xy
    read_px, patch_px, batch_size = block.read_px, block.patch_px, block.batch_size
    reader_threads = block.reader_threads
    batches: queue.Queue = queue.Queue(maxsize=block.queue_batches)
    n = len(level_xy)
    out = np.empty(n, dtype=np.float32)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        """Queue ``item`` unless the predicting side has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read(first: int) -> None:
        _lower_priority()
        try:
            reader = cached_reader(slide_path)
            for start in range(first * batch_size, n, batch_size * reader_threads):
                xy = level_xy[start : start + batch_size]
                batch = np.empty((len(xy), patch_px, patch_px, 3), dtype=np.uint8)
                for i, (x, y) in enumerate(xy):
                    batch[i] = read_patch(reader, level, int(x), int(y), read_px, patch_px)
                if block.stain is not None:
                    batch = normalize(batch, *block.stain)
                if not put((start, batch)):
                    return
        except BaseException as exc:  # handed to the predicting thread
            put((None, exc))
            return
        put((None, None))

    threads = [
        threading.Thread(target=read, args=(k,), name=f"wsiflow-reader-{k}", daemon=True)
        for k in range(reader_threads)
    ]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            start, batch = batches.get()
            if start is None:
                if batch is not None:
                    raise batch
                running -= 1
                continue
            out[start : start + len(batch)] = predictor(batch)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return out


#: Niceness of reader threads: the model's threads win contended cores, the reader fills gaps.
READER_NICENESS = 10


def _lower_priority() -> None:
    """Make this thread yield to the model's threads (Linux: threads have their own niceness)."""
    # Not Linux, or not permitted: run at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICENESS)
