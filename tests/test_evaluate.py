"""VOC AP checked against hand-computed cases."""

import numpy as np
import pytest

from spp_cli.evaluate import (
    ClassDetections,
    ClassGroundTruth,
    average_precision,
    match_detections,
    precision_recall,
    voc07_ap,
    voc_area_ap,
)

BOX = np.array([[0, 0, 10, 10]], np.float32)


def dets(*rows):
    """rows: (image_id, score, x1, y1, x2, y2)."""
    return ClassDetections([r[0] for r in rows], np.array([r[1] for r in rows], float), np.array([r[2:] for r in rows], np.float32).reshape(-1, 4))


def gt(**images):
    """images: id -> list of (x1, y1, x2, y2, difficult)."""
    return ClassGroundTruth({k: (np.array([v[:4] for v in rows], np.float32).reshape(-1, 4), np.array([bool(v[4]) for v in rows], dtype=bool)) for k, rows in images.items()})


def test_duplicate_detection_is_a_false_positive():
    d = dets(("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 0, 0, 10, 10))
    tp, fp = match_detections(d, gt(a=[(0, 0, 10, 10, 0)]))
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 1]


def test_difficult_matches_are_ignored_and_not_counted():
    d = dets(("a", 0.9, 0, 0, 10, 10), ("a", 0.5, 20, 20, 30, 30))
    g = gt(a=[(0, 0, 10, 10, 1), (20, 20, 30, 30, 0)])
    tp, fp = match_detections(d, g)
    assert tp.tolist() == [0, 1] and fp.tolist() == [0, 0]
    assert g.num_positives == 1
    assert average_precision(d, g, "voc07") == pytest.approx(1.0)


def test_ties_keep_input_order():
    # Equal scores: the false positive listed first is ranked first.
    d = dets(("a", 0.5, 50, 50, 60, 60), ("a", 0.5, 0, 0, 10, 10))
    tp, fp = match_detections(d, gt(a=[(0, 0, 10, 10, 0)]))
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 0]
    # recall 0 then 1, precision 0 then 0.5: 11-point AP = 0.5, area AP = 0.5
    assert average_precision(d, gt(a=[(0, 0, 10, 10, 0)]), "voc07") == pytest.approx(0.5)
    assert average_precision(d, gt(a=[(0, 0, 10, 10, 0)]), "voc") == pytest.approx(0.5)


def test_iou_threshold_is_inclusive_and_continuous():
    # [0,10]x[0,10] vs [0,10]x[0,5]: IoU exactly 0.5 -> a match.
    d = dets(("a", 1.0, 0, 0, 10, 5))
    assert match_detections(d, gt(a=[(0, 0, 10, 10, 0)]))[0].tolist() == [1]


def test_class_without_detections_scores_zero_and_without_gt_is_nan():
    assert average_precision(dets(), gt(a=[(0, 0, 10, 10, 0)])) == 0.0
    assert np.isnan(average_precision(dets(("a", 1.0, 0, 0, 10, 10)), gt(a=[])))


def test_hand_computed_curve():
    # 3 ground truths in 2 images; 5 detections: TP, FP, TP, FP, TP by score.
    g = gt(a=[(0, 0, 10, 10, 0), (20, 0, 30, 10, 0)], b=[(0, 0, 10, 10, 0)])
    d = dets(
        ("a", 0.9, 0, 0, 10, 10),
        ("b", 0.8, 40, 40, 50, 50),
        ("b", 0.7, 0, 0, 10, 10),
        ("a", 0.6, 60, 60, 70, 70),
        ("a", 0.5, 20, 0, 30, 10),
    )
    tp, fp = match_detections(d, g)
    recall, precision = precision_recall(tp, fp, g.num_positives)
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    # 11-point: t=0..0.3 -> 1 (4 points), 0.4..0.6 -> 2/3 (3), 0.7..1.0 -> 3/5 (4)
    assert voc07_ap(recall, precision) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    # area: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5
    assert voc_area_ap(recall, precision) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_detection_on_image_without_ground_truth_is_false_positive():
    d = dets(("z", 0.9, 0, 0, 10, 10), ("a", 0.1, 0, 0, 10, 10))
    tp, fp = match_detections(d, gt(a=[(0, 0, 10, 10, 0)]))
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 0]
