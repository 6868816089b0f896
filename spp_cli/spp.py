"""Spatial pyramid pooling: windows -> fixed-length vectors on a conv map.

Shape letters: R windows, C channels, H x W feature map, S scales,
L pyramid levels, B = sum(n * n for n in levels) bins (50 for 1,2,3,6).

Boxes passed in are ``xyxy`` float in continuous pixels of the ORIGINAL
image (:mod:`spp_cli.boxes`); a scale factor maps them onto the resized
image the network saw, and the backbone's stride and offset map them onto
feature cells.

Bin rule (He et al. 2014): bin ``i`` of ``n`` over a window ``w`` cells wide
spans cells ``floor(i * w / n)`` to ``ceil((i + 1) * w / n)`` (0-based,
exclusive end), so bins may overlap and are never empty. This is exactly the
rule of ``torchvision.ops.roi_pool`` for integer boxes at ``spatial_scale=1``,
which does the pooling here (one call per level, C++ on CPU, CUDA on GPU).
Output layout: level by level, channel-major within a level
(``[C x 1 x 1 | C x 2 x 2 | ...]``), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision import ops

DEFAULT_LEVELS = (1, 2, 3, 6)

# SPPnet (paper, section 3.1.1): pool each window at the scale where its
# resized area is closest to 224 x 224, the network's training resolution.
TARGET_WINDOW_SIDE = 224.0


@dataclass(frozen=True)
class Alignment:
    """How image pixels map onto feature cells of a backbone layer.

    The receptive-field centre of feature cell ``i`` is at continuous pixel
    coordinate ``i * stride + offset`` of the image the network saw.
    ``margin`` shrinks each window by that many pixels per side before
    projection (SPPnet code: ``o = 6.5`` for ZF-5; 0 keeps every touched cell).
    """

    stride: int
    offset: float
    margin: float = 0.0


def project_windows(boxes: torch.Tensor, scale: float, align: Alignment, height: int, width: int) -> torch.Tensor:
    """Map windows onto inclusive feature-cell ranges.

    Args:
        boxes: ``(R, 4)`` ``xyxy`` in original-image pixels.
        scale: resize factor from the original image to the network input.
        align: the backbone layer's stride, offset and margin.
        height, width: the feature map size.

    Returns:
        ``(R, 4)`` float tensor of integer cells ``[left, top, right, bottom]``
        (inclusive), clamped to the map. Cell ``j`` covers image pixels
        ``[j*S + o - S/2, j*S + o + S/2)``; a window maps to the cells it
        overlaps after shrinking by the margin. A window too small for that
        (inverted range) collapses to the cell under its centre.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    b = boxes.to(torch.float64) * scale
    s, o, m = float(align.stride), float(align.offset), float(align.margin)
    left = torch.floor((b[:, 0] - o + m) / s + 0.5)
    top = torch.floor((b[:, 1] - o + m) / s + 0.5)
    right = torch.ceil((b[:, 2] - o - m) / s - 0.5)
    bottom = torch.ceil((b[:, 3] - o - m) / s - 0.5)
    cx = torch.floor(((b[:, 0] + b[:, 2]) / 2 - o) / s + 0.5)
    cy = torch.floor(((b[:, 1] + b[:, 3]) / 2 - o) / s + 0.5)
    inverted_x = right < left
    inverted_y = bottom < top
    left = torch.where(inverted_x, cx, left)
    right = torch.where(inverted_x, cx, right)
    top = torch.where(inverted_y, cy, top)
    bottom = torch.where(inverted_y, cy, bottom)
    cells = torch.stack([left.clamp(0, width - 1), top.clamp(0, height - 1), right.clamp(0, width - 1), bottom.clamp(0, height - 1)], 1)
    return cells.to(torch.float32)


def select_scales(boxes: torch.Tensor, scales: list[float], target: float = TARGET_WINDOW_SIDE) -> torch.Tensor:
    """``(R,)`` index of the scale at which each window is pooled.

    Args:
        boxes: ``(R, 4)`` ``xyxy`` in original-image pixels.
        scales: ``(S,)`` resize factors, original image -> network input.
        target: the side of the square whose area a resized window should be
            closest to (224: the paper's rule).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(torch.float64).clamp(min=1e-6)
    factors = torch.tensor(scales, dtype=torch.float64)
    resized = area[:, None] * factors[None, :] ** 2
    return (resized - target * target).abs().argmin(dim=1)


def spatial_pyramid_pool(feature_map: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...] = DEFAULT_LEVELS) -> torch.Tensor:
    """Max-pool each window into a pyramid of bins.

    Args:
        feature_map: ``(C, H, W)`` conv features (any float dtype; pooled in
            float32 so that fp16 caches give the same result on every device).
        cells: ``(R, 4)`` inclusive cell ranges from :func:`project_windows`.
        levels: grid sizes, e.g. ``(1, 2, 3, 6)``.

    Returns:
        ``(R, C * B)`` float32, level by level, channel-major within a level.
    """
    channels = feature_map.shape[0]
    width = channels * sum(n * n for n in levels)
    if cells.numel() == 0:
        return feature_map.new_zeros((0, width), dtype=torch.float32)
    fmap = feature_map.to(torch.float32).unsqueeze(0)
    rois = torch.cat([cells.new_zeros((len(cells), 1)), cells], 1).to(fmap.device, torch.float32)
    parts = [ops.roi_pool(fmap, rois, output_size=(n, n), spatial_scale=1.0).flatten(1) for n in levels]
    return torch.cat(parts, 1)


def pool_windows(
    feature_maps: list[torch.Tensor],
    scales: list[float],
    boxes: torch.Tensor,
    align: Alignment,
    levels: tuple[int, ...] = DEFAULT_LEVELS,
    scale_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPP vectors of windows on a multi-scale feature pyramid of one image.

    Args:
        feature_maps: ``S`` maps ``(C, H_s, W_s)``, one per scale.
        scales: ``(S,)`` resize factors of those maps.
        boxes: ``(R, 4)`` ``xyxy`` in original-image pixels.
        align: the backbone layer's alignment.
        scale_index: ``(R,)`` the scale to pool each window at; by default
            :func:`select_scales` (area closest to 224 x 224).

    Returns:
        ``(R, C * B)`` float32 SPP vectors, in the order of ``boxes``.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    channels = feature_maps[0].shape[0]
    out = torch.zeros((len(boxes), channels * sum(n * n for n in levels)), dtype=torch.float32, device=feature_maps[0].device)
    if len(boxes) == 0:
        return out
    if scale_index is None:
        scale_index = select_scales(boxes, scales) if len(scales) > 1 else torch.zeros(len(boxes), dtype=torch.long)
    for s, (fmap, factor) in enumerate(zip(feature_maps, scales)):
        chosen = torch.nonzero(scale_index == s).flatten()
        if len(chosen) == 0:
            continue
        cells = project_windows(boxes[chosen], factor, align, fmap.shape[1], fmap.shape[2])
        out[chosen.to(out.device)] = spatial_pyramid_pool(fmap, cells, levels)
    return out


class SpatialPyramidPool(nn.Module):
    """:func:`spatial_pyramid_pool` as a module: ``(C, H, W)``, ``(R, 4)`` cells -> ``(R, C * B)``."""

    def __init__(self, levels: tuple[int, ...] = DEFAULT_LEVELS):
        super().__init__()
        self.levels = tuple(levels)

    def forward(self, feature_map: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return spatial_pyramid_pool(feature_map, cells, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def output_dim(channels: int, levels: tuple[int, ...] = DEFAULT_LEVELS) -> int:
    """Length of an SPP vector: ``C * sum(n^2)``."""
    return channels * sum(n * n for n in levels)


def scale_factor(width: int, height: int, short_side: int, max_side: int | None = None) -> float:
    """Resize factor so the short side becomes ``short_side`` (long side capped at ``max_side``)."""
    factor = short_side / min(width, height)
    if max_side and max(width, height) * factor > max_side:
        factor = max_side / max(width, height)
    return factor


def resized_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """``(width, height)`` of the image resized by ``factor`` (at least 1 px)."""
    return max(1, round(width * factor)), max(1, round(height * factor))


