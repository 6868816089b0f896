"""Image -> conv feature pyramid, with the GPU out-of-memory fallback.

SPPnet's authors' advice for images too large for the GPU is to run them on
the CPU; :func:`feature_pyramid` does that for the one image and returns to
the GPU for the next.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from spp_cli.backbones import FeatureExtractor

DEFAULT_SCALES = (688,)  # SPPnet 1-scale; 5-scale: 480, 576, 688, 864, 1200
FIVE_SCALES = (480, 576, 688, 864, 1200)
DEFAULT_MAX_SIDE = 2000  # cap on the resized long side (a 4:3 photo at 1200 is 1600 long)


def feature_pyramid(
    extractor: FeatureExtractor,
    image: np.ndarray,
    scales: tuple[int, ...],
    max_side: int,
    warn: Callable[[str], None] = lambda _: None,
    name: str = "image",
) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Conv maps of ``image`` (``(H, W, 3)`` uint8 RGB) at each scale.

    Returns ``(maps, factors, seconds)`` as
    :meth:`spp_cli.backbones.FeatureExtractor.image_pyramid`. On CUDA
    out-of-memory the image is redone on the CPU, with a warning.
    """
    try:
        return extractor.image_pyramid(image, list(scales), max_side)
    except torch.cuda.OutOfMemoryError:
        if extractor.device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warn(f"{name}: out of GPU memory at scales {','.join(map(str, scales))}; computing this image on the CPU")
        device = extractor.device
        extractor.to("cpu")
        try:
            return extractor.image_pyramid(image, list(scales), max_side)
        finally:
            extractor.to(str(device))
