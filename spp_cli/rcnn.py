"""The R-CNN baseline on the same backbone: warp every window, run the network per window.

SPPnet's speed claim is relative to this: R-CNN (Girshick et al. 2014)
crops each proposal with 16 px of context, warps it to the network's input
size and runs the conv layers on every window. Here the warped window goes
through the same truncated backbone as SPP and its map is pooled with the
same pyramid, so both give vectors of the same length and meaning.

Shape letters: R windows, C channels, B pyramid bins.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import ops

from spp_cli.backbones import FeatureExtractor
from spp_cli.spp import DEFAULT_LEVELS

CONTEXT_PADDING = 16  # R-CNN: pixels of context around the window in the warped frame


def context_boxes(boxes: torch.Tensor, size: int, padding: int = CONTEXT_PADDING) -> torch.Tensor:
    """Grow ``(R, 4)`` ``xyxy`` windows so that ``padding`` px of context surround
    the window once it is warped to ``size x size`` (R-CNN's "padding 16")."""
    if padding <= 0:
        return boxes
    inner = size - 2 * padding
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    dx, dy = w * padding / inner, h * padding / inner
    return torch.stack([boxes[:, 0] - dx, boxes[:, 1] - dy, boxes[:, 2] + dx, boxes[:, 3] + dy], 1)


def warp_windows(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop and bilinearly warp windows to ``size x size``; outside the image is 0.

    ``roi_align`` with adaptive sampling averages ``ceil(window / size)``
    samples per output pixel and axis, so large windows are shrunk without
    aliasing, and a window of exactly ``size`` px is copied unchanged.

    Args:
        image: ``(3, H, W)`` float image.
        boxes: ``(R, 4)`` ``xyxy`` in continuous pixels.

    Returns:
        ``(R, 3, size, size)``.
    """
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)
    return ops.roi_align(image[None], rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def pyramid_pool_whole(maps: torch.Tensor, levels: tuple[int, ...] = DEFAULT_LEVELS) -> torch.Tensor:
    """SPP over each whole map: ``(R, C, h, w)`` -> ``(R, C * B)``, level by level, channel-major.

    PyTorch's adaptive max pooling uses the same floor/ceil bin rule as
    :func:`spp_cli.spp.spatial_pyramid_pool`.
    """
    return torch.cat([F.adaptive_max_pool2d(maps, n).flatten(1) for n in levels], 1)


@torch.inference_mode()
def rcnn_features(
    extractor: FeatureExtractor,
    image: np.ndarray,
    boxes: np.ndarray,
    levels: tuple[int, ...] = DEFAULT_LEVELS,
    batch_size: int = 32,
    padding: int = CONTEXT_PADDING,
) -> torch.Tensor:
    """R-CNN features: one network pass per warped window (in batches).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        boxes: ``(R, 4)`` ``xyxy`` original-image pixels.

    Returns:
        ``(R, C * B)`` float32 on the CPU.
    """
    size = extractor.spec.window_size
    device = extractor.device
    pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float()
    windows = context_boxes(torch.as_tensor(boxes, dtype=torch.float32, device=device), size, padding)
    out = []
    for start in range(0, len(windows), batch_size):
        warped = warp_windows(pixels, windows[start : start + batch_size], size)
        batch = warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        maps = extractor.forward(batch)
        out.append(pyramid_pool_whole(maps.float(), levels).cpu())
    if not out:
        return torch.zeros((0, extractor.spec.channels * sum(n * n for n in levels)))
    return torch.cat(out)
