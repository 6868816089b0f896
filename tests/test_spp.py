"""Spatial pyramid pooling checked against slow per-window loops."""

import math

import numpy as np
import pytest
import torch

from spp_cli.spp import (
    Alignment,
    SpatialPyramidPool,
    output_dim,
    pool_windows,
    project_windows,
    select_scales,
    spatial_pyramid_pool,
)

ALIGN = Alignment(stride=16, offset=7.5)


def slow_project(box, scale, align, height, width):
    s, o, m = align.stride, align.offset, align.margin
    x1, y1, x2, y2 = (v * scale for v in box)
    left = math.floor((x1 - o + m) / s + 0.5)
    right = math.ceil((x2 - o - m) / s - 0.5)
    top = math.floor((y1 - o + m) / s + 0.5)
    bottom = math.ceil((y2 - o - m) / s - 0.5)
    if right < left:
        left = right = math.floor(((x1 + x2) / 2 - o) / s + 0.5)
    if bottom < top:
        top = bottom = math.floor(((y1 + y2) / 2 - o) / s + 0.5)
    clamp = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return [clamp(left, width - 1), clamp(top, height - 1), clamp(right, width - 1), clamp(bottom, height - 1)]


def slow_spp(fmap, cell_box, levels):
    """The paper's rule, one bin at a time."""
    c = fmap.shape[0]
    left, top, right, bottom = (int(v) for v in cell_box)
    w, h = right - left + 1, bottom - top + 1
    out = []
    for n in levels:
        level = np.zeros((c, n, n), np.float32)
        for i in range(n):  # rows
            y0, y1 = top + math.floor(i * h / n), top + math.ceil((i + 1) * h / n)
            for j in range(n):  # columns
                x0, x1 = left + math.floor(j * w / n), left + math.ceil((j + 1) * w / n)
                assert y1 > y0 and x1 > x0, "bins are never empty"
                level[:, i, j] = fmap[:, y0:y1, x0:x1].reshape(c, -1).max(axis=1)
        out.append(level.reshape(-1))
    return np.concatenate(out)


def _windows(rng, n, width, height):
    xy = rng.uniform(-20, [width, height], (n, 2))
    wh = rng.exponential(80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    special = np.array(
        [
            [0, 0, width, height],  # the whole image
            [3, 3, 5, 6],  # smaller than a cell
            [width - 4, height - 4, width, height],  # bottom-right corner
            [50, 50, 50, 80],  # degenerate: zero width
            [40, 30, 20, 10],  # inverted
            [-100, -100, -50, -50],  # entirely outside
            [0, 0, 16, 16],  # exactly one cell
        ],
        np.float64,
    )
    return np.concatenate([boxes, special]).astype(np.float32)


@pytest.mark.parametrize("margin", [0.0, 6.5])
def test_projection_matches_slow_reference(margin):
    rng = np.random.default_rng(0)
    align = Alignment(16, 7.5, margin)
    boxes = _windows(rng, 300, 500, 375)
    for scale in (0.5, 1.0, 1.83):
        h, w = math.ceil(375 * scale / 16), math.ceil(500 * scale / 16)
        fast = project_windows(torch.from_numpy(boxes), scale, align, h, w).numpy()
        slow = np.array([slow_project(b, scale, align, h, w) for b in boxes.astype(np.float64)])
        np.testing.assert_array_equal(fast, slow)
        assert (fast[:, 2] >= fast[:, 0]).all() and (fast[:, 3] >= fast[:, 1]).all()


def test_projection_of_exact_cells():
    # With offset S/2 cells tile the image exactly: [0,16) is cell 0, [16,48) cells 1..2.
    align = Alignment(16, 8.0)
    boxes = torch.tensor([[0, 0, 16, 16], [16, 16, 48, 48], [0, 0, 160, 160]], dtype=torch.float32)
    cells = project_windows(boxes, 1.0, align, 8, 8)
    assert cells.tolist() == [[0, 0, 0, 0], [1, 1, 2, 2], [0, 0, 7, 7]]


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (1,), (4, 2)])
def test_pooling_matches_slow_reference(levels):
    rng = np.random.default_rng(1)
    fmap = rng.standard_normal((5, 12, 17)).astype(np.float32)
    boxes = _windows(rng, 120, 17 * 16, 12 * 16)
    cells = project_windows(torch.from_numpy(boxes), 1.0, ALIGN, 12, 17)
    fast = spatial_pyramid_pool(torch.from_numpy(fmap), cells, levels).numpy()
    slow = np.stack([slow_spp(fmap, c, levels) for c in cells.numpy()])
    assert fast.shape == (len(boxes), output_dim(5, levels))
    np.testing.assert_array_equal(fast, slow)


def test_pooling_fp16_map_equals_fp32_of_same_values():
    rng = np.random.default_rng(2)
    fmap = torch.from_numpy(rng.standard_normal((4, 9, 9)).astype(np.float32)).half()
    cells = torch.tensor([[0, 0, 8, 8], [2, 3, 4, 4]], dtype=torch.float32)
    a = spatial_pyramid_pool(fmap, cells)
    b = spatial_pyramid_pool(fmap.float(), cells)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_empty_inputs():
    fmap = torch.zeros(3, 4, 4)
    assert spatial_pyramid_pool(fmap, torch.zeros((0, 4))).shape == (0, 150)
    assert pool_windows([fmap], [1.0], torch.zeros((0, 4)), ALIGN).shape == (0, 150)
    assert select_scales(torch.zeros((0, 4)), [1.0, 2.0]).shape == (0,)


def test_module_wraps_function():
    fmap = torch.randn(2, 6, 6)
    cells = torch.tensor([[0, 0, 5, 5]], dtype=torch.float32)
    module = SpatialPyramidPool((1, 2))
    assert torch.equal(module(fmap, cells), spatial_pyramid_pool(fmap, cells, (1, 2)))
    assert "levels=(1, 2)" in repr(module)


def test_scale_selection_closest_area_to_224_squared():
    scales = [480 / 375, 688 / 375, 1200 / 375]
    boxes = torch.tensor([[0, 0, 500, 375], [0, 0, 100, 100], [0, 0, 30, 30]], dtype=torch.float32)
    chosen = select_scales(boxes, scales)
    for box, idx in zip(boxes.tolist(), chosen.tolist()):
        area = (box[2] - box[0]) * (box[3] - box[1])
        slow = min(range(len(scales)), key=lambda s: abs(area * scales[s] ** 2 - 224 * 224))
        assert idx == slow
    assert chosen.tolist() == [0, 1, 2]


def test_pool_windows_uses_each_windows_scale():
    rng = np.random.default_rng(3)
    maps = [torch.from_numpy(rng.standard_normal((3, h, w)).astype(np.float32)) for h, w in ((8, 10), (16, 20))]
    scales = [0.5, 1.0]
    boxes = torch.from_numpy(_windows(rng, 40, 320, 256))
    out = pool_windows(maps, scales, boxes, ALIGN)
    index = select_scales(boxes, scales)
    for r in range(len(boxes)):
        s = int(index[r])
        cells = project_windows(boxes[r : r + 1], scales[s], ALIGN, *maps[s].shape[1:])
        assert torch.equal(out[r], spatial_pyramid_pool(maps[s], cells)[0])


def test_rcnn_whole_map_pooling_matches_spp_rule():
    from spp_cli.rcnn import pyramid_pool_whole

    rng = np.random.default_rng(4)
    maps = rng.standard_normal((3, 4, 14, 11)).astype(np.float32)
    fast = pyramid_pool_whole(torch.from_numpy(maps)).numpy()
    for r in range(3):
        slow = slow_spp(maps[r], [0, 0, 10, 13], (1, 2, 3, 6))
        np.testing.assert_array_equal(fast[r], slow)


def test_rcnn_context_and_warp():
    from spp_cli.rcnn import context_boxes, warp_windows

    boxes = torch.tensor([[16.0, 16.0, 208.0, 208.0]])
    grown = context_boxes(boxes, 224, 16)
    # 192 px of window + 16 px on each side in a 224 frame: 1 window px = 1 warped px.
    assert torch.allclose(grown, torch.tensor([[0.0, 0.0, 224.0, 224.0]]))
    image = torch.arange(224 * 224, dtype=torch.float32).reshape(1, 224, 224).repeat(3, 1, 1)
    warped = warp_windows(image, grown, 224)
    assert warped.shape == (1, 3, 224, 224)
    assert torch.allclose(warped[0], image, atol=1e-2)  # identity warp


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (4, 2), (5, 3, 1)])
def test_table_pooling_equals_roi_pool(levels):
    from spp_cli.spp import spatial_pyramid_pool_roi

    rng = np.random.default_rng(5)
    fmap = torch.from_numpy(rng.standard_normal((7, 23, 31)).astype(np.float32))
    boxes = torch.from_numpy(_windows(rng, 700, 31 * 16, 23 * 16))
    cells = project_windows(boxes, 1.0, ALIGN, 23, 31)
    assert torch.equal(spatial_pyramid_pool(fmap, cells, levels), spatial_pyramid_pool_roi(fmap, cells, levels))


def test_small_chunks_and_subsets_give_the_same_vectors():
    from spp_cli.spp import PyramidPooler, assemble_vectors, bin_maxima

    rng = np.random.default_rng(6)
    fmap = torch.from_numpy(rng.standard_normal((7, 23, 31)).astype(np.float32))
    boxes = torch.from_numpy(_windows(rng, 300, 31 * 16, 23 * 16))
    cells = project_windows(boxes, 1.0, ALIGN, 23, 31)
    whole = spatial_pyramid_pool(fmap, cells)
    maxima, inverse = bin_maxima(fmap, cells, chunk=5)
    # Windows share bins: far fewer distinct rectangles than bins.
    assert len(maxima) < inverse.numel() / 2
    assert torch.equal(assemble_vectors(maxima, inverse, chunk=3), whole)
    pooler = PyramidPooler([fmap], [1.0], boxes, ALIGN)
    rows = torch.tensor([299, 0, 17, 17])
    buffer = torch.full((4, whole.shape[1]), float("nan"))
    assert pooler.vectors(rows, out=buffer) is buffer
    assert torch.equal(buffer, whole[rows])
    assert torch.equal(pooler.vectors(slice(10, 20)), whole[10:20])


def test_rcnn_warp_fills_outside_the_image_with_the_fill_pixel():
    from spp_cli.rcnn import warp_windows

    image = torch.full((3, 64, 64), 200.0)
    fill = torch.tensor([127.5, 100.0, 50.0])
    outside = warp_windows(image, torch.tensor([[-100.0, -100.0, -40.0, -40.0]]), 16, fill=fill)
    assert torch.allclose(outside[0], fill.view(3, 1, 1).expand(3, 16, 16))
    # The left half of this window lies left of the image: fill there, the image to the right.
    half = warp_windows(image, torch.tensor([[-32.0, 0.0, 32.0, 64.0]]), 16, fill=fill)[0]
    assert torch.allclose(half[:, :, :7], fill.view(3, 1, 1).expand(3, 16, 7))
    assert torch.allclose(half[:, :, 9:], torch.full((3, 16, 7), 200.0))
    # Without a fill the outside is 0, as roi_align reads it.
    assert torch.equal(warp_windows(image, torch.tensor([[-100.0, -100.0, -40.0, -40.0]]), 16), torch.zeros(1, 3, 16, 16))
