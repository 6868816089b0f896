"""Fine-tuning the fc head on SPP vectors read from the feature cache (SPPnet section 3.1.2).

The conv layers are frozen, so a mini-batch is pooled from cached maps and
never touches the network: Fast R-CNN's sampling (2 images x 64 windows, 25%
foreground at IoU >= 0.5, background at IoU in [0.1, 0.5)), each training
window pooled at a random scale of the pyramid (validation: the test rule,
area closest to 224^2), and half of the windows mirrored.

Mirroring: a window mirrored on a mirrored map pools the same cells with the
bins of every pyramid level in reverse column order, so the flip is a
permutation of the SPP vector (:func:`flip_spp_vectors`) and costs nothing.
It is not the same as a conv pass over a mirrored image (conv filters are not
symmetric); caching mirrored maps would double the conv time and the cache,
and on raccoon the permutation gave the same mAP (benchmarks/README.md).

Runs are resumable: after every epoch the whole state (weights, optimizer
moments, best weights, epoch, early-stopping counters) is written atomically
to a checkpoint beside the output; every epoch draws from RNGs seeded by
(seed, epoch), so a resumed run ends where an uninterrupted one would.

Under torchrun (``world`` > 1) the head is trained as DistributedDataParallel:
each rank reads and samples its own share of the training images (every
``world``-th of them), gradients are averaged over the ranks each step (so a
step sees ``world`` x 2 images), every rank scores the same held-out windows
and rank 0 writes the checkpoints.

Shape letters: R windows, D SPP vector length, K classes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from spp_cli import boxes as box_ops
from spp_cli.cache import CacheEntry, FeatureCache
from spp_cli.errors import DatasetError, ModelError
from spp_cli.fileio import atomic_write_bytes, read_safetensors
from spp_cli.head import BACKGROUND, FCHead, Head
from spp_cli.spp import DEFAULT_LEVELS, output_dim, pool_windows

CHECKPOINT_FORMAT = "spp-finetune-checkpoint"


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; sources in comments."""

    epochs: int = 30
    lr: float = 1e-4  # AdamW; measured on raccoon: 1e-3 plateaus at a higher held-out loss
    weight_decay: float = 5e-4  # AlexNet/SPPnet
    batch: int = 128  # windows per mini-batch (Fast R-CNN)
    images_per_batch: int = 2  # Fast R-CNN: 2 images x 64 windows
    fg_fraction: float = 0.25  # Fast R-CNN / SPPnet fine-tuning
    fg_iou: float = 0.5  # foreground: IoU >= 0.5 with a ground truth
    bg_iou_low: float = 0.1  # background: IoU in [0.1, 0.5)
    hidden: int = 1024  # fc6/fc7 width (AlexNet 4096; smaller keeps the model small and CPU fast)
    dropout: float = 0.5
    flip: bool = True
    random_scale: bool = True  # training windows pooled at a random scale; validation at the best one
    val_fraction: float = 0.1  # images held out for early stopping
    patience: int = 5  # epochs without a better validation loss before stopping
    seed: int = 0


@dataclass
class WindowTable:
    """The windows of one image that fine-tuning samples from.

    Attributes:
        key: cache key.
        boxes: ``(M, 4)`` ``xyxy`` original pixels: ground truth, then proposals.
        labels: ``(M,)`` 0 background, ``k >= 1`` class ``k - 1``.
        foreground, background, fallback: indices into ``boxes``; ``fallback``
            are windows under ``bg_iou_low``, used only when an image has too
            few background windows in range.
    """

    key: str
    boxes: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    fallback: np.ndarray


def window_table(entry: CacheEntry, classes: list[str], config: FinetuneConfig, background_image: bool = False) -> WindowTable:
    """Label the ground truth and proposals of an entry for sampling.

    Ground truth that is difficult or crowd is neither foreground nor a
    reason to call a window background; a window overlapping a crowd box at
    IoU >= ``bg_iou_low`` is left out. A ``background_image`` (`--negatives`)
    holds none of the classes whatever its labels say: every proposal is
    background (sampled from ``fallback``, as none overlaps a ground truth).
    """
    if background_image:  # cached without ground truth, or with labels that do not count here
        return WindowTable(entry.key, entry.proposals.astype(np.float32).reshape(-1, 4), np.zeros(len(entry.proposals), np.int64),
                           np.zeros(0, np.int64), np.zeros(0, np.int64), np.arange(len(entry.proposals)))
    names = [entry.classes[int(i)] for i in entry.gt_labels]
    usable = ~entry.gt_difficult & ~entry.gt_iscrowd & np.array([n in classes for n in names], bool)
    gt = entry.gt_boxes[usable]
    gt_labels = np.array([classes.index(n) + 1 for n, u in zip(names, usable) if u], np.int64)
    boxes = np.concatenate([gt, entry.proposals]).astype(np.float32).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64)
    best = np.zeros(len(boxes), np.float32)
    if len(gt):
        overlaps = box_ops.iou(boxes, gt).numpy()
        best = overlaps.max(1)
        labels = np.where(best >= config.fg_iou, gt_labels[overlaps.argmax(1)], 0)
    ignored = np.zeros(len(boxes), bool)
    others = entry.gt_boxes[~usable]
    if len(others):
        ignored = (box_ops.iou(boxes, others).numpy().max(1) >= config.bg_iou_low) & (best < config.fg_iou)
    foreground = np.flatnonzero(best >= config.fg_iou)
    background = np.flatnonzero((best < config.fg_iou) & (best >= config.bg_iou_low) & ~ignored)
    fallback = np.flatnonzero((best < config.bg_iou_low) & ~ignored)
    return WindowTable(entry.key, boxes, labels, foreground, background, fallback)


def sample_windows(table: WindowTable, count: int, fg_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into ``table.boxes``: ``round(count * fg_fraction)`` foreground
    (fewer if the image has fewer), the rest background (from ``fallback`` when
    the range runs short, with replacement only when the image has too few windows)."""
    n_fg = min(int(round(count * fg_fraction)), len(table.foreground))
    fg = rng.choice(table.foreground, n_fg, replace=False) if n_fg else np.zeros(0, np.int64)
    n_bg = count - n_fg
    pool = table.background
    if len(pool) < n_bg:
        extra = rng.choice(table.fallback, min(n_bg - len(pool), len(table.fallback)), replace=False) if len(table.fallback) else []
        pool = np.concatenate([pool, np.asarray(extra, np.int64)])
    if len(pool) == 0:
        pool = table.foreground  # an image covered by its objects: nothing else to show
    bg = rng.choice(pool, n_bg, replace=len(pool) < n_bg) if n_bg and len(pool) else np.zeros(0, np.int64)
    return np.concatenate([fg, bg]).astype(np.int64)


def flip_spp_vectors(features: torch.Tensor, channels: int, levels: tuple[int, ...]) -> torch.Tensor:
    """The SPP vectors of the mirrored windows on mirrored maps: ``(R, C * B)`` ->
    ``(R, C * B)``, each level's ``n x n`` bins reversed left-right (channel-major layout)."""
    parts, start = [], 0
    for n in levels:
        size = channels * n * n
        parts.append(features[:, start : start + size].reshape(-1, channels, n, n).flip(-1).reshape(-1, size))
        start += size
    return torch.cat(parts, 1)


def pool_training_windows(entry: CacheEntry, boxes: np.ndarray, align, levels, random_scale: bool, rng: np.random.Generator) -> torch.Tensor:
    """``(R, D)`` unscaled SPP vectors; each window at a random scale of the entry's
    pyramid if ``random_scale``, else at the test rule's scale."""
    scale_index = None
    if random_scale and len(entry.maps) > 1:
        scale_index = torch.from_numpy(rng.integers(0, len(entry.maps), len(boxes)))
    return pool_windows(entry.maps, entry.factors, torch.from_numpy(boxes), align, levels, scale_index)


# ------------------------------------------------------------------ training


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    best: bool


@dataclass
class _State:
    """Everything a checkpoint holds besides the weights and optimizer moments."""

    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


Progress = Callable[[int, int, int, float, float], None]  # epoch, step, steps, loss, accuracy


class Finetuner:
    """One fine-tuning run over a cache: sampling tables, validation set, checkpointing."""

    def __init__(self, cache: FeatureCache, keys: list[str], classes: list[str], config: FinetuneConfig,
                 levels: tuple[int, ...] = DEFAULT_LEVELS, device: str = "cpu", rank: int = 0, world: int = 1,
                 negative_keys: list[str] | None = None):
        self.cache, self.config, self.levels, self.device = cache, config, tuple(levels), torch.device(device)
        self.rank, self.world = rank, world
        self.classes = list(classes)
        # Background images (`--negatives`): sampled, batched and held out like the others, all windows background.
        self.negative_keys = set(negative_keys or ()) - set(keys)
        keys = list(keys) + sorted(self.negative_keys)
        self.align = cache.settings.alignment
        self.dim = output_dim(cache.settings.channels, self.levels)
        rng = np.random.default_rng([config.seed, 1 << 20])
        order = rng.permutation(len(keys))
        n_val = int(round(len(keys) * config.val_fraction)) if len(keys) >= 5 else 0
        self.val_keys = sorted(keys[i] for i in order[:n_val])
        self.train_keys = sorted(keys[i] for i in order[n_val:])
        # The training images this rank reads and samples (all of them in one process).
        self.my_keys = self.train_keys[rank::world]
        self.tables: dict[str, WindowTable] = {}
        self.val_x = torch.zeros((0, self.dim))
        self.val_y = torch.zeros(0, dtype=torch.long)
        self.input_scale = 1.0

    def identity(self) -> str:
        """What a checkpoint must match to be resumed: data, classes, settings."""
        parts = [self.train_keys, self.val_keys, self.classes, asdict(self.config), list(self.levels), asdict(self.cache.settings)]
        if self.world > 1:
            parts.append({"ranks": self.world})  # another sampling: not resumable by another rank count
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Read every entry once: sampling tables, the validation windows, the input scale."""
        config = self.config
        rng = np.random.default_rng([config.seed, 2 << 20])
        val_x, val_y, norms = [], [], []
        keys = self.my_keys + self.val_keys
        for n, key in enumerate(keys, 1):
            entry = self.cache.read(key)
            table = window_table(entry, self.classes, config, background_image=key in self.negative_keys)
            self.tables[key] = table
            if key in self.val_keys:
                picked = sample_windows(table, config.batch // config.images_per_batch, config.fg_fraction, rng)
                val_x.append(pool_windows(entry.maps, entry.factors, torch.from_numpy(table.boxes[picked]), self.align, self.levels))
                val_y.append(torch.from_numpy(table.labels[picked]))
            elif len(norms) < 50 and len(table.boxes):
                picked = rng.choice(len(table.boxes), min(64, len(table.boxes)), replace=False)
                norms.append(pool_windows(entry.maps, entry.factors, torch.from_numpy(table.boxes[picked]), self.align, self.levels).norm(dim=1))
            if progress:
                progress(n, len(keys))
        has_foreground = any(len(self.tables[k].foreground) for k in self.my_keys)
        mean_norm = float(torch.cat(norms).mean()) if norms else 1.0
        if self.world > 1:
            # Every rank must train on the same input scale and stop for the same reason.
            local = torch.cat(norms) if norms else torch.zeros(0)
            totals = torch.tensor([float(local.sum()), float(len(local)), float(has_foreground)], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            mean_norm = float(totals[0] / totals[1]) if totals[1] else 1.0
            has_foreground = bool(totals[2])
        if not has_foreground:
            raise DatasetError(f"{self.cache.root}: no training window overlaps a ground-truth box at IoU >= {config.fg_iou}")
        # Unit scale per input on average: fc6's default init expects it.
        self.input_scale = math.sqrt(self.dim) / max(mean_norm, 1e-12)
        if val_x:
            self.val_x, self.val_y = torch.cat(val_x), torch.cat(val_y)

    def new_network(self) -> FCHead:
        torch.manual_seed(self.config.seed)
        return FCHead(self.dim, self.config.hidden, len(self.classes) + 1, self.config.dropout).to(self.device)

    def new_optimizer(self, network: FCHead) -> torch.optim.Optimizer:
        # The fused kernel: the same update in one pass over the 17M parameters (measured: a
        # 128-window step 1.4x faster on 2 CPU threads); torch before 2.4 has it on CUDA only.
        try:
            return torch.optim.AdamW(network.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(network.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def train_epoch(self, network: FCHead, optimizer: torch.optim.Optimizer, epoch: int, progress: Progress | None) -> tuple[float, float]:
        """One pass over the training images in a seeded random order; mean loss and accuracy."""
        config = self.config
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout
        network.train()
        if self.world > 1:
            # Each rank its own images, in its own seeded order; every rank takes
            # as many steps as the one with the most images (the others wrap
            # around), as DistributedDataParallel needs.
            rng = np.random.default_rng([config.seed, epoch, self.rank])
            torch.manual_seed(config.seed * 100_003 + epoch * 1_009 + self.rank)
        order = [self.my_keys[i] for i in rng.permutation(len(self.my_keys))]
        per_image = config.batch // config.images_per_batch
        groups = [order[i : i + config.images_per_batch] for i in range(0, len(order), config.images_per_batch)]
        if self.world > 1:
            most = -(-len(self.train_keys[0 :: self.world]) // config.images_per_batch)
            groups = [groups[i % len(groups)] for i in range(most)] if groups else []
        total_loss = total_correct = total = 0.0
        for step, group in enumerate(groups, 1):
            xs, ys = [], []
            for key in group:
                table = self.tables[key]
                picked = sample_windows(table, per_image, config.fg_fraction, rng)
                entry = self.cache.read(key)
                x = pool_training_windows(entry, table.boxes[picked], self.align, self.levels, config.random_scale, rng)
                if config.flip:
                    mirrored = torch.from_numpy(rng.random(len(x)) < 0.5)
                    x[mirrored] = flip_spp_vectors(x[mirrored], self.cache.settings.channels, self.levels)
                xs.append(x)
                ys.append(torch.from_numpy(table.labels[picked]))
            x = torch.cat(xs).to(self.device) * self.input_scale
            y = torch.cat(ys).to(self.device)
            logits = network(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            total_correct += float((logits.argmax(1) == y).sum())
            total += len(y)
            if progress:
                progress(epoch, step, len(groups), total_loss / total, total_correct / total)
        if self.world > 1:
            sums = torch.tensor([total_loss, total_correct, total], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            total_loss, total_correct, total = (float(v) for v in sums)
        return total_loss / max(total, 1), total_correct / max(total, 1)

    @torch.inference_mode()
    def validate(self, network: FCHead) -> tuple[float, float]:
        """Loss and window accuracy on the held-out windows (eval mode, best scale, no flip)."""
        if len(self.val_y) == 0:
            return math.nan, math.nan
        network.eval()
        logits = network(self.val_x.to(self.device) * self.input_scale)
        y = self.val_y.to(self.device)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    def run(self, checkpoint: Path | None, progress: Progress | None = None, on_epoch: Callable[[EpochReport], None] | None = None) -> Head:
        """Train (resuming from ``checkpoint`` when it holds this run) and return the best head.

        The best epoch is the one with the lowest validation loss (the last
        epoch when there is no validation set); training stops after
        ``patience`` epochs without improvement.
        """
        network = self.new_network()
        optimizer = self.new_optimizer(network)
        trained = network
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Wrapped after the optimizer is made on the same parameters; the
            # wrapper averages gradients over the ranks in backward().
            trained = DistributedDataParallel(network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        state = _State()
        best_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        if checkpoint is not None and checkpoint.is_file():
            state, best_weights = read_checkpoint(checkpoint, self.identity(), network, optimizer)
        while state.epoch < self.config.epochs and state.bad_epochs < self.config.patience:
            epoch = state.epoch + 1
            train_loss, train_acc = self.train_epoch(trained, optimizer, epoch, progress)
            val_loss, val_acc = self.validate(network)
            if self.world > 1:
                # Rank 0's verdict for all: every rank then keeps the same best epoch and stops together.
                verdict = torch.tensor([val_loss, val_acc], dtype=torch.float64)
                torch.distributed.broadcast(verdict, 0)
                val_loss, val_acc = float(verdict[0]), float(verdict[1])
            improved = math.isnan(val_loss) or val_loss < state.best_val_loss
            if improved:
                state.best_val_loss = val_loss if not math.isnan(val_loss) else state.best_val_loss
                state.best_epoch, state.bad_epochs = epoch, 0
                best_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
            else:
                state.bad_epochs += 1
            state.epoch = epoch
            report = EpochReport(epoch, train_loss, train_acc, val_loss, val_acc, improved)
            state.history.append(asdict(report))
            if checkpoint is not None and self.rank == 0:
                write_checkpoint(checkpoint, self.identity(), state, network, optimizer, best_weights)
            if on_epoch:
                on_epoch(report)
        network.load_state_dict(best_weights)
        network.eval()
        return Head(
            network.cpu(),
            [BACKGROUND, *self.classes],
            self.input_scale,
            self.cache.settings,
            self.levels,
            {
                "images": len(self.train_keys),
                "validation_images": len(self.val_keys),
                "background_images": len(self.negative_keys),
                "ranks": self.world,
                "config": asdict(self.config),
                "best_epoch": state.best_epoch,
                "epochs_run": state.epoch,
                "history": state.history,
            },
        )


# ------------------------------------------------------------------ checkpoints


def checkpoint_path(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoint: ``<out>.ckpt``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def write_checkpoint(path: Path, identity: str, state, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     best_weights: dict[str, torch.Tensor] | None = None, kind: str = CHECKPOINT_FORMAT) -> None:
    """Atomically write weights, best weights (fine-tuning's early stopping; none for `spp
    train-proposals`, which keeps its last epoch) and optimizer moments (safetensors, no pickle);
    ``state`` is a dataclass of the run's counters, ``kind`` the format name."""
    from safetensors.torch import save

    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in (best_weights or {}).items()})
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"format": kind, "identity": identity, "state": asdict(state), "param_groups": opt["param_groups"]}
    atomic_write_bytes(path, save(tensors, metadata={"spp": json.dumps(meta)}), sole_writer=True)


def check_checkpoint(path: Path, identity: str, kind: str = CHECKPOINT_FORMAT, what: str = "fine-tuning checkpoint") -> None:
    """Refuse, before any work, a checkpoint that another run wrote (header only).

    Raises:
        ModelError: unreadable, not a checkpoint, or of other data or settings.
    """
    meta, _ = read_safetensors(path, what, ModelError, tensors=False, remedy="delete it to start over")
    if not isinstance(meta, dict) or meta.get("format") != kind:
        raise ModelError(f"{path}: not a {what}; delete it or choose another --out")
    if meta.get("identity") != identity:
        raise ModelError(f"{path}: checkpoint of a run with other data or settings; delete it to start over, or use the same settings")


def read_checkpoint(path: Path, identity: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    kind: str = CHECKPOINT_FORMAT, what: str = "fine-tuning checkpoint", state_type: type = _State) -> tuple:
    """Restore a checkpoint into ``network`` and ``optimizer``: ``(state_type(**state), best weights)``.

    Raises:
        ModelError: unreadable, or written by a run with other data or settings.
    """
    check_checkpoint(path, identity, kind, what)
    meta, tensors = read_safetensors(path, what, ModelError, remedy="delete it to start over")
    network.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    slots: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, index, name = k.split(".", 2)
            slots.setdefault(int(index), {})[name] = v
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return state_type(**meta["state"]), best
