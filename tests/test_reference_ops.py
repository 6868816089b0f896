"""Vectorised ops that had no slow-reference test, each checked against plain Python loops.

Every reference below is written from the op's docstring (shapes, ``xyxy`` continuous
pixels, inclusive/exclusive ends), not from its code; each comparison runs on a few
fixed seeds and on edge cases (empty input, degenerate and inverted boxes, boxes
outside the image, ties).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spp_cli import boxes as box_ops

SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- helpers


def random_boxes(rng, n, low=-20.0, high=120.0, max_side=60.0, dtype=np.float32):
    """``(n, 4)`` ``xyxy`` boxes, some reaching outside ``[0, 100]``."""
    xy = rng.uniform(low, high, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(0.5, max_side, (n, 2))], 1).astype(dtype)


def integer_boxes(rng, n, high=60, max_side=40):
    """``(n, 4)`` float32 boxes on whole pixels (so that float32 and float64 IoUs agree exactly)."""
    xy = rng.integers(0, high, (n, 2))
    return np.concatenate([xy, xy + rng.integers(1, max_side, (n, 2))], 1).astype(np.float32)


def slow_iou(a, b) -> float:
    """IoU of two ``xyxy`` boxes in continuous coordinates (float64)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def slow_iou32(a, b) -> np.float32:
    """The same in float32, for boxes whose areas are whole numbers (exact), as torchvision computes it."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return np.float32(inter) / np.float32(union)


# ---------------------------------------------------------------- boxes.py: format conversions, clip, flags


@pytest.mark.parametrize("seed", SEEDS)
def test_from_xywh_and_to_xywh_match_loops(seed):
    rng = np.random.default_rng(seed)
    xywh = np.concatenate([rng.uniform(-50, 500, (40, 2)), rng.uniform(0, 200, (40, 2))], 1).astype(np.float32)
    xywh[:3, 2:] = 0  # degenerate: no width / height
    expected = np.array([[x, y, x + w, y + h] for x, y, w, h in xywh], np.float32)  # float32 scalars: float32 sums
    np.testing.assert_array_equal(box_ops.from_xywh(xywh), expected)
    xyxy = expected
    back = np.array([[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in xyxy], np.float32)
    np.testing.assert_array_equal(box_ops.to_xywh(xyxy), back)
    # float64 (annotations) stays float64
    xywh64 = xywh.astype(np.float64)
    got64 = box_ops.from_xywh(xywh64, dtype=np.float64)
    assert got64.dtype == np.float64
    np.testing.assert_array_equal(got64, [[x, y, x + w, y + h] for x, y, w, h in xywh64])


def test_format_conversions_of_empty_input():
    assert box_ops.from_xywh(np.zeros((0, 4))).shape == (0, 4)
    assert box_ops.to_xywh(np.zeros((0, 4))).shape == (0, 4)
    assert box_ops.from_cxcywh_normalised(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    assert box_ops.clip(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    assert box_ops.is_outside(np.zeros((0, 4)), 10, 10).shape == (0,)
    assert box_ops.is_degenerate(np.zeros((0, 4))).shape == (0,)
    assert box_ops.dedupe(np.zeros((0, 4))).shape == (0,)


@pytest.mark.parametrize("seed", SEEDS)
def test_from_cxcywh_normalised_matches_loop(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(1, 2000)), int(rng.integers(1, 2000))
    yolo = rng.uniform(0, 1, (50, 4)).astype(np.float32)
    yolo[0] = [0.5, 0.5, 1.0, 1.0]  # the whole image
    yolo[1] = [0.0, 0.0, 0.2, 0.2]  # centred on the corner: half outside
    yolo[2, 2:] = 0  # a point
    f = np.float32
    expected = [
        [(cx - w / f(2)) * f(width), (cy - h / f(2)) * f(height), (cx + w / f(2)) * f(width), (cy + h / f(2)) * f(height)]
        for cx, cy, w, h in yolo
    ]
    got = box_ops.from_cxcywh_normalised(yolo, width, height)
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[0], [0, 0, width, height])


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_matches_loop(seed):
    rng = np.random.default_rng(seed)
    b = random_boxes(rng, 60, low=-150, high=250, max_side=200)
    b[0] = [-1e6, -1e6, 1e6, 1e6]  # around the whole image
    b[1] = [200, 200, 300, 300]  # entirely outside
    b[2] = [40, 30, 20, 10]  # inverted
    b[3] = [100, 80, 100, 80]  # a point on the far corner
    width, height = 100, 80
    clamp = lambda v, hi: min(max(float(v), 0.0), float(hi))  # noqa: E731
    expected = [[clamp(x1, width), clamp(y1, height), clamp(x2, width), clamp(y2, height)] for x1, y1, x2, y2 in b]
    got = box_ops.clip(b, width, height)
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
    assert got.dtype == np.float32 and not np.shares_memory(got, b)


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 1.0])
def test_is_outside_and_is_degenerate_match_loops(tolerance):
    rng = np.random.default_rng(int(tolerance * 10))
    width, height = 64, 48
    b = np.round(random_boxes(rng, 80, low=-3, high=66, max_side=10) * 4) / 4  # quarter pixels: hits the edges
    t = tolerance
    # Exactly at the tolerance: not beyond it (ties); just past it: outside.
    b[:4] = [[-t, 0, 10, 10], [0, -t, 10, 10], [0, 0, width + t, 10], [0, 0, 10, height + t]]
    b[4:8] = [[-t - 0.25, 0, 10, 10], [0, -t - 0.25, 10, 10], [0, 0, width + t + 0.25, 10], [0, 0, 10, height + t + 0.25]]
    b[8:11] = [[5, 5, 5, 9], [5, 5, 9, 5], [9, 9, 5, 5]]  # zero width, zero height, inverted
    outside = [x1 < -t or y1 < -t or x2 > width + t or y2 > height + t for x1, y1, x2, y2 in b.astype(np.float64)]
    degenerate = [x2 <= x1 or y2 <= y1 for x1, y1, x2, y2 in b]
    np.testing.assert_array_equal(box_ops.is_outside(b, width, height, tolerance), outside)
    np.testing.assert_array_equal(box_ops.is_degenerate(b), degenerate)
    assert outside[:8] == [False] * 4 + [True] * 4
    assert degenerate[8:11] == [True] * 3


@pytest.mark.parametrize("seed", SEEDS)
def test_dedupe_matches_loop(seed):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 3, (200, 4)).astype(np.float32)  # a small grid: many repeats, in any order
    b[5] = b[150]  # a late repeat of an early box
    first, seen = [], set()
    for i, box in enumerate(b):
        key = tuple(box.tolist())
        if key not in seen:
            seen.add(key)
            first.append(i)
    got = box_ops.dedupe(b)
    assert got.tolist() == first
    assert box_ops.dedupe(b[:1]).tolist() == [0]


def test_iou_edge_cases_match_loop():
    # torchvision's IoU is checked against loops on random boxes in test_boxes; here the edges:
    # touching, containing, identical, outside the image, and zero-area boxes.
    a = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [2, 2, 8, 8], [-30, -30, -10, -10], [5, 5, 5, 15], [0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [0, 10, 10, 20], [-25, -25, -5, -5], [3, 3, 3, 3], [0, 0, 10, 5]], np.float32)
    expected = np.array([[slow_iou(p, q) if (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) > 0 else np.nan
                          for q in b] for p in a])
    got = box_ops.iou(a, b).numpy()
    finite = np.isfinite(expected)
    assert (~finite).sum() == 1  # two zero-area boxes: 0 / 0
    assert np.isnan(got[~finite]).all()  # nan, as the docstring says (torchvision's)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-7)
    assert got[0, 4] == 0.5 and got[0, 0] == 1.0 and got[1, 0] == 0.0  # exact where exact


# ---------------------------------------------------------------- bbox_reg.py: delta encoding and decoding


def slow_encode(p, g):
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    px, py, gx, gy = p[0] + pw / 2, p[1] + ph / 2, g[0] + gw / 2, g[1] + gh / 2
    return [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]


def slow_decode(p, d):
    pw, ph = p[2] - p[0], p[3] - p[1]
    px, py = p[0] + pw / 2, p[1] + ph / 2
    cap = math.log(1000.0 / 16)  # py-faster-rcnn's clamp on the log-scale deltas
    cx, cy = px + d[0] * pw, py + d[1] * ph
    w, h = pw * math.exp(min(d[2], cap)), ph * math.exp(min(d[3], cap))
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_encode_matches_loop(seed):
    from spp_cli.bbox_reg import encode

    rng = np.random.default_rng(seed)
    proposals = random_boxes(rng, 50, max_side=300)
    targets = random_boxes(rng, 50, max_side=300)
    targets[0] = proposals[0]  # identical: zero deltas
    got = encode(proposals, targets)
    expected = [slow_encode(p.astype(np.float64), g.astype(np.float64)) for p, g in zip(proposals, targets)]
    assert got.dtype == np.float32 and got.shape == (50, 4)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(got[0], [0, 0, 0, 0])
    assert encode(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_matches_loop_including_the_log_scale_clamp(seed):
    from spp_cli.bbox_reg import decode

    rng = np.random.default_rng(seed)
    proposals = random_boxes(rng, 50, max_side=300).astype(np.float64)
    deltas = rng.normal(0, 0.6, (50, 4))
    deltas[:3, 2:] = [[5.0, 0.0], [0.0, 9.0], [-6.0, 4.2]]  # past log(1000/16) = 4.135: clamped; far below: not
    got = decode(torch.from_numpy(proposals), torch.from_numpy(deltas)).numpy()
    expected = [slow_decode(p, d) for p, d in zip(proposals, deltas)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)
    # float32, as detection calls it
    got32 = decode(torch.from_numpy(proposals.astype(np.float32)), torch.from_numpy(deltas.astype(np.float32))).numpy()
    np.testing.assert_allclose(got32, expected, rtol=2e-5, atol=2e-3)
    assert decode(torch.zeros((0, 4)), torch.zeros((0, 4))).shape == (0, 4)


# ---------------------------------------------------------------- spp.py: scale selection, bins, range maxima


def slow_select(box, scales, target):
    area = max((float(box[2]) - float(box[0])) * (float(box[3]) - float(box[1])), 1e-6)
    costs = [abs(area * f * f - target * target) for f in scales]
    return costs.index(min(costs))  # first of equals


@pytest.mark.parametrize("seed", SEEDS)
def test_select_scales_matches_loop(seed):
    from spp_cli.spp import select_scales

    rng = np.random.default_rng(seed)
    b = random_boxes(rng, 200, max_side=500)
    b[0] = [50, 50, 50, 80]  # zero area
    scales = sorted(rng.uniform(0.3, 4.0, 5).tolist())
    got = select_scales(torch.from_numpy(b), scales).tolist()
    assert got == [slow_select(box, scales, 224.0) for box in b]
    # Ties go to the first scale: the same factor twice, and equal distances (5 vs 45 around 25).
    assert select_scales(torch.tensor([[0.0, 0.0, 30.0, 40.0]]), [2.0, 2.0]).tolist() == [0]
    assert select_scales(torch.tensor([[0.0, 0.0, 1.0, 5.0]]), [1.0, 3.0], target=5.0).tolist() == [0]
    assert select_scales(torch.tensor([[0.0, 0.0, 1.0, 5.0]]), [3.0, 1.0], target=5.0).tolist() == [0]


def test_bin_edges_match_the_papers_rule():
    from spp_cli.spp import bin_edges

    rng = np.random.default_rng(0)
    starts = rng.integers(0, 50, 300)
    lengths = np.concatenate([np.arange(1, 40), rng.integers(1, 100, 261)])
    for n in (1, 2, 3, 4, 6, 7, 13):
        lo, hi = bin_edges(torch.from_numpy(starts), torch.from_numpy(lengths), n)
        for r, (s, w) in enumerate(zip(starts.tolist(), lengths.tolist())):
            expected_lo = [s + (i * w) // n for i in range(n)]
            expected_hi = [s - (-(i + 1) * w // n) for i in range(n)]  # ceil((i + 1) * w / n)
            assert lo[r].tolist() == expected_lo and hi[r].tolist() == expected_hi
            assert all(h > low for low, h in zip(expected_lo, expected_hi))  # never empty
            assert expected_lo[0] == s and expected_hi[-1] == s + w  # the bins cover the window


def random_cells(rng, n, height, width):
    """``(n, 4)`` int64 inclusive cell ranges ``[left, top, right, bottom]`` inside an ``H x W`` map."""
    x = np.sort(rng.integers(0, width, (n, 2)), 1)
    y = np.sort(rng.integers(0, height, (n, 2)), 1)
    cells = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    extra = [[0, 0, width - 1, height - 1], [width - 1, height - 1, width - 1, height - 1], [0, 0, 0, 0]]
    return np.concatenate([cells, extra]).astype(np.int64)


def slow_bins(cell, levels):
    """Each bin ``(y0, y1, x0, x1)`` (exclusive ends) of an inclusive cell range, level by level, row-major."""
    left, top, right, bottom = (int(v) for v in cell)
    w, h = right - left + 1, bottom - top + 1
    out = []
    for n in levels:
        for i in range(n):
            for j in range(n):
                out.append((top + math.floor(i * h / n), top + math.ceil((i + 1) * h / n),
                            left + math.floor(j * w / n), left + math.ceil((j + 1) * w / n)))
    return out


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (4, 2), (7,)])
def test_bin_keys_match_loop(levels):
    from spp_cli.spp import bin_keys

    rng = np.random.default_rng(len(levels))
    height, width = 11, 17
    cells = random_cells(rng, 60, height, width)
    got = bin_keys(torch.from_numpy(cells), levels, height, width)
    assert got.shape == (len(cells), sum(n * n for n in levels))
    for r, cell in enumerate(cells):
        expected = [((y0 * (height + 1) + y1) * (width + 1) + x0) * (width + 1) + x1 for y0, y1, x0, x1 in slow_bins(cell, levels)]
        assert got[r].tolist() == expected


@pytest.mark.parametrize("shape", [(2, 1, 1), (3, 5, 7), (2, 8, 3), (1, 9, 16), (2, 1, 13)])
def test_range_max_table_answers_every_rectangle(shape):
    from spp_cli.spp import _RangeMaxTable

    rng = np.random.default_rng(shape[1] * 100 + shape[2])
    fmap = rng.integers(-3, 4, shape).astype(np.float32)  # few distinct values: many ties
    c, h, w = shape
    table = _RangeMaxTable(torch.from_numpy(fmap), h.bit_length() - 1, w.bit_length() - 1)
    rects = [(y0, y1, x0, x1) for y0 in range(h) for y1 in range(y0 + 1, h + 1) for x0 in range(w) for x1 in range(x0 + 1, w + 1)]
    y0, y1, x0, x1 = (torch.tensor(v) for v in zip(*rects))
    corners = table.corner_index(y0, y1, x0, x1)
    got = table.flat[corners.reshape(-1)].view(len(rects), 4, c).amax(1).numpy()
    expected = np.array([fmap[:, a:b, p:q].reshape(c, -1).max(1) for a, b, p, q in rects])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_bin_maxima_match_loop(dtype, chunk):
    from spp_cli.spp import bin_maxima

    rng = np.random.default_rng(chunk)
    levels = (1, 2, 3, 6)
    height, width = 9, 14
    fmap = rng.integers(-5, 6, (4, height, width)).astype(np.float32)  # exact in fp16, ties everywhere
    cells = random_cells(rng, 40, height, width)
    maxima, inverse = bin_maxima(torch.from_numpy(fmap).to(dtype), torch.from_numpy(cells).float(), levels, chunk=chunk)
    assert maxima.dtype == dtype and inverse.shape == (len(cells), 50)
    rectangles = set()
    for r, cell in enumerate(cells):
        for b, (y0, y1, x0, x1) in enumerate(slow_bins(cell, levels)):
            rectangles.add((y0, y1, x0, x1))
            np.testing.assert_array_equal(maxima[inverse[r, b]].float().numpy(), fmap[:, y0:y1, x0:x1].reshape(4, -1).max(1))
    assert len(maxima) == len(rectangles)  # one row per distinct rectangle


# ---------------------------------------------------------------- windows.py: distinct windows, features, norms


def slow_cells(box, scale, align, height, width):
    """:func:`spp_cli.spp.project_windows`'s docstring: cell ``j`` covers ``[j*S + o - S/2, j*S + o + S/2)``; a window
    shrunk by the margin maps to the cells it overlaps; an inverted range collapses to the centre's cell; clamped."""
    s, o, m = align.stride, align.offset, align.margin
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    left, right = math.floor((x1 + m - o) / s + 0.5), math.ceil((x2 - m - o) / s - 0.5)
    top, bottom = math.floor((y1 + m - o) / s + 0.5), math.ceil((y2 - m - o) / s - 0.5)
    if right < left:
        left = right = math.floor(((x1 + x2) / 2 - o) / s + 0.5)
    if bottom < top:
        top = bottom = math.floor(((y1 + y2) / 2 - o) / s + 0.5)
    clamp = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return (clamp(left, width - 1), clamp(top, height - 1), clamp(right, width - 1), clamp(bottom, height - 1))


def make_entry(rng, factors, boxes, channels=3, width=320, height=240):
    from spp_cli.cache import CacheEntry

    maps = [torch.from_numpy(rng.standard_normal((channels, math.ceil(height * f / 16), math.ceil(width * f / 16))).astype(np.float32))
            for f in factors]
    return CacheEntry("0" * 64, "img", "img.jpg", width, height, maps, list(factors), boxes)


@pytest.mark.parametrize("factors", [(1.0,), (0.5, 1.0, 1.7)])
def test_distinct_windows_match_loop(factors):
    from spp_cli.spp import Alignment
    from spp_cli.windows import distinct_windows, window_features

    rng = np.random.default_rng(len(factors))
    align = Alignment(16, 7.5, 2.0)
    b = random_boxes(rng, 150, low=-30, high=330, max_side=150)
    b = np.concatenate([b, b[:20] + rng.uniform(-3, 3, (20, 4)).astype(np.float32),  # near-copies: same cells
                        np.array([[40, 30, 20, 10], [-80, -80, -40, -40], [100, 100, 100, 100]], np.float32)])
    entry = make_entry(rng, factors, b)
    keys, first = {}, []
    for i, box in enumerate(b):
        s = slow_select(box, factors, 224.0) if len(factors) > 1 else 0
        _, height, width = entry.maps[s].shape
        key = (s, *slow_cells(box, factors[s], align, height, width))
        if key not in keys:
            keys[key] = i
            first.append(i)
    got = distinct_windows(entry, b, align)
    assert got.tolist() == first
    assert len(first) < len(b)  # some windows share their cells
    # Windows with the same key have the same features: dropping them loses nothing.
    features = window_features(entry, b, align, scale=2.5)
    unscaled = window_features(entry, b, align)
    torch.testing.assert_close(features, unscaled * 2.5, rtol=0, atol=0)
    for i, box in enumerate(b):
        s = slow_select(box, factors, 224.0) if len(factors) > 1 else 0
        _, height, width = entry.maps[s].shape
        assert torch.equal(unscaled[i], unscaled[keys[(s, *slow_cells(box, factors[s], align, height, width))]])
    assert distinct_windows(entry, np.zeros((0, 4), np.float32), align).shape == (0,)


def test_mean_feature_norms_match_loop():
    from spp_cli.windows import mean_feature_norms

    rng = np.random.default_rng(0)
    rows = {k: rng.standard_normal((n, 6)).astype(np.float32) for k, n in enumerate((5, 0, 9, 3))}
    entries = [SimpleNamespace(key=k, proposals=np.zeros((len(r), 4), np.float32)) for k, r in rows.items()]
    featurize = lambda entry, boxes: torch.from_numpy(rows[entry.key][: len(boxes)])  # noqa: E731
    double = lambda x: 2 * x[:, :4]  # noqa: E731
    norms = [math.sqrt(sum(float(v) ** 2 for v in row)) for r in rows.values() for row in r]
    derived = [math.sqrt(sum((2 * float(v)) ** 2 for v in row[:4])) for r in rows.values() for row in r]
    mean, none = mean_feature_norms(entries, featurize, boxes_per_image=100, seed=0)
    assert none is None and mean == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    mean, mean_derived = mean_feature_norms(entries, featurize, boxes_per_image=100, seed=0, derive=double)
    assert mean == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    assert mean_derived == pytest.approx(sum(derived) / len(derived), rel=1e-6)
    # A sample of at most boxes_per_image rows per image, and no rows at all: 1.0.
    assert mean_feature_norms(entries[1:2], featurize, 100, 0, double) == (1.0, 1.0)
    sampled, _ = mean_feature_norms(entries, featurize, boxes_per_image=2, seed=3)
    assert min(norms) <= sampled <= max(norms)


# ---------------------------------------------------------------- svm.py


def test_linear_svm_scores_match_loop():
    from spp_cli.svm import LinearSVMs

    rng = np.random.default_rng(0)
    svms = LinearSVMs(["a", "b", "c"], rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(3).astype(np.float32), 0.25)
    x = rng.standard_normal((7, 8)).astype(np.float32)
    for scaled, factor in ((True, 1.0), (False, 0.25)):
        expected = [[factor * sum(float(a) * float(w) for a, w in zip(row, svms.weight[k])) + float(svms.bias[k]) for k in range(3)] for row in x]
        np.testing.assert_allclose(svms.scores(torch.from_numpy(x), scaled=scaled).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert svms.scores(torch.zeros((0, 8))).shape == (0, 3)


@pytest.mark.parametrize("use_scratch", [False, True])
def test_squared_hinge_solver_with_every_row_in_the_loss_matches_the_closed_form(use_scratch):
    """With a small C every row keeps a margin loss at the optimum, where the squared hinge is a quadratic:
    ``(I + 2 X' diag(cost) X) w = 2 X' diag(cost) y`` over the rows extended by the bias feature B.
    This runs the solver's branch that reads all rows in place (test_svm's problems copy the active rows)."""
    from spp_cli.config import SVMConfig
    from spp_cli.svm import Scratch, design_matrix, solve_squared_hinge

    rng = np.random.default_rng(5)
    positives = (rng.normal(0, 1, (40, 12)) + 0.3).astype(np.float32)
    negatives = rng.normal(0, 1, (200, 12)).astype(np.float32)
    config = SVMConfig(C=1e-4, newton_tol=1e-8)
    x = design_matrix(240, 12, [torch.from_numpy(positives), torch.from_numpy(negatives)], config.bias_multiplier)
    weight, bias, scores = solve_squared_hinge(x, 40, config, scratch=Scratch() if use_scratch else None)
    xe = x.numpy().astype(np.float64)
    y = np.concatenate([np.ones(40), -np.ones(200)])
    cost = np.where(y > 0, config.C * config.positive_weight, config.C)
    hessian = np.eye(13) + 2 * (xe.T * cost) @ xe
    w_ext = np.linalg.solve(hessian, 2 * xe.T @ (cost * y))
    assert (y * (xe @ w_ext) < 1).all()  # every row in the loss: the quadratic is the objective
    np.testing.assert_allclose(weight, w_ext[:-1], rtol=1e-4, atol=1e-7)
    assert bias == pytest.approx(w_ext[-1] * config.bias_multiplier, rel=1e-4, abs=1e-7)
    np.testing.assert_allclose(scores.numpy(), xe @ w_ext, rtol=1e-4, atol=1e-6)


def test_negative_candidates_match_loop():
    from spp_cli.svm import negative_candidates

    rng = np.random.default_rng(0)
    gt = integer_boxes(rng, 4)
    proposals = np.concatenate([integer_boxes(rng, 80), gt[:2], gt[2:3] + [0, 0, 0, 10]]).astype(np.float32)
    names = ["cat", "dog", "cat", "bird"]
    classes = ["cat", "dog", "bird", "fish"]  # fish: no ground truth, every proposal is a candidate
    got = negative_candidates(proposals, gt, names, classes, 0.3)
    for name in classes:
        mine = [g for g, n in zip(gt, names) if n == name]
        expected = [i for i, p in enumerate(proposals) if all(slow_iou32(p, g) < 0.3 for g in mine)]
        assert got[name].tolist() == expected
    empty_gt = negative_candidates(proposals, np.zeros((0, 4), np.float32), [], classes, 0.3)
    assert all(v.tolist() == list(range(len(proposals))) for v in empty_gt.values())
    assert all(len(v) == 0 for v in negative_candidates(np.zeros((0, 4), np.float32), gt, names, classes, 0.3).values())


def test_mining_selects_hard_negatives_and_evicts_easy_ones_as_loops_do():
    """HardNegativeMiner: a candidate is hard if it scores above ``hard_threshold`` under its class's model;
    a hard window is stored once; a retrain keeps the negatives scoring >= ``evict_threshold``, at most
    ``max_negatives`` of them (the hardest), in mined order."""
    from spp_cli.config import SVMConfig
    from spp_cli.svm import HardNegativeMiner

    rng = np.random.default_rng(0)
    config = SVMConfig(retrain_every=10**9, max_negatives=12)
    miner = HardNegativeMiner(["a", "b", "c"], 6, config)
    miner.add_positives("a", (rng.normal(0, 1, (15, 6)) + 1.5).astype(np.float32))
    miner.add_positives("b", (rng.normal(0, 1, (15, 6)) - 1.5).astype(np.float32))  # c: no positives, never mined
    models = {"a": (rng.normal(0, 1, 6).astype(np.float32), -0.5), "b": (rng.normal(0, 1, 6).astype(np.float32), -1.0)}
    for name, (w, b) in models.items():
        miner.state[name].weight, miner.state[name].bias = w, b
    features = rng.normal(0, 1, (120, 6)).astype(np.float32)
    candidates = {"a": np.arange(0, 120, 2), "b": np.arange(40, 120), "c": np.arange(120)}
    miner.add_image(torch.from_numpy(features), candidates)
    hard = {}
    for name, (w, b) in models.items():
        hard[name] = [int(i) for i in candidates[name] if sum(float(x) * float(v) for x, v in zip(features[i], w)) + b > config.hard_threshold]
        st = miner.state[name]
        assert len(hard[name]) == st.new_since_retrain and 0 < len(hard[name]) < len(candidates[name])
        np.testing.assert_array_equal(miner.store.take(st.negatives), features[hard[name]].astype(np.float16))
    assert miner.store.count == len(set(hard["a"]) | set(hard["b"])) < len(hard["a"]) + len(hard["b"])
    assert len(miner.state["c"].negatives) == 0

    held = miner.store.take(miner.state["a"].negatives).astype(np.float32)
    miner._retrain("a")
    st = miner.state["a"]
    scores = [sum(float(x) * float(v) for x, v in zip(row, st.weight)) + st.bias for row in held]
    kept = [j for j, score in enumerate(scores) if score >= config.evict_threshold]
    assert 0 < len(kept) < len(held)  # some evicted
    if len(kept) > config.max_negatives:
        kept = sorted(sorted(kept, key=lambda j: -scores[j])[: config.max_negatives])
    assert len(kept) == config.max_negatives  # and the cap applied
    np.testing.assert_array_equal(miner.store.take(st.negatives), held[kept].astype(np.float16))


# ---------------------------------------------------------------- evaluate.py: VOC matching and AP


def slow_match(dets, gt, threshold):
    """VOCevaldet from match_detections' docstring: by descending score (stable), each detection against the
    best-overlapping ground truth of its image."""
    order = sorted(range(len(dets.scores)), key=lambda d: -dets.scores[d])
    taken = {k: [False] * len(b) for k, (b, _) in gt.by_image.items()}
    tp, fp = [], []
    for d in order:
        boxes, difficult = gt.by_image.get(dets.image_ids[d], (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            tp.append(0)
            fp.append(1)
            continue
        overlaps = [slow_iou32(dets.boxes[d], g) for g in boxes]
        best = overlaps.index(max(overlaps))
        if overlaps[best] >= threshold:
            if difficult[best]:
                tp.append(0)
                fp.append(0)
            elif not taken[dets.image_ids[d]][best]:
                taken[dets.image_ids[d]][best] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        else:
            tp.append(0)
            fp.append(1)
    return tp, fp


def random_class(rng):
    from spp_cli.evaluate import ClassDetections, ClassGroundTruth

    by_image, ids, scores, boxes = {}, [], [], []
    for n in range(5):
        g = integer_boxes(rng, int(rng.integers(0, 5)))
        if len(g) > 1:
            g[-1] = g[0]  # a duplicated ground truth: argmax ties go to the first
        by_image[str(n)] = (g, rng.random(len(g)) < 0.2)
        for box in g:
            for _ in range(int(rng.integers(0, 3))):
                ids.append(str(n))
                boxes.append(np.clip(box + rng.integers(-4, 5, 4), 0, None))
    for _ in range(8):  # detections anywhere, some in an image with no ground-truth entry
        ids.append(str(int(rng.integers(0, 6))))
        boxes.append(integer_boxes(rng, 1)[0])
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = np.round(rng.random(len(ids)), 1)  # ties: input order decides
    return ClassDetections(ids, scores, boxes), ClassGroundTruth(by_image)


@pytest.mark.parametrize("seed", range(6))
def test_match_detections_matches_loop(seed):
    from spp_cli.evaluate import match_detections

    dets, gt = random_class(np.random.default_rng(seed))
    for threshold in (0.5, 0.7):
        tp, fp = match_detections(dets, gt, threshold)
        expected_tp, expected_fp = slow_match(dets, gt, threshold)
        assert tp.tolist() == expected_tp and fp.tolist() == expected_fp


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_matches_loop(seed):
    from spp_cli.evaluate import precision_recall

    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, 40)  # 0: ignored (difficult), 1: true, 2: false positive
    kind[:3] = 0  # leading ignored detections: no precision yet (0)
    tp, fp = (kind == 1).astype(float), (kind == 2).astype(float)
    for npos in (int(tp.sum()) + 3, 0):
        recall, precision = precision_recall(tp, fp, npos)
        ctp = cfp = 0
        for i in range(len(tp)):
            ctp, cfp = ctp + tp[i], cfp + fp[i]
            assert recall[i] == pytest.approx(ctp / max(npos, 1), rel=1e-15)
            assert precision[i] == pytest.approx(ctp / (ctp + cfp) if ctp + cfp else 0.0, rel=1e-15)
    empty = precision_recall(np.zeros(0), np.zeros(0), 3)
    assert empty[0].shape == empty[1].shape == (0,)


def slow_voc07(recall, precision):
    """11-point AP as documented: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t,
    the thresholds as the Python voc_eval computes them (k * 0.1: 0.30000000000000004, ...)."""
    total = 0.0
    for k in range(11):
        t = k * 0.1
        best = [p for r, p in zip(recall, precision) if r >= t]
        total += max(best) if best else 0.0
    return total / 11


def slow_area_ap(recall, precision):
    """Area under the precision envelope: each step of recall times the best precision from there on."""
    area, previous = 0.0, 0.0
    for i in range(len(recall)):
        area += (recall[i] - previous) * max(precision[i:])
        previous = recall[i]
    return area


def random_curve(rng, npos):
    from spp_cli.evaluate import precision_recall

    hits = rng.random(30) < 0.4
    tp = np.zeros(30)
    tp[np.flatnonzero(hits)[:npos]] = 1
    return precision_recall(tp, 1 - tp, npos)


@pytest.mark.parametrize("seed", range(5))
def test_voc_aps_match_loops(seed):
    from spp_cli.evaluate import voc07_ap, voc_area_ap

    rng = np.random.default_rng(seed)
    for npos in (7, 10, 11, 13, 17, 20):  # 10 and 20: recalls land on the tenths
        recall, precision = random_curve(rng, npos)
        assert voc07_ap(recall, precision) == pytest.approx(slow_voc07(recall, precision), rel=1e-12, abs=1e-15)
        assert voc_area_ap(recall, precision) == pytest.approx(slow_area_ap(recall, precision), rel=1e-12, abs=1e-15)
    # every detection right / none right
    ones = np.ones(5)
    assert voc07_ap(np.arange(1, 6) / 5, ones) == pytest.approx(1.0) and voc_area_ap(np.arange(1, 6) / 5, ones) == pytest.approx(1.0)
    assert voc07_ap(np.zeros(4), np.zeros(4)) == 0.0 and voc_area_ap(np.zeros(4), np.zeros(4)) == 0.0


def test_voc07_ap_takes_the_python_voc_evals_thresholds():
    """py-faster-rcnn's, detectron2's and mmdetection's 0.3 is 0.30000000000000004: a recall of
    exactly 3/10 falls short of it. spp eval keeps their figure so that results compare."""
    from spp_cli.evaluate import precision_recall, voc07_ap

    # 10 ground truths: 3 found first (precision 1 up to recall 0.3), then 7 more among 63 false positives.
    tp = np.array([1, 1, 1] + [0] * 63 + [1] * 7, float)
    recall, precision = precision_recall(tp, 1 - tp, 10)
    assert recall[2] == 0.3
    # t = 0, 0.1, 0.2 -> precision 1; t = 0.3 (a hair above 3/10) .. 1.0 -> 10/73
    assert voc07_ap(recall, precision) == pytest.approx((3 + 8 * 10 / 73) / 11, rel=1e-12)
    assert voc07_ap(recall, precision) == pytest.approx(slow_voc07(recall, precision), rel=1e-12)


# ---------------------------------------------------------------- calibration.py


def test_calibration_probability_matches_loop():
    from spp_cli.calibration import Calibration

    curve = Calibration(slope=1.7, intercept=-0.4, detections=1, right=1, images=1)
    margins = np.concatenate([np.random.default_rng(0).normal(0, 3, 200), [0.0, 30.0, -30.0]])
    expected = [1 / (1 + math.exp(-(1.7 * m - 0.4))) for m in margins]
    np.testing.assert_allclose(curve.probability(margins), expected, rtol=1e-13, atol=0)
    assert curve.probability(np.zeros(0)).shape == (0,)


def slow_reliability(probabilities, right, bins):
    rows = []
    for k in range(bins):
        members = [i for i, p in enumerate(probabilities) if k / bins <= p < (k + 1) / bins or (k == bins - 1 and p == 1.0)]
        if members:
            # each edge as printed: its shortest exact decimal form, at least 1 and at most 3 places
            def edge(x):
                for places in (1, 2, 3):
                    if float(f"{x:.{places}f}") == x:
                        return f"{x:.{places}f}"
                return None
            exact = [edge(j / bins) for j in range(bins + 1)]
            places = 3 if None in exact else max(len(e.split(".")[1]) for e in exact)
            rows.append({"bin": f"{k / bins:.{places}f}-{(k + 1) / bins:.{places}f}", "detections": len(members),
                         "predicted": round(sum(probabilities[i] for i in members) / len(members), 3),
                         "observed": round(sum(right[i] for i in members) / len(members), 3)})
    return rows


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [10, 5, 2, 4, 8, 3, 100])
def test_reliability_table_matches_loop(seed, bins):
    from spp_cli.calibration import reliability_table

    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.random(60), np.arange(11) / 10, np.arange(bins + 1) / bins])  # tenths, every edge, both ends
    right = (rng.random(len(p)) < p).astype(int)
    assert reliability_table(p, right, bins) == slow_reliability(p.tolist(), right.tolist(), bins)
    assert reliability_table(np.zeros(0), np.zeros(0), bins) == []
    assert reliability_table(np.append(p, np.nan), np.append(right, 1), bins) == reliability_table(p, right, bins)  # not a number: left out


def test_reliability_table_bins_a_probability_on_an_edge_into_the_bin_it_opens():
    """int(0.57 * 100) is 56: binning by p * bins put 0.57 into [0.56, 0.57)."""
    from spp_cli.calibration import reliability_table

    assert reliability_table(np.array([0.565, 0.57]), np.array([1, 0]), bins=100) == slow_reliability([0.565, 0.57], [1, 0], 100)


# ---------------------------------------------------------------- rpn.py: recall, the proposal post-processing


@pytest.mark.parametrize("seed", SEEDS)
def test_rpn_recall_matches_loop(seed):
    from spp_cli.rpn import recall

    rng = np.random.default_rng(seed)
    truth = [integer_boxes(rng, n) for n in (3, 0, 5, 2)]
    found = [np.concatenate([integer_boxes(rng, 30), t[:1]]) if len(t) else integer_boxes(rng, 4) for t in truth]
    found[3] = np.zeros((0, 4), np.float32)  # ground truth but no boxes: missed
    truth.append(np.array([[0, 0, 10, 10]], np.float32))
    found.append(np.array([[0, 0, 10, 5], [0, 0, 7, 10]], np.float32))  # IoU exactly 0.5 and 0.7: counted (>=)
    for threshold in (0.5, 0.7):
        hits = sum(1 for t, f in zip(truth, found) for g in t if any(slow_iou(g, p) >= threshold for p in f))
        assert recall(found, truth, threshold) == pytest.approx(hits / sum(len(t) for t in truth), rel=1e-15)
    assert math.isnan(recall([np.zeros((0, 4))], [np.zeros((0, 4))], 0.5))


class _FixedBoxesNet:
    """Stands in for a ProposalNet: per map, its network-input boxes and logits, as ``boxes`` returns them."""

    def __init__(self, config, outputs):
        self.config, self.outputs, self.asked = config, outputs, []

    def to(self, device):
        return self

    def eval(self):
        return self

    def boxes(self, fmap, align, count):
        self.asked.append(count)
        return self.outputs[int(fmap[0, 0, 0])]


def slow_nms(boxes, scores, threshold):
    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(slow_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", SEEDS)
def test_proposal_post_processing_matches_loop(seed):
    """ProposalModel.propose's docstring: each scale's boxes to original pixels, clipped to the image, those under
    ``min_size`` wide or high dropped, then one NMS over all scales, best first, at most ``top_n``."""
    from spp_cli.rpn import ProposalConfig, ProposalModel

    rng = np.random.default_rng(seed)
    width, height = 200, 150
    factors = [0.5, 1.25]
    outputs = []
    for f in factors:
        b = random_boxes(rng, 120, low=-40, high=230, max_side=80) * f
        b[:3] = np.array([[-90, -90, -10, -10], [500, 10, 600, 40], [20, 20, 21, 80]], np.float32) * f  # outside; a sliver
        outputs.append((torch.from_numpy(b), torch.from_numpy(rng.normal(0, 2, 120).astype(np.float32))))
    config = ProposalConfig(min_size=2.0, nms_iou=0.6, top_n=40, pre_nms_top_n=50)
    net = _FixedBoxesNet(config, outputs)
    model = ProposalModel(net, SimpleNamespace(alignment=None))
    maps = [torch.full((1, 2, 2), float(s)) for s in range(len(factors))]
    got_boxes, got_logits = model.propose(maps, factors, width, height)
    assert net.asked == [80, 80]  # max(pre_nms_top_n, 2 * top_n) per scale

    boxes, logits = [], []
    for (b, s), f in zip(outputs, factors):
        for box, score in zip((b / f).numpy(), s.numpy()):
            x1, y1, x2, y2 = (min(max(float(v), 0.0), float(hi)) for v, hi in zip(box, (width, height, width, height)))
            if x2 - x1 >= config.min_size and y2 - y1 >= config.min_size:
                boxes.append([x1, y1, x2, y2])
                logits.append(float(score))
    kept = slow_nms(boxes, logits, config.nms_iou)[: config.top_n]
    assert len(kept) == config.top_n  # the cut is exercised
    np.testing.assert_allclose(got_boxes, [boxes[i] for i in kept], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got_logits, np.array([logits[i] for i in kept], np.float32))
    assert got_boxes.dtype == got_logits.dtype == np.float32


# ---------------------------------------------------------------- proposals.py: mapping back, stratified ranking


def test_to_original_and_sqrt_area_match_loops():
    from spp_cli.proposals import _sqrt_area, _to_original

    rng = np.random.default_rng(0)
    b = random_boxes(rng, 50, low=-5, high=110, max_side=40)
    b[0] = [10, 10, 10, 30]  # zero area: floored at 1e-6
    b[1] = [30, 30, 10, 10]  # inverted: a positive product
    factors, width, height = (2.5, 1.75), 260, 190
    sx, sy = np.float32(factors[0]), np.float32(factors[1])
    clamp = lambda v, hi: min(max(float(v), 0.0), float(hi))  # noqa: E731
    expected = [[clamp(x1 * sx, width), clamp(y1 * sy, height), clamp(x2 * sx, width), clamp(y2 * sy, height)] for x1, y1, x2, y2 in b]
    np.testing.assert_array_equal(_to_original(b, factors, width, height), np.array(expected, np.float32))
    areas = [math.sqrt(max((float(x2) - float(x1)) * (float(y2) - float(y1)), 1e-6)) for x1, y1, x2, y2 in b]
    np.testing.assert_allclose(_sqrt_area(b), areas, rtol=1e-6)


def slow_size_bin(box):
    """< 16 px (sqrt area): 0; 16-32: 1; ...; >= 256: 5."""
    side = math.sqrt(max((float(box[2]) - float(box[0])) * (float(box[3]) - float(box[1])), 1e-6))
    b = 0
    while b < 5 and side >= 16 * 2**b:
        b += 1
    return b


def slow_stratified(runs):
    """Round robin: position 0 of every (bin, run) list (bins outer, runs inner), then position 1, ...; OpenCV's
    order kept inside each list; then the first of exact duplicates."""
    lists = {(b, r): [box for box in run if slow_size_bin(box) == b] for r, run in enumerate(runs) for b in range(6)}
    ranked = []
    for position in range(max((len(v) for v in lists.values()), default=0)):
        for b in range(6):
            for r in range(len(runs)):
                if position < len(lists[b, r]):
                    ranked.append(lists[b, r][position])
    out, seen = [], set()
    for box in ranked:
        if tuple(box.tolist()) not in seen:
            seen.add(tuple(box.tolist()))
            out.append(box)
    return np.array(out, np.float32).reshape(-1, 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_stratified_ranking_matches_loop(seed):
    from spp_cli.proposals import _stratified

    rng = np.random.default_rng(seed)
    runs = []
    for n in (40, 0, 25, 60):
        xy = rng.integers(0, 200, (n, 2))
        side = np.exp2(rng.uniform(2, 9.5, n)).round()  # every size bin, from 4 px to 700
        runs.append(np.concatenate([xy, xy + np.stack([side, side], 1)], 1).astype(np.float32))
    # Sides exactly on the bin edges (16, 32, 256 px), a zero-area box, and the same box in two runs.
    runs[0][:4] = [[0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 256, 256], [5, 5, 5, 9]]
    runs[3][0] = runs[2][0]
    got = _stratified(runs)
    np.testing.assert_array_equal(got, slow_stratified(runs))
    assert _stratified([]).shape == (0, 4) and _stratified([np.zeros((0, 4), np.float32)]).shape == (0, 4)


# ---------------------------------------------------------------- rcnn.py: context padding


def test_context_boxes_match_loop():
    from spp_cli.rcnn import context_boxes

    rng = np.random.default_rng(0)
    b = random_boxes(rng, 40, max_side=300).astype(np.float64)
    b[0] = [10, 10, 10, 50]  # zero width: grown as if 1e-3 wide
    size, padding = 224, 16
    expected = []
    for x1, y1, x2, y2 in b:
        w, h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
        dx, dy = w * padding / (size - 2 * padding), h * padding / (size - 2 * padding)
        expected.append([x1 - dx, y1 - dy, x2 + dx, y2 + dy])
    np.testing.assert_allclose(context_boxes(torch.from_numpy(b), size, padding).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(context_boxes(torch.from_numpy(b), size, 0), torch.from_numpy(b))
    assert context_boxes(torch.zeros((0, 4)), size, padding).shape == (0, 4)
