"""CAMELYON16 metrics on hand-built masks and detections, with values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.froc import (
    OFFICIAL_MPP,
    SlideHits,
    compute_froc,
    evaluation_mask,
    itc_labels,
    review,
    roc,
    score_detections,
    tumor_mask,
)
from pipeline.slides.annotations import Polygon
from tests.conftest import run, write_official_mask

MPP = 0.243
DS = 32  # level 5
# 75 / (0.243 * 32 * 2) = 4.82 mask pixels of growth; ITC below 275 / (0.243 * 32) = 35.4 px.


def _square(x0, y0, x1, y1, group="_0"):
    xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return Polygon(name="a", group=group, level0_xy=xy)


def test_tumor_mask_takes_pixel_centres_and_carves_exclusions():
    polygons = [_square(64, 64, 192, 192), _square(96, 96, 128, 128, group="_2")]
    mask = tumor_mask(polygons, (320, 300), DS)
    assert mask.shape == (10, 10)  # ceil(300 / 32), ceil(320 / 32)
    expected = np.zeros((10, 10), dtype=bool)
    expected[2:6, 2:6] = True  # centres (j + 0.5) * 32 in [64, 192] -> j = 2..5
    expected[3, 3] = False  # the exclusion covers the centre (112, 112) only
    np.testing.assert_array_equal(mask, expected)


def test_evaluation_mask_grows_tumor_by_75_um_and_merges_close_lesions():
    tumor = np.zeros((40, 60), dtype=bool)
    tumor[10:20, 5:15] = True
    tumor[10:20, 23:33] = True  # 8 px gap: each pixel within 4 <= 4.82 px: merged
    tumor[10:20, 46:56] = True  # 13 px gap: a lesion of its own
    labels = evaluation_mask(tumor, MPP, DS)
    assert labels.max() == 2
    assert labels[15, 10] == labels[15, 29] != labels[15, 50]
    # Grown by < 4.82 px: 4 px away is inside, 5 px away is not.
    assert labels[15, 5 - 4] and not labels[15, 5 - 5]
    # Holes are filled.
    ring = np.zeros((30, 30), dtype=bool)
    ring[5:25, 5:25] = True
    ring[8:22, 8:22] = False
    assert evaluation_mask(ring, MPP, DS)[15, 15] == 1


def test_itcs_are_lesions_with_a_major_axis_below_275_um():
    tumor = np.zeros((80, 80), dtype=bool)
    tumor[10, 10] = True  # one pixel, grown to a ~10 px disk: an ITC
    tumor[30:70, 30:70] = True  # 40 px + growth > 35.4 px
    labels = evaluation_mask(tumor, MPP, DS)
    small, large = labels[10, 10], labels[50, 50]
    assert itc_labels(labels, MPP, DS) == {small}
    assert large not in itc_labels(labels, MPP, DS)


def _labels_two_lesions_and_an_itc():
    labels = np.zeros((50, 50), dtype=np.int32)
    labels[5:25, 5:25] = 1
    labels[30:45, 30:45] = 2
    labels[2:4, 40:42] = 3
    return labels, frozenset({3})


def test_hits_count_once_per_lesion_at_their_highest_confidence_and_itcs_count_neither_way():
    labels, itcs = _labels_two_lesions_and_an_itc()
    confidences = [0.6, 0.9, 0.7, 0.8]
    level0_xy = [
        (10 * DS, 10 * DS),  # lesion 1
        (20 * DS + 31, 20 * DS + 31),  # lesion 1 again (same mask pixel rule: // 32)
        (41 * DS, 3 * DS),  # the ITC
        (48 * DS, 2 * DS),  # background
    ]
    hits = score_detections(np.array(confidences), np.array(level0_xy), labels, itcs, DS)
    # Official: true-positive confidences are float32, as the script keeps them.
    assert hits.tp_confidences.dtype == np.float32
    np.testing.assert_array_equal(hits.tp_confidences, np.float32([0.9, 0.0, 0.0]))
    corrected = score_detections(
        np.array(confidences), np.array(level0_xy), labels, itcs, DS, rules="corrected"
    )
    np.testing.assert_array_equal(corrected.tp_confidences, [0.9, 0.0, 0.0])
    np.testing.assert_array_equal(hits.fp_confidences, [0.8])
    assert hits.lesions == 2 and hits.itcs == 1
    np.testing.assert_array_equal(hits.hit, [1, 1, 3, 0])


def test_review_gives_each_detection_its_outcome_and_each_lesion_its_box_found_or_missed():
    labels, itcs = _labels_two_lesions_and_an_itc()
    confidences = np.array([0.6, 0.9, 0.7, 0.8])
    level0_xy = np.array([(10 * DS, 10 * DS), (20 * DS, 20 * DS), (41 * DS, 3 * DS), (48 * DS, 0)])
    hits = score_detections(confidences, level0_xy, labels, itcs, DS)
    found = review(hits, confidences, level0_xy, labels, itcs, DS)
    assert [d[3] for d in found["detections"]] == ["tp", "tp", "itc", "fp"]
    assert found["detections"][0] == [10 * DS, 10 * DS, 0.6, "tp"]
    assert found["lesions"] == [
        {"label": 1, "box": [5 * DS, 5 * DS, 25 * DS, 25 * DS], "itc": False, "confidence": 0.9},
        {"label": 2, "box": [30 * DS, 30 * DS, 45 * DS, 45 * DS], "itc": False, "confidence": 0.0},
        {"label": 3, "box": [40 * DS, 2 * DS, 42 * DS, 4 * DS], "itc": True, "confidence": 0.7},
    ]
    normal = score_detections(np.array([0.3]), np.array([[5, 5]]), None, frozenset(), DS)
    assert review(normal, np.array([0.3]), np.array([[5, 5]]), None, frozenset(), DS) == {
        "detections": [[5, 5, 0.3, "fp"]],
        "lesions": [],
    }


def test_every_detection_on_a_normal_slide_is_a_false_positive():
    hits = score_detections(np.array([0.3, 0.9]), np.array([[0, 0], [5, 5]]), None, frozenset(), DS)
    np.testing.assert_array_equal(hits.fp_confidences, [0.3, 0.9])
    assert hits.lesions == 0 and len(hits.tp_confidences) == 0


def test_detections_outside_the_mask_are_an_error():
    labels, itcs = _labels_two_lesions_and_an_itc()
    with pytest.raises(ValueError, match=r"Expected detections inside the slide. Got \(1600, 0\)"):
        score_detections(np.array([0.5]), np.array([[50 * DS, 0]]), labels, itcs, DS)


def test_perfect_detections_score_one_and_no_detections_score_zero():
    labels, itcs = _labels_two_lesions_and_an_itc()
    on_lesions = np.array([[10 * DS, 10 * DS], [35 * DS, 35 * DS]])
    perfect = score_detections(np.array([0.9, 0.8]), on_lesions, labels, itcs, DS)
    normal = score_detections(np.zeros(0), np.zeros((0, 2)), None, frozenset(), DS)
    froc = compute_froc([perfect, normal])
    assert froc.score == 1.0
    assert froc.sensitivities == (1.0,) * 6
    nothing = score_detections(np.zeros(0), np.zeros((0, 2)), labels, itcs, DS)
    assert compute_froc([nothing, normal]).score == 0.0


def test_a_submission_that_misses_nothing_loses_its_lowest_detection_officially():
    """No missed lesion and no ITC: no 0 to drop, so the script drops a real detection."""
    single = np.zeros((10, 20), dtype=np.int32)
    single[2:5, 2:5] = 1
    single[2:5, 12:15] = 2
    xy = np.array([[3 * DS, 3 * DS], [13 * DS, 3 * DS]])
    official = compute_froc([score_detections(np.array([0.7, 0.9]), xy, single, frozenset(), DS)])
    # Only 0.9 is a threshold: (0 FP, 1/2), then (0, 0): 1/2 at every rate.
    np.testing.assert_array_equal(official.sensitivity, [0, 0.5])
    assert official.score == 0.5
    hits = score_detections(np.array([0.7, 0.9]), xy, single, frozenset(), DS, rules="corrected")
    assert compute_froc([hits], rules="corrected").score == 1.0


def test_froc_curve_and_score_worked_out_by_hand():
    labels, itcs = _labels_two_lesions_and_an_itc()
    tumor_slide = score_detections(
        np.array([0.9, 0.8, 0.6]),
        np.array([[10 * DS, 10 * DS], [48 * DS, 48 * DS], [35 * DS, 35 * DS]]),
        labels,
        itcs,
        DS,
    )
    normal_slide = score_detections(np.array([0.7]), np.array([[0, 0]]), None, frozenset(), DS)
    froc = compute_froc([tumor_slide, normal_slide])
    # Thresholds 0.6, 0.7, 0.8, 0.9 give (FP/slide, sensitivity) (1, 1), (1, .5), (.5, .5),
    # (0, .5), then (0, 0); ascending: the curve below.
    np.testing.assert_allclose(froc.fps_per_slide, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(froc.sensitivity, [0, 0.5, 0.5, 0.5, 1])
    # Read at 1/4, 1/2, 1, 2, 4, 8 FP/slide: .5, .5, 1, 1, 1, 1.
    np.testing.assert_allclose(froc.sensitivities, [0.5, 0.5, 1, 1, 1, 1])
    assert froc.score == pytest.approx(5 / 6)
    assert froc.lesions == 2 and froc.slides == 2


def test_both_rules_agree_when_no_quirk_is_hit():
    """A 0 present, confidences exact in float32, mpp 0.243: official == corrected."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        official = []
        for _ in range(4):
            fps = np.round(rng.random(rng.integers(0, 6)) * 64) / 64
            tps = np.round(rng.random(3) * 64) / 64 * (rng.random(3) > 0.4)
            official.append(SlideHits(fps, tps.astype(np.float32), 3, 0, np.zeros(0)))
        official[0].tp_confidences[0] = 0.0  # a missed lesion, as on every real test set
        corrected = [
            SlideHits(h.fp_confidences, h.tp_confidences.astype(np.float64), 3, 0, h.hit)
            for h in official
        ]
        a = compute_froc(official, rules="official")
        b = compute_froc(corrected, rules="corrected")
        np.testing.assert_array_equal(a.fps_per_slide, b.fps_per_slide)
        np.testing.assert_array_equal(a.sensitivity, b.sensitivity)
        assert a.score == b.score


def test_a_hit_and_a_miss_of_the_same_printed_confidence_are_two_official_thresholds():
    """One lesion hit at 0.3, one missed, a false positive at 0.3.

    Official: the hit is float32(0.3) = 0.30000001, the miss 0.3: two thresholds,
    (1 FP, 1/2) at 0.3 and (0 FP, 1/2) at 0.30000001; sensitivity 1/2 at every
    rate. Corrected: one threshold, (1 FP, 1/2), read as 1/8, 1/4, 1/2 x 4.
    """
    labels, _ = _labels_two_lesions_and_an_itc()
    xy = np.array([[10 * DS, 10 * DS], [48 * DS, 48 * DS]])
    official = compute_froc(
        [score_detections(np.array([0.3, 0.3]), xy, labels, frozenset({3}), DS)]
    )
    np.testing.assert_array_equal(official.fps_per_slide, [0, 0, 1])
    np.testing.assert_array_equal(official.sensitivity, [0, 0.5, 0.5])
    assert official.score == 0.5
    hits = score_detections(np.array([0.3, 0.3]), xy, labels, frozenset({3}), DS, rules="corrected")
    corrected = compute_froc([hits], rules="corrected")
    np.testing.assert_array_equal(corrected.fps_per_slide, [0, 1])
    assert corrected.sensitivities == (0.125, 0.25, 0.5, 0.5, 0.5, 0.5)
    assert corrected.score == pytest.approx(2.375 / 6)


def test_official_rules_grow_tumor_with_0243_um_per_px_whatever_the_slide():
    """A 0.226 µm/px slide, two tumor squares 10 px apart at level 5.

    The gap's middle pixels are 5 px from tumor: below 75 / (0.226 x 64) = 5.19
    (one lesion, corrected) but not below 75 / (0.243 x 64) = 4.82 (two, as
    the script counts them).
    """
    tumor = np.zeros((30, 40), dtype=bool)
    tumor[10:20, 5:15] = True
    tumor[10:20, 25:35] = True
    assert evaluation_mask(tumor, OFFICIAL_MPP, DS).max() == 2
    assert evaluation_mask(tumor, 0.226, DS, rules="corrected").max() == 1


def test_an_empty_tumor_mask_is_one_corner_itc_officially_and_nothing_corrected():
    """SciPy's distance transform of a mask without tumor measures to a virtual edge."""
    empty = np.zeros((30, 40), dtype=bool)
    labels = evaluation_mask(empty, OFFICIAL_MPP, DS)
    assert labels.max() == 1 and labels[0, 0] == 1 and labels[29, 39] == 0
    assert itc_labels(labels, OFFICIAL_MPP, DS) == {1}
    assert evaluation_mask(empty, OFFICIAL_MPP, DS, rules="corrected").max() == 0


def test_froc_needs_lesions():
    normal = score_detections(np.array([0.5]), np.array([[0, 0]]), None, frozenset(), DS)
    with pytest.raises(ValueError, match="at least one tumor lesion"):
        compute_froc([normal])


def test_slide_auc_by_hand_with_ties_counted_half():
    assert roc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]).auc == pytest.approx(3 / 4)
    assert roc([1, 0], [0.5, 0.5]).auc == pytest.approx(0.5)
    assert roc([1, 0, 1, 0], [0.8, 0.2, 0.9, 0.1]).auc == 1.0
    curve = roc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1])
    np.testing.assert_allclose(curve.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curve.tpr, [0, 0.5, 0.5, 1, 1])
    with pytest.raises(ValueError, match="Expected tumor and normal slides"):
        roc([1, 1], [0.2, 0.3])


def _evaluation_inputs(tmp_path, mpp):
    """A 0.226 µm/px tumor slide whose two lesions merge only at its own mpp, and a normal one."""
    tumor = np.zeros((50, 40), dtype=bool)
    tumor[5:40, 5:15] = True  # 35 px tall: lesions, not ITCs, at either mpp
    tumor[5:40, 25:35] = True
    for folder in ("masks", "slides", "results"):
        (tmp_path / folder).mkdir()
    write_official_mask(tmp_path / "masks" / "Test_001_Mask.tif", tumor)
    write_official_mask(tmp_path / "slides" / "test_001.tif", tumor, mpp=mpp)
    write_official_mask(tmp_path / "slides" / "test_002.tif", tumor & False, mpp=mpp)
    (tmp_path / "results" / "test_001.csv").write_text(f"0.9,{10 * DS},{15 * DS}\n")
    (tmp_path / "results" / "test_002.csv").write_text(f"0.4,{10 * DS},{15 * DS}\n")
    (tmp_path / "reference.csv").write_text("Test_001,Tumor,Macro\nTest_002,Normal\n")


def test_evaluate_takes_0243_officially_and_the_slides_mpp_corrected(tmp_path):
    from pipeline.config import EvaluationConfig
    from pipeline.evaluation.evaluate import evaluate

    _evaluation_inputs(tmp_path, 0.226)
    common = (tmp_path / "results", tmp_path / "reference.csv", None)
    official = evaluate(
        *common, None, EvaluationConfig(), masks_dir=tmp_path / "masks", out_dir=tmp_path / "o"
    ).report
    assert official["rules"] == "official" and official["mpp"] == OFFICIAL_MPP
    assert official["lesions"] == 2 and official["per_slide"][0]["lesions_found"] == 1
    corrected = evaluate(
        *common,
        tmp_path / "slides",
        EvaluationConfig(rules="corrected"),
        masks_dir=tmp_path / "masks",
        out_dir=tmp_path / "c",
    ).report
    assert corrected["lesions"] == 1 and corrected["per_slide"][0]["mpp"] == 0.226
    assert corrected["froc"] == 1.0  # the one lesion found, no false positive below 0.9
    assert official["froc"] == 0.5  # one of two lesions found
    with pytest.raises(ValueError, match="corrected rules use each tumor slide's µm/px"):
        evaluate(*common, None, EvaluationConfig(rules="corrected"), masks_dir=tmp_path / "masks")


def test_evaluate_options_are_checked_before_anything_is_read(tmp_path):
    _evaluation_inputs(tmp_path, 0.226)
    base = ("evaluate", str(tmp_path / "results"), "--reference", str(tmp_path / "reference.csv"))
    bad_rules = run(*base, "--masks", str(tmp_path / "masks"), "--rules", "lenient")
    assert bad_rules.returncode == 2 and "rules" in bad_rules.stderr
    assert "Traceback" not in bad_rules.stderr
    no_slides = run(*base, "--masks", str(tmp_path / "masks"), "--rules", "corrected")
    assert no_slides.returncode == 2 and "--slides" in no_slides.stderr
    no_tumor = run(*base)
    assert no_tumor.returncode == 2 and "--annotations or --masks" in no_tumor.stderr
    assert not (tmp_path / "results" / "evaluation.json").exists()
