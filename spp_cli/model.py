"""The detector: backbone settings + SPP pyramid + SVMs + box regressors + thresholds.

Saved as one ``.safetensors`` file: tensors ``svm_weight (K, D)``,
``svm_bias (K,)``, with box regression ``bbox_weight (K, D5, 4)``,
``bbox_bias (K, 4)``, and with a fine-tuned head its fc layers under
``head.`` (the SVMs then read fc7, D = H; regression reads pool5, D5); JSON
metadata under the key ``spp`` holds everything else (format version,
feature mode, classes, backbone and cache settings, pyramid levels, feature
scales, thresholds, proposal settings, training record, and a calibration
of the SVM margins into probabilities where training fitted one). No pickle.

Shape letters: R windows, D feature length, K classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from spp_cli.bbox_reg import BoxRegressors, IoURegressors, decode
from spp_cli.boxes import top_batched_nms, vote_boxes
from spp_cli.cache import CacheSettings, tensor_digest
from spp_cli.calibration import Calibration
from spp_cli.config import DetectConfig
from spp_cli.errors import ModelError, check_class_names
from spp_cli.fileio import atomic_write_bytes, read_safetensors
from spp_cli.head import Head
from spp_cli.spp import Alignment, PyramidPooler, output_dim
from spp_cli.svm import LinearSVMs

if TYPE_CHECKING:  # imported where a model carries one: torchvision's detection modules load then
    from spp_cli.rpn import ProposalModel

MODEL_FORMAT = "spp-detector"
MODEL_VERSION = 1
HEAD_PREFIX = "head."
PROPOSAL_PREFIX = "proposals."
# How window features are computed: "spp" pools each window from the image's
# conv maps; "rcnn" warps each window to the network's input size and runs
# the network on it (spp_cli.rcnn). Models from before the field are "spp".
MODES = ("spp", "rcnn")
# Windows scored per step at detection: the pooled chunk (~16 MB at
# blocks.6) is reused, instead of one (R, D) matrix per image.
SCORE_CHUNK = 256


@dataclass
class Detection:
    """One detection: ``box`` ``xyxy`` original pixels, class index, SVM score."""

    box: list[float]
    class_id: int
    score: float


@dataclass
class Detector:
    """A trained SPPnet detector.

    Attributes:
        features: the settings the conv maps must be computed with (a cache's
            settings): backbone, weights digest, layer, alignment, scales.
        levels: pyramid levels.
        svms: per-class classifiers (with the feature scale).
        regressors: per-class box regressors on pool5, or ``None``.
        localisation: per-class predictors of a window's IoU with its object, on
            pool5 (trained with the box regressors), or ``None``; detection adds
            ``detect.iou_weight`` times the prediction to each class score.
        head: the fine-tuned fc head whose fc7 the SVMs read, or ``None``
            (SVMs on pool5).
        regression_scale: pool5 multiplier for the regressors (default: the
            SVMs' feature scale, the same features).
        detect: score threshold, NMS IoU, detections per image.
        proposals: proposal settings (``ProposalParams`` as a dict).
        training: a free-form record of how the model was made.
        mode: how window features are computed, one of :data:`MODES`
            (``spp``: pooled from conv maps; ``rcnn``: warped windows).
        calibration: margins -> probabilities (fitted on held-out detections
            by `spp train`), or ``None``: scores are margins only.
        proposal_model: learned proposals on the same conv maps
            (:class:`spp_cli.rpn.ProposalModel`), used by default at detection;
            ``None``: selective search.
    """

    features: CacheSettings
    levels: tuple[int, ...]
    svms: LinearSVMs
    regressors: BoxRegressors | None
    localisation: IoURegressors | None = None
    head: Head | None = None
    regression_scale: float | None = None
    detect: DetectConfig = field(default_factory=DetectConfig)
    proposals: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    mode: str = "spp"
    calibration: Calibration | None = None
    proposal_model: ProposalModel | None = None
    # The head detection runs, per fc6 rank (Head.compressed: one factorisation per model and rank), and the head
    # they were made from.
    _detection_heads: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _detection_heads_source: Head | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def classes(self) -> list[str]:
        return self.svms.classes

    @property
    def alignment(self) -> Alignment:
        return self.features.alignment

    @property
    def pool5_scale(self) -> float:
        return self.regression_scale if self.regression_scale is not None else self.svms.feature_scale

    @property
    def feature_kind(self) -> str:
        """``pool5`` or ``fc7``: what the SVMs read."""
        return "fc7" if self.head is not None else "pool5"

    def _detection_head(self, rank: int) -> Head | None:
        """The head whose fc7 detection scores (``DetectConfig.fc6_rank``), ``None`` without one."""
        if self.head is None:
            return None
        if self._detection_heads_source is not self.head:  # a head replaced: every rank made again
            self._detection_heads.clear()
            self._detection_heads_source = self.head
        if rank not in self._detection_heads:
            self._detection_heads[rank] = self.head.compressed(rank)
        return self._detection_heads[rank]

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the model atomically as safetensors + JSON metadata."""
        from safetensors.torch import save

        tensors = {
            "svm_weight": torch.from_numpy(np.ascontiguousarray(self.svms.weight, np.float32)),
            "svm_bias": torch.from_numpy(np.ascontiguousarray(self.svms.bias, np.float32)),
        }
        if self.regressors is not None:
            tensors["bbox_weight"] = torch.from_numpy(np.ascontiguousarray(self.regressors.weight, np.float32))
            tensors["bbox_bias"] = torch.from_numpy(np.ascontiguousarray(self.regressors.bias, np.float32))
        if self.localisation is not None:
            tensors["iou_weight"] = torch.from_numpy(np.ascontiguousarray(self.localisation.weight, np.float32))
            tensors["iou_bias"] = torch.from_numpy(np.ascontiguousarray(self.localisation.bias, np.float32))
        if self.head is not None:
            tensors.update(self.head.tensors(prefix=HEAD_PREFIX))
        if self.proposal_model is not None:
            tensors.update(self.proposal_model.tensors(prefix=PROPOSAL_PREFIX))
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "mode": self.mode,
            "classes": self.classes,
            "features": {**asdict(self.features), "scales": list(self.features.scales)},
            "levels": list(self.levels),
            "feature_scale": self.svms.feature_scale,
            "regression_scale": self.pool5_scale,
            "head": self.head.metadata() if self.head is not None else None,
            "detect": {k: v for k, v in asdict(self.detect).items() if k != "classes"},  # a run's filter, not the model's
            "proposals": self.proposals,
            "training": self.training,
            "digest": tensor_digest(tensors),
        }
        if self.calibration is not None:  # absent, not null: uncalibrated files stay as they were
            meta["calibration"] = self.calibration.to_json()
        if self.proposal_model is not None:  # absent without one, as for the calibration
            meta["proposal_model"] = self.proposal_model.metadata()
        atomic_write_bytes(path, save(tensors, metadata={"spp": json.dumps(meta)}), sole_writer=True)

    @classmethod
    def load(cls, path: str | Path) -> "Detector":
        """Read a model file.

        Raises:
            ModelError: missing, not a safetensors file, damaged, or another
                format or version; the message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        meta, tensors = read_safetensors(path, "spp model", ModelError)
        if meta is None:
            raise ModelError(f"{path}: not an spp detector (a safetensors file without spp metadata; models come from `spp train-svm`)")
        if not isinstance(meta, dict):
            meta = {}
        if meta.get("format") != MODEL_FORMAT:
            raise ModelError(f"{path}: not an spp detector (format {meta.get('format')!r})")
        if meta.get("version") != MODEL_VERSION:
            raise ModelError(f"{path}: model format version {meta.get('version')} is not supported (this spp reads version {MODEL_VERSION})")
        if "digest" in meta and tensor_digest(tensors) != meta["digest"]:
            raise ModelError(f"{path}: damaged spp model (checksum mismatch)")
        mode = meta.get("mode", "spp")
        if mode not in MODES:
            raise ModelError(f"{path}: unknown feature mode {mode!r} (this spp knows {', '.join(MODES)})")
        try:
            classes = list(meta["classes"])
            # Files without a digest (or re-saved with a new one) are checked here, so that a
            # model that does not fit together is refused on load, not in a matrix product at detection.
            for name in ("svm_weight", "svm_bias", "bbox_weight", "bbox_bias", "iou_weight", "iou_bias"):
                if name in tensors and tensors[name].dtype != torch.float32:
                    raise ValueError(f"{name} is {str(tensors[name].dtype).removeprefix('torch.')}, not float32")
            weight = tensors["svm_weight"].numpy()
            bias = tensors["svm_bias"].numpy()
            if weight.ndim != 2 or weight.shape[0] != len(classes) or bias.shape != (len(classes),):
                raise ValueError("classifier shapes do not match the class list")
            features = CacheSettings.from_json(meta["features"])
            levels = meta["levels"]
            if (not isinstance(levels, list) or not levels
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in levels)):
                raise ValueError(f"levels {json.dumps(levels)} are not a non-empty list of positive whole numbers")
            pool5_width = output_dim(features.channels, tuple(levels))
            regressors = None
            if "bbox_weight" in tensors:
                regressors = BoxRegressors(tensors["bbox_weight"].numpy(), tensors["bbox_bias"].numpy())
                if regressors.weight.ndim != 3 or regressors.weight.shape[0] != len(classes) or regressors.bias.shape != (len(classes), 4):
                    raise ValueError("box regressor shapes do not match the classifiers")
                if regressors.weight.shape[1:] != (pool5_width, 4):
                    raise ValueError(f"bbox_weight is {list(regressors.weight.shape)}, not [{len(classes)}, {pool5_width}, 4]: "
                                     f"the box regressors read pool5, {features.channels} channels x levels {levels}")
            localisation = None
            if "iou_weight" in tensors:
                localisation = IoURegressors(tensors["iou_weight"].numpy(), tensors["iou_bias"].numpy())
                if localisation.weight.shape != (len(classes), pool5_width):
                    raise ValueError(f"iou_weight is {list(localisation.weight.shape)}, not [{len(classes)}, {pool5_width}]: "
                                     f"one row per class, reading pool5, {features.channels} channels x levels {levels}")
                if localisation.bias.shape != (len(classes),):
                    raise ValueError(f"iou_bias is {list(localisation.bias.shape)}, not [{len(classes)}]: one value per class")
            head = Head.from_parts(meta["head"], tensors, str(path), HEAD_PREFIX) if meta.get("head") else None
            proposal_model = None
            if meta.get("proposal_model"):
                from spp_cli.rpn import ProposalModel

                proposal_model = ProposalModel.from_parts(meta["proposal_model"], tensors, str(path), PROPOSAL_PREFIX)
            if head is not None:
                if head.network.fc6.in_features != pool5_width:
                    raise ValueError(f"the head's fc6 is {head.network.fc6.in_features} wide, not {pool5_width}: "
                                     f"it reads pool5, {features.channels} channels x levels {levels}")
                if head.hidden != weight.shape[1]:
                    raise ValueError("classifier length does not match the head's fc7 width")
            elif weight.shape[1] != pool5_width:
                raise ValueError(f"svm_weight is {weight.shape[1]} wide, not {pool5_width}: "
                                 f"the SVMs read pool5, {features.channels} channels x levels {levels}")
            return cls(
                features=features,
                levels=tuple(levels),
                svms=LinearSVMs(classes, weight, bias, float(meta["feature_scale"])),
                regressors=regressors,
                localisation=localisation,
                head=head,
                regression_scale=float(meta["regression_scale"]) if meta.get("regression_scale") is not None else None,
                detect=DetectConfig(**meta.get("detect", {})),
                proposals=dict(meta.get("proposals", {})),
                training=dict(meta.get("training", {})),
                mode=mode,
                calibration=Calibration.from_json(meta["calibration"]) if meta.get("calibration") else None,
                proposal_model=proposal_model,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: damaged spp model ({exc})") from None

    def calibrate(self, calibration: Calibration) -> None:
        """Adopt ``calibration`` and show detections from its display probability on."""
        self.calibration = calibration
        margin = round(calibration.margin_at(calibration.display_probability), 4)
        self.detect = replace(self.detect, display_threshold=margin)

    def probability(self, score: float) -> float | None:
        """A detection's calibrated probability of being right, or ``None`` for an uncalibrated model."""
        return None if self.calibration is None else round(float(self.calibration.probability(score)), 4)

    def detect_config(self, **settings) -> DetectConfig:
        """The model's own detection settings with ``settings`` (a caller's thresholds) replaced:
        what belongs to the model and no flag sets (its objectness weight) is carried, and so is
        a setting given as None (``max_detections``: a caller that sets no cap keeps the model's)."""
        return replace(self.detect, **{name: value for name, value in settings.items() if value is not None})

    def class_indices(self, names: Iterable[str], source: str) -> tuple[int, ...]:
        """The indices of the classes ``names`` (a run's detection filter, ``DetectConfig.classes``).

        Raises:
            ModelError: ``"{source}: has no class 'X' (its classes: ...)"``, naming each missing one.
        """
        names = list(names)
        check_class_names(names, self.classes, source, ModelError)
        return tuple(sorted({self.classes.index(name) for name in names}))

    def foreign_proposals_warning(self, source: str) -> str:
        """What to tell a run that scores other proposals than this model's network's, where
        its scores add that network's objectness (``DetectConfig.objectness_weight``)."""
        return (f"{source}: its scores add its proposal network's objectness ({self.detect.objectness_weight:g} x log sigmoid); "
                "with other proposals they are the SVM margins alone, higher than its thresholds and probabilities expect")

    def margin_at_probability(self, probability: float, source: str) -> float:
        """The SVM margin a detection needs to reach ``probability``: a probability threshold
        as a margin threshold (the same detections pass either)."""
        if self.calibration is None:
            raise ModelError(f"{source}: has no calibrated probabilities (`spp train` fits them where its validation part gives enough detections); threshold the SVM margin (--conf) instead")
        return self.calibration.margin_at(probability)

    # ---------------------------------------------------------------- inference

    def check_features(self, settings: CacheSettings, source: str) -> None:
        """Refuse conv maps computed with other settings than the model was trained on."""
        if settings != self.features:
            raise ModelError(
                f"{source}: features were computed with {settings.describe()}, but the model needs "
                f"{self.features.describe()}; use a cache built with the model's settings"
            )

    @torch.inference_mode()
    def detect_windows(
        self,
        maps: list[torch.Tensor],
        factors: list[float],
        proposals: np.ndarray,
        width: int,
        height: int,
        config: DetectConfig | None = None,
        timings: dict | None = None,
        objectness: np.ndarray | None = None,
    ) -> list[Detection]:
        """Pool, score, regress, suppress: the detections of one image.

        Args:
            maps: ``S`` conv maps ``(C, H_s, W_s)`` of the image.
            factors: their resize factors.
            proposals: ``(R, 4)`` ``xyxy`` original pixels.
            width, height: original image size (for clipping).
            config: thresholds; the model's own by default.
            timings: if given, receives ``pool``, ``classify``, ``nms`` seconds.
            objectness: ``(R,)`` the proposal network's logits of ``proposals``
                (learned proposals): with ``config.objectness_weight`` w, each
                window's class scores gain ``w * log sigmoid(logit)``.
        """
        if self.mode != "spp":
            # Pooling conv maps would give features the classifiers never saw.
            raise ValueError(f"a {self.mode} model scores features of its own kind: use detect_features")
        t0 = time.perf_counter()
        boxes = torch.as_tensor(proposals, dtype=torch.float32)
        pooler = PyramidPooler(maps, factors, boxes, self.alignment, self.levels)
        _add(timings, "pool", time.perf_counter() - t0)
        config = config or self.detect
        prior = None
        if config.objectness_weight and objectness is not None:
            prior = config.objectness_weight * torch.nn.functional.logsigmoid(torch.as_tensor(objectness, dtype=torch.float32))
        return self._detect(pooler.vectors, boxes, width, height, config, timings, prior=prior)

    @torch.inference_mode()
    def detect_features(
        self,
        features: torch.Tensor,
        boxes: torch.Tensor,
        width: int,
        height: int,
        config: DetectConfig | None = None,
        timings: dict | None = None,
    ) -> list[Detection]:
        """Score, regress, suppress, given the unscaled ``(R, D5)`` pool5 window
        features of ``(R, 4)`` ``xyxy`` boxes (however they were computed)."""
        # Looking up rows of given features is no pooling: it counts as classify.
        return self._detect(lambda rows, out=None: features[rows], boxes, width, height, config, timings, rows_stage="classify")

    def _detect(self, pool5_rows, boxes: torch.Tensor, width: int, height: int, config: DetectConfig | None,
                timings: dict | None, rows_stage: str = "pool", prior: torch.Tensor | None = None) -> list[Detection]:
        """Score and regress windows a chunk at a time, then suppress and vote.

        ``pool5_rows(rows, out=None)`` returns the unscaled ``(k, D5)`` pool5
        features of the windows ``rows`` (a slice), optionally into ``out``.
        Working in chunks never holds the ``(R, D5)`` matrix: one reused
        buffer. Each chunk's box deltas for every class are computed beside its
        scores, ``(R, K, 4)`` in all: with many classes nearly every window is
        some class's candidate, and pooling the candidates' windows again
        afterwards cost coco128's 69-class model 80 of its 120 ms of pooling
        per image. The time ``pool5_rows`` takes goes to the ``rows_stage``
        entry of ``timings``. ``prior``: ``(R,)`` added to every class score of
        each window.
        """
        config = config or self.detect
        r = len(boxes)
        scores = torch.empty((r, len(self.classes)), dtype=torch.float32)
        regressors = self.regressors if config.bbox_regression else None
        localisation = self.localisation if config.iou_weight else None
        head = self._detection_head(config.fc6_rank)
        deltas = torch.empty((r, len(self.classes), 4), dtype=torch.float32) if regressors is not None else None
        buffer = None
        pool_seconds = classify_seconds = 0.0
        for s in range(0, r, SCORE_CHUNK):
            e = min(s + SCORE_CHUNK, r)
            t0 = time.perf_counter()
            pool5 = pool5_rows(slice(s, e), out=None if buffer is None else buffer[: e - s])
            if buffer is None and r > SCORE_CHUNK:
                buffer = pool5  # the first chunk is full-sized: reuse its memory
            t1 = time.perf_counter()
            classifier_input = head.fc7(pool5) if head is not None else pool5
            chunk_scores = self.svms.scores(classifier_input, scaled=False)
            if localisation is not None:
                chunk_scores += config.iou_weight * localisation.predict_all(pool5, scale=self.pool5_scale)
            scores[s:e] = chunk_scores.cpu()
            if regressors is not None:
                deltas[s:e] = regressors.predict_all(pool5, scale=self.pool5_scale).cpu()
            pool_seconds += t1 - t0
            classify_seconds += time.perf_counter() - t1
        if prior is not None:
            scores += prior[:, None]
        if config.classes is not None:
            # The other classes take no part: NMS and voting are per class, so the asked classes'
            # detections are those of a run over all, except that max_detections counts them alone.
            others = torch.ones(len(self.classes), dtype=torch.bool)
            others[list(config.classes)] = False
            scores[:, others] = -torch.inf
        t1 = time.perf_counter()
        # With voting, the candidates reach below --conf: boxes then do not
        # depend on it (NMS keeps the same boxes above it either way).
        floor = min(config.score_threshold, config.voting_floor) if config.box_voting else config.score_threshold
        window, cls = torch.nonzero(scores > floor, as_tuple=True)
        kept_scores = scores[window, cls]
        kept_boxes = boxes[window].clone()
        if deltas is not None and len(window):
            kept_boxes = decode(kept_boxes, deltas[window, cls])
        kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clamp(0, width)
        kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clamp(0, height)
        t2 = time.perf_counter()
        classify_seconds += t2 - t1
        keep = top_batched_nms(kept_boxes, kept_scores, cls, config.nms_iou, config.max_detections, config.score_threshold)
        final_boxes = kept_boxes[keep]
        if config.box_voting and len(keep):
            final_boxes = vote_boxes(keep, kept_boxes, kept_scores, cls, config.voting_iou)
        t3 = time.perf_counter()
        _add(timings, rows_stage, pool_seconds)
        _add(timings, "classify", classify_seconds)
        _add(timings, "nms", t3 - t2)
        return [
            Detection([round(float(v), 2) for v in final_boxes[j].tolist()], int(cls[i]), round(float(kept_scores[i]), 4))
            for j, i in enumerate(keep.tolist())
        ]


def _add(timings: dict | None, stage: str, seconds: float) -> None:
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + seconds
