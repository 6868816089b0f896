"""Learned proposals: a region proposal network on the cached conv map (Ren et al., Faster R-CNN, 2015).

Selective search is what a user waits for at detection (1-2 s of a 1.2-1.5 s
image) and it misses windows that fit small or touching objects tightly. The
conv map SPPnet computes anyway can propose instead: a 3x3 conv over the map,
then per cell and anchor an objectness logit and four box deltas. It trains
on the feature cache alone (no conv pass), like `spp finetune`, so each image
still goes through the network once.

torchvision supplies the parts: ``RPNHead`` (conv, objectness, deltas), the
anchor shapes (``AnchorGenerator.generate_anchors``), the anchor-to-ground-truth
matching, the balanced sampling and the loss (``RegionProposalNetwork``), the
delta coding (``BoxCoder``, weights 1). What is ours: the anchor grid is
centred on each cell's receptive field (``i * stride + offset`` of the
network input, :class:`spp_cli.spp.Alignment`) rather than at its corner, and
boxes come back in original-image pixels, merged over the cache's scales.

Saved as ``.safetensors``: the head's tensors (fp16) and JSON metadata under
``spp`` (format, version, :class:`ProposalConfig`, the cache settings the maps
came from, the training record). No pickle.

Shape letters: C channels, H x W map cells, A anchors per cell, R boxes.
Boxes are ``xyxy`` continuous pixels throughout.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import ops
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from spp_cli.cache import CacheSettings, tensor_digest
from spp_cli.errors import ModelError
from spp_cli.fileio import atomic_write_bytes, read_safetensors
from spp_cli.spp import Alignment

PROPOSAL_FORMAT = "spp-proposal-model"
PROPOSAL_VERSION = 1


@dataclass(frozen=True)
class ProposalConfig:
    """Anchors, training sampling and test-time filtering (Faster R-CNN's RPN settings unless said)."""

    # Anchor sides in network-input pixels (the cache's scale: a 688 or 1024 short side);
    # 16 is below Faster R-CNN's 32: touching cells and coco's small objects.
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    fg_iou: float = 0.7  # an anchor at IoU >= 0.7 with a ground truth is positive (and each box's best anchor)
    bg_iou: float = 0.3  # below 0.3 with every ground truth: negative
    anchors_per_image: int = 256  # sampled for the loss
    positive_fraction: float = 0.5
    # Highest-objectness anchors decoded per scale, at least twice the boxes asked for (NMS at 0.7
    # leaves about half of them: 1000 gave coco128 ~500 boxes at --top 1000); at 300 boxes,
    # 6000 gave the same held-out recall at 7-10x the time.
    pre_nms_top_n: int = 1000
    nms_iou: float = 0.7
    min_size: float = 2.0  # original pixels: narrower boxes are dropped
    top_n: int = 300  # boxes per image by default
    epochs: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # held-out training images whose recall each epoch reports (the last epoch is kept); 0: none
    seed: int = 0

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, doc: dict) -> "ProposalConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in doc.items() if k in names})


def cell_anchors(config: ProposalConfig) -> torch.Tensor:
    """``(A, 4)`` anchors centred on (0, 0), every size at every ratio (torchvision's shapes and order)."""
    generator = AnchorGenerator((config.anchor_sizes,), (config.aspect_ratios,))
    return generator.cell_anchors[0].float()


def grid_anchors(base: torch.Tensor, height: int, width: int, align: Alignment) -> torch.Tensor:
    """``(H * W * A, 4)`` anchors of a ``H x W`` map, row-major over cells then anchors
    (the order of ``concat_box_prediction_layers``), each cell's centred on its receptive
    field: ``(x * stride + offset, y * stride + offset)`` in network-input pixels. On
    ``base``'s device (a CUDA network's buffer under --gpu)."""
    xs = torch.arange(width, dtype=torch.float32, device=base.device) * align.stride + align.offset
    ys = torch.arange(height, dtype=torch.float32, device=base.device) * align.stride + align.offset
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


@dataclass
class AnchorTargets:
    """A map's anchors' training targets: ``(M,)`` int8 labels (1 object, 0 background, -1
    ignored), the ``(P,)`` indices of the positive ones and their ``(P, 4)`` encoded boxes."""

    labels: torch.Tensor
    positive: torch.Tensor
    encoded: torch.Tensor


class ProposalNet(nn.Module):
    """torchvision's RPN head and training machinery over one conv map at a time."""

    def __init__(self, channels: int, config: ProposalConfig):
        super().__init__()
        self.config = config
        self.register_buffer("base_anchors", cell_anchors(config), persistent=False)
        self.head = RPNHead(channels, len(self.base_anchors))
        # Only its matching, sampling and loss are used (its forward assumes anchors at cell corners).
        self.rpn = RegionProposalNetwork(
            AnchorGenerator((config.anchor_sizes,), (config.aspect_ratios,)), self.head,
            config.fg_iou, config.bg_iou, config.anchors_per_image, config.positive_fraction,
            {"training": config.pre_nms_top_n, "testing": config.pre_nms_top_n}, {"training": config.top_n, "testing": config.top_n},
            config.nms_iou,
        )
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def predict(self, fmap: torch.Tensor, align: Alignment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C, H, W)`` map -> objectness ``(H*W*A,)``, deltas ``(H*W*A, 4)``, anchors ``(H*W*A, 4)``."""
        logits, deltas = self.head([fmap[None].float()])
        objectness, deltas = concat_box_prediction_layers(logits, deltas)
        anchors = grid_anchors(self.base_anchors, fmap.shape[1], fmap.shape[2], align).to(fmap.device)
        return objectness.reshape(-1), deltas, anchors

    def targets(self, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> AnchorTargets:
        """What the loss of a map with ``(M, 4)`` ``anchors`` learns, its image holding ``(N, 4)``
        ``gt_boxes`` (network-input pixels; none: every anchor is background): torchvision's
        matching and box encoding, the encoding kept for the positive anchors only (the loss
        reads no other anchor's)."""
        labels, matched = self.rpn.assign_targets_to_anchors([anchors], [{"boxes": gt_boxes.to(anchors)}])
        positive = torch.nonzero(labels[0] >= 1).flatten()
        encoded = self.box_coder.encode_single(matched[0][positive], anchors[positive])
        return AnchorTargets(labels[0].to(torch.int8), positive, encoded)

    def loss(self, fmap: torch.Tensor, align: Alignment, gt_boxes: torch.Tensor,
             targets: AnchorTargets | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness and box losses of one map whose image holds ``(N, 4)`` ``gt_boxes``
        (network-input pixels; none: every sampled anchor is background); ``targets``: this
        map's :meth:`targets`, where the caller kept them."""
        objectness, deltas, anchors = self.predict(fmap, align)
        if targets is None:
            targets = self.targets(anchors, gt_boxes)
        encoded = torch.zeros_like(anchors)
        encoded[targets.positive] = targets.encoded
        return self.rpn.compute_loss(objectness[:, None], deltas, [targets.labels.to(anchors.dtype)], [encoded])

    @torch.inference_mode()
    def boxes(self, fmap: torch.Tensor, align: Alignment, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` highest-objectness anchors of a map, decoded: ``(R, 4)``
        network-input pixels and their ``(R,)`` logits, best first."""
        objectness, deltas, anchors = self.predict(fmap, align)
        top = torch.topk(objectness, min(count, len(objectness))).indices
        decoded = self.box_coder.decode_single(deltas[top], anchors[top])
        return decoded, objectness[top]


@dataclass
class ProposalModel:
    """A trained proposal network and the features it reads.

    Attributes:
        net: the head.
        features: cache settings of the maps it was trained on (backbone, layer, scales).
        training: a free-form record of the run.
    """

    net: ProposalNet
    features: CacheSettings
    training: dict = field(default_factory=dict)

    @property
    def config(self) -> ProposalConfig:
        return self.net.config

    @torch.inference_mode()
    def propose(self, maps: list[torch.Tensor], factors: list[float], width: int, height: int,
                top_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of one image from its conv maps, best first.

        Args:
            maps: ``S`` maps ``(C, H_s, W_s)``, one per scale.
            factors: their resize factors (original -> network input).
            width, height: the original image size.
            top_n: boxes to return (default: the model's ``top_n``).

        Returns:
            ``(R, 4)`` float32 ``xyxy`` original pixels clipped to the image and
            ``(R,)`` float32 objectness logits, ``R <= top_n``: of each scale the
            ``max(pre_nms_top_n, 2 * top_n)`` highest-objectness anchors
            decoded, then all scales' boxes merged by one NMS.
        """
        if maps:
            self.net.to(maps[0].device)  # the maps' device: a CUDA conv pass's maps stay on the GPU
        self.net.eval()
        config = self.config
        top_n = top_n or config.top_n
        decoded = max(config.pre_nms_top_n, 2 * top_n)
        boxes, scores = [], []
        for fmap, factor in zip(maps, factors):
            found, logits = self.net.boxes(fmap, self.features.alignment, decoded)
            boxes.append(found / factor)
            scores.append(logits)
        merged = torch.cat(boxes).float().cpu()
        logits = torch.cat(scores).float().cpu()
        merged[:, 0::2] = merged[:, 0::2].clamp(0, width)
        merged[:, 1::2] = merged[:, 1::2].clamp(0, height)
        wide = ((merged[:, 2] - merged[:, 0]) >= config.min_size) & ((merged[:, 3] - merged[:, 1]) >= config.min_size)
        merged, logits = merged[wide], logits[wide]
        keep = ops.nms(merged, logits, config.nms_iou)[:top_n]
        return merged[keep].numpy().astype(np.float32), logits[keep].numpy().astype(np.float32)

    # ---------------------------------------------------------------- files
    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The head's weights in fp16 (half the file)."""
        return {prefix + k: v.detach().cpu().half().contiguous() for k, v in self.net.head.state_dict().items()}

    def metadata(self) -> dict:
        return {
            "config": self.config.to_json(),
            "channels": int(self.features.channels),
            "features": {**asdict(self.features), "scales": list(self.features.scales)},
            "training": self.training,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors + JSON metadata."""
        from safetensors.torch import save

        tensors = self.tensors()
        meta = {"format": PROPOSAL_FORMAT, "version": PROPOSAL_VERSION, **self.metadata(), "digest": tensor_digest(tensors)}
        atomic_write_bytes(path, save(tensors, metadata={"spp": json.dumps(meta)}), sole_writer=True)

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor], source: str, prefix: str = "") -> "ProposalModel":
        """Rebuild from :meth:`metadata` and :meth:`tensors` (a proposal-model file, or a detector carrying one).

        Raises:
            ModelError: shapes or metadata do not fit together.
        """
        try:
            config = ProposalConfig.from_json(meta["config"])
            features = CacheSettings.from_json(meta["features"])
            net = ProposalNet(int(meta["channels"]), config)
            state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
            net.head.load_state_dict(state, strict=True)
            return cls(net.eval(), features, dict(meta.get("training", {})))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{source}: not a usable proposal model ({str(exc).splitlines()[0][:160]})") from None

    @classmethod
    def load(cls, path: str | Path) -> "ProposalModel":
        """Read a file written by :meth:`save`.

        Raises:
            ModelError: unreadable, another kind of file, or damaged.
        """
        meta, tensors = read_safetensors(path, "proposal model", ModelError)
        if not isinstance(meta, dict) or meta.get("format") != PROPOSAL_FORMAT:
            raise ModelError(f"{path}: not a proposal model (no {PROPOSAL_FORMAT} metadata); train one with `spp train-proposals`")
        if meta.get("version") != PROPOSAL_VERSION:
            raise ModelError(f"{path}: proposal model version {meta.get('version')}; this spp reads version {PROPOSAL_VERSION}")
        if meta.get("digest") != tensor_digest(tensors):
            raise ModelError(f"{path}: proposal model is damaged (checksum mismatch)")
        return cls.from_parts(meta, tensors, str(path))

    def check_features(self, settings: CacheSettings, source: str) -> None:
        """Refuse maps of another backbone, layer or weights than the ones trained on (scales may differ)."""
        mine, theirs = self.features, settings
        if (mine.backbone, mine.weights_sha256, mine.layer, mine.channels) != (theirs.backbone, theirs.weights_sha256, theirs.layer, theirs.channels):
            raise ModelError(
                f"{source}: maps of {theirs.backbone} ({theirs.layer}, weights {theirs.weights_sha256[:12]}), but the proposal "
                f"model reads {mine.backbone} ({mine.layer}, weights {mine.weights_sha256[:12]})"
            )


def recall(proposals: list[np.ndarray], gt: list[np.ndarray], iou: float) -> float:
    """Share of ground-truth boxes (all images) that some proposal of their image covers at IoU >= ``iou``."""
    hit = total = 0
    for boxes, truth in zip(proposals, gt):
        total += len(truth)
        if len(truth) and len(boxes):
            best = ops.box_iou(torch.as_tensor(truth, dtype=torch.float32), torch.as_tensor(boxes, dtype=torch.float32)).max(1).values
            hit += int((best >= iou).sum())
    return hit / total if total else math.nan


# ------------------------------------------------------------------ training

CHECKPOINT_KIND = "spp-proposal-checkpoint"


@dataclass
class TrainingState:
    """What a proposal-training checkpoint holds besides the weights and optimizer moments."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)  # per epoch: loss, held-out recall@0.7 / @0.5 at top_n


# Cached maps a proposal trainer keeps in memory; past this, it reads the others from the
# cache at each step (blocks.6 at one scale: 0.58 MB per image, ~3,700 images).
HOLD_BYTES = 2 << 30


@dataclass
class _Image:
    key: str
    image_id: str
    maps: list[torch.Tensor] | None  # None: read from the cache when needed
    factors: list[float]
    width: int
    height: int
    gt_boxes: np.ndarray  # (N, 4) original pixels; empty for a background image


class ProposalTrainer:
    """Train a :class:`ProposalNet` on cached maps; the last epoch's weights are kept.

    A ``val_fraction`` of the images (the lowest sha256 ranks of their ids: the
    same ones on every run) never trains; their recall@0.7 / @0.5 at ``top_n``
    boxes is reported after each epoch (training on them too gave raccoon's
    detector a lower validation mAP at each of 4 seeds: docs/proposals.md). It
    does not pick the epoch: on raccoon that tenth is 14 images, whose recall
    moves by 0.07 per box, so the epoch it picked was close to a draw; keeping
    the last one (Faster R-CNN's choice, after
    the learning rate's drop) was level with it in the detector's validation mAP
    and ahead in validation recall@0.7 on all three benchmark datasets
    (docs/proposals.md, "Which epoch to keep"). Each epoch draws from generators
    seeded by (seed, epoch) and ends with a checkpoint, so a resumed run ends
    where an uninterrupted one would.
    """

    def __init__(self, cache, keys: list[str], config: ProposalConfig, device: str = "cpu", hold_bytes: int = HOLD_BYTES):
        from spp_cli.pipeline import id_rank

        self.cache, self.config, self.device, self.hold_bytes = cache, config, torch.device(device), hold_bytes
        self.keys = sorted(keys, key=lambda k: id_rank(cache.metadata(k).get("image_id", k)))
        count = max(1, round(config.val_fraction * len(self.keys))) if len(self.keys) >= 2 and config.val_fraction > 0 else 0
        self.val_keys, self.train_keys = self.keys[:count], self.keys[count:]
        self.train: list[_Image] = []
        self.val: list[_Image] = []

    def identity(self) -> str:
        """What a checkpoint must match to be resumed: images, settings, features."""
        import hashlib

        # "keep": checkpoints of the spp that kept the epoch of best held-out recall are not resumed.
        doc = {"keys": sorted(self.keys), "config": self.config.to_json(), "features": self.cache.settings.describe(), "keep": "last"}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def prepare(self, progress=None) -> None:
        """Read the images' ground truth, and their maps (at the cache's precision) up to ``hold_bytes``."""
        held = 0
        for done, key in enumerate(self.keys, 1):
            entry = self.cache.read(key)
            boxes = entry.gt_boxes if entry.gt_boxes is not None else np.zeros((0, 4), np.float32)
            if entry.gt_iscrowd is not None and len(boxes):
                boxes = boxes[~entry.gt_iscrowd.astype(bool)]  # a crowd box is no one object to propose
            size = sum(m.numel() * m.element_size() for m in entry.maps)
            maps = entry.maps if held + size <= self.hold_bytes else None
            held += size if maps is not None else 0
            image = _Image(key, entry.image_id, maps, list(entry.factors), entry.width, entry.height, np.asarray(boxes, np.float32))
            (self.val if done <= len(self.val_keys) else self.train).append(image)
            if progress is not None:
                progress(done, len(self.keys))

    def evaluate(self, model: ProposalModel) -> tuple[float, float]:
        """Held-out (recall@0.7, recall@0.5) at ``top_n`` boxes per image."""
        found = [model.propose([m.to(self.device) for m in self.maps(image)], image.factors, image.width, image.height)[0] for image in self.val]
        truth = [image.gt_boxes for image in self.val]
        return recall(found, truth, 0.7), recall(found, truth, 0.5)

    def maps(self, image: _Image) -> list[torch.Tensor]:
        """The image's cached maps: held in memory, or read again from the cache."""
        return image.maps if image.maps is not None else self.cache.read(image.key).maps

    def learning_rate(self, epoch: int, step: int) -> float:
        """Linear warm-up over the first 100 steps, x0.1 for the last quarter of the epochs (Faster R-CNN's schedule)."""
        config = self.config
        warm = min(1.0, (epoch * len(self.train) + step + 1) / 100)
        return config.lr * warm * (0.1 if epoch >= math.ceil(0.75 * config.epochs) else 1.0)

    def run(self, checkpoint: Path | None = None, progress=None, on_epoch=None) -> ProposalModel:
        """Train, resuming from ``checkpoint`` when it holds this run; the last epoch's model.

        ``progress(epoch, step, steps, loss)`` after each image; ``on_epoch(state)`` after each epoch.
        """
        from spp_cli.finetune import read_checkpoint, write_checkpoint

        config = self.config
        torch.manual_seed(config.seed)
        net = ProposalNet(self.cache.settings.channels, config).to(self.device)
        model = ProposalModel(net, self.cache.settings)
        optimizer = torch.optim.SGD(net.head.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        state = TrainingState()
        what = "proposal-training checkpoint"
        if checkpoint is not None and checkpoint.is_file():
            state, _ = read_checkpoint(checkpoint, self.identity(), net.head, optimizer, CHECKPOINT_KIND, what, TrainingState)
        align = self.cache.settings.alignment
        held_targets: dict[tuple[int, int], AnchorTargets] = {}
        while state.epoch < config.epochs:
            epoch = state.epoch
            torch.manual_seed(config.seed * 100_003 + epoch)  # the anchor sampler draws from torch's generator
            rng = np.random.default_rng((config.seed, epoch))
            net.train()
            total = 0.0
            order = rng.permutation(len(self.train))
            for step, index in enumerate(order):
                image = self.train[index]
                scale = int(rng.integers(len(image.factors)))
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate(epoch, step)
                gt = torch.as_tensor(image.gt_boxes, device=self.device) * image.factors[scale]
                fmap = self.maps(image)[scale].to(self.device)
                # The same every epoch: matching the anchors to the boxes was an eighth of the training. Kept
                # beside the maps held in memory (~40 kB a map of 37,000 anchors, bccd's at stride 16).
                targets = held_targets.get((index, scale))
                if targets is None and image.maps is not None:
                    anchors = grid_anchors(net.base_anchors, fmap.shape[1], fmap.shape[2], align).to(fmap.device)
                    targets = held_targets[index, scale] = net.targets(anchors, gt)
                objectness_loss, box_loss = net.loss(fmap, align, gt, targets)
                loss = objectness_loss + box_loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                if progress is not None:
                    progress(epoch + 1, step + 1, len(order), total / (step + 1))
            held_out = self.evaluate(model) if self.val else (math.nan, math.nan)
            state.epoch = epoch + 1
            state.history.append({"epoch": epoch + 1, "loss": round(total / max(1, len(order)), 4),
                                  "recall@0.7": round(held_out[0], 4), "recall@0.5": round(held_out[1], 4)})
            if checkpoint is not None:
                write_checkpoint(checkpoint, self.identity(), state, net.head, optimizer, kind=CHECKPOINT_KIND)
            if on_epoch is not None:
                on_epoch(state)
        last = state.history[-1] if state.history else {"recall@0.7": math.nan, "recall@0.5": math.nan}
        model.training = {
            "images": len(self.train), "held_out": len(self.val), "epochs_run": state.epoch,
            "held_out_recall@0.7": last["recall@0.7"], "held_out_recall@0.5": last["recall@0.5"],
            "top_n": config.top_n, "history": state.history,
        }
        net.cpu()
        return model


class LearnedWindows:
    """A feature cache whose entries' proposals are a proposal model's boxes (computed from
    the cached maps on the first read of an entry): SVMs and box regressors then train on
    the windows the detector will see. Everything else is the cache's own.

    An entry's boxes are kept after its first read (300 x 4 floats): SVM training reads an
    entry up to three times (feature norms, positives, mining) and fine-tuning once per
    epoch, and the network's pass over the maps was about 8 s of bccd's SVM step each time.
    """

    def __init__(self, cache, model: ProposalModel):
        model.check_features(cache.settings, str(cache.root))
        self.cache, self.model = cache, model
        self._boxes: dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def read(self, key: str, device: str = "cpu"):
        entry = self.cache.read(key, device)
        if key not in self._boxes:
            self._boxes[key] = self.model.propose(entry.maps, entry.factors, entry.width, entry.height)[0]
        entry.proposals = self._boxes[key].copy()  # a reader may change its entry's boxes in place
        return entry
