"""SPP feature vectors of windows in cached images: the bridge between cache and classifiers.

Shape letters: R windows, D = C * B feature length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from spp_cli.cache import CacheEntry
from spp_cli.spp import DEFAULT_LEVELS, Alignment, pool_windows, project_windows, select_scales


def window_features(
    entry: CacheEntry, boxes: np.ndarray, align: Alignment, levels: tuple[int, ...] = DEFAULT_LEVELS, scale: float = 1.0
) -> torch.Tensor:
    """``(R, D)`` float32 pool5 features of ``(R, 4)`` ``xyxy`` windows, times ``scale``.

    Each window is pooled at its own scale (area closest to 224 x 224).
    """
    features = pool_windows(entry.maps, entry.factors, torch.as_tensor(boxes, dtype=torch.float32), align, levels)
    if scale != 1.0:
        features.mul_(scale)
    return features


def distinct_windows(entry: CacheEntry, boxes: np.ndarray, align: Alignment) -> np.ndarray:
    """Indices of windows that pool distinct regions (SPPnet code's negative dedup).

    Two windows that select the same scale and project onto the same feature
    cells have identical features; only the first is kept.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = torch.as_tensor(boxes, dtype=torch.float32)
    scale_index = select_scales(b, entry.factors) if len(entry.factors) > 1 else torch.zeros(len(b), dtype=torch.long)
    keys = torch.zeros((len(b), 5), dtype=torch.long)
    keys[:, 0] = scale_index
    for s, (fmap, factor) in enumerate(zip(entry.maps, entry.factors)):
        chosen = torch.nonzero(scale_index == s).flatten()
        if len(chosen):
            keys[chosen, 1:] = project_windows(b[chosen], factor, align, fmap.shape[1], fmap.shape[2]).long()
    _, first = np.unique(keys.numpy(), axis=0, return_index=True)
    return np.sort(first)


@dataclass(frozen=True)
class SPPFeaturizer:
    """Window features pooled from the cached conv maps (SPPnet).

    The training code asks a featurizer for two things, so that another way
    of computing window features (R-CNN's warped windows) can stand in:
    ``features(entry, boxes)`` -> ``(R, D)`` unscaled float32, and
    ``distinct(entry, boxes)`` -> indices of windows worth scoring;
    ``mode`` names the kind of features for the model file.
    """

    mode: ClassVar[str] = "spp"
    align: Alignment
    levels: tuple[int, ...] = DEFAULT_LEVELS

    def features(self, entry: CacheEntry, boxes: np.ndarray) -> torch.Tensor:
        return window_features(entry, boxes, self.align, self.levels)

    def distinct(self, entry: CacheEntry, boxes: np.ndarray) -> np.ndarray:
        return distinct_windows(entry, boxes, self.align)


def mean_feature_norms(entries, featurize, boxes_per_image: int, seed: int, derive=None) -> tuple[float, float | None]:
    """Mean L2 norms over a sample of windows (R-CNN: 200 images x 200 boxes) of ``featurize``'s features and, if
    ``derive`` is given, of ``derive(features)`` (fc7 of pool5), in one pass over the entries."""
    rng = np.random.default_rng(seed)
    norms, derived = [], []
    for entry in entries:
        boxes = entry.proposals
        if len(boxes) > boxes_per_image:
            boxes = boxes[rng.choice(len(boxes), boxes_per_image, replace=False)]
        if len(boxes):
            features = featurize(entry, boxes)
            norms.append(features.norm(dim=1))
            if derive is not None:
                derived.append(derive(features).norm(dim=1))
    mean = float(torch.cat(norms).mean()) if norms else 1.0
    if derive is None:
        return mean, None
    return mean, float(torch.cat(derived).mean()) if derived else 1.0
