import math

import numpy as np
import pytest
import torch
from torchvision import ops

from spp_cli import boxes


def test_voc_is_one_based_inclusive():
    # A VOC box over pixels 1..10 (1-based) covers continuous [0, 10].
    assert boxes.from_voc(1, 1, 10, 20) == [0.0, 0.0, 10.0, 20.0]


def test_xywh_round_trip():
    b = np.array([[1.5, 2, 10, 20]], np.float32)
    xyxy = boxes.from_xywh(b)
    np.testing.assert_allclose(xyxy, [[1.5, 2, 11.5, 22]])
    np.testing.assert_allclose(boxes.to_xywh(xyxy), b)


def test_yolo_normalised_centre_form():
    out = boxes.from_cxcywh_normalised(np.array([[0.5, 0.5, 0.2, 0.4]]), 100, 50)
    np.testing.assert_allclose(out, [[40, 15, 60, 35]], atol=1e-5)


def test_clip_and_flags():
    b = np.array([[-5, 2, 70, 40], [10, 10, 10, 20], [1, 1, 2, 2]], np.float32)
    np.testing.assert_array_equal(boxes.is_outside(b, 64, 48), [True, False, False])
    np.testing.assert_array_equal(boxes.is_degenerate(b), [False, True, False])
    np.testing.assert_allclose(boxes.clip(b, 64, 48)[0], [0, 2, 64, 40])


def test_outside_tolerance_ignores_rounding():
    b = np.array([[-0.0001, 0, 64.3, 48]], np.float32)
    assert boxes.is_outside(b, 64, 48)[0]
    assert not boxes.is_outside(b, 64, 48, tolerance=1.0)[0]


def _slow_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_iou_matches_slow_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (20, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 30, (20, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 50, (15, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 30, (15, 2))], 1).astype(np.float32)
    fast = boxes.iou(a, b).numpy()
    slow = np.array([[_slow_iou(p, q) for q in b] for p in a])
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_iou_of_empty_sets():
    assert boxes.iou(np.zeros((0, 4)), np.ones((3, 4))).shape == torch.Size([0, 3])


def test_dedupe_keeps_first_occurrence_in_order():
    b = np.array([[3, 3, 4, 4], [1, 1, 2, 2], [3, 3, 4, 4], [0, 0, 1, 1]])
    np.testing.assert_array_equal(boxes.dedupe(b), [0, 1, 3])


def _slow_vote(kept, candidates, scores, classes, threshold):
    out = []
    for i in kept:
        total, weight = np.zeros(4), 0.0
        for j in range(len(candidates)):
            if classes[j] != classes[i]:
                continue
            if boxes.iou(candidates[i : i + 1], candidates[j : j + 1]).item() >= threshold:
                w = math.exp(scores[j] - scores[i])
                total += w * candidates[j]
                weight += w
        out.append(total / weight)
    return np.array(out)


def test_box_voting_matches_slow_reference():
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (60, 2))
    candidates = np.concatenate([xy, xy + rng.uniform(10, 80, (60, 2))], 1).astype(np.float32)
    scores = rng.normal(0, 1, 60).astype(np.float32)
    classes = rng.integers(0, 3, 60)
    kept = torch.tensor([5, 0, 17, 42, 33])
    voted = boxes.vote_boxes(kept, torch.from_numpy(candidates), torch.from_numpy(scores), torch.from_numpy(classes), 0.5)
    np.testing.assert_allclose(voted.numpy(), _slow_vote(kept.tolist(), candidates, scores, classes, 0.5), rtol=1e-5, atol=1e-4)


def test_box_voting_by_hand():
    candidates = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60], [0, 0, 10, 11]])
    scores = torch.tensor([1.0, 0.0, 5.0, 2.0])
    classes = torch.tensor([0, 0, 0, 1])
    voted = boxes.vote_boxes(torch.tensor([0, 2, 3]), candidates, scores, classes)
    # Box 1 (IoU 0.83, one margin unit lower) votes with weight 1/e; box 2 is too far,
    # box 3 is another class: alone, it stays as it is.
    w = math.exp(-1.0)
    assert torch.allclose(voted[0], torch.tensor([0.0, 0.0, 10.0, (10 + 12 * w) / (1 + w)]))
    assert torch.equal(voted[1], candidates[2]) and torch.equal(voted[2], candidates[3])


def _slow_nms_top(candidates, scores, classes, threshold, limit, min_score):
    """Greedy NMS per class, one box at a time by decreasing score; survivors above min_score, the first ``limit``."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if any(classes[j] == classes[i] and boxes.iou(candidates[i : i + 1], candidates[j : j + 1]).item() > threshold for j in kept):
            continue
        kept.append(i)
    return [i for i in kept if scores[i] > min_score][:limit]


@pytest.mark.parametrize("limit, min_score", [(5, -10.0), (20, 0.5), (100, -10.0), (3, 2.5)])
def test_top_batched_nms_matches_slow_reference_and_torchvision(limit, min_score):
    rng = np.random.default_rng(limit)
    n = 700  # more than 8 * limit for the small limits: the candidates are taken in rounds
    xy = rng.uniform(0, 300, (n, 2))
    candidates = np.concatenate([xy, xy + rng.uniform(20, 120, (n, 2))], 1).astype(np.float32)
    scores = rng.normal(0, 1.5, n).astype(np.float32)
    classes = rng.integers(0, 4, n)
    as_tensors = torch.from_numpy(candidates), torch.from_numpy(scores), torch.from_numpy(classes)
    kept = boxes.top_batched_nms(*as_tensors, 0.3, limit, min_score)
    everything = ops.batched_nms(*as_tensors, 0.3)
    np.testing.assert_array_equal(kept.numpy(), everything[scores[everything.numpy()] > min_score][:limit].numpy())
    np.testing.assert_array_equal(kept.numpy(), _slow_nms_top(candidates, scores, classes, 0.3, limit, min_score))


def test_top_batched_nms_of_no_candidates():
    kept = boxes.top_batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.3, 100, -1.0)
    assert kept.shape == (0,)


def test_top_batched_nms_orders_equal_scores_by_index_as_nms_over_all_does():
    # Scores in steps of 0.1: many equal ones, across the rounds' cuts too.
    rng = np.random.default_rng(3)
    for limit in (1, 4, 30):
        n = 900
        xy = rng.uniform(0, 300, (n, 2))
        candidates = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], 1).astype(np.float32))
        scores = torch.from_numpy(np.round(rng.normal(0, 1, n), 1).astype(np.float32))
        classes = torch.from_numpy(rng.integers(0, 5, n))
        everything = ops.batched_nms(candidates, scores, classes, 0.3).sort().values
        everything = everything[scores[everything] > -0.5]
        expected = everything[torch.argsort(scores[everything], descending=True, stable=True)][:limit]
        assert torch.equal(boxes.top_batched_nms(candidates, scores, classes, 0.3, limit, -0.5), expected)
