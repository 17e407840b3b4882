"""Contact sheets of stored patches, to look at the data before training on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import StoreError
from .store import location, open_store

_CELL_PX = 128
_CAPTION_PX = 28
_COLOURS = {1: (214, 39, 40), 0: (44, 160, 44)}


def contact_sheet(
    store_path: Path | str,
    out_path: Path | str,
    *,
    slide_id: str | None = None,
    per_class: int = 16,
    seed: int = 0,
    columns: int = 8,
) -> dict[str, int]:
    """Write a PNG of up to ``per_class`` random tumor and normal patches; return the counts.

    Each patch is framed red (tumor) or green (normal) and captioned with its
    slide id and level-0 coordinates.
    """
    out_path = Path(out_path)
    root = open_store(store_path)
    store_path = location(store_path)
    slide_ids = sorted(k for k in root.group_keys() if root[k].attrs.get("complete") is True)
    if slide_id is not None:
        if slide_id not in slide_ids:
            raise StoreError(
                store_path, f"Expected a complete slide in {slide_ids}. Got {slide_id!r} instead."
            )
        slide_ids = [slide_id]
    if not slide_ids:
        raise StoreError(store_path, "holds no complete slide")
    rng = np.random.default_rng(seed)
    candidates: dict[int, list[tuple[str, int]]] = {1: [], 0: []}
    for sid in slide_ids:
        labels = root[sid]["labels"][:]
        for label in (1, 0):
            candidates[label].extend((sid, int(i)) for i in np.flatnonzero(labels == label))
    picked: dict[int, list[tuple[str, int]]] = {}
    for label, items in candidates.items():
        order = rng.permutation(len(items))[:per_class]
        picked[label] = sorted(items[i] for i in order)
    cells = [(label, sid, i) for label in (1, 0) for sid, i in picked[label]]
    rows = max(1, -(-len(cells) // columns))
    sheet = Image.new("RGB", (columns * _CELL_PX, rows * (_CELL_PX + _CAPTION_PX)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (label, sid, i) in enumerate(cells):
        group = root[sid]
        patch = Image.fromarray(group["patches"][i]).resize((_CELL_PX - 6, _CELL_PX - 6))
        x, y = (n % columns) * _CELL_PX, (n // columns) * (_CELL_PX + _CAPTION_PX)
        draw.rectangle([x, y, x + _CELL_PX - 1, y + _CELL_PX - 1], fill=_COLOURS[label])
        sheet.paste(patch, (x + 3, y + 3))
        cx, cy = (int(v) for v in group["coords"][i])
        caption = f"{'tumor' if label else 'normal'} {sid}\n({cx}, {cy})"
        draw.multiline_text((x + 3, y + _CELL_PX + 1), caption, fill=(0, 0, 0), spacing=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    sheet.save(partial, format="PNG")
    os.replace(partial, out_path)
    return {"tumor": len(picked[1]), "normal": len(picked[0]), "slides": len(slide_ids)}
