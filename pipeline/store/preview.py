"""Contact sheets of stored patches, to look at the data before training on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import StoreError
from pipeline.store.patch_store import location, open_store

_CELL_PX = 128
_CAPTION_PX = 28
_COLOURS = {1: (214, 39, 40), 0: (44, 160, 44)}
#: A sheet of 2 x 1,024 patches is 1,024 x 40,000 px (~120 MB in memory while drawn).
MAX_PER_CLASS = 1024


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
    slide id and level-0 coordinates (an imported dataset's patch: its
    index). Patches are drawn uniformly from the chosen slides without
    listing them: a cohort of millions of patches is sampled from per-slide
    counts, one slide's labels in memory at a time.
    """
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise ValueError(
            f"Expected 1 <= per_class <= {MAX_PER_CLASS}. Received: per_class={per_class}"
        )
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
    counts = np.zeros((2, len(slide_ids)), dtype=np.int64)  # [label, slide]
    for k, sid in enumerate(slide_ids):
        labels = root[sid]["labels"][:]
        counts[1, k] = np.count_nonzero(labels == 1)
        counts[0, k] = np.count_nonzero(labels == 0)
    picked: dict[int, list[tuple[str, int]]] = {1: [], 0: []}
    for label in (1, 0):
        # Ranks in the cohort's list of this class's patches, slide after slide.
        total = int(counts[label].sum())
        ranks = rng.choice(total, size=min(per_class, total), replace=False)
        ends = np.cumsum(counts[label])
        slide_of = np.searchsorted(ends, ranks, side="right")
        for k in np.unique(slide_of):
            indices = np.flatnonzero(root[slide_ids[k]]["labels"][:] == label)
            local = ranks[slide_of == k] - (ends[k] - counts[label, k])
            picked[label].extend((slide_ids[k], int(i)) for i in indices[local])
        picked[label].sort()
    cells = [(label, sid, i) for label in (1, 0) for sid, i in picked[label]]
    rows = max(1, -(-len(cells) // columns))
    sheet = Image.new("RGB", (columns * _CELL_PX, rows * (_CELL_PX + _CAPTION_PX)), "white")
    draw = ImageDraw.Draw(sheet)
    # Cells by the Zarr chunk holding their patch: each chunk is read and decoded once.
    arrays = {sid: (root[sid]["patches"], root[sid]["coords"]) for sid in {c[1] for c in cells}}
    by_chunk: dict[tuple[str, int], list[int]] = {}
    for n, (_, sid, i) in enumerate(cells):
        by_chunk.setdefault((sid, i // arrays[sid][0].chunks[0]), []).append(n)
    for (sid, _), ns in by_chunk.items():
        indices = [cells[n][2] for n in ns]
        patches = arrays[sid][0].get_orthogonal_selection((indices,))
        coords = arrays[sid][1].get_orthogonal_selection((indices,))
        for n, pixels, (cx, cy) in zip(ns, patches, coords, strict=True):
            label = cells[n][0]
            patch = Image.fromarray(pixels).resize((_CELL_PX - 6, _CELL_PX - 6))
            x, y = (n % columns) * _CELL_PX, (n // columns) * (_CELL_PX + _CAPTION_PX)
            draw.rectangle([x, y, x + _CELL_PX - 1, y + _CELL_PX - 1], fill=_COLOURS[label])
            sheet.paste(patch, (x + 3, y + 3))
            # Imported datasets record no position (-1): the patch's index instead.
            where = f"({int(cx)}, {int(cy)})" if cx >= 0 else f"#{cells[n][2]}"
            caption = f"{'tumor' if label else 'normal'} {sid}\n{where}"
            draw.multiline_text((x + 3, y + _CELL_PX + 1), caption, fill=(0, 0, 0), spacing=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    sheet.save(partial, format="PNG", compress_level=1)  # 1 of 9: ~6x faster, ~1.2x larger
    os.replace(partial, out_path)
    return {
        "tumor": len(picked[1]),
        "normal": len(picked[0]),
        "slides": len(slide_ids),
        "patches": [[sid, i, label] for label, sid, i in cells],
    }
