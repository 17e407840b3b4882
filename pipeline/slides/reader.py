"""The one gate for slide I/O: the only module that imports OpenSlide.

Everything else sees :class:`SlideReader`: level geometry, physical pixel size
and ``read_region`` returning ``(h, w, 3)`` uint8 arrays. Readers are opened
inside the process that uses them (OpenSlide handles do not pickle): pass
paths between processes, never readers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import tifffile

from pipeline.errors import SlideNotFoundError, SlideReadError
from pipeline.slides.tiffdirect import DIRECT_VENDORS, DirectLevel, DirectTiff

try:
    import openslide
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "wsiflow needs the OpenSlide library. Try `pip install openslide-bin` "
        "(or install your platform's openslide package)."
    ) from exc

#: What OpenSlide raises when a read fails (the viewer's Deep Zoom tiles come straight from it).
READ_ERRORS = (openslide.OpenSlideError,)

#: Background used where a read falls outside the slide or the slide is transparent.
BACKGROUND_RGB = (255, 255, 255)


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is, independent of any open handle.

    ``level_wh`` are ``(width, height)`` pixels per pyramid level, level 0
    first; ``level_downsamples`` are relative to level 0; ``mpp_xy`` is the
    level-0 pixel size in µm, or ``None`` when the file records none.
    """

    path: Path
    vendor: str
    level_wh: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_xy: tuple[float, float] | None
    objective_power: float | None
    properties: dict[str, str]
    associated_images: tuple[str, ...]

    @property
    def level0_wh(self) -> tuple[int, int]:
        return self.level_wh[0]

    @property
    def level_count(self) -> int:
        return len(self.level_wh)

    @property
    def mpp(self) -> float | None:
        """Level-0 µm per pixel (mean of x and y), or ``None`` when the file records none."""
        return None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2


class SlideReader:
    """A slide opened with OpenSlide. Use as a context manager or call :meth:`close`.

    With ``direct=True`` (the default), :meth:`read_level` decodes tiles of
    tiled TIFF pyramids (generic TIFF, Aperio SVS) itself, ~5x faster than
    OpenSlide's painting and pixel-identical; other formats and levels with no
    matching TIFF page go through OpenSlide.
    """

    def __init__(self, path: Path | str, *, direct: bool = True):
        self.path = Path(path)
        file = self.path
        if self.path.is_dir():  # a DICOM series: OpenSlide finds its other files from one
            series = dicom_files(self.path)
            if not series:
                raise SlideNotFoundError(self.path, "is a folder, not a slide file")
            file = series[0]
        if not file.is_file():
            raise SlideNotFoundError(self.path, _why_missing(self.path))
        if file.stat().st_size == 0:
            raise SlideReadError(file, "empty file (0 bytes): a copy or download cut short?")
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except OSError as exc:  # permission denied, an I/O error on the disk
            raise SlideReadError(file, f"cannot read the file: {exc.strerror}") from exc
        try:
            self._osr = openslide.OpenSlide(str(file))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            reason = (
                _truncated(file)
                or _plain_tiff(file)
                or ("not a slide format OpenSlide can read (unsupported or not a slide)")
            )
            raise SlideReadError(self.path, reason) from exc
        except openslide.OpenSlideError as exc:
            reason = _truncated(file) or f"OpenSlide cannot open it: {exc}"
            raise SlideReadError(self.path, reason) from exc
        self.info = _slide_info(self.path, self._osr)
        self._direct: DirectTiff | None = None
        if direct and self.info.vendor in DIRECT_VENDORS:
            try:
                self._direct = DirectTiff(self.path, self.info.level_wh)
            except Exception:  # tifffile cannot parse it: OpenSlide reads everything
                self._direct = None

    def direct_level(self, level: int) -> DirectLevel | None:
        """The direct tile reader of ``level``, or None when it goes through OpenSlide."""
        return None if self._direct is None else self._direct.levels[level]

    def drop_tile_caches(self) -> None:
        """Forget the tiles the direct readers keep decoded (memory back; reads stay right)."""
        if self._direct is not None:
            for direct in self._direct.levels:
                if direct is not None:
                    direct.drop_cache()

    def read_level(
        self, level: int, level_xy: tuple[int, int], size_wh: tuple[int, int]
    ) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB of ``level``, top-left at ``level_xy`` in *level* pixels.

        Outside the slide is :data:`BACKGROUND_RGB`. Through OpenSlide the
        level-0 position is ``round(level_xy * downsample)``.
        """
        direct = self.direct_level(level)
        if direct is not None:
            try:
                return direct.read(level_xy[0], level_xy[1], size_wh[0], size_wh[1])
            except Exception as exc:
                raise SlideReadError(
                    self.path,
                    f"cannot decode level {level} at {level_xy} "
                    f"(corrupt or truncated file?): {exc}",
                ) from exc
        downsample = self.info.level_downsamples[level]
        level0_xy = (round(level_xy[0] * downsample), round(level_xy[1] * downsample))
        return self.read_region(level0_xy, level, size_wh)

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]
    ) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB pixels of ``level`` whose top-left is ``level0_xy``.

        Areas outside the slide or transparent in it are :data:`BACKGROUND_RGB`.
        """
        try:
            image = self._osr.read_region(level0_xy, level, size_wh)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                self.path,
                f"cannot decode region at level-0 {level0_xy}, level {level}, "
                f"size {size_wh} (corrupt or truncated file?): {exc}",
            ) from exc
        return _rgba_to_rgb(np.asarray(image))

    def overview(
        self, downsample: float, block_px: int = 2048
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Return the slide at about ``downsample`` x level 0, streamed in blocks.

        Reads the level with the largest downsample not above ``downsample``
        and block-averages it by the remaining integer factor, ``block_px``
        level pixels at a time, so memory stays bounded by the result.
        Returns ``(rgb, level0_px_per_px_xy)``: ``(h, w, 3)`` uint8 and the
        exact level-0 pixels per overview pixel along x and y.
        """
        downsamples = self.info.level_downsamples
        level = max(
            (k for k, d in enumerate(downsamples) if d <= downsample * 1.01),
            key=lambda k: downsamples[k],
        )
        level_w, level_h = self.info.level_wh[level]
        factor = max(1, int(downsample / downsamples[level] + 0.01))
        out_w, out_h = max(1, level_w // factor), max(1, level_h // factor)
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        step = max(1, block_px // factor) * factor  # level pixels per block, a multiple of factor
        for y in range(0, out_h * factor, step):
            for x in range(0, out_w * factor, step):
                w = min(step, out_w * factor - x)
                h = min(step, out_h * factor - y)
                block = self.read_level(level, (x, y), (w, h))
                if factor > 1:
                    # Rounded here only: np.rint of uint8 pixels makes float16, ~15x slower
                    # than reading them.
                    block = np.rint(
                        block.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
                    )
                out[y // factor : (y + h) // factor, x // factor : (x + w) // factor] = block
        level0_w, level0_h = self.info.level0_wh
        return out, (level0_w / out_w, level0_h / out_h)

    def thumbnail(self, max_wh: tuple[int, int]) -> np.ndarray:
        """Return an ``(h, w, 3)`` uint8 RGB thumbnail that fits in ``max_wh``."""
        try:
            image = self._osr.get_thumbnail(max_wh)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self.path, f"cannot read a thumbnail: {exc}") from exc
        return np.asarray(image.convert("RGB"))

    def associated_image(self, name: str) -> np.ndarray:
        """Return an associated image (``label``, ``macro``, ``thumbnail``...) as RGB."""
        try:
            image = self._osr.associated_images[name]
        except KeyError:
            raise SlideReadError(
                self.path,
                f"Expected an associated image in {sorted(self._osr.associated_images)}. "
                f"Got {name!r} instead.",
            ) from None
        return _rgba_to_rgb(np.asarray(image))

    def deepzoom(self, tile_px: int = 254, overlap: int = 1):
        """An OpenSlide ``DeepZoomGenerator`` over this slide (DZI XML, tile geometry, tiles).

        Tiles come back as PIL RGB images; bad levels or addresses raise ``ValueError``.
        """
        from openslide.deepzoom import DeepZoomGenerator

        return DeepZoomGenerator(self._osr, tile_size=tile_px, overlap=overlap, limit_bounds=False)

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._osr.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_slide(path: Path | str, *, direct: bool = True) -> SlideReader:
    """Open ``path`` with OpenSlide, raising :class:`SlideError` subclasses on failure."""
    return SlideReader(path, direct=direct)


def _why_missing(path: Path) -> str:
    """Why ``path`` is not a file: a broken link, a link loop, or nothing there."""
    if not path.is_symlink():
        return "is a folder, not a slide file" if path.is_dir() else "no such file"
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a link loop (the link leads back to itself)"
    return f"a broken link: its target {os.readlink(path)} does not exist"


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly in ``folder`` (a DICOM WSI series), sorted."""
    try:
        return sorted(
            p
            for p in Path(folder).iterdir()
            if p.suffix.lower() == ".dcm" and not p.name.startswith(".")
        )
    except OSError:
        return []


def _plain_tiff(path: Path) -> str | None:
    """A reason when ``path`` is a TIFF OpenSlide does not take because it is not tiled."""
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if page.is_tiled:
                return None
            return (
                f"a TIFF that is not tiled (one plain {page.imagewidth} x {page.imagelength} "
                "image, no pyramid), which OpenSlide does not read; convert it to a tiled "
                "pyramid, e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`"
            )
    except Exception:  # not a TIFF tifffile can read
        return None


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs what it skips in a damaged file; the reason we give says it instead."""
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tiff_log.setLevel(level)


def _truncated(path: Path) -> str | None:
    """A reason when ``path`` is a TIFF whose structure points past its end (cut short)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(16)
    byteorder = {b"II": "little", b"MM": "big"}.get(header[:2])
    if byteorder is None or len(header) < 16:
        return None
    version = int.from_bytes(header[2:4], byteorder)
    if version == 42:  # classic TIFF: the first directory's offset is 4 bytes at 4
        first = int.from_bytes(header[4:8], byteorder)
    elif version == 43:  # BigTIFF: 8 bytes at 8
        first = int.from_bytes(header[8:16], byteorder)
    else:
        return None
    cut = f"truncated or corrupt: a TIFF of {size:,} bytes whose structure reaches past its end"
    end = _directories_end(path, size, byteorder, version == 43, first)
    if end > size:
        return f"{cut} (its directories reach byte {end:,}); a copy or download cut short?"
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            end = max(
                (
                    int(offset) + int(count)
                    for page in tif.pages
                    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)
                ),
                default=0,
            )
    except Exception:  # tifffile cannot walk its directories: not a TIFF we can judge
        return None
    if end > size:
        return f"{cut} (its data runs to byte {end:,}); a copy or download cut short?"
    return None


def _directories_end(path: Path, size: int, byteorder: str, big: bool, offset: int) -> int:
    """The furthest byte the chain of TIFF directories from ``offset`` needs (a bounded walk)."""
    count_size, entry_size, offset_size = (8, 20, 8) if big else (2, 12, 4)
    end = 0
    with open(path, "rb") as handle:
        for _ in range(10_000):  # a chain that loops ends here
            if offset == 0:
                break
            if offset + count_size > size:
                return max(end, offset + count_size)
            handle.seek(offset)
            count = int.from_bytes(handle.read(count_size), byteorder)
            next_at = offset + count_size + count * entry_size
            end = max(end, next_at + offset_size)
            if end > size:
                return end
            handle.seek(next_at)
            offset = int.from_bytes(handle.read(offset_size), byteorder)
    return end


def _slide_info(path: Path, osr: openslide.OpenSlide) -> SlideInfo:
    props = dict(osr.properties)
    mpp_xy = None
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
        if mpp_x > 0 and mpp_y > 0:
            mpp_xy = (mpp_x, mpp_y)
    except (KeyError, ValueError):
        pass
    try:
        objective_power = float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
    except (KeyError, ValueError):
        objective_power = None
    return SlideInfo(
        path=path,
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
        level_wh=tuple((int(w), int(h)) for w, h in osr.level_dimensions),
        level_downsamples=tuple(float(d) for d in osr.level_downsamples),
        mpp_xy=mpp_xy,
        objective_power=objective_power,
        properties=props,
        associated_images=tuple(sorted(osr.associated_images)),
    )


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA onto the background colour."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    # Premultiplied: out = rgb + (1 - a) * background.
    a = alpha.astype(np.float32)[..., None] / 255.0
    background = np.asarray(BACKGROUND_RGB, dtype=np.float32)
    out = rgba[..., :3].astype(np.float32) + (1.0 - a) * background
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: File suffixes OpenSlide reads (whole-slide formats), used when a folder is given.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)


def find_slides(paths: list[Path] | tuple[Path, ...]) -> list[Path]:
    """Expand files and folders (searched recursively) into a sorted list of slide files.

    Files given explicitly are kept whatever their suffix (and whether or not
    they exist, so the caller reports them); folders contribute files with a
    suffix in :data:`SLIDE_SUFFIXES`, skipping hidden files and folders (broken
    links and link loops among them are kept, for the caller to report).
    Symbolic links to folders are followed (a cohort linked in from another
    disk), each real folder once, so a link back up the tree ends the search.
    """
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found.extend(_slides_in(path))
        elif path.suffix.lower() == ".dcm" and path.is_file():
            found.append(path.parent)  # one file of a DICOM series: the series' folder
        else:
            found.append(path)
    return sorted(dict.fromkeys(found))


def _slides_in(folder: Path) -> list[Path]:
    """Slide files under ``folder``, following links to folders, each real folder once."""
    found = []
    seen: set[str] = set()
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        # Broken links and link loops are listed too: opening them says which they are,
        # rather than the slide silently missing from the cohort.
        listed = [
            Path(top, name)
            for name in files
            if not name.startswith(".")
            and Path(name).suffix.lower() in SLIDE_SUFFIXES
            and (Path(top, name).is_file() or Path(top, name).is_symlink())
        ]
        # DICOM WSI stores a slide as a series of files (one per level, label, overview)
        # in one folder: the folder is the slide.
        dicom = [p for p in listed if p.suffix.lower() == ".dcm"]
        found.extend(p for p in listed if p.suffix.lower() != ".dcm")
        if dicom:
            found.append(Path(top))
    return found
