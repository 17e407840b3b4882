"""`wsiflow predict`: single patch images through a trained model, as a user runs it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.store.patch_store import open_patches, open_store
from tests.conftest import last_json, run


def _patches(patch_store, label: int, n: int) -> np.ndarray:
    """``n`` stored patches of ``label`` from the tumor slides, clear cases only.

    Tumor: the patches most covered by tumor; normal: patches with no tumor
    at all. A patch labelled by a lesion's edge (half tumor) is ambiguous by
    definition, and a model's score on it says little.
    """
    root = open_store(patch_store)
    found = []
    for slide_id in sorted(root.group_keys()):
        labels = np.asarray(root[slide_id]["labels"][:])
        if (labels == 1).any():
            fraction = np.asarray(root[slide_id]["tumor_fraction"][:])
            if label == 1:
                index = np.flatnonzero(labels == 1)
                index = np.sort(index[np.argsort(-fraction[index], kind="stable")[:n]])
            else:
                index = np.flatnonzero((labels == 0) & (fraction == 0))[:n]
            found.append(
                np.asarray(open_patches(patch_store, slide_id).get_orthogonal_selection(index))
            )
    return np.concatenate(found)[:n]


def test_predict_scores_tumor_above_normal_and_reports_bad_images(
    trained_model, patch_store, tmp_path
):
    images = tmp_path / "images"
    (images / "tumor").mkdir(parents=True)
    (images / "normal").mkdir()
    for i, patch in enumerate(_patches(patch_store, 1, 4)):
        Image.fromarray(patch).save(images / "tumor" / f"{i}.png")
    for i, patch in enumerate(_patches(patch_store, 0, 4)):
        Image.fromarray(patch).save(images / "normal" / f"{i}.jpg", quality=95)
    result = run("predict", str(trained_model), str(images), "--json")
    assert result.returncode == 0, result.stderr
    found = {r["path"]: r for r in last_json(result)["images"]}
    assert len(found) == 8
    tumor = [r["probability"] for p, r in found.items() if "/tumor/" in p]
    normal = [r["probability"] for p, r in found.items() if "/normal/" in p]
    assert min(tumor) > max(normal) and min(tumor) > 0.5 > max(normal), (tumor, normal)

    # A patch of another size is refused unless --resize; a broken file is one line; the
    # good image in the same call is still predicted.
    big = images / "big.png"
    Image.fromarray(np.kron(_patches(patch_store, 1, 1)[0], np.ones((2, 2, 1), np.uint8))).save(big)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    good = images / "tumor" / "0.png"
    mixed = run("predict", str(trained_model), str(big), str(broken), str(good), "--json")
    assert mixed.returncode == 1
    rows = last_json(mixed)["images"]
    assert [r["probability"] is None for r in rows] == [True, True, False]
    assert "Expected a 64 x 64 px patch" in rows[0]["reason"] and "--resize" in rows[0]["reason"]
    assert "not a readable image" in rows[1]["reason"]
    assert "Traceback" not in mixed.stderr and str(broken) in mixed.stderr
    resized = run("predict", str(trained_model), str(big), "--resize", "--json")
    assert resized.returncode == 0, resized.stderr
    row = last_json(resized)["images"][0]
    assert row["probability"] > 0.5 and "resized from 128 x 128" in row["warnings"][0]
