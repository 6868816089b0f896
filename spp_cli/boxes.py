"""The one box convention of the toolkit, and the operations on it.

Convention: ``xyxy``, float, in continuous pixel coordinates of the ORIGINAL
image. A box covering pixel columns 0..W-1 and rows 0..H-1 entirely is
``[0, 0, W, H]``. Readers convert at the edge:

- PASCAL VOC XML (1-based, inclusive pixel indices): ``[xmin - 1, ymin - 1, xmax, ymax]``
- COCO ``[x, y, w, h]``: ``[x, y, x + w, y + h]``
- YOLO ``cx cy w h`` normalised: multiply by ``W, H`` then convert from centre form
- OpenCV rects ``(x, y, w, h)`` in integer pixels: ``[x, y, x + w, y + h]``

Shape letters: R boxes, N ground truths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch and torchvision are imported by the functions that need them: a
# `spp propose` parent then holds no torch thread pools when it forks its
# workers (spp_cli.proposals.run_proposals).


def from_voc(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """One VOC ``bndbox`` (1-based inclusive pixels) in the toolkit's convention."""
    return [xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)]


def from_xywh(boxes: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``(R, 4)`` boxes ``[x, y, w, h]`` (COCO, OpenCV rects) to ``xyxy`` (annotations: float64, so
    that :func:`spp_cli.data.records.sanitise` sees values beyond float32's range)."""
    boxes = np.asarray(boxes, dtype=dtype).reshape(-1, 4)
    # A corner beyond float64 becomes inf: sanitise drops such boxes with spp's own warning, not numpy's.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(R, 4)`` ``xyxy`` boxes to COCO ``[x, y, w, h]``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def from_cxcywh_normalised(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(R, 4)`` YOLO boxes ``[cx, cy, w, h]`` in [0, 1] to ``xyxy`` pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    centre, size = boxes[:, :2], boxes[:, 2:]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1) * scale


def clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(R, 4)`` ``xyxy`` boxes clipped to the image ``[0, W] x [0, H]``."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def is_outside(boxes: np.ndarray, width: int, height: int, tolerance: float = 0.0) -> np.ndarray:
    """``(R,)`` bool: which ``xyxy`` boxes reach more than ``tolerance`` px beyond the image."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    t = tolerance
    return (b[:, 0] < -t) | (b[:, 1] < -t) | (b[:, 2] > width + t) | (b[:, 3] > height + t)


def is_degenerate(boxes: np.ndarray) -> np.ndarray:
    """``(R,)`` bool: boxes with ``x2 <= x1`` or ``y2 <= y1`` (no area)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])


def iou(boxes1: np.ndarray | torch.Tensor, boxes2: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(R1, R2)`` of two sets of ``xyxy`` boxes (torchvision.ops)."""
    import torch
    from torchvision import ops

    b1 = torch.as_tensor(np.asarray(boxes1, dtype=np.float32)).reshape(-1, 4)
    b2 = torch.as_tensor(np.asarray(boxes2, dtype=np.float32)).reshape(-1, 4)
    if len(b1) == 0 or len(b2) == 0:
        return torch.zeros((len(b1), len(b2)))
    return ops.box_iou(b1, b2)


def dedupe(boxes: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct box, order kept."""
    b = np.asarray(boxes).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(b, axis=0, return_index=True)
    return np.sort(first)


def vote_boxes(
    kept: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """Box voting (Gidaris & Komodakis, ICCV 2015): refine each detection kept by NMS.

    Each kept box becomes the weighted mean of the candidate boxes of its
    class that overlap it at IoU >= ``iou_threshold`` (itself included),
    weighted by ``exp(score - kept score)``. Scores here are SVM margins, not
    probabilities, so the weights compare margins: a candidate one unit
    below the kept box counts e^-1 as much (MR-CNN's ``max(0, score)``
    would ignore every candidate of a detection that scores below 0).

    Args:
        kept: ``(K,)`` indices into the candidates (NMS's output).
        boxes: ``(N, 4)`` ``xyxy`` candidate boxes (before NMS).
        scores: ``(N,)`` their scores.
        classes: ``(N,)`` their class indices.

    Returns:
        ``(K, 4)`` voted ``xyxy`` boxes, in the order of ``kept``.
    """
    import torch
    from torchvision import ops

    out = boxes[kept].clone()
    for k in classes[kept].unique().tolist():
        rows = torch.nonzero(classes[kept] == k).flatten()
        same = torch.nonzero(classes == k).flatten()
        overlaps = ops.box_iou(boxes[kept[rows]], boxes[same])  # (K_k, N_k)
        weights = torch.exp(scores[same][None, :] - scores[kept[rows]][:, None]) * (overlaps >= iou_threshold)
        out[rows] = (weights @ boxes[same]) / weights.sum(1, keepdim=True)
    return out
