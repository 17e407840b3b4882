"""Worker side of tiling: read patches with a cached slide handle and write store chunks.

Each worker thread keeps its slides and Zarr arrays open between tasks
(opening costs milliseconds each; a task is ~0.1 s of work).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .codecs import image_codec_of, pack_images
from .errors import SlideError
from .slide import SlideReader, open_slide
from .store import open_patches, write_encoded_chunk

_local = threading.local()


def _thread_cached(slot: str, key: Any, open_: Callable[[], Any], limit: int) -> Any:
    """The worker thread's open object for ``key`` in ``slot``; past ``limit``, the oldest goes."""
    cache: dict[Any, Any] = getattr(_local, slot, None) or {}
    setattr(_local, slot, cache)
    value = cache.get(key)
    if value is None:
        if len(cache) >= limit:
            oldest = cache.pop(next(iter(cache)))
            if hasattr(oldest, "close"):
                oldest.close()
        value = cache[key] = open_()
    return value


#: Up to this downscale factor patches are resampled bilinearly: the samples are close
#: enough that an antialiasing filter changes little (Pillow's antialiased bilinear differs by
#: 0.3 grey levels on average at 263 -> 256 px), at a seventh of its cost. Past it, each output
#: pixel is the mean of the source area it covers (OpenCV's INTER_AREA).
LINEAR_MAX_SCALE = 1.25


def cached_reader(path: str) -> SlideReader:
    """The worker thread's open reader for ``path`` (a few kept, oldest closed).

    Only this one keeps its decoded tiles: a thread reads one slide at a time,
    and the others' would hold memory until their slide comes back.
    """
    reader = _thread_cached("readers", path, lambda: open_slide(path), limit=4)
    for other in _local.readers.values():
        if other is not reader:
            other.drop_tile_caches()
    return reader


def resize_patch(patch: np.ndarray, patch_px: int) -> np.ndarray:
    """Resample a square ``(n, n, 3)`` uint8 region to ``(patch_px, patch_px, 3)``."""
    scale = patch.shape[0] / patch_px
    interpolation = cv2.INTER_LINEAR if scale <= LINEAR_MAX_SCALE else cv2.INTER_AREA
    return cv2.resize(patch, (patch_px, patch_px), interpolation=interpolation)


def read_patch(
    reader: SlideReader, level: int, x: int, y: int, read_px: int, patch_px: int
) -> np.ndarray:
    """A ``(patch_px, patch_px, 3)`` uint8 patch from ``read_px`` px of ``level`` at ``(x, y)``."""
    patch = reader.read_level(level, (x, y), (read_px, read_px))
    return patch if read_px == patch_px else resize_patch(patch, patch_px)


def read_patches(
    slide_path: str, level: int, level_xy: np.ndarray, read_px: int, patch_px: int
) -> np.ndarray:
    """Read ``(n, patch_px, patch_px, 3)`` uint8 patches at ``level_xy`` (level pixels)."""
    reader = cached_reader(slide_path)
    out = np.empty((len(level_xy), patch_px, patch_px, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(level_xy):
        out[i] = read_patch(reader, level, int(x), int(y), read_px, patch_px)
    return out


def _cached_patches(store_path: str, slide_id: str, token: str) -> Any:
    """The worker thread's open ``patches`` array; ``token`` changes when the group is redone."""
    return _thread_cached(
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
