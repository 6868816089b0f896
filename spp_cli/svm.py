"""Per-class linear SVMs on SPP features, trained with hard-negative mining.

The R-CNN protocol that SPPnet kept (``py-faster-rcnn/tools/train_svms.py``
has it in the same shape): positives are the ground-truth boxes of the class;
negatives are proposals under IoU 0.3 with every ground truth of the class;
features are scaled so that their mean L2 norm is 20; liblinear's
L2-regularised hinge loss (``-s 3``) with C = 0.001, positive weight 2 and
bias multiplier 10, liblinear's default tolerance 0.1; one epoch of hard-negative mining: a negative is hard if
it scores above -1.0001, cached easy negatives below -1.2 are evicted, and a
class is retrained after every 2,000 new hard negatives.

Shape letters: K classes, D feature length, P positives, N negatives.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from spp_cli import boxes as box_ops
from spp_cli.config import SVMConfig


@dataclass
class LinearSVMs:
    """K one-vs-rest linear classifiers: ``score = x @ weight[k] + bias[k]``.

    Attributes:
        classes: K class names.
        weight: ``(K, D)`` float32.
        bias: ``(K,)`` float32.
        feature_scale: multiply raw pool5 features by this first.
    """

    classes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    feature_scale: float

    def scores(self, features: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """``(R, D)`` features -> ``(R, K)`` scores.

        ``scaled=False`` takes raw features and applies ``feature_scale`` to
        the ``(R, K)`` products instead (no scaled copy of the features).
        """
        w = torch.from_numpy(self.weight).to(features.device)
        b = torch.from_numpy(self.bias).to(features.device)
        if scaled:
            return features @ w.T + b
        return torch.addmm(b, features, w.T, alpha=self.feature_scale)


@dataclass
class _ClassState:
    """Training state of one class: positives and the cache of hard negatives."""

    positives: list[np.ndarray] = field(default_factory=list)  # fp16 rows
    negatives: np.ndarray | None = None  # (N, D) fp16
    new_since_retrain: int = 0
    weight: np.ndarray | None = None
    bias: float = 0.0
    retrains: int = 0


def fit_linear_svm(positives: np.ndarray, negatives: np.ndarray, config: SVMConfig) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3 -c C -w1 2 -B 10`` through scikit-learn's LinearSVC."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([positives, negatives]).astype(np.float32)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    svm = LinearSVC(
        C=config.C,
        loss="hinge",
        dual=True,
        class_weight={1: config.positive_weight, -1: 1.0},
        intercept_scaling=config.bias_multiplier,
        tol=config.tol,
        max_iter=5000,
        random_state=config.seed,
    )
    with warnings.catch_warnings():
        # One mining round's model need not be fully converged; the last fit is.
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


class HardNegativeMiner:
    """Runs the mining epoch; feed it images one by one, then :meth:`finish`.

    Args:
        classes: K class names.
        dim: D, feature length.
        config: the protocol's settings.
        on_retrain: called with ``(class name, positives, negatives)`` after each retrain.
    """

    def __init__(self, classes: list[str], dim: int, config: SVMConfig, on_retrain: Callable[[str, int, int], None] | None = None):
        self.classes = list(classes)
        self.dim = dim
        self.config = config
        self.on_retrain = on_retrain
        self.state = {name: _ClassState() for name in classes}

    def add_positives(self, class_name: str, features: np.ndarray) -> None:
        """``(P, D)`` scaled features of ground-truth boxes of one class."""
        if len(features):
            self.state[class_name].positives.append(features.astype(np.float16))

    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.zeros((len(self.classes), self.dim), np.float32)
        b = np.zeros(len(self.classes), np.float32)
        for k, name in enumerate(self.classes):
            st = self.state[name]
            if st.weight is not None:
                w[k], b[k] = st.weight, st.bias
        return w, b

    def add_image(self, features: torch.Tensor, candidates: dict[str, np.ndarray]) -> None:
        """Mine one image (each image once: one epoch, so no window is cached twice).

        Args:
            features: ``(R, D)`` scaled features of its distinct windows.
            candidates: per class, indices into ``features`` of windows that
                qualify as negatives (IoU < 0.3 with all its ground truths).
        """
        w, b = self._weights()
        scores = (features @ torch.from_numpy(w).T + torch.from_numpy(b)).numpy()
        for k, name in enumerate(self.classes):
            idx = candidates.get(name)
            st = self.state[name]
            if idx is None or len(idx) == 0 or not st.positives:
                continue
            hard = idx[scores[idx, k] > self.config.hard_threshold]
            if len(hard) == 0:
                continue
            rows = features[torch.from_numpy(hard)].numpy().astype(np.float16)
            st.negatives = rows if st.negatives is None else np.concatenate([st.negatives, rows])
            st.new_since_retrain += len(hard)
            if st.new_since_retrain >= self.config.retrain_every:
                self._retrain(name)

    def _retrain(self, name: str) -> None:
        # One class at a time: scikit-learn's liblinear draws its coordinate order from one
        # generator shared by all threads, so side-by-side fits would not be reproducible.
        st = self.state[name]
        positives = np.concatenate(st.positives).astype(np.float32)
        negatives = st.negatives.astype(np.float32)
        st.weight, st.bias = fit_linear_svm(positives, negatives, self.config)
        st.retrains += 1
        st.new_since_retrain = 0
        # Evict easy negatives; keep the cache bounded, hardest first.
        neg_scores = negatives @ st.weight + st.bias
        keep = np.flatnonzero(neg_scores >= self.config.evict_threshold)
        if len(keep) > self.config.max_negatives:
            keep = keep[np.argsort(-neg_scores[keep], kind="stable")[: self.config.max_negatives]]
            keep.sort()
        st.negatives = st.negatives[keep]
        if self.on_retrain:
            self.on_retrain(name, len(positives), len(keep))

    def finish(self, feature_scale: float) -> LinearSVMs:
        """Final retrain of every class with new negatives, and the classifiers."""
        for name in self.classes:
            st = self.state[name]
            if st.positives and st.negatives is not None and (st.new_since_retrain or st.weight is None):
                self._retrain(name)
        w, b = self._weights()
        return LinearSVMs(self.classes, w, b, feature_scale)

    def untrained(self) -> list[str]:
        """Classes without positives (no classifier can be trained)."""
        return [name for name in self.classes if not self.state[name].positives]


def negative_candidates(proposals: np.ndarray, gt_boxes: np.ndarray, gt_classes: list[str], classes: list[str], max_iou: float) -> dict[str, np.ndarray]:
    """Per class, indices of proposals under ``max_iou`` with every ground truth of that class.

    Ground truths include difficult and crowd boxes: a window over one is not
    a clean negative, even though such boxes are not positives either.
    """
    out = {}
    overlaps = box_ops.iou(proposals, gt_boxes).numpy() if len(gt_boxes) and len(proposals) else None
    names = np.asarray(gt_classes)
    for name in classes:
        if overlaps is None or not (names == name).any():
            out[name] = np.arange(len(proposals))
        else:
            out[name] = np.flatnonzero(overlaps[:, names == name].max(axis=1) < max_iou)
    return out
