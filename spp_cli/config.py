"""Training and detection defaults, each with its source.

Frozen dataclasses: a run's settings are recorded in the model file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


# The commands that train: they hold MKL to reproducible sums (hold_reproducible_blas).
TRAINING_COMMANDS = frozenset({"train", "train-svm", "finetune", "train-proposals"})


def hold_reproducible_blas() -> None:
    """MKL's AVX2 kernels in their strict reproducible mode (``MKL_CBWR=AVX2,STRICT``) for this process.

    The training commands call it, so that ``--threads``, torchrun's ranks and SLURM's tasks
    train the same SVMs from one cache: MKL's own choice of kernels (AVX-512 where the CPU has
    it) and its AVX2 kernels outside strict mode split a product's sum by thread (SVM biases
    1% apart at 1 and 2 threads; a one-row or a many-window gemm against the classes moved
    too); the solver's dot products are its own (``svm._dot``). It costs matrix products ~1.7x
    on an AVX-512 CPU, so detection and a Python caller's process keep MKL's choice. MKL reads
    the variable at its first call: a process that has multiplied matrices already keeps what
    it had (set it before importing torch to train reproducibly from Python). A value the
    user set is kept.
    """
    os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")


def cpu_budget() -> int:
    """The cores a run may keep busy: ``spp --threads N`` (which sets OMP_NUM_THREADS, as a
    batch system may) where given, else every core. Selective search's worker processes
    and the second thread beside the network keep to it, as torch's threads do."""
    cores = os.cpu_count() or 1
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        asked = 0
    return min(cores, asked) if asked > 0 else cores


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining (R-CNN protocol, kept by SPPnet)."""

    # liblinear -c. R-CNN/SPPnet used 0.001 for their AlexNet/ZF features; on
    # EfficientNet-Lite0 SPP features it underfits (raccoon VOC07 mAP 0.791 vs
    # 0.867 at 0.1 and 1.0, with box regression, ground-truth positives): 0.1 is
    # the default here. `spp train`, whose positives add windows, uses 0.03
    # (TrainPlan.svm_c).
    C: float = 0.1
    positive_weight: float = 2.0  # liblinear -w1, R-CNN/SPPnet
    bias_multiplier: float = 10.0  # liblinear -B, R-CNN/SPPnet
    negative_iou: float = 0.3  # negatives: IoU < 0.3 with every ground truth of the class
    # Positives: the ground-truth boxes (R-CNN, SPPnet: 0 here); with a value in (0, 1] also
    # every training window overlapping a ground-truth box of the class at least this much
    # (the box a detector will score is a window, never the exact box). `spp train` uses 0.7:
    # validation mAP raccoon 0.878 -> 0.910, bccd 0.801 -> 0.827, coco128 0.065 -> 0.070
    # (benchmarks/README.md, "Positives").
    positive_iou: float = 0.0
    hard_threshold: float = -1.0001  # a negative is hard if its score is above this
    evict_threshold: float = -1.2  # cached negatives scoring below this are dropped at retrain
    retrain_every: int = 2000  # retrain after this many new hard negatives
    target_norm: float = 20.0  # features scaled so their mean L2 norm is 20
    norm_images: int = 200  # images sampled to measure the mean norm (code: 200 x 200)
    norm_boxes: int = 200
    max_negatives: int = 20000  # cap per class on cached negatives (memory), easiest dropped first
    # With solver liblinear: -e, the dual solver's stopping tolerance. 0.1 is liblinear's
    # own default for -s 3, the one R-CNN's train_svms.m ran with. Measured on
    # bccd mining sets (3,247 x 16,000): 3.3x faster than 1e-3, margins within 0.05.
    tol: float = 0.1
    # newton: the squared hinge (liblinear -s 2's objective) by Newton-CG in torch,
    # started from the previous model at each retrain; liblinear: R-CNN's hinge dual.
    # Measured with `spp train --features pool5` (validation parts of the training
    # splits, 2 threads): raccoon 0.849 vs 0.847, bccd 0.670 vs 0.665; bccd's
    # pool5 SVM step 335 s vs 541 s (liblinear's with 3 classes fitted side by side).
    solver: str = "newton"
    newton_tol: float = 1e-4  # stop when |gradient| <= this x |gradient at the zero model|
    newton_steps: int = 50
    cg_steps: int = 50  # conjugate-gradient steps per Newton step at most
    seed: int = 0


@dataclass(frozen=True)
class BBoxRegConfig:
    """Ridge regression of box deltas from pool5 features (R-CNN's setting)."""

    min_iou: float = 0.6  # training windows: IoU > 0.6 with a ground truth (R-CNN; SPPnet: >= 0.5)
    ridge_lambda: float = 1000.0  # R-CNN (SPPnet: 4000 with IoU >= 0.5)
    # Localisation quality (bbox_reg.IoURegressors): windows at IoU >= this with a box of the
    # class, at most 64 per image and class (fewer past a memory budget: train.samples_per_image),
    # and the boxes themselves; the same ridge lambda.
    iou_min: float = 0.1


@dataclass(frozen=True)
class DetectConfig:
    """Test-time settings (R-CNN/SPPnet test protocol)."""

    score_threshold: float = -1.5  # R-CNN/SPPnet code: candidates scoring below are dropped before NMS
    nms_iou: float = 0.3  # per-class NMS, R-CNN/SPPnet
    # Per image: 100 (VOC protocol, COCO's maxDets), or twice the most objects of one training image
    # where that is more (detections_cap): 4 x 4 mosaics of bccd, ~200 cells each, lost half their
    # mAP at 100 (0.291 against 0.451 at 1,000). The benchmark datasets hold at most 42.
    max_detections: int = 100
    bbox_regression: bool = True  # apply the model's box regressors (when it has them)
    # Box voting after NMS (Gidaris & Komodakis 2015, spp_cli.boxes.vote_boxes),
    # over the candidates above min(score_threshold, voting_floor), so that a
    # detection's box does not depend on --conf. Measured (VOC07 mAP, test
    # splits): raccoon pool5+bbox 0.866 -> 0.921, ftfc7+bbox 0.868 -> 0.896,
    # coco128 5-scale ftfc7+bbox 0.108 -> 0.140 (benchmarks/README.md, Accuracy).
    box_voting: bool = True
    voting_iou: float = 0.5  # candidates at IoU >= 0.5 with the kept box vote (MR-CNN)
    voting_floor: float = -1.5  # candidates scoring above this vote: R-CNN's candidate threshold
    # Shown by default (printed, drawn) on plain images: SVM scores are margins,
    # not probabilities. Measured on raccoon test (pool5 + box regression):
    # precision 0.87 at >= 0, 0.75 in [-0.25, 0), 0.42 in [-0.5, -0.25), <= 0.13
    # below; at -0.3 a shown detection is right more often than not.
    display_threshold: float = -0.3
    # Each window's class scores plus this times log sigmoid of its objectness logit, where the
    # windows are the model's own learned proposals (0: the SVM score alone). `spp train` sets it
    # per model from validation (pipeline.OBJECTNESS_WEIGHT): the term gained bccd's validation
    # part 0.875 -> 0.905 on the stride-16 cut and cost raccoon's 0.909 -> 0.807, so no one value
    # serves both (benchmarks/README.md, "Detection settings").
    objectness_weight: float = 0.0
    # Each window's class score plus this times its predicted IoU with an object of the class
    # (bbox_reg.IoURegressors; models without them: no term). On the validation parts of the
    # three benchmark datasets 1.5-3 gained on all three and 1 or 4 did not; with 2 the SVM step
    # of `spp train` validates raccoon 0.850 -> 0.876, bccd's stride-16 cut 0.893 -> 0.896,
    # coco128 0.121 -> 0.131 (benchmarks/README.md, "What was tried").
    iou_weight: float = 2.0
    # A fine-tuned head's fc6 at detection: its truncated SVD at this rank (0: the full layer;
    # Head.compressed). Its validation mAP at least the full layer's on raccoon, bccd and coco128,
    # coco128's classification 1.4x faster.
    fc6_rank: int = 512
    # Only these class indices are detected (`spp detect --classes`); None: every class. A run's
    # choice, never stored in a model (Detector.save leaves it out).
    classes: tuple[int, ...] | None = None


def detections_cap(most_objects: int) -> int:
    """A model's detections per image: the default, or twice the most objects (boxes, crowds
    left out) that one of its training images holds, where that is more."""
    return max(DetectConfig.max_detections, 2 * most_objects)


# Here rather than in spp_cli.features (which imports torch): `spp train` reads --scales first.
def parse_scales(text: str) -> tuple[int, ...]:
    """``"688"`` or ``"480,576,688,864,1200"`` -> sorted distinct short sides."""
    from spp_cli.errors import UsageError

    try:
        values = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise UsageError(f"--scales: '{text}' is not a comma-separated list of pixel sizes (e.g. 688 or 480,576,688,864,1200)") from None
    if not values or any(v < 32 or v > 4000 for v in values):
        raise UsageError(f"--scales: '{text}': each short side must be between 32 and 4000 pixels")
    return tuple(values)
