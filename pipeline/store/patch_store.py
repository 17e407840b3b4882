"""The Zarr patch store: one group per slide, a cohort summary in the root attributes.

::

    STORE.zarr/                      attrs: wsiflow_store, slides {id: summary}
    STORE.zarr/<slide_id>/           attrs: slide identity, resolution, config, version,
                                            complete: true (written last)
        patches         uint8  (N, P, P, 3)  chunked (chunk_patches, P, P, 3), files c.<i>.0.0.0
        labels          int8   (N,)          1 tumor, 0 normal
        tumor_fraction  float32 (N,)
        tissue_fraction float32 (N,)
        coords          int32  (N, 2)        level-0 x, y of each patch's top-left corner

A group without ``complete: true`` is an interrupted write and is redone.

A store is a local path or any fsspec URL Zarr can open (``s3://bucket/cohort.zarr``,
``gs://``, ``az://``, ...); the backend (``s3fs``, ``gcsfs``, ``adlfs``) reads its
credentials and endpoint from its usual environment and configuration files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.errors import ForeignOutputError, StoreError
from pipeline.outputs import atomic, foreign_entries, is_url, location, not_ours
from pipeline.slides.stain import SAMPLE_PATCHES, fit_stain, sample_rows
from pipeline.store.codecs import PatchImageCodec, image_codec_of

STORE_FORMAT = 1
#: Compressors for the lossless choices; image codecs go through PatchImageCodec.
LOSSLESS = {
    "zstd": lambda: ZstdCodec(level=3),
    "lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),
    "none": lambda: None,
}


def canonical(store: Path | str) -> str:
    """A store's location for cache keys and flow parameters: URLs as given, paths absolute."""
    return location(store) if is_url(store) else str(Path(location(store)).resolve())


def join(store: Path | str, *parts: str) -> str:
    """The location of ``parts`` inside ``store`` (a path or a URL)."""
    return "/".join([location(store).rstrip("/"), *parts])


def open_root(store_path: Path | str) -> zarr.Group:
    """Open (or create) the store's root group.

    Only an absent or empty location, or a wsiflow patch store, is written
    into: anything else (a folder of the user's files, another Zarr group)
    is a :class:`ForeignOutputError` before anything is written there.
    """
    check_writable_store(store_path)
    root = _open_group(store_path, "a")
    if "wsiflow_store" not in root.attrs:
        root.update_attributes({"wsiflow_store": STORE_FORMAT, "slides": {}})
    return root


def check_writable_store(store_path: Path | str) -> None:
    """Raise :class:`ForeignOutputError` unless ``store_path`` is absent, empty or ours."""
    where = location(store_path)
    if is_url(where):
        fs, path = _filesystem(where)
        try:
            names = [Path(p).name for p in fs.ls(path, detail=False)] if fs.isdir(path) else []
        except FileNotFoundError:
            names = []
        except Exception as exc:  # connection, credentials, permissions
            raise StoreError(where, f"cannot open ({type(exc).__name__}: {exc})") from exc
        read = (lambda: fs.cat_file(f"{path}/zarr.json")) if "zarr.json" in names else None
    else:
        folder = Path(where)
        if folder.exists() and not folder.is_dir():
            raise ForeignOutputError(where, "exists and is not a folder (a patch store is one)")
        names = foreign_entries(folder) if folder.is_dir() else []
        read = (folder / "zarr.json").read_bytes if "zarr.json" in names else None
    if not names:
        return
    if read is None:
        raise ForeignOutputError(where, not_ours(names))
    try:
        attrs = json.loads(read()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        attrs = {}
    if "wsiflow_store" not in attrs:
        raise ForeignOutputError(
            where,
            "is a Zarr group wsiflow did not write (no wsiflow_store attribute); "
            "choose another --out",
        )


def zarr_root(store_path: Path | str) -> zarr.Group:
    """Open an existing store's root for writing slide groups, leaving its attributes alone.

    Per-slide tasks running at once use this; :func:`open_root` (which may
    write the root attributes) is called once before them.
    """
    return _open_group(store_path, "r+", "no patch store here; create it first (open_root)")


def open_store(store_path: Path | str) -> zarr.Group:
    """An existing patch store's root group, read-only.

    Raises :class:`StoreError` naming the store for a missing store, a bad
    URL, an unreachable or unknown backend, or a group that is not a wsiflow
    store.
    """
    root = _open_group(store_path, "r")
    if "wsiflow_store" not in root.attrs:
        raise StoreError(
            store_path,
            "not a wsiflow patch store (no wsiflow_store attribute); write one with `wsiflow tile`",
        )
    return root


_NO_STORE = "not a Zarr patch store (no zarr.json); write one with `wsiflow tile`"


def _open_group(store_path: Path | str, mode: str, missing: str | None = None) -> zarr.Group:
    """``zarr.open_group`` with every way of failing turned into one :class:`StoreError`.

    ``missing`` says what is wrong when there is no group (default: for reading,
    not a store; for creating, the folder or bucket cannot be made).
    """
    where = location(store_path)
    if is_url(where):
        _reachable(where)
    try:
        return zarr.open_group(where, mode=mode)
    except zarr.errors.GroupNotFoundError as exc:
        raise StoreError(where, missing or _NO_STORE) from exc
    except FileNotFoundError as exc:  # e.g. "The specified bucket does not exist"
        default = f"cannot create a patch store here ({exc})" if mode == "a" else _NO_STORE
        raise StoreError(where, missing or default) from exc
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(where, "is a Zarr array, not a patch store (a group)") from exc
    except Exception as exc:  # permissions, credentials, metadata Zarr cannot read
        raise StoreError(where, f"cannot open ({type(exc).__name__}: {exc})") from exc


def _reachable(url: str) -> None:
    """One synchronous look at a store URL: a bad endpoint or credentials is one clear error.

    Zarr's concurrent first reads would leave a trail of unretrieved
    exceptions behind the same failure.
    """
    fs, path = _filesystem(url)
    try:
        fs.exists(f"{path}/zarr.json")
    except Exception as exc:  # the backend's own errors: connection, credentials, permissions
        raise StoreError(url, f"cannot open ({type(exc).__name__}: {exc})") from exc


def _filesystem(store_path: Path | str) -> tuple[Any, str]:
    """The fsspec filesystem of a store URL and the store's path in it."""
    import fsspec

    where = location(store_path)
    try:
        return fsspec.core.url_to_fs(where)
    except ImportError as exc:  # fsspec names the package the protocol needs
        raise StoreError(where, f"cannot open this URL: {exc}") from exc
    except ValueError as exc:  # "Protocol not known: ...", malformed URLs
        raise StoreError(where, f"not a store location: {exc}") from exc


def completed_attrs(root: zarr.Group, slide_id: str) -> dict[str, Any] | None:
    """The attributes of ``slide_id``'s complete group; None if absent, partial, unreadable."""
    try:
        attrs = root[slide_id].attrs
    except (KeyError, FileNotFoundError, ValueError, OSError):
        return None
    return dict(attrs) if attrs.get("complete") is True else None


def completed_fingerprint(root: zarr.Group, slide_id: str) -> str | None:
    """The fingerprint of ``slide_id``'s complete group; None if absent, partial, unreadable."""
    attrs = completed_attrs(root, slide_id)
    return None if attrs is None else attrs.get("fingerprint")


def other_source(complete: dict[str, Any] | None, path: Path) -> str | None:
    """The source file of a complete group (its ``complete`` attributes) when not ``path``.

    Two files with one slide id (``dirA/case1.tif``, ``dirB/case1.tif``) are
    two slides: the second never silently replaces the first. None when the
    group is not complete or is from ``path``.
    """
    slide = (complete or {}).get("slide")
    source = slide.get("path") if isinstance(slide, dict) else None
    if not source or source == str(Path(path).resolve()):
        return None
    return source


def create_slide_group(
    root: zarr.Group,
    slide_id: str,
    *,
    n_patches: int,
    patch_px: int,
    chunk_patches: int,
    codec: str,
    codec_quality: int,
    attrs: dict[str, Any],
) -> zarr.Group:
    """(Re)create the group of ``slide_id`` with empty arrays; ``complete`` is false.

    Write patches through :func:`open_patches`: Zarr's default skips chunks
    equal to the fill value, and that check costs ~0.5 ms per 256 px patch,
    for patches of tissue that are never empty. Patch chunks are files side
    by side (``patches/c.7.0.0.0``) rather than Zarr's default directory per
    chunk (``patches/c/7/0/0/0``): making those three directories took longer
    than writing the chunk itself on our machines (BENCHMARKS.md).
    """
    group = root.create_group(slide_id, overwrite=True)
    if codec in LOSSLESS:
        serializer: Any = BytesCodec()
        compressor = LOSSLESS[codec]()
        compressors = () if compressor is None else (compressor,)
    else:
        serializer = PatchImageCodec(format=codec, quality=codec_quality)
        compressors = ()
    group.create_array(
        "patches",
        shape=(n_patches, patch_px, patch_px, 3),
        chunks=(chunk_patches, patch_px, patch_px, 3),
        dtype="uint8",
        serializer=serializer,
        compressors=compressors,
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    per_patch_chunks = max(1, min(n_patches, 65536))
    for name, dtype, shape in (
        ("labels", "int8", (n_patches,)),
        ("tumor_fraction", "float32", (n_patches,)),
        ("tissue_fraction", "float32", (n_patches,)),
        ("coords", "int32", (n_patches, 2)),
    ):
        group.create_array(
            name,
            shape=shape,
            chunks=(per_patch_chunks, *shape[1:]),
            dtype=dtype,
            compressors=ZstdCodec(level=3),
            fill_value=0,
        )
    # One metadata write: attrs.update() would rewrite zarr.json once per key.
    group.update_attributes({**attrs, "complete": False})
    return group


def open_patches(store_path: Path | str, slide_id: str) -> zarr.Array:
    """Open a slide's ``patches`` array for writing (~1 ms; workers cache it per slide)."""
    array = zarr.open_array(join(store_path, slide_id, "patches"), mode="r+")
    # A runtime setting, not stored in the metadata: see create_slide_group.
    return array.with_config({"write_empty_chunks": True})


def write_encoded_chunk(array: zarr.Array, chunk_index: int, data: bytes) -> None:
    """Store already-encoded bytes as chunk ``chunk_index`` of a patches array.

    For image-codec chunks built with :func:`pipeline.store.codecs.pack_images`,
    from patches the worker encoded or from the source slide's own JPEG
    tiles. A local chunk file appears atomically (written aside, then
    renamed); elsewhere the store's own put is one object, whole or absent.
    """
    path = _local_chunk_file(array, chunk_index)
    if path is None:
        buffer = default_buffer_prototype().buffer.from_bytes(data)
        sync((array.store_path / _chunk_key(array, chunk_index)).set(buffer))
        return
    with atomic(path) as partial:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)


def read_encoded_chunk(array: zarr.Array, chunk_index: int) -> bytes | None:
    """The stored bytes of chunk ``chunk_index`` of a patches array (None if absent)."""
    path = _local_chunk_file(array, chunk_index)
    if path is None:
        key = _chunk_key(array, chunk_index)
        buffer = sync((array.store_path / key).get(default_buffer_prototype()))
        return None if buffer is None else buffer.to_bytes()
    try:
        return path.read_bytes()
    except FileNotFoundError:  # an empty chunk
        return None


def read_some(array: zarr.Array, start: int, n: int, indices: np.ndarray) -> np.ndarray:
    """Patches ``start + indices`` of the chunk of ``n`` patches at ``start`` (repeats allowed).

    With the patch image codec only those patches are decoded: a balanced
    training stream or a mining pass keeps few patches per chunk, and
    decoding just those saves most of the work.
    """
    codec = image_codec_of(array)
    data = read_encoded_chunk(array, start // array.chunks[0]) if codec else None
    if data is None:
        return array[start : start + n][indices]
    return codec.decode_some(data, indices)


def read_rows(array: zarr.Array, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Patches ``array[rows]`` (``rows`` sorted), one chunk's share at a time.

    Only those patches are decoded (:func:`read_some`), and at most one
    chunk's worth is in memory per step.
    """
    n, chunk = array.shape[0], array.chunks[0]
    for start in range(0, n, chunk):
        here = rows[(rows >= start) & (rows < start + chunk)]
        if len(here):
            yield read_some(array, start, min(chunk, n - start), here - start)


def stored_stain_fit(array: zarr.Array, method: str, target: dict[str, Any]) -> dict[str, Any]:
    """A slide's own stain fit (its source) from its stored ``patches``, for ``target``.

    The same sample in training and mining (:data:`SAMPLE_PATCHES` spread
    over the slide); ``ValueError`` as :func:`pipeline.slides.stain.fit_stain`.
    """
    return fit_stain(sample_patches(array, SAMPLE_PATCHES), method, target=target)


def sample_patches(array: zarr.Array, count: int) -> np.ndarray:
    """Up to ``count`` patches spread evenly over a ``patches`` array (a slide's stain sample)."""
    parts = list(read_rows(array, sample_rows(array.shape[0], count)))
    return np.concatenate(parts) if parts else np.zeros((0, *array.shape[1:]), np.uint8)


def _chunk_key(array: zarr.Array, chunk_index: int) -> str:
    """The key of chunk ``chunk_index`` of a patches array, relative to the array."""
    return array.metadata.encode_chunk_key((chunk_index, 0, 0, 0))


def _local_chunk_file(array: zarr.Array, chunk_index: int) -> Path | None:
    """The file of chunk ``chunk_index`` when the array is in a local store; None elsewhere."""
    if not isinstance(array.store, LocalStore):
        return None
    return Path(str(array.store.root)) / array.path / _chunk_key(array, chunk_index)


def mark_complete(group: zarr.Group, extra: dict[str, Any]) -> None:
    """Record ``extra`` and ``complete: true`` in one metadata write."""
    group.update_attributes({**extra, "complete": True})


def update_summary(root: zarr.Group, slide_id: str, record: dict[str, Any]) -> None:
    """Set the cohort summary row of ``slide_id`` (slide, patches, tumor patches, status)."""
    slides = dict(root.attrs.get("slides", {}))
    slides[slide_id] = record
    root.attrs["slides"] = slides


def read_summary(store_path: Path | str) -> dict[str, dict[str, Any]]:
    """The cohort summary, from the root attributes only (no slide group is opened)."""
    root = _open_group(store_path, "r")
    return dict(root.attrs.get("slides", {}))


def store_bytes(path: Path | str) -> int:
    """Bytes stored under ``path`` (a local folder, or a store URL); 0 if there is none."""
    if not is_url(path):
        return sum(p.stat().st_size for p in Path(location(path)).rglob("*") if p.is_file())
    fs, where = _filesystem(path)
    return int(fs.du(where)) if fs.exists(where) else 0
