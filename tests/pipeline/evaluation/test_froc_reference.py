"""The FROC against the organisers' own evaluation script, compared for exact equality.

The script (a Python 3 port of ``Evaluation_FROC.py``) lives in
``../shared/reference/camelyon16/``; it is loaded or run from there, never
copied. Masks are CAMELYON16-style ``*_Mask.tif`` files with lesions of every
kind (merging pairs, holes, ITCs, a mask without tumor); detections carry
2-decimal confidences, so hits and misses tie, and some slides are empty or
all-miss. wsiflow's default (official) rules must give the script's curve,
six sensitivities and score to the last bit.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.evaluation.evaluate import official_mask
from pipeline.evaluation.froc import (
    OFFICIAL_MPP,
    compute_froc,
    evaluation_mask,
    itc_labels,
    score_detections,
)
from tests.conftest import OFFICIAL_FROC, last_json, run, write_official_mask

pytestmark = pytest.mark.skipif(
    not OFFICIAL_FROC.is_file(),
    reason=f"the organisers' script is not here: {OFFICIAL_FROC} (../shared is beside CI's clone)",
)

LEVEL, DS = 5, 32
RATES = [0.25, 0.5, 1, 2, 4, 8]  # as the script's eval_threshold


@pytest.fixture(scope="module")
def script():
    """The organisers' script as a module (its functions, not its __main__)."""
    spec = importlib.util.spec_from_file_location("official_froc", OFFICIAL_FROC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _disk(shape, centre, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _tumors() -> dict[str, np.ndarray]:
    """Level-5 tumor masks: lesions of every kind the rules treat differently."""
    shape = (48, 64)
    rng = np.random.default_rng(16)
    masks = {}
    a = np.zeros(shape, dtype=bool)
    a[5:20, 5:20] = True  # a lesion
    a[5:20, 28:40] = True  # 8 px away: merged with it by the 75 µm growth
    a[30:44, 48:62] = True
    a[35:39, 53:57] = False  # a hole, filled
    a[40, 5] = True  # an ITC
    masks["Tumor_001"] = a
    b = np.zeros(shape, dtype=bool)
    for _ in range(9):  # random disks: ITCs, lesions near the 275 µm axis, merges
        b |= _disk(shape, rng.integers(0, shape, 2), rng.integers(1, 14))
    masks["Tumor_002"] = b
    masks["Tumor_003"] = np.zeros(shape, dtype=bool)  # a tumor slide whose mask is empty
    c = np.zeros(shape, dtype=bool)
    for k in range(6):  # a row of small lesions, major axes around the ITC threshold
        c[10 : 12 + 5 * k, 4 + 10 * k : 6 + 10 * k] = True
    masks["Tumor_004"] = c
    noise = rng.random(shape)
    from scipy import ndimage

    masks["Tumor_005"] = ndimage.gaussian_filter(noise, 3) > 0.53
    return masks


@pytest.fixture(scope="module")
def masks(tmp_path_factory, script):
    """``{case: (path, our labels, our ITCs, the script's labels, the script's ITCs)}``."""
    folder = tmp_path_factory.mktemp("masks")
    found = {}
    for case, tumor in _tumors().items():
        path = folder / f"{case}_Mask.tif"
        write_official_mask(path, tumor)
        labels = evaluation_mask(official_mask(path, LEVEL), OFFICIAL_MPP, DS)
        theirs = script.computeEvaluationMask(str(path), 0.243, LEVEL)
        found[case] = (
            path,
            labels,
            itc_labels(labels, OFFICIAL_MPP, DS),
            theirs,
            script.computeITCList(theirs, 0.243, LEVEL),
        )
    return found


def test_evaluation_masks_and_itcs_equal_the_scripts(masks):
    kinds = set()
    for case, (_, labels, itcs, theirs, their_itcs) in masks.items():
        np.testing.assert_array_equal(labels, theirs, err_msg=case)
        assert itcs == set(their_itcs), case
        kinds.add((labels.max() > len(itcs), len(itcs) > 0))
    assert (True, True) in kinds  # lesions and ITCs on one slide are among the cases


def _detections(rng, labels, itcs, n):
    """``n`` detections: on lesions, on ITCs and on background, 2-decimal confidences."""
    height, width = labels.shape
    where = {
        "lesion": np.argwhere((labels > 0) & ~np.isin(labels, list(itcs))),
        "itc": np.argwhere(np.isin(labels, list(itcs))),
        "background": np.argwhere(labels == 0),
    }
    xs, ys, probs = [], [], []
    for _ in range(n):
        kind = rng.choice(["lesion", "itc", "background"], p=[0.5, 0.15, 0.35])
        cells = where[kind] if len(where[kind]) else np.argwhere(np.ones((height, width)))
        row, col = cells[rng.integers(len(cells))]
        xs.append(int(col) * DS + int(rng.integers(DS)))
        ys.append(int(row) * DS + int(rng.integers(DS)))
        probs.append(round(float(rng.integers(0, 101)) / 100, 2))
    if n >= 2 and rng.random() < 0.5:  # a hit and a miss of one printed confidence
        probs[1] = probs[0]
    return xs, ys, probs


def _script_froc(script, cases):
    """The script's curve and score for ``[(case, is_tumor, mask labels, ITCs, x, y, probs)]``."""
    froc_data = np.zeros((4, len(cases)), dtype=object)
    for i, (case, is_tumor, labels, itcs, xs, ys, probs) in enumerate(cases):
        froc_data[0][i] = case
        fp, tp, tumors, _, _ = script.compute_FP_TP_Probs(
            ys, xs, probs, is_tumor, labels if is_tumor else 0, list(itcs), LEVEL
        )
        froc_data[1][i], froc_data[2][i], froc_data[3][i] = fp, tp, tumors
    total_fps, total_sensitivity = script.computeFROC(froc_data)
    at = np.interp(RATES, total_fps[::-1], total_sensitivity[::-1])
    return total_fps, total_sensitivity, at, np.mean(at)


def test_random_cases_equal_the_script_to_the_last_bit(script, masks):
    rng = np.random.default_rng(2016)
    differ_from_corrected = compared = 0
    for _ in range(300):
        cases = []
        tumor_cases = rng.choice(sorted(masks), size=rng.integers(1, 6), replace=False)
        for case in tumor_cases:
            _, _, _, labels, itcs = masks[case]
            n = int(rng.choice([0, 1, 2, 5, 12]))
            if rng.random() < 0.15:  # an all-miss slide
                xs, ys, probs = _detections(rng, np.zeros_like(labels), set(), n)
            else:
                xs, ys, probs = _detections(rng, labels, set(itcs), n)
            cases.append((case, True, labels, itcs, xs, ys, probs))
        for k in range(int(rng.integers(0, 4))):
            shape = masks["Tumor_001"][1].shape
            xs, ys, probs = _detections(rng, np.zeros(shape, np.int32), set(), int(rng.integers(6)))
            cases.append((f"Normal_{k:03d}", False, None, [], xs, ys, probs))
        hits, corrected = [], []
        for _, is_tumor, labels, itcs, xs, ys, probs in cases:
            args = (
                np.array(probs, dtype=np.float64),
                np.array([xs, ys], dtype=np.int64).T.reshape(-1, 2),
                labels if is_tumor else None,
                frozenset(itcs),
                DS,
            )
            hits.append(score_detections(*args))
            corrected.append(score_detections(*args, rules="corrected"))
        if sum(h.lesions for h in hits) == 0:
            with pytest.raises(ValueError, match="at least one tumor lesion"):
                compute_froc(hits)
            continue
        total_fps, total_sensitivity, at, score = _script_froc(script, cases)
        ours = compute_froc(hits)
        assert np.array_equal(ours.fps_per_slide, total_fps[::-1])
        assert np.array_equal(ours.sensitivity, total_sensitivity[::-1])
        assert ours.sensitivities == tuple(float(v) for v in at)
        assert ours.score == float(score)
        compared += 1
        differ_from_corrected += compute_froc(corrected, rules="corrected").score != ours.score
    assert compared > 250
    assert differ_from_corrected >= 10  # the quirks were exercised, not only the common path


def _submission(folder, cases):
    """Detections as the script reads them: ``<case>.csv`` of ``Confidence,X,Y``, no header."""
    folder.mkdir()
    for case, xs, ys, probs in cases:
        lines = "".join(f"{p},{x},{y}\n" for x, y, p in zip(xs, ys, probs, strict=True))
        (folder / f"{case}.csv").write_text(lines)


@pytest.mark.slow
def test_wsiflow_evaluate_equals_the_script_run_as_a_program(masks, tmp_path):
    """The CLI on a submission folder and mask files; real test-set naming conventions."""
    rng = np.random.default_rng(7)
    cases = []
    for case in sorted(masks):
        _, labels, itcs, _, _ = masks[case]
        cases.append((case, *_detections(rng, labels, itcs, 15)))
    for k in range(3):
        shape = masks["Tumor_001"][1].shape
        cases.append((f"Normal_{k:03d}", *_detections(rng, np.zeros(shape, np.int32), set(), 8)))
    mask_dir = next(iter(masks.values()))[0].parent
    results = tmp_path / "results"
    _submission(results, cases)
    reference = tmp_path / "reference.csv"
    with reference.open("w", newline="") as handle:  # as the organisers ship it: no header
        writer = csv.writer(handle)
        for case, *_ in cases:
            writer.writerow(
                [case, "Tumor", "Macro"] if case.startswith("Tumor") else [case, "Normal"]
            )
    official = tmp_path / "official.json"
    done = subprocess.run(
        [sys.executable, str(OFFICIAL_FROC), str(mask_dir), str(results), "--json", str(official)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    theirs = json.loads(official.read_text())

    result = run(
        "evaluate", str(results), "--reference", str(reference), "--masks", str(mask_dir),
        "--out", str(tmp_path / "report"), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert summary["froc"] == theirs["froc_score"]
    assert summary["froc_sensitivities"] == theirs["sensitivities"]
    assert summary["rules"] == "official" and summary["slides"] == len(cases)
    assert summary["slide_auc"] is None and "scores.csv" in summary["undefined"]["slide_auc"]
    curve = json.loads((tmp_path / "report" / "evaluation.json").read_text())["froc_curve"]
    assert curve["fps_per_slide"] == theirs["total_FPs"][::-1]
    assert curve["sensitivity"] == theirs["total_sensitivity"][::-1]

    # Test-set names in other cases: reference Tumor_001, files tumor_001.csv and
    # tumor_001_mask.tif; the numbers do not change.
    lower_masks = tmp_path / "lower-masks"
    lower_masks.mkdir()
    for path in mask_dir.glob("*_Mask.tif"):
        (lower_masks / path.name.lower()).symlink_to(path)
    lower_results = tmp_path / "lower-results"
    lower_results.mkdir()
    for path in results.glob("*.csv"):
        (lower_results / path.name.lower()).write_text(path.read_text())
    header = tmp_path / "reference-with-header.csv"
    header.write_text("image,type,size,notes\n" + reference.read_text())
    again = run(
        "evaluate", str(lower_results), "--reference", str(header), "--masks", str(lower_masks),
        "--out", str(tmp_path / "report-lower"), "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert last_json(again)["froc"] == theirs["froc_score"]

    # --exclude leaves slides out of both sides, as the literature leaves out Test_049/114.
    kept = tmp_path / "kept"
    _submission(kept, [c for c in cases if c[0] not in ("Tumor_002", "Normal_001")])
    subprocess.run(
        [sys.executable, str(OFFICIAL_FROC), str(mask_dir), str(kept), "--json", str(official)],
        capture_output=True, check=True, timeout=300,
    )  # fmt: skip
    left_out = run(
        "evaluate", str(results), "--reference", str(reference), "--masks", str(mask_dir),
        "--exclude", "tumor_002", "--exclude", "NORMAL_001", "--exclude", "Test_049",
        "--out", str(tmp_path / "report-excluded"), "--json",
    )  # fmt: skip
    assert left_out.returncode == 0, left_out.stderr
    summary = last_json(left_out)
    assert summary["froc"] == json.loads(official.read_text())["froc_score"]
    assert summary["excluded"] == ["Normal_001", "Tumor_002"]
    assert summary["excluded_not_in_reference"] == ["Test_049"]
    assert "not in the reference, so not left out: Test_049" in left_out.stderr
