"""The fully-connected head SPPnet fine-tunes on SPP vectors: fc6 -> fc7 -> (K+1)-way softmax.

The conv layers stay frozen (the paper's section 3.1.2: "we only fine-tune the
fully-connected layers"), so the head trains on SPP vectors pooled from the
feature cache and never runs the network. After fine-tuning, the fc7
activations are the features the SVMs train on ("ftfc7").

EfficientNet-Lite0 has no pretrained fc6/fc7, so both are initialised at
random; the widths are smaller than AlexNet's 4096 to keep the shipped model
small and the CPU fast (``HeadConfig.hidden``).

Saved as ``.safetensors``: tensors ``fc6.weight (H, D)``, ``fc6.bias``,
``fc7.weight (H, H)``, ``fc7.bias``, ``cls.weight (K+1, H)``, ``cls.bias``;
JSON metadata under ``spp`` (format, version, classes with background
first, input scale, the cache settings and pyramid the vectors came from,
training record, checksum). No pickle.

Shape letters: R windows, D SPP vector length, H hidden width, K classes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from spp_cli.cache import CacheSettings, tensor_digest
from spp_cli.errors import ModelError
from spp_cli.fileio import atomic_write_bytes, read_safetensors

HEAD_FORMAT = "spp-head"
HEAD_VERSION = 1
BACKGROUND = "__background__"


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> classifier.

    Args:
        in_dim: D, the SPP vector length.
        hidden: H, width of fc6 and fc7.
        num_outputs: K + 1 (background is output 0).
        dropout: dropout after fc6 and fc7 (AlexNet/SPPnet: 0.5).
    """

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Linear(in_dim, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_outputs)
        self.dropout = nn.Dropout(dropout)

    def fc7_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` scaled SPP vectors -> ``(R, H)`` fc7 activations (after ReLU)."""
        x = self.dropout(torch.relu(self.fc6(x)))
        return torch.relu(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` scaled SPP vectors -> ``(R, K+1)`` logits."""
        return self.cls(self.dropout(self.fc7_features(x)))


class _LowRankLinear(nn.Module):
    """``x -> (x @ down') @ up' + bias``: a linear layer of rank ``r`` (``down (r, D)``, ``up (H, r)``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x @ self.down.T, self.up.T)


@dataclass
class Head:
    """A fine-tuned head and what it was trained on.

    Attributes:
        network: the fc layers.
        classes: K + 1 names, ``__background__`` first.
        input_scale: SPP vectors are multiplied by this before fc6 (mean L2
            norm of the training vectors -> sqrt(D), unit scale per input).
        features: cache settings the SPP vectors came from.
        levels: pyramid levels.
        training: a free-form record of the run.
    """

    network: FCHead
    classes: list[str]
    input_scale: float
    features: CacheSettings
    levels: tuple[int, ...]
    training: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.network.fc7.out_features

    @torch.inference_mode()
    def fc7(self, pool5: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """``(R, D)`` unscaled SPP vectors -> ``(R, H)`` fc7 features (eval mode)."""
        self.network.eval()
        network = self.network.to(pool5.device)
        if len(pool5) == 0:
            return pool5.new_zeros((0, self.hidden))
        return torch.cat([network.fc7_features(pool5[i : i + batch] * self.input_scale) for i in range(0, len(pool5), batch)])

    def compressed(self, rank: int) -> Head:
        """This head with fc6 replaced by its truncated SVD at ``rank`` (Fast R-CNN's compression
        for detection: ``W ~ U_r S_r V_r'``, two layers ``V_r'`` then ``U_r S_r`` and fc6's bias);
        itself where ``rank`` is 0 or saves nothing (``rank >= min(H, D)``).

        fc6 is most of the head's products (``D x H`` per window against ``H x H`` for fc7): at
        rank 512 coco128's 69-class model classified its validation images in 394 against 566 ms
        each, and the validation mAP of the fc7 models of raccoon, bccd and coco128 moved 0.855 ->
        0.859, 0.920 -> 0.921, 0.182 -> 0.190 (benchmarks/README.md, "What was tried"): the heads
        learn fc6 from random weights on a few hundred images, so its small singular values are
        mostly noise.
        """
        fc6 = self.network.fc6
        if not isinstance(fc6, nn.Linear) or not rank or rank >= min(fc6.in_features, fc6.out_features):
            return self
        # The top singular triples from the H x H Gram matrix W W' in float64 (its eigenvectors are
        # U, its eigenvalues S^2; V_r' = S_r^-1 U_r' W): 0.9 s for coco128's 1,024 x 16,000 fc6,
        # where a full SVD took 3.4 s of every `spp detect` start.
        w = fc6.weight.detach().double()
        eigenvalues, eigenvectors = torch.linalg.eigh(w @ w.T)
        top = torch.argsort(eigenvalues, descending=True)[:rank]
        s = eigenvalues[top].clamp(min=1e-300).sqrt()
        u = eigenvectors[:, top]
        down = (u.T @ w) / s[:, None]  # V_r'
        network = copy.deepcopy(self.network)  # no fresh layers: their random init would draw from torch's generator
        network.fc6 = _LowRankLinear(down.float(), (u * s).float(), fc6.bias.detach().float())
        return Head(network.eval(), self.classes, self.input_scale, self.features, self.levels, self.training)

    @torch.inference_mode()
    def probabilities(self, pool5: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` unscaled SPP vectors -> ``(R, K+1)`` softmax scores (eval mode)."""
        self.network.eval()
        return torch.softmax(self.network.to(pool5.device)(pool5 * self.input_scale), 1)

    # ---------------------------------------------------------------- files

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights in fp16 (half the file; fc7 features move by < 0.1%).

        A head read back is what `train-svm` and `detect` use, so both see
        the same rounded weights.
        """
        return {prefix + k: v.detach().cpu().half().contiguous() for k, v in self.network.state_dict().items()}

    def metadata(self) -> dict:
        return {
            "classes": self.classes,
            "in_dim": self.network.fc6.in_features,
            "hidden": self.hidden,
            "input_scale": self.input_scale,
            "features": {**asdict(self.features), "scales": list(self.features.scales)},
            "levels": list(self.levels),
            "training": self.training,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors + JSON metadata."""
        from safetensors.torch import save

        tensors = self.tensors()
        meta = {"format": HEAD_FORMAT, "version": HEAD_VERSION, **self.metadata(), "digest": tensor_digest(tensors)}
        atomic_write_bytes(path, save(tensors, metadata={"spp": json.dumps(meta)}), sole_writer=True)

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor], source: str, prefix: str = "") -> Head:
        """Rebuild from :meth:`metadata` and :meth:`tensors` (a head file, or a model carrying one).

        Raises:
            ModelError: shapes or metadata do not fit together.
        """
        try:
            classes = list(meta["classes"])
            network = FCHead(int(meta["in_dim"]), int(meta["hidden"]), len(classes))
            state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
            network.load_state_dict(state, strict=True)
            features = CacheSettings.from_json(meta["features"])
            return cls(network.eval(), classes, float(meta["input_scale"]), features, tuple(meta["levels"]), dict(meta.get("training", {})))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise ModelError(f"{source}: damaged fine-tuned head ({reason})") from None

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Read a head file written by :meth:`save` (``spp finetune``).

        Raises:
            ModelError: missing, unreadable, damaged, or not a head; names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: head file not found")
        meta, tensors = read_safetensors(path, "spp head", ModelError)
        if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
            raise ModelError(f"{path}: not a fine-tuned head (heads come from `spp finetune`)")
        if meta.get("version") != HEAD_VERSION:
            raise ModelError(f"{path}: head format version {meta.get('version')} is not supported (this spp reads version {HEAD_VERSION})")
        if tensor_digest(tensors) != meta.get("digest"):
            raise ModelError(f"{path}: damaged fine-tuned head (checksum mismatch)")
        return cls.from_parts(meta, tensors, str(path))
