"""CAMELYON16 metrics on hand-built masks and detections, with values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.annotations import Polygon
from pipeline.froc import (
    compute_froc,
    evaluation_mask,
    itc_labels,
    roc,
    score_detections,
    tumor_mask,
)

MPP = 0.243
DS = 32  # level 5
# 75 / (0.243 * 32 * 2) = 4.82 mask pixels of growth; ITC below 275 / (0.243 * 32) = 35.4 px.


def _square(x0, y0, x1, y1, group="_0"):
    xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return Polygon(name="a", group=group, level0_xy=xy)


def _official_froc(fp_lists, tp_lists, lesion_counts):
    """``computeFROC`` of the official Evaluation_FROC.py, transcribed line by line."""
    unlisted_fps = [item for sublist in fp_lists for item in sublist]
    unlisted_tps = [item for sublist in tp_lists for item in sublist]
    total_fps, total_tps = [], []
    all_probs = sorted(set(unlisted_fps + unlisted_tps))
    for thresh in all_probs[1:]:
        total_fps.append((np.asarray(unlisted_fps) >= thresh).sum())
        total_tps.append((np.asarray(unlisted_tps) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    total_fps = np.asarray(total_fps) / float(len(fp_lists))
    total_sensitivity = np.asarray(total_tps) / float(sum(lesion_counts))
    eval_tps = np.interp([0.25, 0.5, 1, 2, 4, 8], total_fps[::-1], total_sensitivity[::-1])
    return total_fps, total_sensitivity, float(np.mean(eval_tps))


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
    np.testing.assert_array_equal(hits.tp_confidences, [0.9, 0.0, 0.0])
    np.testing.assert_array_equal(hits.fp_confidences, [0.8])
    assert hits.lesions == 2 and hits.itcs == 1
    np.testing.assert_array_equal(hits.hit, [1, 1, 3, 0])


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
    # A single perfect detection of a single lesion (no 0 anywhere) also scores 1.
    single = np.zeros((10, 10), dtype=np.int32)
    single[2:5, 2:5] = 1
    one = score_detections(np.array([0.7]), np.array([[3 * DS, 3 * DS]]), single, frozenset(), DS)
    assert compute_froc([one]).score == 1.0


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


def test_froc_equals_the_official_script_whenever_a_zero_is_present():
    rng = np.random.default_rng(3)
    for _ in range(20):
        fp_lists = [list(np.round(rng.random(rng.integers(0, 6)), 2)) for _ in range(4)]
        tp_lists = [list(np.round(rng.random(3), 2) * (rng.random(3) > 0.4)) for _ in range(4)]
        tp_lists[0][0] = 0.0  # a missed lesion, as on every real test set
        counts = [3, 3, 3, 3]
        from pipeline.froc import SlideHits

        hits = [
            SlideHits(np.array(fp), np.array(tp), n, 0, np.zeros(0))
            for fp, tp, n in zip(fp_lists, tp_lists, counts, strict=True)
        ]
        ours = compute_froc(hits)
        fps, sens, score = _official_froc(fp_lists, tp_lists, counts)
        np.testing.assert_allclose(ours.fps_per_slide, fps[::-1])
        np.testing.assert_allclose(ours.sensitivity, sens[::-1])
        assert ours.score == pytest.approx(score)


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
