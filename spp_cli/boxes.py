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
    """Pairwise IoU ``(R1, R2)`` of two sets of ``xyxy`` boxes (torchvision.ops).

    Two zero-area boxes give ``nan`` (0 / 0, as torchvision's); every comparison
    ``iou >= t`` is false for it, as for no overlap."""
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


def top_batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    limit: int,
    min_score: float,
) -> torch.Tensor:
    """Per-class NMS's survivors scoring above ``min_score``, the ``limit`` highest:
    ``ops.batched_nms(...)`` filtered and cut, found from the highest-scoring candidates alone.

    Why it is the same answer: NMS keeps a box unless a higher-scoring box of its class that
    was kept overlaps it, so a box's fate depends only on the boxes above it. NMS over the
    ``M`` highest-scoring candidates therefore keeps exactly those of them that NMS over all
    keeps, and every survivor outside them scores lower: once ``limit`` survivors above
    ``min_score`` are among the ``M``, they are the answer. ``M`` starts at ``8 * limit`` and
    grows fourfold. Equal scores are common (small windows pooled from the same cells: the
    same features, another box): they are ordered by candidate index, here and inside NMS.

    Why: with many classes nearly every window is some class's candidate (coco128's 69-class
    model: ~85,000 per image above the voting floor); NMS over all of them, each class's
    candidates against each other, took 180 ms of an image's detection for 100 detections.
    Each class's NMS runs apart (``ops.nms``), as ``ops.batched_nms`` does past 1,000 boxes: under
    that it shifts each class's boxes by a multiple of the largest coordinate, and at float32's
    precision there (69 classes x 640 px) a thin box's IoU can come out on the other side of
    the threshold.

    Args:
        boxes: ``(N, 4)`` ``xyxy`` candidate boxes.
        scores: ``(N,)`` their scores.
        classes: ``(N,)`` their class indices.
        limit: survivors wanted (detections per image).

    Returns:
        ``(<= limit,)`` indices into the candidates, by decreasing score (equal scores by index).
    """
    import torch
    from torchvision import ops

    order = torch.argsort(scores, descending=True, stable=True)
    taken = 8 * limit
    while True:
        # In the candidates' own order: equal scores meet NMS (whose sort is stable) as they do among all.
        top = order[:taken].sort().values
        keep = torch.cat([top[:0]] + [mine[ops.nms(boxes[mine], scores[mine], iou_threshold)]
                                      for mine in (top[classes[top] == k] for k in classes[top].unique())]).sort().values
        keep = keep[scores[keep] > min_score]
        # Done with enough survivors, or when every candidate left scores at most min_score.
        if len(keep) >= limit or taken >= len(order) or float(scores[order[taken - 1]]) <= min_score:
            return keep[torch.argsort(scores[keep], descending=True, stable=True)][:limit]
        taken *= 4


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
