"""The Zarr patch store: one group per slide, a cohort summary in the root attributes.

::

    STORE.zarr/                      attrs: wsiflow_store, slides {id: summary}
    STORE.zarr/<slide_id>/           attrs: slide identity, resolution, config, version,
                                            complete: true (written last)
        patches         uint8  (N, P, P, 3)  chunked (chunk_patches, P, P, 3)
        labels          int8   (N,)          1 tumor, 0 normal
        tumor_fraction  float32 (N,)
        tissue_fraction float32 (N,)
        coords          int32  (N, 2)        level-0 x, y of each patch's top-left corner

A group without ``complete: true`` is an interrupted write and is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from .codecs import PatchImageCodec
from .errors import StoreError

STORE_FORMAT = 1
#: Compressors for the lossless choices; image codecs go through PatchImageCodec.
LOSSLESS = {
    "zstd": lambda: ZstdCodec(level=3),
    "lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),
    "none": lambda: None,
}


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size and modification time: what decides whether a file changed."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a JSON-able payload (inputs and config of one slide's tiling)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_root(store_path: Path | str) -> zarr.Group:
    """Open (or create) the store's root group."""
    root = zarr.open_group(str(store_path), mode="a")
    if "wsiflow_store" not in root.attrs:
        root.attrs.update({"wsiflow_store": STORE_FORMAT, "slides": {}})
    return root


def zarr_root(store_path: Path | str) -> zarr.Group:
    """Open an existing store's root for writing slide groups, leaving its attributes alone.

    Per-slide tasks running at once use this; :func:`open_root` (which may
    write the root attributes) is called once before them.
    """
    try:
        return zarr.open_group(str(store_path), mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(store_path, "no patch store here; create it first (open_root)") from exc


def completed_fingerprint(root: zarr.Group, slide_id: str) -> str | None:
    """The fingerprint of ``slide_id``'s complete group; None if absent, partial, unreadable."""
    try:
        attrs = root[slide_id].attrs
    except (KeyError, FileNotFoundError, ValueError, OSError):
        return None
    if attrs.get("complete") is not True:
        return None
    return attrs.get("fingerprint")


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
    for patches of tissue that are never empty.
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
    group.attrs.update({**attrs, "complete": False})
    return group


def open_patches(store_path: Path | str, slide_id: str) -> zarr.Array:
    """Open a slide's ``patches`` array for writing (opening costs ~40 ms: cache it)."""
    array = zarr.open_array(str(Path(store_path) / slide_id / "patches"), mode="r+")
    # A runtime setting, not stored in the metadata: see create_slide_group.
    return array.with_config({"write_empty_chunks": True})


def write_encoded_chunk(array: zarr.Array, chunk_index: int, data: bytes) -> None:
    """Store already-encoded bytes as chunk ``chunk_index`` of a local patches array.

    For image-codec chunks built with :func:`pipeline.codecs.pack_images`,
    from patches the worker encoded or from the source slide's own JPEG
    tiles; the file appears atomically.
    """
    path = _chunk_path(array, chunk_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def read_encoded_chunk(array: zarr.Array, chunk_index: int) -> bytes | None:
    """The stored bytes of chunk ``chunk_index`` of a local patches array (None if absent)."""
    try:
        return _chunk_path(array, chunk_index).read_bytes()
    except (AttributeError, FileNotFoundError):  # not a local store, or an empty chunk
        return None


def _chunk_path(array: zarr.Array, chunk_index: int) -> Path:
    """The file of chunk ``chunk_index`` of a patches array in a local store."""
    key = array.metadata.encode_chunk_key((chunk_index, 0, 0, 0))
    return Path(str(array.store.root)) / array.path / key


def mark_complete(group: zarr.Group, extra: dict[str, Any]) -> None:
    """Record ``extra`` and, last of all, ``complete: true``."""
    group.attrs.update(extra)
    group.attrs["complete"] = True


def update_summary(root: zarr.Group, slide_id: str, record: dict[str, Any]) -> None:
    """Set the cohort summary row of ``slide_id`` (slide, patches, tumor patches, status)."""
    slides = dict(root.attrs.get("slides", {}))
    slides[slide_id] = record
    root.attrs["slides"] = slides


def read_summary(store_path: Path | str) -> dict[str, dict[str, Any]]:
    """The cohort summary, from the root attributes only (no slide group is opened)."""
    root = zarr.open_group(str(store_path), mode="r")
    return dict(root.attrs.get("slides", {}))


def store_bytes(path: Path | str) -> int:
    """Bytes on disk under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
