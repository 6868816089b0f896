"""The R-CNN baseline on the same backbone: warp every window, run the network per window.

SPPnet's speed claim is relative to this: R-CNN (Girshick et al. 2014)
crops each proposal with 16 px of context, warps it to the network's input
size and runs the conv layers on every window. Here the warped window goes
through the same truncated backbone as SPP and its map is pooled with the
same pyramid, so both give vectors of the same length and meaning.

Shape letters: R windows, C channels, B pyramid bins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import ops

from spp_cli import backbones
from spp_cli.backbones import FeatureExtractor
from spp_cli.cache import DTYPES, CacheEntry, CacheSettings, image_key
from spp_cli.errors import CacheError
from spp_cli.images import load_image
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


def warp_windows(image: torch.Tensor, boxes: torch.Tensor, size: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Crop and bilinearly warp windows to ``size x size``; outside the image is ``fill``.

    ``roi_align`` with adaptive sampling averages ``ceil(window / size)``
    samples per output pixel and axis, so large windows are shrunk without
    aliasing, and a window of exactly ``size`` px is copied unchanged.

    Args:
        image: ``(3, H, W)`` float image.
        boxes: ``(R, 4)`` ``xyxy`` in continuous pixels.
        fill: ``(3,)`` the value of pixels outside the image (default 0).
            R-CNN fills them with the mean pixel, which the network's input
            normalisation maps to 0.

    Returns:
        ``(R, 3, size, size)``.
    """
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)
    if fill is None:
        return ops.roi_align(image[None], rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    # roi_align is linear and reads 0 outside the image: warp the image minus
    # the fill, then add it back.
    fill = fill.view(1, 3, 1, 1).to(image)
    warped = ops.roi_align(image[None] - fill, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return warped.add_(fill)


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
    mean_pixel = torch.tensor(extractor.spec.mean, dtype=torch.float32, device=device) * 255
    out = []
    for start in range(0, len(windows), batch_size):
        warped = warp_windows(pixels, windows[start : start + batch_size], size, fill=mean_pixel)
        batch = warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        maps = extractor.forward(batch)
        out.append(pyramid_pool_whole(maps.float(), levels).cpu())
    if not out:
        return torch.zeros((0, extractor.spec.channels * sum(n * n for n in levels)))
    return torch.cat(out)


def extractor_for(settings: CacheSettings, source: str, device: str = "cpu") -> FeatureExtractor:
    """:func:`spp_cli.backbones.extractor_for`, with R-CNN's remedy in its errors."""
    return backbones.extractor_for(
        settings, source, device, "R-CNN mode runs the network itself and can only reproduce the default weights and input"
    )


class RCNNFeaturizer:
    """Window features of cached images computed the R-CNN way, memoised per image.

    Stands in for :class:`spp_cli.windows.SPPFeaturizer` in
    :func:`spp_cli.train.train_detector`: the cache entry supplies the image
    path, proposals and ground truth; its conv maps are not used. Training
    asks for one image's features up to three times (norm sample, ground-truth
    positives, proposals in mining), always a subset of ground truth ∪
    proposals, so the first request runs *every* window of the image through
    the network once and later requests are row look-ups.

    Rows are kept at the cache's ``dtype`` (fp16 by default): the precision
    SPP features get from the cached maps, and what detection rounds to.
    They are held in memory, or in ``folder`` as ``.npy`` files when given:
    ``R x D x 2`` bytes per image (500 windows x 5600 floats for Lite0 is
    5.6 MB), too much to keep in memory for thousands of images.

    Args:
        extractor: the backbone the cache was built with (same weights).
        levels: pyramid levels.
        dtype: ``fp16`` or ``fp32`` storage of the rows.
        batch_size: warped windows per network pass.
        folder: where to keep rows on disk; ``None`` keeps them in memory.
        on_image: called after each image's windows are computed with
            ``(images computed, windows computed)`` so far (progress bars).
    """

    mode: ClassVar[str] = "rcnn"

    def __init__(
        self,
        extractor: FeatureExtractor,
        levels: tuple[int, ...] = DEFAULT_LEVELS,
        dtype: str = "fp16",
        batch_size: int = 32,
        folder: Path | None = None,
        on_image: Callable[[int, int], None] | None = None,
    ):
        self.extractor = extractor
        self.levels = tuple(levels)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self.folder = Path(folder) if folder is not None else None
        self.on_image = on_image
        self.images_computed = 0
        self.windows_computed = 0
        self._index: dict[str, dict[bytes, int]] = {}  # entry key -> box bytes -> row
        self._rows: dict[str, torch.Tensor] = {}  # entry key -> (R, D) rows, in memory

    def features(self, entry: CacheEntry, boxes: np.ndarray) -> torch.Tensor:
        """``(R, D)`` unscaled float32 features of ``(R, 4)`` ``xyxy`` windows
        (original-image pixels) of ``entry``'s image."""
        boxes = np.ascontiguousarray(boxes, np.float32).reshape(-1, 4)
        if entry.key not in self._index:
            self._compute_image(entry)
        index = self._index[entry.key]
        rows = [index.get(box.tobytes()) for box in boxes]
        if any(r is None for r in rows):
            # Not a window of the image's ground truth or proposals: compute
            # these directly (nothing in training asks for such windows).
            return self._warped(entry, boxes).to(self.dtype).float()
        stored = self._stored(entry.key)
        return torch.as_tensor(np.asarray(stored[np.asarray(rows, np.int64)])).float()

    def distinct(self, entry: CacheEntry, boxes: np.ndarray) -> np.ndarray:
        """Indices of distinct windows: R-CNN warps every window, so only exact
        duplicates (identical features) are dropped, not SPP's same-cell windows."""
        if len(boxes) == 0:
            return np.zeros(0, np.int64)
        _, first = np.unique(np.ascontiguousarray(boxes, np.float32).reshape(-1, 4), axis=0, return_index=True)
        return np.sort(first)

    def _warped(self, entry: CacheEntry, boxes: np.ndarray) -> torch.Tensor:
        path = Path(entry.path)
        try:
            changed = image_key(path) != entry.key
        except OSError as exc:
            raise CacheError(f"{path}: cannot read the cached image ({exc.strerror or exc}); R-CNN mode needs the image files the cache was built from") from None
        if changed:
            # Proposals and ground truth belong to the bytes that were cached.
            raise CacheError(f"{path}: the image changed since it was cached (sha256 differs); run `spp cache` on it again")
        # A truncated file was warned of when it was cached: same pixels, no second warning.
        image = load_image(path, warn=lambda _: None)
        return rcnn_features(self.extractor, image, boxes, self.levels, self.batch_size)

    def _compute_image(self, entry: CacheEntry) -> None:
        parts = [entry.proposals.reshape(-1, 4)]
        if entry.gt_boxes is not None:
            parts.insert(0, entry.gt_boxes.reshape(-1, 4))
        boxes = np.ascontiguousarray(np.concatenate(parts), np.float32)
        keep = self.distinct(entry, boxes)
        boxes = boxes[keep]
        rows = self._warped(entry, boxes).to(self.dtype)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            np.save(self.folder / f"{entry.key}.npy", rows.numpy())
        else:
            self._rows[entry.key] = rows
        self._index[entry.key] = {box.tobytes(): r for r, box in enumerate(boxes)}
        self.images_computed += 1
        self.windows_computed += len(boxes)
        if self.on_image is not None:
            self.on_image(self.images_computed, self.windows_computed)

    def _stored(self, key: str):
        if self.folder is None:
            return self._rows[key].numpy()
        # Memory-mapped: only the requested rows are read.
        return np.load(self.folder / f"{key}.npy", mmap_mode="r")
