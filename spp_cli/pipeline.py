"""`spp train`'s recommended flow: images -> proposals -> cache -> SVMs (pool5, and fc7 on a
fine-tuned head) -> a choice on validation -> the final model: the chosen candidate itself,
its SVM margins calibrated into probabilities on its own validation detections
(spp_cli.calibration); with ``refit`` the chosen kind is trained again on the whole split.

Every choice is made on a validation part of the *training* data (a
``--val-split``, or a stable fraction of the training split picked by the
sha256 of each image id); the test split is never opened. The steps are
the step commands' own functions (``run_propose``, ``run_cache``,
``run_train_svm``, ``run_finetune``); each writes its output atomically and
is recorded in ``<work>/train-state.json`` when done, so a rerun after an
interruption (Ctrl-C, SIGKILL) skips finished steps and resumes the one it
was in (proposals and the cache per image, fine-tuning per epoch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spp_cli import __version__, ui
from spp_cli.calibration import Calibration
from spp_cli.config import cpu_budget
from spp_cli.data.registry import ALL_IMAGES, dataset_files
from spp_cli.errors import DatasetError, SPPError, UsageError
from spp_cli.fileio import atomic_write_json, check_not_in_cache, check_not_input, check_writable, file_stamp

STATE_FORMAT = "spp-train-state"
# Version 2 holds part of --negatives out for validation; a version-1 state's steps were
# fitted on all of them, so they are redone rather than resumed.
STATE_VERSION = 2
FEATURE_CHOICES = ("auto", "pool5", "fc7")
PROPOSAL_CHOICES = ("auto", "learned", "selective-search")
# A class whose median box spans fewer cells of the feature map than SMALL_OBJECT_CELLS at
# BASE_SCALE is small: `--scales auto` (the default) then trains on a finer map as well (the
# backbone's stride-16 cut at BASE_SCALE, or LARGER_SCALE for a backbone without one) and keeps
# the map of higher validation mAP. Neither map wins everywhere (see scale_alternatives); raccoon's
# smallest median box is 565 px, so it trains at 688 alone (benchmarks/README.md, "Scale").
BASE_SCALE = 688
LARGER_SCALE = 1024
SMALL_OBJECT_CELLS = 2.0
MIN_CLASS_BOXES = 3  # classes with fewer boxes have no median worth the name
# A model that proposes with its own network is validated with and without this weight of the
# windows' log objectness in their scores (DetectConfig.objectness_weight), and keeps the higher.
# On the validation parts, 0.25 / 0.5 / 1 gave bccd's stride-16 candidate 0.904 / 0.905 / 0.905
# (0.875 without) and raccoon's 0.807 / 0.807 / 0.795 (0.909 without).
OBJECTNESS_WEIGHT = 0.5


@dataclass(frozen=True)
class TrainPlan:
    """What `spp train` was asked to do: everything a resumed run must match."""

    data: str
    split: str
    val_split: str | None = None
    val_fraction: float = 0.1
    scales: str = "auto"  # see scale_alternatives
    # pool5: SVMs on SPP vectors. auto: also a head fine-tuned on the chosen map and SVMs on its
    # fc7, and whichever has the higher validation mAP (fc7 alone: the head on every map). auto
    # (at --epochs 10) against pool5, benchmarks/vs_faster_rcnn.py: test raccoon 0.875 both
    # (pool5 kept), bccd 0.866 -> 0.881 (0.889 with fc6 at rank 512: DetectConfig.fc6_rank),
    # coco128 0.151 -> 0.153 (0.147); training 87 -> 209, 405 -> 555, 365 -> 493 s; coco128's
    # detection 0.91 -> 1.54 s per image (1.36-1.42 at rank 512; fc6 over ~1,900 windows):
    # slower on every dataset, so not the default (benchmarks/README.md, "What was tried").
    features: str = "pool5"
    finetune_epochs: int = 30
    backbone: str = "efficientnet_lite0"
    negatives: tuple[str, ...] = ()  # background images (no object of any class): negatives for the SVMs and the fine-tuning
    # learned: a proposal network trained on the cached maps gives the SVMs' training windows and
    # travels in the model (validation mAP, raccoon 0.904 vs 0.849 with selective search, bccd 0.692
    # vs 0.670). selective-search: the paper's proposals. auto: the network where it finds the
    # validation objects (recall@0.5, 300 boxes) at least as often as selective search does; on
    # coco128 (86 training images, 80 classes) it found 0.42 of the test boxes, selective search 0.79.
    proposals: str = "auto"
    # False: the model is the validated candidate (fitted on the fit part), so its validation
    # mAP and probabilities describe it, and the SVMs are mined once; True: the chosen kind is
    # mined again on the whole split (the validation images too), which costs that step again.
    refit: bool = False
    # The SVMs' positives: ground truth and the windows overlapping it by at least this much
    # (SVMConfig.positive_iou; 0: ground truth only, R-CNN's protocol).
    positive_iou: float = 0.7
    # The SVMs' C with those positives (SVMConfig.C, 0.1, was measured with the ground truth
    # alone). Their SVM step on the validation parts, C 0.01 / 0.03 / 0.1 / 0.3 / 1: raccoon
    # 0.837 / 0.850 / 0.850 / 0.850 / 0.852, bccd's stride-16 cut 0.898 / 0.893 / 0.885 / 0.862
    # / 0.860, coco128 0.070 / 0.121 / 0.070 / 0.076 / 0.048 (benchmarks/README.md, "SVM
    # regularisation"): 0.03 is at least 0.1's on all three.
    svm_c: float = 0.03

    def fingerprint(self) -> dict:
        """The plan as it reads back from train-state.json (JSON types: lists, not tuples)."""
        plan = {**asdict(self), "data": str(Path(self.data).resolve()) if Path(self.data).exists() else self.data}
        return json.loads(json.dumps(plan))


@dataclass
class Split:
    """The training split divided into the part models are fitted on and the validation part."""

    fit_ids: list[str]
    val_ids: list[str]
    how: str  # a sentence for the summary and the model's metadata


def id_rank(image_id: str) -> int:
    """A stable pseudo-random number for an image id (sha256): the order validation images are drawn in."""
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:16], 16)


def split_for_validation(train_ids: list[str], val_ids: list[str] | None, val_fraction: float) -> Split:
    """``val_ids`` when given (a ``--val-split``), else the ``round(fraction * n)`` training ids of
    lowest sha256 rank (at least one; the same images on every rerun, whatever the list order).

    Raises:
        DatasetError: too few images to hold any out.
    """
    if val_ids is not None:
        overlap = set(train_ids) & set(val_ids)
        fit = [i for i in train_ids if i not in overlap]
        if not fit or not val_ids:
            raise DatasetError("the training and validation splits must each have images of their own")
        return Split(fit, list(val_ids), f"validation split: {len(val_ids)} image(s)")
    if len(train_ids) < 2:
        raise DatasetError(f"{len(train_ids)} training image(s): at least 2 are needed to hold one out for validation")
    held = _held_out(train_ids, val_fraction, id_rank)
    return Split([i for i in train_ids if i not in held], [i for i in train_ids if i in held],
                 f"validation: {len(held)} of the split's {len(train_ids)} image(s) (a {val_fraction:g} fraction, by sha256 of the image id)")


def _held_out(items: list, fraction: float, rank: Callable) -> set:
    """The ``round(fraction * n)`` items of lowest ``rank`` (at least one, never all; n >= 2)."""
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    return set(sorted(items, key=rank)[:count])


@dataclass
class TrainState:
    """``<work>/train-state.json``: the plan and each finished step's results."""

    path: Path
    plan: dict
    steps: dict[str, dict] = field(default_factory=dict)

    # True where the folder held another plan's state (other settings or data): set aside, its steps redone.
    replaced: bool = False

    @classmethod
    def load_or_new(cls, path: Path, plan: dict) -> "TrainState":
        if path.is_file():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = None
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                ui.warn(f"{path}: not a readable spp train state (damaged, or another file); its finished steps are redone")
                return cls(path, plan, replaced=True)
            if doc.get("format") == STATE_FORMAT and doc.get("version") == STATE_VERSION and doc.get("plan") == plan:
                return cls(path, plan, dict(doc.get("steps", {})))
            old = doc.get("plan")
            if isinstance(old, dict) and old.get("contents") != plan.get("contents") and \
                    {k: v for k, v in old.items() if k != "contents"} == {k: v for k, v in plan.items() if k != "contents"}:
                why = "on other contents of the data (its images, ground truth or background images)"
            else:
                why = "with other settings"
            ui.warn(f"{path}: left by a run {why}; its finished steps are redone")
            return cls(path, plan, replaced=True)
        return cls(path, plan)

    def done(self, step: str, *outputs: Path) -> dict | None:
        """The recorded results of ``step`` if it finished and its outputs are still there."""
        result = self.steps.get(step)
        return result if result is not None and all(p.exists() for p in outputs) else None

    def record(self, step: str, result: dict) -> None:
        self.steps[step] = result
        atomic_write_json(self.path, {"format": STATE_FORMAT, "version": STATE_VERSION, "plan": self.plan, "steps": self.steps}, indent=2)


@dataclass
class TrainResult:
    """What `spp train` made and why: for the summary and the model's metadata."""

    features: str
    reason: str
    val_map: dict[str, float]
    val_ap: dict[str, dict[str, float]]
    split: Split
    seconds: dict[str, float]
    calibration: Calibration | None = None  # of the final model; None: too few validation outcomes
    proposals: str = ""  # which proposals the model uses, and why
    scales: str = ""  # the cache's scales and the size of the smallest objects on its map
    skipped_at: tuple[str, ...] = ()  # the steps that skipped inputs (each listed them), this run or the one it resumes


def classes_held_out(classes: list[str], fit: list, val: list) -> list[str]:
    """The classes with a usable box (neither difficult nor crowd) in the validation records
    ``val`` and none in the fit records ``fit``: the SVMs get no positive of them."""
    def usable(records) -> set[str]:
        return {classes[label] for r in records for label, hard, crowd in zip(r.labels, r.difficult, r.iscrowd) if not hard and not crowd}

    in_fit, in_val = usable(fit), usable(val)
    return [name for name in classes if name in in_val and name not in in_fit]


def contents_fingerprint(train_set, val_set=None, backgrounds: list[Path] = ()) -> dict:
    """What the run trains and validates on, as train-state.json records it (a resume must match
    it): the image count and a sha256 over each record of the training split (and of a named
    validation split) in image-id order: its id, its ground truth (boxes, class names,
    difficult, crowd), its size, and its image file's identity, then each background image's
    identity and each annotation the reader could not use. An image file's identity is its path,
    size and modification time (what make and rsync go by): it costs a stat, where a hash of its
    bytes (the cache's key) would read every image on every rerun; an edited or replaced image
    gets a new time, and a touched one only redoes the steps (the cache, keyed by content, is
    reused). Annotations count by what was read from them, so touching one changes nothing."""
    digest = hashlib.sha256()

    def identity(path: Path) -> list:
        return [str(Path(path).absolute()), file_stamp(path)]

    def add(item) -> None:
        digest.update(json.dumps(item, separators=(",", ":")).encode("utf-8") + b"\n")

    count = 0
    for part, dataset in (("train", train_set), ("validation", val_set)):
        if dataset is None:
            continue
        add([part, list(dataset.classes)])
        for record in sorted(dataset.records, key=lambda r: r.image_id):
            add([record.image_id, identity(record.path), record.width, record.height,
                 [[float(v) for v in box] for box in record.boxes.tolist()],
                 [dataset.classes[int(label)] for label in record.labels],
                 [bool(v) for v in record.difficult], [bool(v) for v in record.iscrowd]])
        add([part, "unusable", sorted([str(path), str(problem)] for path, problem in dataset.bad)])
        count += len(dataset.records)
    add(["backgrounds", sorted(identity(path) for path in backgrounds)])
    return {"images": count, "backgrounds": len(backgrounds), "sha256": digest.hexdigest()}


# The steps of spp train that checkpoint: their outputs in a map's folder (spp_cli.finetune.checkpoint_path).
CHECKPOINTED_OUTPUTS = ("proposals.safetensors", "head.safetensors")


def discard_step_checkpoints(folders: list[Path]) -> list[Path]:
    """Delete the checkpoints of :data:`CHECKPOINTED_OUTPUTS` in this run's map ``folders``: a
    set-aside state's, which would refuse this plan's steps (other images or settings). Nothing
    else is touched: the caches are keyed by content and reused, and the step outputs are
    rewritten by their steps. The paths deleted."""
    from spp_cli.finetune import checkpoint_path

    removed = []
    for folder in folders:
        for output in CHECKPOINTED_OUTPUTS:
            path = checkpoint_path(folder / output)
            if path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                except OSError as exc:
                    raise SPPError(f"{path}: cannot delete the checkpoint of a run with other data or settings ({exc.strerror or exc})") from None
                removed.append(path)
    return removed


def split_backgrounds(paths: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """``--negatives`` divided like the training split: ``(fit, held out)``, the held-out part the
    ``round(fraction * n)`` images of lowest rank of their sha256 (at least one, never all; none of
    a single image). The same files on every rerun, wherever they lie and in whatever order."""
    from spp_cli.cache import image_key

    def rank(path: Path) -> int:
        try:
            return id_rank(image_key(path))
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read file ({exc.strerror or exc})") from None

    if len(paths) < 2:
        return list(paths), []
    held = _held_out(paths, val_fraction, rank)
    return [p for p in paths if p not in held], [p for p in paths if p in held]


def validation_results(model_path: Path, cache_dir: Path, records: list, backgrounds: list[Path] = (),
                       objectness_weight: float | None = None) -> tuple[float, dict[str, float], dict | None]:
    """VOC07 mAP, per-class AP and the margin calibration (JSON, or ``None`` when the outcomes
    cannot support one) of a model on cached validation images, with the detector's own default
    thresholds, box regression and voting: what `spp detect` then `spp eval` give.

    ``backgrounds`` are held-out background images: every detection on them is wrong, in the
    AP (a false positive ranked among the others) and in the calibration alike. ``objectness_weight``
    scores with that weight instead of the model's own (``DetectConfig.objectness_weight``)."""
    import numpy as np

    from spp_cli.cache import FeatureCache, image_key
    from spp_cli.calibration import detection_outcomes, fit_calibration
    from spp_cli.evaluate import GroundTruthImage, evaluate_voc
    from spp_cli.model import Detector

    detector = Detector.load(model_path)
    cache = FeatureCache.open(cache_dir)
    config = detector.detect_config(objectness_weight=objectness_weight)

    def detections(path: Path) -> list[dict]:
        entry = cache.read(image_key(path))
        proposals, objectness = entry.proposals, None
        if detector.proposal_model is not None:  # as `spp detect` proposes with it by default
            proposals, objectness = detector.proposal_model.propose(entry.maps, entry.factors, entry.width, entry.height)
        dets = detector.detect_windows(entry.maps, entry.factors, proposals, entry.width, entry.height, config, objectness=objectness)
        return [{"box": d.box, "class": detector.classes[d.class_id], "score": d.score} for d in dets]

    pairs = [(GroundTruthImage.from_record(record, classes), detections(record.path)) for record, classes in records]
    nothing = GroundTruthImage(np.zeros((0, 4), np.float32), [], np.zeros(0, bool), np.zeros(0, bool))
    pairs += [(nothing, detections(path)) for path in backgrounds]
    classes = [c for c in records[0][1] if c in detector.classes] if records else []
    result = evaluate_voc(pairs, classes, "voc07")
    per_class = {k: (None if math.isnan(v) else round(v, 6)) for k, v in result.per_class.items()}
    calibration = fit_calibration(*detection_outcomes(pairs, classes), images=len(pairs))
    mean = 0.0 if math.isnan(result.mean_ap) else float(result.mean_ap)
    return mean, per_class, (calibration.to_json() if calibration is not None else None)


def choose_proposals(cache, proposal_model: Path, val_records: list, searched: dict | None = None) -> dict:
    """Learned proposals where they find the validation objects at IoU 0.5 at least as often as
    selective search (run here on those images only, with `spp propose`'s default settings); the
    figures and a sentence on why. ``searched`` (image path as a string -> its
    :class:`~spp_cli.proposals.ImageProposals`) keeps selective search's results for the next
    call and for the search of every image: they are the image's, whatever the cache's scale."""
    from spp_cli.cache import image_key
    from spp_cli.proposals import ProposalParams, ProposalTask, TaskFailure, run_proposals
    from spp_cli.rpn import ProposalModel, recall

    searched = {} if searched is None else searched
    # Selective search on a process per core (the boxes do not depend on the process: each
    # image's search is seeded on its own, spp_cli.proposals).
    pending = [record for record, _ in val_records if str(record.path) not in searched]
    tasks = [ProposalTask(record.image_id, str(record.path)) for record in pending]
    stamps = {task.path: file_stamp(task.path) for task in tasks}  # as `spp propose` records them in props.json
    for found, record in zip(run_proposals(tasks, ProposalParams(), cpu_budget()), pending):  # in task order
        if isinstance(found, TaskFailure):
            raise DatasetError(found.message)
        found.file = stamps[found.path]
        searched[str(record.path)] = found
    model = ProposalModel.load(proposal_model)
    learned, from_search, truth = [], [], []
    for record, _ in val_records:
        entry = cache.read(image_key(record.path))
        truth.append(record.boxes[~record.iscrowd])
        learned.append(model.propose(entry.maps, entry.factors, entry.width, entry.height)[0])
        from_search.append(searched[str(record.path)].boxes)
    ours, theirs = recall(learned, truth, 0.5), recall(from_search, truth, 0.5)
    count = round(sum(len(b) for b in from_search) / max(len(from_search), 1))
    choice = "learned" if not ours < theirs else "selective-search"  # a NaN (no validation box) keeps the learned ones
    reason = (f"Proposals: {choice} (validation recall@0.5: learned {ours:.3f} at {model.config.top_n} boxes, "
              f"selective search {theirs:.3f} at {count})")
    return {"choice": choice, "reason": reason, "learned_recall@0.5": round(ours, 4), "selective_search_recall@0.5": round(theirs, 4)}


def smallest_class(records: list, classes: list[str], side: int) -> tuple[str, float] | None:
    """The class whose median box side (sqrt of the area) is smallest after resizing each image's
    short side to ``side``, and that median in pixels; ``None`` without boxes. Classes with fewer
    than ``MIN_CLASS_BOXES`` boxes count only when no class has that many; crowd boxes never.
    Only the given (training) records are read: boxes and sizes, no pixels."""
    import numpy as np

    sides: dict[int, list[float]] = {}
    for record in records:
        if not record.width or not record.height or not len(record.boxes):
            continue
        boxes, labels = record.boxes[~record.iscrowd], record.labels[~record.iscrowd]
        widths, heights = np.clip(boxes[:, 2] - boxes[:, 0], 0, None), np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        for label, value in zip(labels, np.sqrt(widths * heights) * side / min(record.width, record.height)):
            sides.setdefault(int(label), []).append(float(value))
    counted = {k: v for k, v in sides.items() if len(v) >= MIN_CLASS_BOXES} or sides  # a median needs a few boxes
    if not counted:
        return None
    label, median = min(((k, float(np.median(v))) for k, v in counted.items()), key=lambda kv: kv[1])
    return classes[label], median


def _size_phrase(size: tuple[str, float], stride: int, side: int | None = None) -> str:
    name, median = size
    at = f" at {side}" if side is not None else ""
    return f"the smallest class's median box, {name}, is {median:.0f} px{at}: {median / stride:.1f} cells of the stride-{stride} map"


def _smaller_objects_hint(backbone: str, side: int) -> str:
    """Where small objects may be found better than on ``backbone``'s map at short side ``side``,
    and that `--scales auto` tries it ("" where there is nothing finer to point to)."""
    from spp_cli.backbones import get_spec

    spec = get_spec(backbone)
    if spec.finer is not None:
        finer = get_spec(spec.finer)
        where = f"on the stride-{finer.stride} cut, --backbone {finer.name}"
    elif side < LARGER_SCALE:
        where = f"at --scales {LARGER_SCALE}"
    else:
        return ""
    return f"; small objects may be found better {where} (--scales auto tries it where they are this small)"


def scale_note(records: list, classes: list[str], scales: tuple[int, ...], backbone: str) -> str:
    """``Scale: <scales>`` and the size of the smallest objects on ``backbone``'s feature map (see
    ``smallest_class``) at the largest of ``scales``, in pixels and in map cells; where that is
    under ``SMALL_OBJECT_CELLS`` cells, a pointer to the finer map ``--scales auto`` would try
    (:func:`scale_alternatives`), if there is one."""
    from spp_cli.backbones import get_spec

    stride = get_spec(backbone).stride
    side = max(scales)
    size = smallest_class(records, classes, side)
    text = f"Scale: {','.join(map(str, scales))}"
    if size is None:
        return text
    text += f" ({_size_phrase(size, stride)})"
    if size[1] / stride < SMALL_OBJECT_CELLS:
        text += _smaller_objects_hint(backbone, side)
    return text


@dataclass(frozen=True)
class FeatureMap:
    """One feature map `spp train` may train a candidate on: cache scales (short sides, as
    ``--scales`` writes them) on a backbone cut. ``label`` names it in step names and lines: the
    scales, with the cut where it is not ``--backbone``'s."""

    scales: str
    backbone: str
    label: str


@dataclass(frozen=True)
class ScalePlan:
    """The feature maps `spp train` trains at (each a candidate for the final model), the line
    that says so, and the size of the smallest objects at the first ("" without boxes)."""

    alternatives: list[FeatureMap]
    line: str
    size: str = ""

    def chosen(self, scores: dict[str, float], chosen: str) -> str:
        """The Scale line once validation has chosen (``scores`` and ``chosen`` by label): each
        alternative's validation mAP."""
        if len(self.alternatives) == 1:
            return self.line
        figures = ", ".join(f"{feature_map.label}: {scores[feature_map.label]:.3f}" for feature_map in self.alternatives)
        return f"Scale: {chosen} (validation mAP {figures}" + (f"; {self.size})" if self.size else ")")


def scale_alternatives(text: str, records: list, classes: list[str], backbone: str) -> ScalePlan:
    """What ``--scales`` asks of `spp train` on ``backbone``: one scale set (``688``,
    ``480,576,688,864,1200``), alternatives separated by ``/`` (``688/1024``), or ``auto``:
    ``BASE_SCALE`` and, where the smallest class's median box spans under ``SMALL_OBJECT_CELLS``
    cells of the map at ``BASE_SCALE``, a finer map as well: the backbone's cut at half the stride
    (``BackboneSpec.finer``) at ``BASE_SCALE``, or ``LARGER_SCALE`` for a backbone without one.

    Why the finer cut before the larger scale: on the validation part of bccd's training split
    (Platelets' median box 57 px at 688, 1.8 cells at stride 32) Lite0's stride-16 cut at 688
    gave 0.875 mAP against 0.694 for the default cut at 688 and 0.845 at 1024, in a third of the
    1024 run's time; on coco128's (its smallest class 16 px) the default cut at 688 kept the lead:
    0.078 against 0.057 for the stride-16 cut and 0.042 at 1024 (benchmarks/README.md, "Scale").

    Raises:
        SPPError: a part is not a scale set (the message names it).
        UsageError: two parts are the same.
    """
    from spp_cli.backbones import get_spec
    from spp_cli.config import parse_scales

    spec = get_spec(backbone)

    def on_backbone(scales: str) -> FeatureMap:
        return FeatureMap(scales, backbone, scales)

    if text == "auto":
        size = smallest_class(records, classes, BASE_SCALE)
        base = on_backbone(str(BASE_SCALE))
        if size is None or size[1] / spec.stride >= SMALL_OBJECT_CELLS:
            return ScalePlan([base], scale_note(records, classes, (BASE_SCALE,), backbone))
        phrase = _size_phrase(size, spec.stride, BASE_SCALE)
        under = f"{phrase}, under {SMALL_OBJECT_CELLS:g}"
        if spec.finer is not None:
            finer = get_spec(spec.finer)
            return ScalePlan([base, FeatureMap(str(BASE_SCALE), finer.name, f"{BASE_SCALE} on {finer.name}")],
                             f"Scale: {BASE_SCALE} on {backbone} and on its stride-{finer.stride} cut {finer.name}, "
                             f"the one of higher validation mAP ({under})", phrase)
        return ScalePlan([base, on_backbone(str(LARGER_SCALE))],
                         f"Scale: {BASE_SCALE} and {LARGER_SCALE}, the one of higher validation mAP ({under})", phrase)
    parts = [",".join(map(str, parse_scales(part))) for part in text.split("/")]
    if len(set(parts)) < len(parts):
        raise UsageError(f"--scales {text}: each alternative must differ from the others")
    if len(parts) == 1:
        return ScalePlan([on_backbone(parts[0])], scale_note(records, classes, tuple(int(v) for v in parts[0].split(",")), backbone))
    side = max(int(v) for v in parts[0].split(","))
    size = smallest_class(records, classes, side)
    phrase = _size_phrase(size, spec.stride, side) if size else ""
    return ScalePlan([on_backbone(part) for part in parts],
                     f"Scale: {' and '.join(parts)}, the one of higher validation mAP" + (f" ({phrase})" if phrase else ""), phrase)


def map_folder(feature_map: FeatureMap, backbone: str) -> str:
    """The work folder's subfolder of a feature map other than the first: ``scale-<scales>``, with
    the cut's name in front where it is not ``backbone`` (``--backbone``'s)."""
    scales = "scale-" + feature_map.scales.replace(",", "-")
    return scales if feature_map.backbone == backbone else f"{feature_map.backbone}-{scales}"


def choose_features(val_map: dict[str, float]) -> tuple[str, str]:
    """The SVM input with the higher validation mAP; pool5 on a tie (no head to run at detection)."""
    if "fc7" not in val_map:
        return "pool5", f"pool5 only (validation mAP {val_map['pool5']:.3f})"
    pool5, fc7 = val_map["pool5"], val_map["fc7"]
    if fc7 > pool5:
        return "fc7", f"fc7 (validation mAP {fc7:.3f}) over pool5 ({pool5:.3f})"
    return "pool5", f"pool5 (validation mAP {pool5:.3f}) over fc7 ({fc7:.3f})"


def run_train(plan: TrainPlan, out: Path, work: Path | None, cache_dir: Path | None, gpu: bool = False,
              step_banner: Callable[[int, int, str], None] | None = None) -> tuple[int, TrainResult | None]:
    """The whole flow; (exit code, result). Resumes from ``<work>/train-state.json``."""
    # No torch op runs before the selective-search workers fork (torch's thread pools start with the first op).
    from spp_cli.commands.propose import run_propose
    from spp_cli.data import open_dataset
    from spp_cli.shard import under_torchrun
    from spp_cli.sources import Source, Sources

    if under_torchrun():
        # Its steps share one state file and choose on rank 0's validation;
        # the step commands themselves run over ranks (docs/scale-out.md).
        raise UsageError("spp train runs as one process; under torchrun run its steps (propose, cache, finetune, train-svm) as in docs/scale-out.md")
    if plan.features not in FEATURE_CHOICES:
        raise UsageError(f"--features must be one of {', '.join(FEATURE_CHOICES)}")
    check_writable(out)
    # The dataset's annotation file, split lists and background lists are read again on a resume.
    check_not_input(out, [*dataset_files(plan.data, plan.split), *([plan.val_split] if plan.val_split else []), *plan.negatives])
    work = work if work is not None else out.with_name(out.stem + ".work")
    cache_dir = cache_dir if cache_dir is not None else work / "feats"
    check_not_in_cache(out, cache_dir)

    # Only the training split (and a validation split, when named) is opened: never the test split.
    train_set = open_dataset(plan.data, plan.split)
    val_set = open_dataset(plan.data, plan.val_split) if plan.val_split else None
    if not train_set.records:
        raise DatasetError(f"{plan.data}: no usable images in split '{plan.split}'")
    if plan.split == ALL_IMAGES and train_set.format != "coco":  # a COCO JSON is one split; the others hold their test split
        ui.warn(f"--split {ALL_IMAGES}: training on every image of {plan.data}, its test split's too; score the model on other images")
    if not any(len(record.boxes) for record in train_set.records):  # found here, not by its fourth step
        where = f" of split '{plan.split}'" if plan.split else ""
        raise DatasetError(f"{plan.data}: the {len(train_set.records)} image(s){where} hold no ground-truth box; nothing to train on")
    try:  # made once the data is found usable: a run refused for its data leaves no empty folder
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # as FeatureCache says of a --cache folder it cannot create
        raise SPPError(f"{work}: cannot create work folder ({exc.strerror or exc})") from None
    background: list[Path] = []
    if plan.negatives:
        from spp_cli.train import negative_images

        background = negative_images(plan.negatives)
    # The plan names the data and split by path; what they hold is part of it too, so that a
    # state of other images or ground truth is set aside like one of other settings.
    contents = contents_fingerprint(train_set, val_set, background)
    state = TrainState.load_or_new(work / "train-state.json",
                                   {**plan.fingerprint(), "cache": str(cache_dir.resolve()), "spp": __version__, "contents": contents})
    split = split_for_validation([r.image_id for r in train_set.records],
                                 [r.image_id for r in val_set.records] if val_set is not None else None, plan.val_fraction)
    records = {r.image_id: (r, train_set.classes) for r in train_set.records}
    if val_set is not None:
        held = set(split.val_ids)
        records.update({r.image_id: (_relabel(r, val_set.classes, train_set.classes), train_set.classes)
                        for r in val_set.records if r.image_id in held})
    items = [Source(i, records[i][0].path, records[i][0]) for i in split.fit_ids + split.val_ids]
    held_only = classes_held_out(train_set.classes, [records[i][0] for i in split.fit_ids], [records[i][0] for i in split.val_ids])
    if val_set is not None:  # its boxes of a class the training split lacks are dropped (_relabel): say which
        outside = [name for name in val_set.classes if name not in train_set.classes]
        if outside:
            ui.warn(f"class(es) {', '.join(outside)} of --val-split {plan.val_split} are in no training image: not trained, not validated")
    if held_only and not plan.refit:
        ui.warn(f"class(es) {', '.join(held_only)}: every box is in the held-out validation images, so the model will not detect them "
                "(--refit trains on every image)")
    fit_backgrounds: tuple[str, ...] = ()  # --negatives the models are trained with
    val_backgrounds: list[Path] = []  # and those held out with the validation images
    if plan.negatives:
        # No record: cached without ground truth, used only as negatives. A part is held out
        # with the validation images, so that validation sees what the negatives are for.
        items += [Source(f"negative:{path.as_posix()}", path) for path in background]
        fit, val_backgrounds = split_backgrounds(background, plan.val_fraction)
        fit_backgrounds = tuple(str(path) for path in fit)
        if val_backgrounds:
            split = dataclasses.replace(split, how=f"{split.how}, with {len(val_backgrounds)} of the {len(background)} background image(s)")
    bad = list(train_set.bad) + (list(val_set.bad) if val_set is not None else [])
    # The dataset's warnings (boxes clipped, dropped) once, here: each step would say them again.
    ui.print_warnings(list(train_set.warnings) + (list(val_set.warnings) if val_set is not None else []))

    def sources() -> Sources:
        # A fresh object per step: a step may rewrite its list of problems (the skipped inputs are
        # listed by each step that skips them, for its exit code).
        return Sources(list(items), train_set, list(bad), [])

    if plan.proposals not in PROPOSAL_CHOICES:
        raise UsageError(f"--proposals must be one of {', '.join(PROPOSAL_CHOICES)}")
    scale_plan = scale_alternatives(plan.scales, [records[i][0] for i in split.fit_ids], train_set.classes, plan.backbone)
    ui.say(scale_plan.line)
    alternatives = scale_plan.alternatives
    several = len(alternatives) > 1

    def at(name: str, label: str) -> str:
        """A step's (or candidate's) name: with the feature map it is trained on, when several are tried."""
        return f"{name} at {label}" if several else name

    learned = plan.proposals != "selective-search"  # the cache first, then the proposal network
    per_scale = ["cache", "proposal network"] + (["proposals"] if plan.proposals == "auto" else []) if learned else ["cache"]
    per_scale += (["SVMs on pool5"] if plan.features != "fc7" else []) + (["fine-tuning", "SVMs on fc7"] if plan.features == "fc7" else [])
    # auto: the head is fine-tuned once, on the map whose pool5 SVMs validate best (listed by
    # these names; run, and recorded, under the chosen map's).
    last = ["fine-tuning", "SVMs on fc7"] if plan.features == "auto" else []
    steps = ([] if learned else ["proposals"]) + [at(name, feature_map.label) for feature_map in alternatives for name in per_scale] + last + ["final model"]
    seconds: dict[str, float] = {}

    def step(name: str, listed: str | None = None) -> None:
        """The banner of step ``name``, counted at ``listed`` (default: its own name) in ``steps``."""
        (step_banner or _banner)(steps.index(listed or name) + 1, len(steps), name)

    def timed(name: str, action: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        result = action()
        result["seconds"] = round(time.perf_counter() - start, 2)
        state.record(name, result)
        return result

    # Selective search's boxes are the image's, whatever the scale: one file for every scale
    # (`spp propose` run again over it reuses the boxes of unchanged images).
    props = work / "props.json"

    # Selective search on the validation images (path -> ImageProposals): run by the first
    # choice of proposals, for every scale's choice and for the search of every image.
    searched_val: dict = {}

    def search_all() -> int:
        return run_propose((), None, None, props, "fast", None, None, None, None, cpu_budget(), False, shard="0/1", sources=sources(),
                           searched=searched_val)

    if not learned:
        step("proposals")
        result = state.done("proposals", props) or timed("proposals", lambda: {"code": search_all()})
        seconds["proposals"] = result["seconds"]
    from spp_cli.backbones import get_spec
    from spp_cli.cache import FeatureCache, image_key
    from spp_cli.commands.cache import run_cache
    from spp_cli.commands.finetune import run_finetune
    from spp_cli.commands.train_svm import run_train_svm

    def train_at(feature_map: FeatureMap, folder: Path, feats: Path, finer_feats: Path | None = None) -> ScaleRun:
        """The flow's steps on one feature map, their files in ``folder``; the cache in ``feats``
        (and, from the same forward passes, the cache of its backbone's finer cut in ``finer_feats``)."""
        label = feature_map.label
        run = ScaleRun(label, feats, folder / "proposals.safetensors" if learned else None, folder / "head.safetensors",
                       {kind: folder / f"val-{kind}.safetensors" for kind in ("pool5", "fc7")},
                       proposal_choice={"choice": "learned" if learned else "selective-search", "reason": f"--proposals {plan.proposals}"})
        name = at("cache", label)
        step(name)

        def build_cache(boxes: Path | None, **how) -> int:
            return run_cache((), None, None, feats, boxes, feature_map.backbone, None, feature_map.scales, 2000, "fp16", gpu, shard="0/1", sources=sources(), **how)

        result = state.done(name, feats) or timed(name, lambda: {"code": build_cache(None if learned else props, selective_search=not learned,
                                                                                      finer_cache=finer_feats)})
        seconds[name] = result["seconds"]

        cache = FeatureCache.open(feats)
        key_of = {cache.metadata(k).get("image_id"): k for k in cache.keys()}
        run.fit_keys = [key_of[i] for i in split.fit_ids if i in key_of]
        run.val_records = [records[i] for i in split.val_ids if i in key_of]
        run.val_keys = [key_of[r.image_id] for r, _ in run.val_records]
        held_backgrounds = [path for path in val_backgrounds if cache.has(image_key(path))]  # unreadable ones were listed
        if not run.fit_keys or not run.val_records:
            raise DatasetError(f"{feats}: no cached image to {'fit on' if not run.fit_keys else 'validate on'} (see the problems listed above)")

        if learned:
            from spp_cli.commands.train_proposals import run_train_proposals

            name = at("proposal network", label)
            step(name)
            result = state.done(name, run.proposal_model) or timed(name, lambda: {"code": run_train_proposals(
                feats, run.proposal_model, None, None, 16, 300, gpu, keys=run.fit_keys)})
            seconds[name] = result["seconds"]
        if plan.proposals == "auto":
            name = at("proposals", label)
            step(name)

            def choose_and_search() -> dict:
                choice = choose_proposals(cache, run.proposal_model, run.val_records, searched_val)
                ui.say(choice["reason"])
                if choice["choice"] == "selective-search":
                    # Every image's boxes, then the cache's entries take them (no forward pass). A search
                    # that skipped inputs (exit code 1, listed) still wrote the others' boxes: the cache takes them.
                    searched = search_all()
                    choice["code"] = build_cache(props) or searched
                return choice

            run.proposal_choice = state.done(name) or timed(name, choose_and_search)
            seconds[name] = run.proposal_choice["seconds"]
            if run.proposal_choice["choice"] == "selective-search":
                run.proposal_model = None

        def svm_step(kind: str, listed: str | None = None) -> None:
            name = at(f"SVMs on {kind}", label)
            step(name, listed)
            candidate = run.candidates[kind]

            def action() -> dict:
                run_train_svm(feats, candidate, None, None, None, plan.svm_c, True, kind, run.head if kind == "fc7" else None, keys=run.fit_keys,
                              negatives=fit_backgrounds, proposal_model_path=run.proposal_model, positive_iou=plan.positive_iou)
                mean, per_class, calibration = validation_results(candidate, feats, run.val_records, held_backgrounds)
                also = f" and {len(held_backgrounds)} background image(s)" if held_backgrounds else ""
                plain, weight, weighted = mean, 0.0, ""
                if run.proposal_model is not None:  # it proposes with its network: its objectness may help the score
                    with_term = validation_results(candidate, feats, run.val_records, held_backgrounds, OBJECTNESS_WEIGHT)
                    if with_term[0] > mean:
                        (mean, per_class, calibration), weight = with_term, OBJECTNESS_WEIGHT
                        set_objectness_weight(candidate, weight)
                    weighted = (f"; with {OBJECTNESS_WEIGHT:g} x log objectness {with_term[0]:.3f}, "
                                f"{'kept' if weight else 'not kept'}")
                ui.say(f"validation mAP ({at(kind, label)}): {plain:.3f} on {len(run.val_records)} image(s){also}{weighted}")
                return {"val_map": mean, "val_ap": per_class, "calibration": calibration, "objectness_weight": weight}

            result = state.done(name, candidate) or timed(name, action)
            if "calibration" not in result:  # recorded by an spp that did not calibrate: fit it now
                result["val_map"], result["val_ap"], result["calibration"] = validation_results(candidate, feats, run.val_records, held_backgrounds)
                state.record(name, result)
            seconds[name] = result["seconds"]
            run.val_map[kind], run.val_ap[kind], run.calibrations[kind] = result["val_map"], result["val_ap"], result["calibration"]
            run.objectness_weights[kind] = result.get("objectness_weight", 0.0)

        def fc7_steps() -> None:
            """Fine-tuning on this map, then SVMs on its fc7 (validated like pool5's)."""
            listed = (None, None) if plan.features == "fc7" else ("fine-tuning", "SVMs on fc7")
            name = at("fine-tuning", label)
            step(name, listed[0])
            result = state.done(name, run.head) or timed(name, lambda: {"code": run_finetune(
                feats, run.head, None, None, None, plan.finetune_epochs, 1e-4, 128, 0.25, 1024, True, 0, gpu, keys=run.fit_keys,
                negatives=fit_backgrounds, proposal_model_path=run.proposal_model)})
            seconds[name] = result["seconds"]
            svm_step("fc7", listed[1])

        run.fc7_steps = fc7_steps
        if plan.features != "fc7":
            svm_step("pool5")
        else:
            fc7_steps()
        if plan.features != "auto":  # auto decides once fc7 is validated on the chosen map
            also = "; --features auto also tries a fine-tuned fc7" if plan.features == "pool5" else ""
            run.features, run.reason = plan.features, f"{plan.features} (validation mAP {run.val_map[plan.features]:.3f}{also})"
        return run

    # The first map's files where a single-map run keeps them; each other's in a folder of its own.
    folders = [work] + [work / map_folder(feature_map, plan.backbone) for feature_map in alternatives[1:]]
    if state.replaced:
        for path in discard_step_checkpoints(folders):
            ui.warn(f"{path}: a checkpoint of that run; deleted")
    feats_dirs = [cache_dir if folder == work else folder / "feats" for folder in folders]
    # The finer cut of the first map's network at the same scales is a prefix of it: its maps
    # come from the first cache's forward passes.
    first = alternatives[0]
    finer_feats = next((feats for feature_map, feats in zip(alternatives[1:], feats_dirs[1:])
                        if feature_map.scales == first.scales and feature_map.backbone == get_spec(first.backbone).finer), None)
    runs = [train_at(feature_map, folder, feats, finer_feats if feature_map is first else None)
            for feature_map, folder, feats in zip(alternatives, folders, feats_dirs)]
    # The map: by its pool5 SVMs' validation mAP (fc7's with --features fc7); the first alternative on a tie.
    map_kind = "fc7" if plan.features == "fc7" else "pool5"
    chosen = max(runs, key=lambda run: run.val_map[map_kind])
    scale_line = scale_plan.chosen({run.label: run.val_map[map_kind] for run in runs}, chosen.label)
    if plan.features == "auto":
        # A head fine-tuned on the chosen map only: on the others it would cost its time to
        # decide nothing (the map is chosen).
        chosen.fc7_steps()
        chosen.features, chosen.reason = choose_features(chosen.val_map)
    val_map = {at(kind, run.label): value for run in runs for kind, value in run.val_map.items()}
    val_ap = {at(kind, run.label): value for run in runs for kind, value in run.val_ap.items()}
    features, reason = chosen.features, chosen.reason

    step("final model")
    metadata = {
        "flow": "spp train",
        "choice": {"features": features, "reason": reason, "validation_mAP": val_map, "validation_AP": val_ap, "split": split.how,
                   "scales": scale_line,
                   "proposals": {k: v for k, v in chosen.proposal_choice.items() if k not in ("code", "seconds")}},
        "data": plan.data,
        "split": plan.split,
    }
    start = time.perf_counter()
    fitted = chosen.calibrations.get(features)
    calibration = Calibration.from_json(fitted) if fitted is not None else None
    if plan.refit:
        code = run_train_svm(chosen.cache_dir, out, None, None, None, plan.svm_c, True, features, chosen.head if features == "fc7" else None,
                             keys=chosen.fit_keys + chosen.val_keys, training_extra=metadata, negatives=plan.negatives, calibration=calibration,
                             proposal_model_path=chosen.proposal_model, positive_iou=plan.positive_iou)
        if not code and chosen.objectness_weights.get(features):
            set_objectness_weight(out, chosen.objectness_weights[features])
    else:
        code = _adopt_candidate(chosen.candidates[features], out, metadata, calibration)
    seconds["final model"] = round(time.perf_counter() - start, 2)
    skipped_at = tuple(name for name, r in state.steps.items() if r.get("code"))
    return (1 if code or skipped_at else 0), TrainResult(features, reason, val_map, val_ap, split, seconds, calibration,
                                                        chosen.proposal_choice["reason"], scale_line, skipped_at)


@dataclass
class ScaleRun:
    """The flow on one feature map: where its files are, and what validation said of its candidates."""

    label: str  # the map's (FeatureMap.label)
    cache_dir: Path
    proposal_model: Path | None  # None: the SVMs' windows (and the model's proposals) are selective search's
    head: Path
    candidates: dict[str, Path]  # per kind (pool5, fc7): the model validated
    fit_keys: list[str] = field(default_factory=list)
    val_keys: list[str] = field(default_factory=list)
    val_records: list = field(default_factory=list)
    proposal_choice: dict = field(default_factory=dict)
    val_map: dict[str, float] = field(default_factory=dict)
    val_ap: dict[str, dict] = field(default_factory=dict)
    calibrations: dict[str, dict | None] = field(default_factory=dict)
    objectness_weights: dict[str, float] = field(default_factory=dict)  # per kind: DetectConfig.objectness_weight kept
    features: str = "pool5"
    reason: str = ""
    fc7_steps: Callable[[], None] | None = None  # fine-tuning and fc7's SVMs on this map, once run


def set_objectness_weight(model_path: Path, weight: float) -> None:
    """Rewrite a model file with ``weight`` as its ``DetectConfig.objectness_weight``."""
    from spp_cli.model import Detector

    detector = Detector.load(model_path)
    detector.detect = detector.detect_config(objectness_weight=weight)
    detector.save(model_path)


def _adopt_candidate(candidate: Path, out: Path, metadata: dict, calibration: Calibration | None) -> int:
    """Write the validated candidate as the final model, with the flow's metadata and calibration."""
    from spp_cli.model import Detector

    detector = Detector.load(candidate)
    detector.training.update(metadata)
    if calibration is not None:
        detector.calibrate(calibration)
    detector.save(out)
    ui.say(f"Wrote {out}: the {metadata['choice']['features']} candidate, {detector.training.get('images')} training image(s)")
    return 0


def _relabel(record, names: list[str], classes: list[str]):
    """``record`` with its labels (indices into ``names``) as indices into ``classes``, the training
    split's list; boxes of a class the training split lacks are dropped (no model can find them)."""
    import numpy as np

    index = {name: k for k, name in enumerate(classes)}
    labels = [index.get(names[int(i)], -1) for i in record.labels]
    keep = np.array([k >= 0 for k in labels], dtype=bool)
    return dataclasses.replace(record, boxes=record.boxes[keep], labels=np.asarray(labels, np.int64)[keep],
                               difficult=record.difficult[keep], iscrowd=record.iscrowd[keep])


def _banner(number: int, total: int, name: str) -> None:
    ui.say(f"[{number}/{total}] {name}")
