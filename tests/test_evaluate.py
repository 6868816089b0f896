"""VOC and COCO AP checked against hand-computed cases and pycocotools."""

import numpy as np
import pytest

from spp_cli.evaluate import (
    ClassDetections,
    ClassGroundTruth,
    GroundTruthImage,
    average_precision,
    evaluate_coco,
    evaluate_voc,
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


# ---------------------------------------------------------------- COCO (pycocotools) and VOC on whole datasets


def image(rows, width=200, height=200):
    """rows: (class, x1, y1, x2, y2[, difficult[, crowd]]) -> a GroundTruthImage."""
    rows = [tuple(r) + (0,) * (7 - len(r)) for r in rows]
    return GroundTruthImage(
        np.array([r[1:5] for r in rows], np.float32).reshape(-1, 4),
        [r[0] for r in rows],
        np.array([bool(r[5]) for r in rows], dtype=bool),
        np.array([bool(r[6]) for r in rows], dtype=bool),
        width,
        height,
    )


def det(name, score, *box):
    return {"class": name, "score": score, "box": [float(v) for v in box]}


def test_coco_hand_computed():
    # cat: one detection at IoU 0.72 with its ground truth: a match at IoU
    # thresholds 0.50..0.70 (5 of 10) -> AP 0.5, AP50 1.
    # dog: a false positive scoring above an exact true positive: precision
    # envelope 0.5 at every recall -> AP = AP50 = 0.5 (101-point and area alike).
    images = [
        (image([("cat", 0, 0, 100, 100)]), [det("cat", 0.9, 0, 0, 100, 72)]),
        (image([("dog", 10, 10, 50, 50)]), [det("dog", 0.9, 60, 60, 90, 90), det("dog", 0.8, 10, 10, 50, 50)]),
    ]
    result = evaluate_coco(images, ["cat", "dog"])
    assert result.per_class == pytest.approx({"cat": 0.5, "dog": 0.5})
    assert result.extra["AP50/cat"] == pytest.approx(1.0) and result.extra["AP50/dog"] == pytest.approx(0.5)
    assert result.mean_ap == pytest.approx(0.5) and result.extra["AP50"] == pytest.approx(0.75)
    assert result.counts == {"cat": 1, "dog": 1}


def test_coco_101_point_interpolation_by_hand():
    # Two ground truths; TP, FP, TP by score: recall 0.5, 0.5, 1; precision 1, 1/2, 2/3.
    images = [
        (
            image([("cat", 0, 0, 50, 50), ("cat", 100, 100, 150, 150)]),
            [det("cat", 0.9, 0, 0, 50, 50), det("cat", 0.8, 60, 0, 90, 30), det("cat", 0.7, 100, 100, 150, 150)],
        )
    ]
    # COCO: recall thresholds 0, 0.01, .., 0.50 (51) take the envelope 1, 0.51..1.00 (50) take 2/3.
    coco = evaluate_coco(images, ["cat"])
    assert coco.per_class["cat"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)
    assert coco.extra["AP50"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)
    # VOC area: 0.5 * 1 + 0.5 * 2/3; VOC07: t = 0..0.5 (6 points) -> 1, 0.6..1 (5) -> 2/3.
    assert evaluate_voc(images, ["cat"], "voc").per_class["cat"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert evaluate_voc(images, ["cat"], "voc07").per_class["cat"] == pytest.approx((6 + 5 * 2 / 3) / 11)


CAT_A, CAT_B, DOG = (10, 10, 60, 60), (120, 20, 190, 90), (100, 100, 180, 150)
NOWHERE = (0, 150, 5, 155)  # overlaps nothing


@pytest.mark.parametrize(
    "dets, expected",
    [
        # every object found exactly, nothing else
        ([[det("cat", 0.9, *CAT_A)], [det("dog", 0.8, *DOG), det("cat", 0.7, *CAT_B)]], 1.0),
        # false positives ranked above the true positives: cat FP, TP, FP, TP
        # (precision 0, 1/2, 1/3, 1/2), dog FP, TP (0, 1/2): a flat envelope of 1/2
        (
            [
                [det("cat", 0.9, *NOWHERE), det("cat", 0.8, *CAT_A), det("dog", 0.9, *NOWHERE)],
                [det("cat", 0.7, *NOWHERE), det("cat", 0.6, *CAT_B), det("dog", 0.8, *DOG)],
            ],
            0.5,
        ),
        # detections only where there is nothing
        ([[det("cat", 0.9, *NOWHERE)], [det("dog", 0.8, *NOWHERE), det("cat", 0.7, *NOWHERE)]], 0.0),
    ],
    ids=["perfect", "fp-above-tp", "all-wrong"],
)
def test_voc_area_ap_and_coco_ap50_agree_where_they_must(dets, expected):
    # Where the precision envelope is flat, area AP and the 101-point AP50 coincide.
    records = [image([("cat", *CAT_A)]), image([("dog", *DOG), ("cat", *CAT_B)])]
    images = list(zip(records, dets))
    voc = evaluate_voc(images, ["cat", "dog"], "voc")
    coco = evaluate_coco(images, ["cat", "dog"])
    for name in ("cat", "dog"):
        assert voc.per_class[name] == pytest.approx(expected)
        assert coco.extra[f"AP50/{name}"] == pytest.approx(expected)
    assert voc.mean_ap == pytest.approx(expected) and coco.extra["AP50"] == pytest.approx(expected)


def test_coco_matches_pycocotools_run_directly():
    """evaluate_coco against COCOeval fed by hand: xywh boxes, category ids, crowd flags, per-class slices."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(1)
    classes = ["cat", "dog", "bird"]  # bird: detections but no ground truth
    images, coco_images, annotations, results = [], [], [], []
    for n in range(6):
        rows, dets_ = [], []
        for _ in range(int(rng.integers(1, 4))):
            name = classes[int(rng.integers(0, 2))]
            x1, y1 = rng.uniform(0, 120, 2)
            w, h = rng.uniform(15, 70, 2)
            crowd = int(rng.random() < 0.15)
            rows.append((name, x1, y1, x1 + w, y1 + h, 0, crowd))
            annotations.append({"id": len(annotations) + 1, "image_id": n + 100, "category_id": 1 + classes.index(name),
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": crowd})
            for _ in range(int(rng.integers(0, 3))):  # jittered copies: IoU spread over 0.3..1
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                dets_.append(det(name, float(rng.random()), x1 + j[0], y1 + j[1], x1 + w + j[2], y1 + h + j[3]))
        for _ in range(int(rng.integers(0, 3))):  # false positives, some of class bird
            x1, y1 = rng.uniform(0, 150, 2)
            dets_.append(det(classes[int(rng.integers(0, 3))], float(rng.random()), x1, y1, x1 + 30, y1 + 30))
        images.append((image(rows), dets_))
        coco_images.append({"id": n + 100, "width": 200, "height": 200})
        for d in dets_:
            x1, y1, x2, y2 = d["box"]
            results.append({"image_id": n + 100, "category_id": 1 + classes.index(d["class"]), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})

    def cocoeval(cat_ids):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": coco_images, "annotations": annotations, "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.params.catIds = cat_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev.stats

    result = evaluate_coco(images, classes)
    stats = cocoeval([1, 2, 3])
    assert 0.05 < stats[0] < 0.95  # a case with something to get wrong
    assert result.mean_ap == pytest.approx(stats[0]) and result.extra["AP50"] == pytest.approx(stats[1])
    for k, name in enumerate(classes[:2]):
        one = cocoeval([k + 1])
        assert result.per_class[name] == pytest.approx(one[0]) and result.extra[f"AP50/{name}"] == pytest.approx(one[1])
    assert np.isnan(result.per_class["bird"]) and "AP50/bird" not in result.extra
    assert result.counts == {c: sum(1 for a in annotations if a["category_id"] == k + 1 and not a["iscrowd"]) for k, c in enumerate(classes)}


def _random_pairs(rng: np.random.Generator, images: int, classes: list[str], ties: bool = False) -> list:
    pairs = []
    for _ in range(images):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (n, 2))], axis=1).astype(np.float32)
        names = [classes[int(i)] for i in rng.integers(0, len(classes), n)]
        gt = GroundTruthImage(boxes, names, rng.random(n) < 0.15, np.zeros(n, bool))
        dets = []
        for _ in range(int(rng.integers(0, 6))):
            if n and rng.random() < 0.6:  # near a box of the image, of its class or another
                k = int(rng.integers(0, n))
                box = boxes[k] + rng.normal(0, 4, 4)
                name = names[k] if rng.random() < 0.8 else classes[int(rng.integers(0, len(classes)))]
            else:
                x, y = rng.uniform(0, 80, 2)
                box, name = np.array([x, y, x + 20, y + 20]), classes[int(rng.integers(0, len(classes)))]
            score = float(rng.normal())
            dets.append({"box": [float(v) for v in box], "class": name, "score": round(score, 1) if ties else score})
        pairs.append((gt, dets))
    return pairs


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_paired_bootstrap_weights_equal_duplicated_images(seed, ties):
    """benchmarks/paired_bootstrap.py matches once and weighs images; the slow reference
    scores a list in which each image appears as often as its weight. Exactly, without tied
    scores; with them (scores rounded to 0.1), up to the order the copies of a tie take."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from paired_bootstrap import class_matches, weighted_map
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    pairs = _random_pairs(rng, 12, classes, ties)
    matches = [class_matches(pairs, c) for c in classes]
    weights = rng.integers(0, 4, (5, len(pairs))).astype(np.float64)
    weights[0] = 1
    got = weighted_map(matches, weights)
    for row, value in zip(weights, got):
        duplicated = [pair for pair, times in zip(pairs, row) for _ in range(int(times))]
        assert value == pytest.approx(evaluate_voc(duplicated, classes, "voc07").mean_ap, abs=0.01 if ties else 1e-12, nan_ok=True)
