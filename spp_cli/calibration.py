"""Calibrated probabilities for SVM margins (Platt scaling).

An SVM margin says how far a window is from the decision boundary, not how
likely a detection is to be right. `spp train` holds out part of the
training split anyway; the detections its candidate models make there,
each marked right (a true positive under VOC matching at IoU 0.5) or wrong,
fit one logistic curve ``P(right | score) = 1 / (1 + exp(-(a * score + b)))``
(Platt, 1999) over all classes. The model stores ``a`` and ``b``; `spp detect`
then prints a probability beside each margin and its display threshold is a
probability (0.5 by default). The curve is monotonic, so thresholding the
probability keeps exactly the detections that thresholding the margin at
:meth:`Calibration.margin_at` keeps.

Fitted on the held-out part with the candidate model trained without it,
the curve describes margins on images a model has not seen: the final
model's margins on new images, not on its own training images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Fewer right or wrong detections than this, and a fitted curve says more
# about the noise than about the model: the model then stays uncalibrated.
MIN_OUTCOMES = 5
DISPLAY_PROBABILITY = 0.5  # shown by default: right more often than not


@dataclass(frozen=True)
class Calibration:
    """``P(right | margin) = sigmoid(slope * margin + intercept)``, and what it was fitted on."""

    slope: float
    intercept: float
    detections: int  # held-out detections the curve was fitted on
    right: int  # of them, true positives
    images: int  # held-out images they came from
    display_probability: float = DISPLAY_PROBABILITY

    def probability(self, margins: np.ndarray | float) -> np.ndarray:
        """``(N,)`` probabilities of ``(N,)`` margins (a scalar gives a 0-d array)."""
        z = self.slope * np.asarray(margins, np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def margin_at(self, probability: float) -> float:
        """The margin whose probability is ``probability`` (0 < p < 1): the inverse of :meth:`probability`."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"a probability threshold must be between 0 and 1 (exclusive), not {probability}")
        return (math.log(probability / (1.0 - probability)) - self.intercept) / self.slope

    def to_json(self) -> dict:
        return {"method": "platt", **asdict(self)}

    @classmethod
    def from_json(cls, meta: dict) -> Calibration:
        if meta.get("method") != "platt":
            raise ValueError(f"unknown calibration method {meta.get('method')!r}")
        fields = {k: meta[k] for k in ("slope", "intercept", "detections", "right", "images")}
        calibration = cls(**fields, display_probability=float(meta.get("display_probability", DISPLAY_PROBABILITY)))
        if not calibration.slope > 0:
            raise ValueError("calibration slope must be positive (a higher margin is more likely right)")
        return calibration


def fit_calibration(margins: np.ndarray, right: np.ndarray, images: int) -> Calibration | None:
    """Platt scaling of ``(N,)`` margins against ``(N,)`` 0/1 outcomes; ``None`` when the
    outcomes cannot support a curve (too few right or wrong, or a curve that falls)."""
    from sklearn.linear_model import LogisticRegression

    margins = np.asarray(margins, np.float64).reshape(-1, 1)
    right = np.asarray(right, np.int64).reshape(-1)
    positives = int(right.sum())
    if positives < MIN_OUTCOMES or len(right) - positives < MIN_OUTCOMES:
        return None
    # Unregularised in effect (C large): one feature, hundreds of outcomes.
    fit = LogisticRegression(C=1e4, solver="lbfgs", max_iter=1000).fit(margins, right)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not slope > 0:
        return None
    return Calibration(round(slope, 6), round(intercept, 6), len(right), positives, images)


def detection_outcomes(images: list, classes: list[str], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's margin and whether it is right, by the VOC devkit's matching.

    Args:
        images: ``(GroundTruthImage, detections)`` per image, as :func:`spp_cli.evaluate.evaluate_voc` takes.
        classes: the classes to match.

    Returns:
        ``(margins (D,), right (D,))``; detections matching a difficult or crowd
        box are left out (neither right nor wrong, as in AP).
    """
    from spp_cli.evaluate import class_inputs, match_detections

    margins, outcomes = [], []
    for name in classes:
        detections, gt = class_inputs(images, name)
        if not len(detections.scores):
            continue
        tp, fp = match_detections(detections, gt, iou_threshold)
        ordered = detections.scores[np.argsort(-detections.scores, kind="stable")]  # match_detections' order
        counted = (tp + fp) > 0
        margins.append(ordered[counted])
        outcomes.append(tp[counted])
    if not margins:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(margins), np.concatenate(outcomes)


def reliability_table(probabilities: np.ndarray, right: np.ndarray, bins: int = 10) -> list[dict]:
    """Predicted against observed precision per probability bin ``[k/bins, (k+1)/bins)``
    (the last bin closed): ``{"bin", "detections", "predicted", "observed"}`` for non-empty bins;
    a probability that is not a number is left out."""
    probabilities, right = np.asarray(probabilities, np.float64), np.asarray(right, np.float64)
    finite = np.isfinite(probabilities)
    probabilities, right = probabilities[finite], right[finite]
    # Against the edges themselves: int(0.57 * 100) is 56, so p * bins would put a
    # probability on an edge into the bin below it.
    index = np.clip(np.searchsorted(np.arange(bins + 1) / bins, probabilities, side="right") - 1, 0, bins - 1)
    # The fewest decimals (1 to 3) that print every edge exactly: 4 bins are 0.25 apart.
    decimals = next((d for d in (1, 2, 3) if all(round(k / bins, d) == k / bins for k in range(bins + 1))), 3)
    rows = []
    for k in range(bins):
        members = index == k
        if members.any():
            rows.append({"bin": f"{k / bins:.{decimals}f}-{(k + 1) / bins:.{decimals}f}", "detections": int(members.sum()),
                         "predicted": round(float(probabilities[members].mean()), 3),
                         "observed": round(float(right[members].mean()), 3)})
    return rows
