"""Contact sheets: random patches of each class, drawn from the store as they are."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.store.preview import _CAPTION_PX, _CELL_PX, contact_sheet


def _labels(store) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {sid: root[sid]["labels"][:] for sid in root.group_keys()}


def test_sheet_shows_distinct_random_patches_of_each_class(patch_store, tmp_path):
    labels = _labels(patch_store)
    out = tmp_path / "sheet.png"
    shown = contact_sheet(patch_store, out, per_class=6, seed=1)
    assert (shown["tumor"], shown["normal"], shown["slides"]) == (6, 6, 4)
    picks = shown["patches"]
    assert len({(sid, i) for sid, i, _ in picks}) == 12
    assert all(labels[sid][i] == label for sid, i, label in picks)
    assert [label for *_, label in picks] == [1] * 6 + [0] * 6
    # Each cell shows its stored patch: cells are drawn in the order returned, 8 a row.
    root = zarr.open_group(str(patch_store), mode="r")
    with Image.open(out) as sheet:
        sheet = np.asarray(sheet.convert("RGB"))
    for n, (sid, i, _) in enumerate(picks):
        x, y = (n % 8) * _CELL_PX, (n // 8) * (_CELL_PX + _CAPTION_PX)
        expected = Image.fromarray(root[sid]["patches"][i]).resize((_CELL_PX - 6, _CELL_PX - 6))
        cell = sheet[y + 3 : y + _CELL_PX - 3, x + 3 : x + _CELL_PX - 3]
        np.testing.assert_array_equal(cell, np.asarray(expected))
    again = contact_sheet(patch_store, tmp_path / "again.png", per_class=6, seed=1)
    other = contact_sheet(patch_store, tmp_path / "other.png", per_class=6, seed=2)
    assert again["patches"] == picks and other["patches"] != picks


def test_sheet_draws_from_every_slide_and_takes_all_of_a_small_class(patch_store, tmp_path):
    labels = _labels(patch_store)
    tumor = {(sid, int(i)) for sid, lab in labels.items() for i in np.flatnonzero(lab == 1)}
    assert 0 < len(tumor) < 1024
    shown = contact_sheet(patch_store, tmp_path / "s.png", per_class=1024, seed=0)
    picks = shown["patches"]
    assert {(sid, i) for sid, i, label in picks if label == 1} == tumor
    normal = [(sid, i) for sid, i, label in picks if label == 0]
    assert len(normal) == len(set(normal)) == 1024
    assert all(labels[sid][i] == 0 for sid, i in normal)
    # Uniform over the cohort's normal patches: each slide in proportion to its count.
    counts = {sid: int((lab == 0).sum()) for sid, lab in labels.items()}
    total = sum(counts.values())
    for sid, count in counts.items():
        drawn = sum(s == sid for s, _ in normal)
        assert abs(drawn - 1024 * count / total) < 5 * np.sqrt(1024 * count / total) + 1


def test_one_slide_and_bad_counts(patch_store, tmp_path):
    sid = sorted(_labels(patch_store))[0]
    shown = contact_sheet(patch_store, tmp_path / "s.png", slide_id=sid, per_class=4)
    assert {s for s, *_ in shown["patches"]} == {sid}
    for bad in (0, -3, 1025):
        with pytest.raises(ValueError, match="Expected 1 <= per_class <= 1024"):
            contact_sheet(patch_store, tmp_path / "bad.png", per_class=bad)
    assert not (tmp_path / "bad.png").exists()
