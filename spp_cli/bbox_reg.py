"""Bounding-box regression: ridge regression from pool5 features to box deltas.

R-CNN's setting (IoU > 0.6, lambda 1000) is the default; SPPnet used
IoU >= 0.5 and lambda 4000 (``BBoxRegConfig``). Deltas are the standard
parameterisation: ``dx = (gx - px) / pw``, ``dy = (gy - py) / ph``,
``dw = log(gw / pw)``, ``dh = log(gh / ph)`` with centres ``x, y`` and sizes
``w, h`` of ``xyxy`` boxes.

Shape letters: R windows, D feature length, K classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Deltas above log(1000/16) would grow a box beyond any image (py-faster-rcnn's clamp).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(proposals: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(R, 4)`` deltas that turn ``xyxy`` proposals into ``xyxy`` targets."""
    pw = proposals[:, 2] - proposals[:, 0]
    ph = proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    gw = targets[:, 2] - targets[:, 0]
    gh = targets[:, 3] - targets[:, 1]
    gx, gy = targets[:, 0] + gw / 2, targets[:, 1] + gh / 2
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], 1).astype(np.float32)


def decode(proposals: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply ``(R, 4)`` deltas to ``(R, 4)`` ``xyxy`` proposals."""
    pw = proposals[:, 2] - proposals[:, 0]
    ph = proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    dw = deltas[:, 2].clamp(max=_MAX_LOG_SCALE)
    dh = deltas[:, 3].clamp(max=_MAX_LOG_SCALE)
    cx, cy = px + deltas[:, 0] * pw, py + deltas[:, 1] * ph
    w, h = pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


@dataclass
class BoxRegressors:
    """Per class: ``deltas = x @ weight[k] + bias[k]``; ``weight (K, D, 4)``, ``bias (K, 4)``."""

    weight: np.ndarray
    bias: np.ndarray
    # The (D, K * 4) matrix and (K * 4,) bias of predict_all, made once per device: a copy of
    # the K x D x 4 weights (18 MB for 69 classes) that detection would otherwise make per chunk.
    _matrices: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def predict_all(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(R, D)`` scaled features -> ``(R, K, 4)`` deltas for every class.

        One ``(R, D) x (D, K * 4)`` product: cheap, where gathering a
        ``(D, 4)`` matrix per candidate would need ``R x D x 4`` memory.
        ``scale``: the features' scale, applied to the product (unscaled
        features in, no scaled copy of them made).
        """
        k, d, _ = self.weight.shape
        key = (id(self.weight), id(self.bias), str(features.device))  # arrays replaced: made again
        if key not in self._matrices:
            self._matrices.clear()
            w = torch.from_numpy(self.weight).to(features.device).permute(1, 0, 2).reshape(d, k * 4).contiguous()
            self._matrices[key] = w, torch.from_numpy(self.bias).to(features.device).reshape(k * 4)
        w, b = self._matrices[key]
        return torch.addmm(b, features, w, alpha=scale).view(len(features), k, 4)

    def predict(self, features: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` scaled features and ``(R,)`` classes -> ``(R, 4)`` deltas."""
        if len(features) == 0:
            return features.new_zeros((0, 4))
        return self.predict_all(features)[torch.arange(len(features), device=features.device), class_index]


@dataclass
class IoURegressors:
    """Per class, the localisation quality of a window: its predicted IoU with the object of
    the class it overlaps, ``iou = x @ weight[k] + bias[k]``; ``weight (K, D)``, ``bias (K,)``.

    Fitted by ridge regression on the pool5 rows of training windows that overlap a box of
    the class at IoU >= 0.1 (and the boxes themselves, at IoU 1). Detection adds a multiple
    of it to each window's class score (``DetectConfig.iou_weight``): a part of an object (a
    raccoon's head) scores high with a linear SVM, which never trains on windows between
    IoU 0.3 and 0.7, and low here. IoU-Net (Jiang et al., 2018) learns the same quantity.
    """

    weight: np.ndarray
    bias: np.ndarray

    def predict_all(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(R, D)`` features times ``scale`` -> ``(R, K)`` predicted IoUs (the product scaled, not the features)."""
        w = torch.from_numpy(self.weight).to(features.device)
        b = torch.from_numpy(self.bias).to(features.device)
        return torch.addmm(b, features, w.T, alpha=scale)


def fit_ridge(features: np.ndarray | torch.Tensor, deltas: np.ndarray, ridge_lambda: float, tol: float = 1e-6,
              max_steps: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised bias: ``(N, D)``, ``(N, T)`` -> ``(D, T)``, ``(T,)``
    (box regression: the ``T = 4`` deltas; localisation quality: ``T = 1``, the IoU).

    ``W`` solves ``(Xc'Xc + lambda I) W = Xc'Yc`` on centred data, by conjugate gradients (each
    column until its residual is ``tol`` of its right-hand side): two products with
    the float32 rows per step, the centring applied inside them (``Xc v = X v - 1 (mean . v)``),
    so neither ``Xc`` nor an ``N x N`` or ``D x D`` matrix is formed. The lambda term bounds the
    system's condition number, and with it the steps. On bccd's largest class (RBC: 13,170
    windows x 16,000 pool5 features, 2 threads) this took 12.7 s where the closed form in float64
    took 78.8 s, its predicted deltas within 4e-7 of the closed form's (benchmarks/README.md,
    "SVM solver").
    """
    # fp16 rows (the training run's) widened by torch: numpy's float16 conversion is ~10x slower.
    x = features.float() if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features)).float()
    y = torch.from_numpy(np.asarray(deltas, dtype=np.float64))
    x_mean, y_mean = x.mean(0, dtype=torch.float64), y.mean(0)
    mean32 = x_mean.float()

    def transposed_product(u: torch.Tensor) -> torch.Tensor:
        """``Xc' u`` for ``(N, T)`` float32 ``u``: as ``(u' X)'``, a row-major product (``X' u``
        read the rows transposed, 3x slower here)."""
        return (u.T @ x).T - torch.outer(mean32, u.sum(0))

    def normal_product(p: torch.Tensor) -> torch.Tensor:
        """``(Xc'Xc + lambda I) p`` for ``(D, T)`` float64 ``p``."""
        p32 = p.float()
        return transposed_product(x @ p32 - mean32 @ p32).double() + ridge_lambda * p

    rhs = transposed_product((y - y_mean).float()).double()  # Xc'Yc
    w = torch.zeros_like(rhs)
    residual, direction = rhs.clone(), rhs.clone()
    squared = (residual * residual).sum(0)
    goal = (tol * tol) * squared
    for _ in range(max_steps):
        if bool((squared <= goal).all()):
            break
        product = normal_product(direction)
        curvature = (direction * product).sum(0)
        alpha = torch.where(curvature > 0, squared / curvature.clamp(min=1e-300), torch.zeros_like(squared))
        w += alpha * direction
        residual -= alpha * product
        new_squared = (residual * residual).sum(0)
        direction = residual + torch.where(squared > 0, new_squared / squared.clamp(min=1e-300), torch.zeros_like(squared)) * direction
        squared = new_squared
    b = y_mean - x_mean @ w
    return w.float().numpy(), b.float().numpy()
