"""Evaluation: proposal recall and MABO (detection AP follows in this module).

Shape letters: R proposals, N ground truths, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spp_cli import boxes as box_ops


@dataclass
class RecallStats:
    """Proposal quality over a set of ground-truth boxes.

    ``best_iou`` holds, for every counted ground truth, the best IoU any
    proposal of its image reaches.
    """

    best_iou: list[float] = field(default_factory=list)

    def add(self, values: np.ndarray) -> None:
        self.best_iou.extend(float(v) for v in values)

    @property
    def count(self) -> int:
        return len(self.best_iou)

    def recall(self, threshold: float) -> float:
        """Fraction of ground truths with a proposal at IoU >= ``threshold``."""
        if not self.best_iou:
            return float("nan")
        return float(np.mean(np.asarray(self.best_iou) >= threshold))

    @property
    def mabo(self) -> float:
        """Mean Average Best Overlap (Uijlings et al.): mean of per-class mean best IoU.

        Here over the ground truths this object holds; :func:`proposal_recall`
        averages the per-class values for the overall figure.
        """
        return float(np.mean(self.best_iou)) if self.best_iou else float("nan")


def best_overlaps(proposals: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` best IoU of each ground truth with any of the ``(R, 4)`` proposals."""
    if len(gt_boxes) == 0:
        return np.zeros(0, np.float32)
    if len(proposals) == 0:
        return np.zeros(len(gt_boxes), np.float32)
    return box_ops.iou(gt_boxes, proposals).max(dim=1).values.numpy()


def proposal_recall(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str]
) -> tuple[RecallStats, dict[str, RecallStats], float]:
    """Recall statistics of proposals against ground truth.

    Args:
        items: per image ``(proposals (R, 4), gt_boxes (N, 4), gt_labels (N,))``;
            crowd boxes must already be removed.
        classes: names for the label indices.

    Returns:
        ``(overall, per_class, mabo)``: overall stats over all ground truths,
        per-class stats (classes with ground truth only), and MABO as defined
        by Uijlings et al. (mean over classes of the mean best overlap).
    """
    overall = RecallStats()
    per_class: dict[str, RecallStats] = {}
    for proposals, gt_boxes, gt_labels in items:
        best = best_overlaps(proposals, gt_boxes)
        overall.add(best)
        for label, value in zip(gt_labels, best):
            per_class.setdefault(classes[int(label)], RecallStats()).add(np.array([value]))
    mabo = float(np.mean([s.mabo for s in per_class.values()])) if per_class else float("nan")
    return overall, per_class, mabo


# ---------------------------------------------------------------- detection AP


@dataclass
class ClassDetections:
    """All detections of one class over a dataset.

    Attributes:
        image_ids: ``(D,)`` the image each detection belongs to.
        scores: ``(D,)`` confidence.
        boxes: ``(D, 4)`` ``xyxy`` original-image pixels.
    """

    image_ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray


@dataclass
class ClassGroundTruth:
    """Ground truth of one class: per image ``(boxes (N, 4), difficult (N,))``."""

    by_image: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def num_positives(self) -> int:
        """Ground truths that count (not difficult)."""
        return int(sum((~difficult).sum() for _, difficult in self.by_image.values()))


def match_detections(dets: ClassDetections, gt: ClassGroundTruth, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The PASCAL VOC devkit's matching (``VOCevaldet``), per class.

    Detections are taken by descending score (ties keep input order, as
    MATLAB's stable ``sort`` does); each is matched to the ground truth of its
    image with the highest IoU. IoU >= threshold with a difficult ground truth:
    ignored (neither true nor false positive); with an unmatched one: true
    positive (and the ground truth is taken); with a taken one: false positive
    (a duplicate). Below the threshold: false positive.

    Continuous coordinates make the devkit's ``+1`` pixel convention implicit
    (a VOC box ``xmin..xmax`` is ``[xmin - 1, xmax]`` here).

    Returns:
        ``(tp, fp)``, ``(D,)`` float arrays in score order.
    """
    order = np.argsort(-np.asarray(dets.scores, dtype=np.float64), kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    taken = {image_id: np.zeros(len(boxes), bool) for image_id, (boxes, _) in gt.by_image.items()}
    for rank, d in enumerate(order):
        image_id = dets.image_ids[d]
        boxes, difficult = gt.by_image.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = box_ops.iou(dets.boxes[d : d + 1], boxes).numpy()[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            if difficult[best]:
                continue
            if not taken[image_id][best]:
                tp[rank] = 1
                taken[image_id][best] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ``(recall, precision)`` along the score order."""
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / max(num_positives, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        mask = recall >= t
        ap += (precision[mask].max() if mask.any() else 0.0) / 11
    return float(ap)


def voc_area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope (``VOCap``)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def average_precision(dets: ClassDetections, gt: ClassGroundTruth, metric: str = "voc07", iou_threshold: float = 0.5) -> float:
    """AP of one class; ``nan`` when the class has no (non-difficult) ground truth."""
    npos = gt.num_positives
    if npos == 0:
        return float("nan")
    tp, fp = match_detections(dets, gt, iou_threshold)
    recall, precision = precision_recall(tp, fp, npos)
    if len(recall) == 0:
        return 0.0
    return voc07_ap(recall, precision) if metric == "voc07" else voc_area_ap(recall, precision)
