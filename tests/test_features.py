import numpy as np
import pytest
import torch

from spp_cli.config import parse_scales
from spp_cli.errors import SPPError
from spp_cli.features import feature_pyramid


class _FlakyGPUExtractor:
    """Stands in for a FeatureExtractor whose CUDA pass runs out of memory once."""

    def __init__(self):
        self.device = torch.device("cuda")
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        self.device = torch.device(device)
        return self

    def image_pyramid(self, image, scales, max_side):
        if self.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [torch.zeros(1, 2, 2)], [1.0], [0.01]


def test_out_of_memory_image_falls_back_to_cpu_then_returns_to_gpu():
    extractor = _FlakyGPUExtractor()
    warnings = []
    maps, factors, _ = feature_pyramid(extractor, np.zeros((4, 4, 3), np.uint8), (688,), 2000, warn=warnings.append, name="big.jpg")
    assert maps[0].shape == (1, 2, 2) and factors == [1.0]
    assert warnings == ["big.jpg: out of GPU memory at scales 688; computing this image on the CPU"]
    assert extractor.moves == ["cpu", "cuda"]


@pytest.mark.parametrize("text, expected", [("688", (688,)), ("1200, 480,576,688,864", (480, 576, 688, 864, 1200))])
def test_parse_scales(text, expected):
    assert parse_scales(text) == expected


@pytest.mark.parametrize("text", ["abc", "10", "", "688,x"])
def test_parse_scales_rejects(text):
    with pytest.raises(SPPError, match="--scales"):
        parse_scales(text)
