"""A contact sheet of what a ``camelyon`` cohort holds: each tumor pattern, mimic and artefact.

Patches are read back from the cohort's slides (so the sheet shows the files,
JPEG and all), at 0.5 µm/px, from both centres, at the places ``synth.json``
records for each feature.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import CohortError
from pipeline.slides.reader import open_slide
from pipeline.synth.layout import ARTEFACT_KINDS, MIMIC_KINDS

_CELL_PX = 192
_CAPTION_PX = 30
_VIEW_MPP = 0.5  # the patches' resolution: what a model at 20x sees
#: The sheet's columns: tumor patterns, ITCs, normal node, mimics, artefacts.
ELEMENTS = ("ductal", "lobular", "itc", "node", *MIMIC_KINDS, *ARTEFACT_KINDS)
_FRAME = {"tumor": (214, 39, 40), "normal": (44, 160, 44), "artefact": (120, 120, 120)}


def cohort_contact_sheet(root: Path | str, out_path: Path | str, *, per_cell: int = 2) -> dict:
    """Write a PNG: one column per element of ``ELEMENTS``, ``per_cell`` patches per centre.

    Returns ``{"elements": {element: shown}, "centres": [...], "missing": [elements with none]}``.
    """
    root, out_path = Path(root), Path(out_path)
    try:
        manifest = json.loads((root / "synth.json").read_text())
    except (OSError, ValueError) as exc:
        raise CohortError(root, f"no readable synth.json ({exc})") from exc
    records = [r for r in manifest.get("slides", []) if r.get("centre")]
    if not records:
        raise CohortError(root, "has no slide of the camelyon difficulty (--difficulty)")
    centres = sorted({r["centre"] for r in records})
    picks: dict[tuple[str, str], list[tuple[dict, tuple[float, float]]]] = {}
    for record in records:
        for feature in record["features"]:
            element = "itc" if feature["size_class"] == "itc" else feature["kind"]
            if element in ELEMENTS:
                picks.setdefault((element, record["centre"]), []).append(
                    (record, feature["anchor"])
                )
        if record["label"] == "Normal":  # plain node: the middle of a normal slide's tissue
            picks.setdefault(("node", record["centre"]), []).append((record, None))
    # One column per element, one row per example: a wide strip that reads left to right.
    rows = per_cell * len(centres)
    sheet = Image.new("RGB", (len(ELEMENTS) * _CELL_PX, rows * (_CELL_PX + _CAPTION_PX)), "white")
    draw = ImageDraw.Draw(sheet)
    shown: dict[str, int] = {}
    for column, element in enumerate(ELEMENTS):
        shown[element] = 0
        for c, centre in enumerate(centres):
            for k, (record, anchor) in enumerate(picks.get((element, centre), [])[:per_cell]):
                x, y = column * _CELL_PX, (c * per_cell + k) * (_CELL_PX + _CAPTION_PX)
                patch = _read_patch(root / record["image"], anchor)
                kind = "tumor" if element in ("ductal", "lobular", "itc") else "normal"
                kind = "artefact" if element in ARTEFACT_KINDS else kind
                draw.rectangle([x, y, x + _CELL_PX - 1, y + _CELL_PX - 1], fill=_FRAME[kind])
                sheet.paste(Image.fromarray(patch), (x + 3, y + 3))
                caption = f"{element} ({kind})\n{centre} {record['slide_id']}"
                draw.multiline_text((x + 3, y + _CELL_PX + 1), caption, fill=(0, 0, 0), spacing=1)
                shown[element] += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    sheet.save(partial, format="PNG", compress_level=1)
    os.replace(partial, out_path)
    return {
        "elements": shown,
        "centres": centres,
        "missing": [r for r, n in shown.items() if not n],
    }


def _read_patch(path: Path, anchor: list[float] | None) -> np.ndarray:
    """``(_CELL_PX - 6)`` px square RGB at 0.5 µm/px centred on ``anchor`` (None: tissue middle)."""
    side = _CELL_PX - 6
    with open_slide(path) as slide:
        mpp = slide.info.mpp or 0.25
        span = round(side * _VIEW_MPP / mpp)  # level-0 px
        if anchor is None:
            thumb = slide.thumbnail((256, 256))
            tissue = np.argwhere(thumb.mean(axis=2) < 200)
            scale = slide.info.level0_wh[0] / thumb.shape[1]
            middle = tissue[len(tissue) // 2] if len(tissue) else np.array(thumb.shape[:2]) / 2
            anchor = [float(middle[1] * scale), float(middle[0] * scale)]
        x0, y0 = round(anchor[0] - span / 2), round(anchor[1] - span / 2)
        pixels = slide.read_region((x0, y0), 0, (span, span))
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.LANCZOS))
