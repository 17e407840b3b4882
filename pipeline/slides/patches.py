"""Reading patches from a slide, the same for tiling and inference: cached handles, resampling.

Each worker thread keeps its slides open between tasks (opening costs
milliseconds each; a task is ~0.1 s of work).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from pipeline.slides.reader import SlideReader, open_slide

_local = threading.local()


def thread_cached(slot: str, key: Any, open_: Callable[[], Any], limit: int) -> Any:
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
    reader = thread_cached("readers", path, lambda: open_slide(path), limit=4)
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
