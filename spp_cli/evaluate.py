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
