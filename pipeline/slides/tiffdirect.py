"""Direct tile decoding for tiled TIFF pyramids (generic tiled TIFF, Aperio SVS).

OpenSlide spends ~1.1 ms painting a 256 px region through cairo even when the
tile is cached, against ~0.15 ms to decode the JPEG tile itself. For the
formats whose pyramid levels are plain tiled TIFF pages, this reads the
compressed tiles with ``os.pread`` and decodes them with tifffile/imagecodecs
(libjpeg-turbo), keeping a small cache of decoded tiles. Every other format
goes through OpenSlide, which stays the pixel reference in the tests.

A JPEG tile can also be handed on as a complete JPEG stream without decoding
it (:meth:`DirectLevel.jpeg_tile`). Generic TIFFs such as CAMELYON16's store
complete streams. Aperio stores abbreviated ones: the quantisation and Huffman
tables sit once in the page's JPEGTables, and the components are R, G and B
with no marker saying so (OpenSlide and tifffile go by the TIFF's photometric
tag). The complete stream gets the tables back and, for RGB pages, an Adobe
APP14 marker with transform 0, which tells every JPEG decoder there is no
colour transform.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import simplejpeg
import tifffile

#: OpenSlide vendors whose levels are tiled TIFF pages tifffile can decode as they are.
DIRECT_VENDORS = frozenset({"generic-tiff", "aperio"})

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
#: APP14 "Adobe", version 100, no flags, transform 0: the components are R, G, B as stored.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class DirectLevel:
    """One tiled TIFF page read tile by tile; regions are in this level's pixels."""

    def __init__(self, fd: int, page: tifffile.TiffPage):
        self._fd = fd
        self.height, self.width = page.shape[:2]
        self.tile_h, self.tile_w = page.tilelength, page.tilewidth
        self.tiles_across = -(-self.width // self.tile_w)
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._decode = page.decode
        self._jpegtables = page.jpegtables
        tables = page.jpegtables or b""
        #: Tiles are JPEG streams that :meth:`jpeg_tile` can hand on whole, undecoded.
        self.jpeg_tiles = page.compression == 7 and (
            not tables or (tables[:2] == _SOI and tables[-2:] == _EOI)
        )
        # What goes between a tile's SOI and the rest of it to make it a complete stream.
        self._jpeg_header = (_ADOBE_RGB if page.photometric == 2 else b"") + tables[2:-2]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # Regions read row by row (patches that are not the stored tiles) straddle two rows
        # of tiles, and the next row of regions reads the lower one again: keep two rows.
        # Whole tiles are not kept (a grid of them never reads one twice).
        self._cache_tiles = 2 * self.tiles_across + 2
        #: Tiles decoded so far (a tile read again from the cache does not count).
        self.tiles_decoded = 0

    def tile(self, index: int, *, keep: bool = True) -> np.ndarray | None:
        """Return decoded tile ``index`` as ``(tile_h, tile_w, 3)`` uint8, or None if absent.

        ``keep``: cache it for the next reads (the least recently used goes).
        """
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        if self._counts[index] == 0:
            return None
        if self.jpeg_tiles:
            tile = decode_jpeg(self.jpeg_tile(index), f"tile {index}")
        else:
            segment, _, _ = self._decode(self.raw_tile(index), index, jpegtables=self._jpegtables)
            tile = segment.reshape(self.tile_h, self.tile_w, -1)[..., :3]
        self.tiles_decoded += 1
        tile.flags.writeable = False
        if keep:
            self._cache[index] = tile
            if len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return tile

    def drop_cache(self) -> None:
        """Forget the decoded tiles kept so far."""
        self._cache.clear()

    def raw_tile(self, index: int) -> bytes:
        """The stored bytes of tile ``index``."""
        count = self._counts[index]
        data = os.pread(self._fd, count, self._offsets[index])
        if count == 0 or len(data) != count:
            raise OSError(f"tile {index} is missing or truncated: {len(data)} of {count} bytes")
        return data

    def jpeg_tile(self, index: int, *, verify: bool = False) -> bytes:
        """Tile ``index`` as a complete JPEG stream (needs :attr:`jpeg_tiles`), not decoded.

        The stored bytes themselves when they are one; otherwise with the
        page's shared tables and colour space put in after the start marker.
        With ``verify``, the stream is decoded once (at 1/8 scale: every
        entropy-coded bit is still read) and corrupt data raises ``OSError``.
        """
        data = self.raw_tile(index)
        if data[:2] != _SOI:
            raise OSError(f"tile {index} is not a JPEG stream (starts with {data[:2].hex()})")
        if self._jpeg_header:
            data = b"".join((_SOI, self._jpeg_header, memoryview(data)[2:]))
        if verify:
            decode_jpeg(data, f"tile {index}", min_factor=8)
        return data

    def tile_index(self, x: int, y: int) -> int:
        """Index of the tile whose top-left corner is at level pixels ``(x, y)``."""
        return (y // self.tile_h) * self.tiles_across + x // self.tile_w

    def read(self, x: int, y: int, w: int, h: int, background: int = 255) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 of this level at ``(x, y)``; outside is ``background``.

        A region that is exactly one whole stored tile is that tile (read-only).
        """
        if (
            w == self.tile_w
            and h == self.tile_h
            and x % w == 0
            and y % h == 0
            and x >= 0
            and x + w <= self.width
            and y >= 0
            and y + h <= self.height
        ):
            tile = self.tile(self.tile_index(x, y), keep=False)
            if tile is not None:
                return tile
        out = np.full((h, w, 3), background, dtype=np.uint8)
        x_lo, y_lo = max(x, 0), max(y, 0)
        x_hi, y_hi = min(x + w, self.width), min(y + h, self.height)
        if x_lo >= x_hi or y_lo >= y_hi:
            return out
        for ty in range(y_lo // self.tile_h, (y_hi - 1) // self.tile_h + 1):
            for tx in range(x_lo // self.tile_w, (x_hi - 1) // self.tile_w + 1):
                tile = self.tile(ty * self.tiles_across + tx)
                if tile is None:
                    continue
                tile_x, tile_y = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x_lo, tile_x), max(y_lo, tile_y)
                sx1 = min(x_hi, tile_x + self.tile_w)
                sy1 = min(y_hi, tile_y + self.tile_h)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - tile_y : sy1 - tile_y, sx0 - tile_x : sx1 - tile_x
                ]
        return out


def decode_jpeg(data: bytes, what: str, *, min_factor: int = 1) -> np.ndarray:
    """Decode a complete JPEG stream to ``(h, w, 3)`` uint8 RGB, refusing corrupt data.

    libjpeg's warnings ("Corrupt JPEG data: premature end of data segment",
    "... extraneous bytes before marker") are errors here: the decoder goes on
    after them and returns grey or shifted blocks, which must never become
    patches or heatmaps. ``min_factor`` decodes at a reduced scale (a check).
    Raises ``OSError`` naming ``what``.
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_factor=min_factor)
    except ValueError as exc:
        raise OSError(f"{what}: corrupt JPEG data ({exc})") from exc


class DirectTiff:
    """The tiled TIFF pages matching a slide's OpenSlide levels, by level index.

    ``levels[k]`` is None where level ``k`` has no matching tiled page (that
    level is then read through OpenSlide).
    """

    def __init__(self, path: Path, level_wh: tuple[tuple[int, int], ...]):
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._tif = tifffile.TiffFile(path)
            pages = [
                page
                for page in self._tif.pages
                if isinstance(page, tifffile.TiffPage)
                and page.is_tiled
                and page.samplesperpixel >= 3
                and page.dtype == np.uint8
                and page.planarconfig == 1
            ]
            self.levels: list[DirectLevel | None] = []
            for w, h in level_wh:
                match = next((p for p in pages if p.shape[:2] == (h, w)), None)
                self.levels.append(None if match is None else DirectLevel(self._fd, match))
        except Exception:
            os.close(self._fd)
            raise

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)
