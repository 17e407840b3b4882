"""Write multi-resolution, tiled TIFF pyramids tile by tile (JPEG, or lossless deflate).

The layout is what OpenSlide opens as a *generic tiled TIFF*: one top-level
tiled directory per level, each half the size of the previous one, the
level-0 pixel size in the resolution tags (so OpenSlide reports mpp).

Memory stays bounded by one row of tiles per level whatever the slide size:
level 0 is rendered a tile row at a time and streamed into the file, while
each row is also downsampled 2x into a temporary, compressed Zarr array for
the next level, which is streamed in turn once level 0 is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from zarr.codecs import ZstdCodec

#: ``render(level0_x, level0_y, width, height) -> (height, width, 3) uint8``
RenderFn = Callable[[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class PyramidInfo:
    """What was written: ``level_wh`` are ``(width, height)`` per level, level 0 first."""

    path: Path
    level_wh: tuple[tuple[int, int], ...]
    tile_px: int
    mpp: float | None
    file_bytes: int


def pyramid_level_sizes(width: int, height: int, tile_px: int) -> list[tuple[int, int]]:
    """Halve ``(width, height)`` (rounding down) until a level fits in one tile."""
    sizes = [(width, height)]
    while max(sizes[-1]) > tile_px and min(sizes[-1]) >= 2:
        w, h = sizes[-1]
        sizes.append((w // 2, h // 2))
    return sizes


def write_pyramid_tiff(
    path: Path | str,
    width: int,
    height: int,
    render: RenderFn,
    *,
    mpp: float | None,
    tile_px: int = 256,
    jpeg_quality: int = 80,
    lossless: bool = False,
    description: str = "",
    on_tile_row: Callable[[int, int], None] | None = None,
) -> PyramidInfo:
    """Render a ``width x height`` level-0 image through ``render`` into a pyramidal TIFF.

    ``mpp`` is the level-0 pixel size in µm (None: no resolution recorded, as
    some scanners' exports; OpenSlide then reports no mpp); ``on_tile_row(done, total)`` is
    called after each level-0 tile row; ``lossless``: deflate (level 0 keeps every
    pixel's value) instead of JPEG. The file appears atomically: it is
    written as ``<name>.partial`` and renamed when complete.
    """
    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(
            f"Expected a positive slide size. Received: width={width}, height={height}"
        )
    if tile_px % 16 or tile_px < 16:
        raise ValueError(
            f"Expected a tile size that is a multiple of 16. Received: tile_px={tile_px}"
        )
    sizes = pyramid_level_sizes(width, height, tile_px)
    partial = path.with_name(path.name + ".partial")
    try:
        compression = ("zlib", {"level": 6}) if lossless else ("jpeg", {"level": jpeg_quality})
        _write_levels(partial, sizes, render, mpp, tile_px, compression, description, on_tile_row)
    except BaseException:
        partial.unlink(missing_ok=True)  # never leave a file that looks like a slide
        raise
    os.replace(partial, path)
    return PyramidInfo(
        path=path,
        level_wh=tuple(sizes),
        tile_px=tile_px,
        mpp=mpp,
        file_bytes=path.stat().st_size,
    )


def _write_levels(
    partial: Path,
    sizes: list[tuple[int, int]],
    render: RenderFn,
    mpp: float | None,
    tile_px: int,
    compression: tuple[str, dict],
    description: str,
    on_tile_row: Callable[[int, int], None] | None,
) -> None:
    width, height = sizes[0]
    # BigTIFF once the raw pixels pass 2 GiB, so large slides cannot overflow 32-bit offsets.
    bigtiff = width * height * 3 > 2**31
    with tempfile.TemporaryDirectory(prefix=".pyramid-", dir=partial.parent) as scratch:
        stores = [
            zarr.create_array(
                store=os.path.join(scratch, f"level{k}.zarr"),
                shape=(h, w, 3),
                chunks=(tile_px, w, 3),
                dtype="uint8",
                compressors=ZstdCodec(level=1),
                fill_value=255,
            )
            for k, (w, h) in enumerate(sizes)
            if k > 0
        ]
        sinks = [_HalvingSink(store, tile_px) for store in stores]
        with tifffile.TiffWriter(partial, bigtiff=bigtiff) as tif:
            for level, (w, h) in enumerate(sizes):
                if level == 0:
                    strips = _render_strips(render, width, height, tile_px, on_tile_row)
                else:
                    sinks[level - 1].flush()
                    strips = _stored_strips(stores[level - 1], tile_px)
                sink = sinks[level] if level < len(sinks) else None
                if mpp is None:
                    resolution = None
                else:
                    level_mpp = mpp * width / w
                    resolution = (1e4 / level_mpp, 1e4 / level_mpp)
                tif.write(
                    _tiles(strips, w, tile_px, sink),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile_px, tile_px),
                    photometric="rgb",
                    compression=compression[0],
                    compressionargs=compression[1],
                    predictor=compression[0] == "zlib",
                    resolution=resolution,
                    resolutionunit="CENTIMETER" if resolution else "NONE",
                    subfiletype=0 if level == 0 else 1,
                    description=description if level == 0 else None,
                    software="wsiflow",
                    metadata=None,
                )


def _render_strips(
    render: RenderFn,
    width: int,
    height: int,
    tile_px: int,
    on_tile_row: Callable[[int, int], None] | None,
) -> Iterator[np.ndarray]:
    """Yield level-0 strips of ``tile_px`` rows (fewer at the bottom), rendered tile by tile."""
    n_rows = -(-height // tile_px)
    for row in range(n_rows):
        y0 = row * tile_px
        rows = min(tile_px, height - y0)
        strip = np.empty((rows, width, 3), dtype=np.uint8)
        for x0 in range(0, width, tile_px):
            cols = min(tile_px, width - x0)
            strip[:, x0 : x0 + cols] = render(x0, y0, cols, rows)
        yield strip
        if on_tile_row is not None:
            on_tile_row(row + 1, n_rows)


def _stored_strips(store: zarr.Array, tile_px: int) -> Iterator[np.ndarray]:
    height = store.shape[0]
    for y0 in range(0, height, tile_px):
        yield store[y0 : min(y0 + tile_px, height)]


def _tiles(
    strips: Iterator[np.ndarray], width: int, tile_px: int, sink: _HalvingSink | None
) -> Iterator[np.ndarray]:
    """Yield full ``(tile_px, tile_px, 3)`` tiles row by row, feeding each strip to ``sink``."""
    for strip in strips:
        if sink is not None:
            sink.push(strip)
        for x0 in range(0, width, tile_px):
            tile = strip[:, x0 : x0 + tile_px]
            if tile.shape[:2] != (tile_px, tile_px):
                # Edge tiles: repeat the border instead of tifffile's black padding,
                # which would bleed into the visible pixels through JPEG's blocks.
                pad = ((0, tile_px - tile.shape[0]), (0, tile_px - tile.shape[1]), (0, 0))
                tile = np.pad(tile, pad, mode="edge")
            yield np.ascontiguousarray(tile)


class _HalvingSink:
    """Accept strips of one level; write their 2x2-mean downsample to the next level's store."""

    def __init__(self, store: zarr.Array, tile_px: int):
        self.store = store
        self.tile_px = tile_px
        self.height, self.width = store.shape[:2]
        self.next_row = 0
        self.carry: np.ndarray | None = None  # an odd leftover source row
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def push(self, strip: np.ndarray) -> None:
        if self.carry is not None:
            strip = np.concatenate([self.carry, strip])
            self.carry = None
        pairs = strip.shape[0] // 2
        if strip.shape[0] % 2:
            self.carry = strip[-1:].copy()
        rows = min(pairs, self.height - self.next_row - self.pending_rows)
        if rows <= 0:
            return
        top, bottom = strip[0 : 2 * rows : 2], strip[1 : 2 * rows : 2]
        w2 = 2 * self.width
        # Rounded 2x2 mean in uint16, half a source strip of scratch memory.
        acc = top[:, 0:w2:2].astype(np.uint16)
        acc += top[:, 1:w2:2]
        acc += bottom[:, 0:w2:2]
        acc += bottom[:, 1:w2:2]
        acc += 2
        acc >>= 2
        self.pending.append(acc.astype(np.uint8))
        self.pending_rows += rows
        if self.pending_rows >= self.tile_px:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending)
        self.store[self.next_row : self.next_row + block.shape[0]] = block
        self.next_row += block.shape[0]
        self.pending, self.pending_rows = [], 0
