"""Worker side of tiling: read patches with a cached slide handle and write store chunks.

Each worker thread keeps its slides and Zarr arrays open between tasks
(opening costs milliseconds each; a task is ~0.1 s of work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import SlideError
from pipeline.slides.patches import cached_reader, read_patch, read_patches, thread_cached
from pipeline.store.codecs import image_codec_of, pack_images
from pipeline.store.patch_store import open_patches, write_encoded_chunk


def _cached_patches(store_path: str, slide_id: str, token: str) -> Any:
    """The worker thread's open ``patches`` array; ``token`` changes when the group is redone."""
    return thread_cached(
        "arrays", (store_path, slide_id, token), lambda: open_patches(store_path, slide_id), limit=8
    )


@dataclass(frozen=True, eq=False)
class Chunks:
    """Whole store chunks of one slide's patches to extract: what a tiling task is given.

    ``level_xy`` is ``(n, 2)`` int64 top-left corners in ``level`` pixels of the
    patches from index ``start`` on; ``read_px`` level pixels are read per patch
    and resampled to ``patch_px``. ``token`` names the (re)created group, so a
    worker never writes through an array it opened for an earlier one.
    """

    slide_path: str
    store_path: str
    slide_id: str
    token: str
    start: int
    level: int
    level_xy: np.ndarray
    read_px: int
    patch_px: int
    passthrough: bool = False  # copy the stored JPEG tiles as they are
    verify: bool = True  # decode each copied tile once as a check


def extract_chunk(task: Chunks) -> int:
    """Read a block of whole chunks' patches and write them into the store; return how many.

    One chunk's patches are in memory at a time. Image-codec stores get each
    chunk encoded here, patch by patch while the decoded patch is still in
    cache, and written as the chunk's file (or, with ``passthrough``, the
    source tiles' bytes, each decoded once as a check when ``verify``);
    lossless stores go through Zarr chunk by chunk.
    """
    slide_path, start, level, level_xy = task.slide_path, task.start, task.level, task.level_xy
    read_px, patch_px = task.read_px, task.patch_px
    passthrough, verify = task.passthrough, task.verify
    array = _cached_patches(task.store_path, task.slide_id, task.token)
    codec = image_codec_of(array)
    chunk = array.chunks[0]
    if codec is None:
        for offset in range(0, len(level_xy), chunk):
            patches = read_patches(
                slide_path, level, level_xy[offset : offset + chunk], read_px, patch_px
            )
            array[start + offset : start + offset + len(patches)] = patches
        return len(level_xy)
    reader = cached_reader(slide_path)
    direct = reader.direct_level(level) if passthrough else None
    for offset in range(0, len(level_xy), chunk):
        block = level_xy[offset : offset + chunk]
        if direct is not None:
            try:
                images = [
                    direct.jpeg_tile(direct.tile_index(int(x), int(y)), verify=verify)
                    for x, y in block
                ]
            except OSError as exc:
                raise SlideError(slide_path, f"cannot read level {level} tiles: {exc}") from exc
        else:
            images = [
                codec.encode_patch(read_patch(reader, level, int(x), int(y), read_px, patch_px))
                for x, y in block
            ]
        # The last chunk of an array is stored full size: repeat an image past the end.
        images += images[-1:] * (chunk - len(images))
        write_encoded_chunk(array, (start + offset) // chunk, pack_images(images))
    return len(level_xy)
