"""Training a detector from a feature cache: SVMs with hard-negative mining, then box regression.

Reads only the cache (no network pass): each entry holds the conv maps,
proposals and ground truth of one image.

Shape letters: R windows, N ground truths, D feature length, K classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from spp_cli import boxes as box_ops
from spp_cli.bbox_reg import BoxRegressors, IoURegressors, encode, fit_ridge
from spp_cli.cache import CacheEntry, FeatureCache
from spp_cli.config import BBoxRegConfig, DetectConfig, SVMConfig, detections_cap
from spp_cli.errors import DatasetError, ModelError, SPPError
from spp_cli.fileio import StreamedTensor, atomic_write_safetensors, remove_stale_writes
from spp_cli.head import Head
from spp_cli.model import Detector
from spp_cli.spp import DEFAULT_LEVELS, output_dim
from spp_cli.svm import HardNegativeMiner, LinearSVMs, negative_candidates, store_memory_rows
from spp_cli.windows import SPPFeaturizer, mean_feature_norms

Progress = Callable[[str, int, int], None]

# Box regression's and the localisation term's samples are held (fp16) until mining ends,
# then fitted a class at a time: these bound their bytes, so a training set of thousands of
# images does not run out of memory. At most SAMPLES_PER_IMAGE windows per image (box
# regression: across its classes; the localisation term: per class present), fewer where
# the training set is large enough to pass the budget: 2 GiB is ~65,000 rows of
# blocks.6's 16,000-long pool5 (bccd's 292 trainval images take at most ~19,000 and ~47,000).
SAMPLES_PER_IMAGE = 64
MIN_SAMPLES_PER_IMAGE = 8
REGRESSION_SAMPLE_BYTES = 2 << 30
LOCALISATION_SAMPLE_BYTES = 3 << 30


def samples_per_image(budget_bytes: int, row_bytes: int, images: int) -> int:
    """Windows sampled per image (or per image and class) so that ``images`` of them stay
    within ``budget_bytes`` of ``row_bytes`` rows: ``SAMPLES_PER_IMAGE`` while they fit,
    never fewer than ``MIN_SAMPLES_PER_IMAGE``."""
    fitting = budget_bytes // max(row_bytes * images, 1)
    return int(max(MIN_SAMPLES_PER_IMAGE, min(SAMPLES_PER_IMAGE, fitting)))


@dataclass
class TrainingSet:
    """The cache entries a detector is trained on, and its classes.

    ``negative_keys`` are background images (`--negatives`): entries that
    hold none of the classes, whatever their own labels say; every window
    of theirs is a negative candidate of every class, mined like the others.
    """

    cache: FeatureCache
    keys: list[str]
    classes: list[str]
    negative_keys: list[str] = field(default_factory=list)


def training_set(cache: FeatureCache, classes: list[str] | None = None, keys: list[str] | None = None) -> TrainingSet:
    """Entries with ground truth, and the class list (all classes seen, or ``classes``).

    Raises:
        DatasetError: no entry has ground truth, none has a box, or a requested class never occurs.
    """
    keys = keys if keys is not None else cache.keys()
    with_gt, seen = [], []
    for key in keys:
        meta = cache.metadata(key)
        if meta.get("has_gt"):
            with_gt.append(key)
            for name in meta.get("classes", []):
                if name not in seen:
                    seen.append(name)
    if not with_gt:
        raise DatasetError(f"{cache.root}: no cached image has ground truth; build the cache with --data SPEC")
    if not any(cache.holds_box(key) for key in with_gt):
        raise DatasetError(f"{cache.root}: the ground truth of its {len(with_gt)} image(s) holds no box; nothing to train on")
    if classes:
        unknown = [c for c in classes if c not in seen]
        if unknown:
            raise DatasetError(f"{cache.root}: class(es) {', '.join(unknown)} not in the cache (classes: {', '.join(seen)})")
        seen = list(classes)
    return TrainingSet(cache, with_gt, seen)


def split_keys(cache: FeatureCache, spec: str, split: str | None) -> list[str]:
    """Keys of the cached images that belong to a dataset (split), by image id.

    Lets one cache of a whole dataset (each image through the network once)
    serve training on one split and detection on another.

    Raises:
        DatasetError: the dataset cannot be read, or none of its images is cached.
    """
    from spp_cli.data import open_dataset

    dataset = open_dataset(spec, split)
    ids = {record.image_id for record in dataset.records}
    keys = [key for key in cache.keys() if cache.metadata(key).get("image_id") in ids]
    if not keys:
        where = f"{spec} (split {split})" if split else str(spec)
        raise DatasetError(f"{cache.root}: none of the {len(ids)} images of {where} is in the cache")
    return keys


def negative_images(inputs: tuple[str, ...] | list[str]) -> list:
    """The image files of ``--negatives`` (files, folders, globs, .txt lists).

    Raises:
        UsageError: an input holds no image (the message names it).
    """
    from spp_cli.errors import UsageError
    from spp_cli.images import expand_inputs

    paths, skipped = expand_inputs(list(inputs))
    if skipped:
        raise UsageError(f"--negatives {skipped[0][0]}: {skipped[0][1]}")
    return paths


def negative_keys(cache: FeatureCache, paths: list) -> list[str]:
    """Cache keys of background images given as files (sha256 of their bytes).

    Raises:
        DatasetError: an image is not in the cache (the message names it and says how to add it).
    """
    from spp_cli.cache import image_key

    keys, missing = [], []
    for path in paths:
        try:
            key = image_key(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read file ({exc.strerror or exc})") from None
        if cache.has(key):
            keys.append(key)
        else:
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{missing[0]}{more}: not in the cache {cache.root}; add the negatives with `spp cache IMAGES --cache {cache.root}` first")
    return list(dict.fromkeys(keys))


# How often hard-negative mining's state is written (at least): a run shorter than this
# writes nothing. Each write also waits until it would take at most a tenth of the time
# since the last one (the state reaches GBs with many classes: coco128's 3 GB store takes
# ~50 s to reach the disk of a VM that writes 63 MB/s with fsync), so writing costs at most
# a tenth of the training time; a kill loses the work since the last write.
MINING_CHECKPOINT_SECONDS = 60.0
MINING_CHECKPOINT_SHARE = 0.1
ASSUMED_WRITE_BYTES_PER_S = 100e6  # until a first write measures the disk


class MiningCheckpoint:
    """The mining epoch's state in one safetensors file, so that a stopped `spp train-svm`
    (Ctrl-C, SIGTERM, SIGKILL, a lost node) resumes after the last image it saved.

    The file holds the miner's state (:meth:`HardNegativeMiner.export_state`: the hard
    negatives each class holds, its model and solver scores), box regression's and the
    localisation term's samples so far, the number of images of the mining order done, and
    a fingerprint of everything that decides the result (settings, classes, the images in
    order and their entries' digests, the feature scales measured on the cache). The positives are not in it: they
    are computed again from the cache before mining, as in any run. A file whose
    fingerprint differs (other settings or images, or a changed cache) is not used.
    """

    def __init__(self, path: Path, fingerprint: dict, seconds: float, log: Callable[[str], None]):
        self.path, self.fingerprint, self.seconds, self.log = Path(path), fingerprint, seconds, log
        self.cursor = 0  # images of the mining order whose work the miner holds
        self.last = time.perf_counter()
        self.bytes_per_s = ASSUMED_WRITE_BYTES_PER_S

    def load(self, miner: HardNegativeMiner, samples: dict[str, dict[str, list[np.ndarray]]]) -> int:
        """Restore a matching checkpoint into ``miner`` (holding its positives only) and
        ``samples`` (empty); the images done (0 where there is none to take)."""
        remove_stale_writes(self.path)  # a write cut by a kill, GBs perhaps: before this run's mining
        if not self.path.exists():
            return 0
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as file:
                meta = json.loads((file.metadata() or {}).get("spp", "null"))
                if not isinstance(meta, dict) or meta.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
                    self.log(f"warning: {self.path}: left by a run with other settings, images or cache; hard-negative mining starts over")
                    return 0
                names = set(file.keys())

                def read(name: str) -> np.ndarray | None:
                    return file.get_tensor(name) if name in names else None

                store = file.get_slice("store")
                rows = store.get_shape()[0]
                miner.import_state(read, (store[at : min(at + 4096, rows)] for at in range(0, rows, 4096)), meta["classes"])
                for kind, per_class in samples.items():
                    for k, name in enumerate(miner.classes):
                        block = read(f"{kind}.{k}")
                        per_class[name] = [block] if block is not None else []
        except Exception as exc:  # a file cut short by a full disk, or not safetensors: mining starts over
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self.log(f"warning: {self.path}: not a readable checkpoint ({reason}); hard-negative mining starts over")
            miner.forget_mining()  # whatever was taken before the problem
            for per_class in samples.values():
                for name in per_class:
                    per_class[name] = []
            return 0
        self.cursor = int(meta["cursor"])
        return self.cursor

    def maybe_save(self, done: int, miner: HardNegativeMiner, samples: dict[str, dict[str, list[np.ndarray]]]) -> None:
        """Write the state after ``done`` images once ``seconds`` have passed since the last
        write and the write would take at most ``MINING_CHECKPOINT_SHARE`` of that time
        (``seconds`` 0: after every image, whatever it costs)."""
        since = time.perf_counter() - self.last
        if since < self.seconds:
            return
        if self.seconds > 0:
            # An upper bound of the bytes, without a pass over the rows: the store holds rows no class
            # keeps any more until it compacts (at most as many as the live ones).
            size = 2 * miner.store.count * miner.dim + sum(block.nbytes for per_class in samples.values() for blocks in per_class.values() for block in blocks)
            if size / self.bytes_per_s > MINING_CHECKPOINT_SHARE * since:
                return
        began = time.perf_counter()
        tensors, counters = miner.export_state()
        for kind, per_class in samples.items():
            for k, name in enumerate(miner.classes):
                blocks = per_class[name]
                if blocks:
                    shape = (sum(len(b) for b in blocks), *blocks[0].shape[1:])
                    tensors[f"{kind}.{k}"] = StreamedTensor(blocks[0].dtype, shape, lambda blocks=blocks: blocks)
        meta = {"fingerprint": self.fingerprint, "cursor": done, "classes": counters}
        try:
            written = atomic_write_safetensors(self.path, tensors, {"spp": json.dumps(meta)}, sole_writer=True)
        except SPPError as exc:  # a full disk: the training itself goes on, without saves
            self.log(f"warning: {exc}; training goes on without saving mining's state")
            self.seconds = math.inf
            return
        self.last = time.perf_counter()
        self.bytes_per_s = written / max(self.last - began, 1e-3)


def check_head(head: Head, cache: FeatureCache, levels: tuple[int, ...] = DEFAULT_LEVELS) -> None:
    """Refuse a head fine-tuned on other features than ``cache`` holds.

    Raises:
        ModelError: settings or pyramid differ; the message says what to do.
    """
    if (head.features, tuple(head.levels)) != (cache.settings, tuple(levels)):
        raise ModelError(
            f"the head was fine-tuned on {head.features.describe()} (pyramid {list(head.levels)}); the cache {cache.root} "
            f"holds {cache.settings.describe()}; fine-tune on this cache, or train on the head's cache"
        )


def _gt_names(entry: CacheEntry) -> list[str]:
    return [entry.classes[int(label)] for label in entry.gt_labels]


def train_detector(
    data: TrainingSet,
    levels: tuple[int, ...] = DEFAULT_LEVELS,
    svm_config: SVMConfig = SVMConfig(),
    bbox_config: BBoxRegConfig | None = BBoxRegConfig(),
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda _: None,
    featurizer=None,
    head: Head | None = None,
    checkpoint: Path | None = None,
    checkpoint_key: dict | None = None,
    checkpoint_seconds: float = MINING_CHECKPOINT_SECONDS,
) -> Detector:
    """Train SVMs (and box regressors) on cached features.

    The SVMs see pool5 (SPP vectors) or, with a fine-tuned ``head``, its fc7
    activations ("ftfc7"); box regression always reads pool5, as in R-CNN.
    ``featurizer`` computes pool5 of windows from a cache entry (default:
    :class:`~spp_cli.windows.SPPFeaturizer`, SPP pooling of the cached maps;
    :class:`~spp_cli.rcnn.RCNNFeaturizer` for R-CNN's warped windows). Its
    ``mode`` is recorded in the model, so detection computes features the same way.

    With ``checkpoint`` (a file path), the mining epoch's state is written there every
    ``checkpoint_seconds`` or more (0: after every image; see :class:`MiningCheckpoint`), and a run of the same
    settings and images picks up from it: the same detector as a run without the stop.
    ``checkpoint_key``: what else decides the result that the cache does not name (the
    files of a head or a proposal model, by their hashes); a checkpoint is taken only where it matches.

    Raises:
        ModelError: ``head`` was fine-tuned on other features than the cache's.
    """
    cache, settings = data.cache, data.cache.settings
    featurizer = featurizer or SPPFeaturizer(settings.alignment, tuple(levels))
    if head is not None:
        check_head(head, cache, tuple(levels))
    rng = np.random.default_rng(svm_config.seed)
    progress = progress or (lambda *_: None)

    def classifier_input(pool5: torch.Tensor) -> torch.Tensor:
        return head.fc7(pool5) if head is not None else pool5

    # 1. Feature scales: mean L2 norm of a sample of windows -> 20, for the
    #    classifier's input and (when it differs) for box regression's pool5.
    sample = sorted(rng.choice(len(data.keys), min(svm_config.norm_images, len(data.keys)), replace=False))
    pool5_norm, fc7_norm = mean_feature_norms(
        (cache.read(data.keys[i]) for i in sample), featurizer.features, svm_config.norm_boxes, svm_config.seed,
        derive=head.fc7 if head is not None else None,
    )
    norm = fc7_norm if head is not None else pool5_norm
    scale = svm_config.target_norm / max(norm, 1e-12)
    pool5_scale = svm_config.target_norm / max(pool5_norm, 1e-12)
    log(f"feature scale: mean L2 norm {norm:.2f} -> {svm_config.target_norm:g} (x{scale:.4f})")

    dim = head.hidden if head is not None else output_dim(settings.channels, levels)
    pool5_dim = output_dim(settings.channels, levels)
    # Hard negatives past a quarter of the memory go to files beside the cache (see NegativeStore).
    spill = cache.root if os.access(cache.root, os.W_OK) else Path(tempfile.gettempdir())
    miner = HardNegativeMiner(data.classes, dim, svm_config, on_retrain=lambda c, p, n: log(f"retrained {c}: {p} positives, {n} negatives"),
                              spill=spill, memory_rows=store_memory_rows(dim))

    # 2. Positives: ground-truth boxes (not difficult, not crowd) and, with positive_iou,
    #    the windows that overlap one of them that much (as the box's class).
    images_with_boxes = class_images = 0  # for the budgets of the regression and localisation samples
    most_objects = 0  # in one image: the model's detections per image (config.detections_cap)
    trained_classes = set(data.classes)
    for n, key in enumerate(data.keys, 1):
        entry = cache.read(key)
        names = np.array(_gt_names(entry))
        usable = ~entry.gt_difficult & ~entry.gt_iscrowd
        images_with_boxes += bool((~entry.gt_iscrowd).any())
        most_objects = max(most_objects, int((~entry.gt_iscrowd).sum()))
        class_images += len(set(names[usable]) & trained_classes)
        if usable.any():
            boxes, box_names = entry.gt_boxes[usable], names[usable]
            if svm_config.positive_iou > 0:
                windows, window_names = positive_windows(entry.proposals[featurizer.distinct(entry, entry.proposals)],
                                                         boxes, box_names, svm_config.positive_iou)
                boxes, box_names = np.concatenate([boxes, windows]), np.concatenate([box_names, window_names])
            feats = (classifier_input(featurizer.features(entry, boxes)) * scale).numpy()
            for name in data.classes:
                miner.add_positives(name, feats[box_names == name])
        progress("positives", n, len(data.keys))
    untrained = list(miner.untrained())
    if len(untrained) == 1:
        log(f"warning: class {untrained[0]} has no usable positive in the cache; it is left out of the model")
    elif untrained:  # one line: a COCO subset may name 80 classes and hold 30
        log(f"warning: {len(untrained)} classes have no usable positive in the cache; they are left out of the model: {', '.join(untrained)}")

    # 3. One epoch of hard-negative mining over the images in random order,
    #    collecting box-regression samples on the way.
    row_bytes = 2 * pool5_dim  # fp16
    regression_cap = samples_per_image(REGRESSION_SAMPLE_BYTES, row_bytes, images_with_boxes)
    localisation_cap = samples_per_image(LOCALISATION_SAMPLE_BYTES, row_bytes, class_images)
    if bbox_config is not None and min(regression_cap, localisation_cap) < SAMPLES_PER_IMAGE:
        log(f"box regression: at most {regression_cap} windows per image, localisation term: {localisation_cap} per image "
            f"and class (of {SAMPLES_PER_IMAGE}), to hold the samples of {images_with_boxes} images in memory")
    reg_feats: dict[str, list[np.ndarray]] = {c: [] for c in data.classes}
    reg_deltas: dict[str, list[np.ndarray]] = {c: [] for c in data.classes}
    iou_feats: dict[str, list[np.ndarray]] = {c: [] for c in data.classes}
    iou_targets: dict[str, list[np.ndarray]] = {c: [] for c in data.classes}
    # Background images join the same random order (without them the order,
    # hence the model, is what it always was).
    mined = list(data.keys) + [k for k in data.negative_keys if k not in set(data.keys)]
    background = set(mined[len(data.keys):])
    order = rng.permutation(len(mined))
    samples = {"reg_feats": reg_feats, "reg_deltas": reg_deltas, "iou_feats": iou_feats, "iou_targets": iou_targets}
    saver = None
    if checkpoint is not None:
        fingerprint = {
            "svm": asdict(svm_config), "bbox_regression": asdict(bbox_config) if bbox_config else None, "levels": list(levels),
            "classes": list(data.classes), "features": settings.describe(), "mode": featurizer.mode, "dim": dim,
            "scale": scale, "pool5_scale": pool5_scale,
            "images": hashlib.sha256(json.dumps(mined).encode()).hexdigest(),  # the mining order's images, in the cache's order
            # and their entries' contents (`spp cache` rewrites an entry in place when its boxes or labels change)
            "contents": hashlib.sha256(json.dumps([cache.metadata(key).get("digest") for key in mined]).encode()).hexdigest(),
            **(checkpoint_key or {}),
        }
        saver = MiningCheckpoint(checkpoint, fingerprint, checkpoint_seconds, log)
        resumed = saver.load(miner, samples)
        if resumed:
            log(f"resuming hard-negative mining after {resumed} of {len(order)} images ({checkpoint})")
    for n, i in enumerate(order, 1):
        if saver is not None and n <= saver.cursor:
            continue
        entry = cache.read(mined[i])
        windows = entry.proposals[featurizer.distinct(entry, entry.proposals)]
        pool5 = featurizer.features(entry, windows)
        if mined[i] in background:
            candidates = {name: np.arange(len(windows)) for name in data.classes}
        else:
            names = _gt_names(entry)
            if bbox_config is not None:
                _regression_samples(entry, windows, pool5, pool5_scale, names, data.classes, bbox_config, reg_feats, reg_deltas,
                                    regression_cap)
                _localisation_samples(entry, windows, pool5, featurizer, pool5_scale, names, bbox_config.iou_min, iou_feats, iou_targets,
                                      localisation_cap)
            candidates = negative_candidates(windows, entry.gt_boxes, names, data.classes, svm_config.negative_iou)
        # In place: (R, D) is ~90 MB at blocks.6, and a scaled copy per image
        # was a sixth of the training time. Without a head, pool5 itself is
        # scaled; its regression rows were copied above.
        feats = pool5.mul_(scale) if head is None else classifier_input(pool5) * scale
        miner.add_image(feats, candidates)
        progress("mining", n, len(order))
        if saver is not None:
            saver.maybe_save(n, miner, samples)
    svms = miner.finish(scale)
    # A class without positives has no classifier: it must not be in the
    # model at all (a zero weight vector would score 0 on every window).
    trained = [k for k, name in enumerate(data.classes) if name not in miner.untrained()]
    classes = [data.classes[k] for k in trained]
    svms = LinearSVMs(classes, svms.weight[trained], svms.bias[trained], svms.feature_scale)
    # The hard negatives' store and the solver's buffers (GBs with many classes) before the
    # regression fits: their rows and float32 copies would otherwise come on top of them.
    del miner

    # 4. Box regression and localisation quality per class.
    regressors = localisation = None
    if bbox_config is not None:
        weight = np.zeros((len(classes), pool5_dim, 4), np.float32)
        bias = np.zeros((len(classes), 4), np.float32)
        iou_weight = np.zeros((len(classes), pool5_dim), np.float32)
        iou_bias = np.zeros(len(classes), np.float32)
        for k, name in enumerate(classes):
            if reg_feats[name]:
                x = _float_rows(reg_feats.pop(name))
                y = np.concatenate(reg_deltas[name])
                weight[k], bias[k] = fit_ridge(x, y, bbox_config.ridge_lambda)
                log(f"box regression {name}: {len(x)} windows")
            if iou_feats[name]:
                x = _float_rows(iou_feats.pop(name))
                # To 1e-3 of the residual, not box regression's 1e-6: the prediction is a term of a
                # score (raccoon's validation the same at 1e-6).
                w, b = fit_ridge(x, np.concatenate(iou_targets[name])[:, None], bbox_config.ridge_lambda, tol=1e-3)
                iou_weight[k], iou_bias[k] = w[:, 0], b[0]
            x = None  # this class's rows go before the next class's are made
            progress("box regression", k + 1, len(classes))
        regressors = BoxRegressors(weight, bias)
        localisation = IoURegressors(iou_weight, iou_bias)

    return Detector(
        features=settings,
        levels=tuple(levels),
        svms=svms,
        regressors=regressors,
        localisation=localisation,
        head=head,
        regression_scale=pool5_scale,
        detect=DetectConfig(max_detections=detections_cap(most_objects)),
        proposals={},
        mode=featurizer.mode,
        training={
            "images": len(data.keys),
            "background_images": len(background),
            "svm": asdict(svm_config),
            "bbox_regression": asdict(bbox_config) if bbox_config else None,
            "mean_feature_norm": norm,
            "features": "fc7" if head is not None else "pool5",
        },
    )


def positive_windows(windows: np.ndarray, gt_boxes: np.ndarray, gt_names: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``(P, 4)`` ``xyxy`` windows whose best IoU with a ground-truth box is at least
    ``min_iou``, and the names of those boxes: positives of the box's class."""
    windows = np.asarray(windows, np.float32).reshape(-1, 4)
    gt_names = np.asarray(gt_names)
    if len(windows) == 0 or len(gt_boxes) == 0:
        return windows[:0], gt_names[:0]
    overlaps = box_ops.iou(windows, gt_boxes).numpy()
    best = overlaps.argmax(1)
    keep = np.flatnonzero(overlaps[np.arange(len(windows)), best] >= min_iou)
    return windows[keep], gt_names[best[keep]]


def _regression_samples(entry, windows, pool5, scale, names, classes, config, reg_feats, reg_deltas,
                        cap_per_image: int = SAMPLES_PER_IMAGE) -> None:
    """Append the scaled pool5 rows and target deltas of ``windows`` overlapping a
    ground-truth box above ``config.min_iou`` (at most ``cap_per_image``)."""
    usable = ~entry.gt_iscrowd
    if not usable.any() or len(windows) == 0:
        return
    gt = entry.gt_boxes[usable]
    gt_names = np.asarray(names)[usable]
    overlaps = box_ops.iou(windows, gt).numpy()
    best = overlaps.argmax(1)
    good = np.flatnonzero(overlaps[np.arange(len(windows)), best] > config.min_iou)
    if len(good) > cap_per_image:
        # Bound memory on images with many overlapping windows; evenly spaced keeps variety.
        good = good[np.linspace(0, len(good) - 1, cap_per_image).astype(int)]
    for name in set(gt_names[best[good]]):
        if name not in reg_feats:
            continue
        sel = good[gt_names[best[good]] == name]
        reg_feats[name].append((pool5[torch.from_numpy(sel)] * scale).half().numpy())  # torch: 4x numpy's fp16 conversion
        reg_deltas[name].append(encode(windows[sel], gt[best[sel]]))


def _float_rows(blocks: list[np.ndarray]) -> torch.Tensor:
    """fp16 row blocks as one float32 ``(N, D)`` tensor, filled block by block: no fp16
    concatenation beside it (bccd's RBC: ~27,000 x 16,000 rows, 0.9 GB in fp16)."""
    rows = torch.empty((sum(len(b) for b in blocks), blocks[0].shape[1]), dtype=torch.float32)
    start = 0
    for block in blocks:
        rows[start : start + len(block)] = torch.from_numpy(block)
        start += len(block)
    return rows


def _localisation_samples(entry, windows, pool5, featurizer, scale, names, min_iou, iou_feats, iou_targets,
                          cap_per_class: int = SAMPLES_PER_IMAGE) -> None:
    """Append, for each class with a usable box in the image, the scaled pool5 rows of the
    ``windows`` whose best IoU with the class's boxes is at least ``min_iou`` (at most
    ``cap_per_class``, evenly spaced), that IoU as their target, and the boxes' own rows at 1."""
    usable = ~entry.gt_difficult & ~entry.gt_iscrowd
    if not usable.any():
        return
    gt, gt_names = entry.gt_boxes[usable], np.asarray(names)[usable]
    overlaps = box_ops.iou(windows, gt).numpy() if len(windows) else np.zeros((0, len(gt)), np.float32)
    box_rows = featurizer.features(entry, gt)
    for name in set(gt_names):
        if name not in iou_feats:
            continue
        of_class = gt_names == name
        best = overlaps[:, of_class].max(1) if len(windows) else np.zeros(0, np.float32)
        chosen = np.flatnonzero(best >= min_iou)
        if len(chosen) > cap_per_class:
            chosen = chosen[np.linspace(0, len(chosen) - 1, cap_per_class).astype(int)]
        rows = torch.cat([pool5[torch.from_numpy(chosen)], box_rows[torch.from_numpy(np.flatnonzero(of_class))]])
        iou_feats[name].append((rows * scale).half().numpy())
        iou_targets[name].append(np.concatenate([best[chosen], np.ones(int(of_class.sum()), np.float32)]).astype(np.float32))


def assemble_detectors(parts: list[Detector], classes: list[str]) -> Detector:
    """One detector from detectors trained on disjoint class subsets of the same data.

    Classes are independent in SVM training (one classifier, one miner, one
    box regressor each), so the parts of a train-svm split over ranks join
    into the model one process trains; ``classes`` gives the order. A class
    no part has (no usable positive) stays out, as in one process.
    """
    parts = [p for p in parts if p.classes]
    if not parts:
        raise ModelError("no rank trained any class")
    rows = {name: (part, k) for part in parts for k, name in enumerate(part.classes)}
    kept = [name for name in classes if name in rows]
    first = parts[0]
    weight = np.stack([rows[n][0].svms.weight[rows[n][1]] for n in kept])
    bias = np.array([rows[n][0].svms.bias[rows[n][1]] for n in kept], np.float32)
    svms = LinearSVMs(kept, weight, bias, first.svms.feature_scale)
    regressors = None
    if first.regressors is not None:
        regressors = BoxRegressors(
            np.stack([rows[n][0].regressors.weight[rows[n][1]] for n in kept]),
            np.stack([rows[n][0].regressors.bias[rows[n][1]] for n in kept]),
        )
    localisation = None
    if first.localisation is not None:
        localisation = IoURegressors(
            np.stack([rows[n][0].localisation.weight[rows[n][1]] for n in kept]),
            np.array([rows[n][0].localisation.bias[rows[n][1]] for n in kept], np.float32),
        )
    training = dict(first.training)
    training["ranks"] = len(parts)
    return Detector(
        features=first.features, levels=first.levels, svms=svms, regressors=regressors, localisation=localisation, head=first.head,
        regression_scale=first.regression_scale, detect=first.detect, proposals=first.proposals,
        training=training, mode=first.mode,
    )
