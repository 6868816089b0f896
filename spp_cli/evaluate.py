"""Evaluation: proposal recall and MABO (detection AP follows in this module).

Shape letters: R proposals, N ground truths, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spp_cli import boxes as box_ops


@dataclass
class RecallStats:
    """Proposal quality over a set of ground-truth boxes.

    ``best_iou`` holds, for every counted ground truth, the best IoU any
    proposal of its image reaches.
    """

    best_iou: list[float] = field(default_factory=list)

    def add(self, values: np.ndarray) -> None:
        self.best_iou.extend(float(v) for v in values)

    @property
    def count(self) -> int:
        return len(self.best_iou)

    def recall(self, threshold: float) -> float:
        """Fraction of ground truths with a proposal at IoU >= ``threshold``."""
        if not self.best_iou:
            return float("nan")
        return float(np.mean(np.asarray(self.best_iou) >= threshold))

    @property
    def mabo(self) -> float:
        """Mean Average Best Overlap (Uijlings et al.): mean of per-class mean best IoU.

        Here over the ground truths this object holds; :func:`proposal_recall`
        averages the per-class values for the overall figure.
        """
        return float(np.mean(self.best_iou)) if self.best_iou else float("nan")


def best_overlaps(proposals: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` best IoU of each ground truth with any of the ``(R, 4)`` proposals."""
    if len(gt_boxes) == 0:
        return np.zeros(0, np.float32)
    if len(proposals) == 0:
        return np.zeros(len(gt_boxes), np.float32)
    return box_ops.iou(gt_boxes, proposals).max(dim=1).values.numpy()


def proposal_recall(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str]
) -> tuple[RecallStats, dict[str, RecallStats], float]:
    """Recall statistics of proposals against ground truth.

    Args:
        items: per image ``(proposals (R, 4), gt_boxes (N, 4), gt_labels (N,))``;
            crowd boxes must already be removed.
        classes: names for the label indices.

    Returns:
        ``(overall, per_class, mabo)``: overall stats over all ground truths,
        per-class stats (classes with ground truth only), and MABO as defined
        by Uijlings et al. (mean over classes of the mean best overlap).
    """
    overall = RecallStats()
    per_class: dict[str, RecallStats] = {}
    for proposals, gt_boxes, gt_labels in items:
        best = best_overlaps(proposals, gt_boxes)
        overall.add(best)
        for label, value in zip(gt_labels, best):
            per_class.setdefault(classes[int(label)], RecallStats()).add(np.array([value]))
    mabo = float(np.mean([s.mabo for s in per_class.values()])) if per_class else float("nan")
    return overall, per_class, mabo


# ---------------------------------------------------------------- detection AP


@dataclass
class ClassDetections:
    """All detections of one class over a dataset.

    Attributes:
        image_ids: ``(D,)`` the image each detection belongs to.
        scores: ``(D,)`` confidence.
        boxes: ``(D, 4)`` ``xyxy`` original-image pixels.
    """

    image_ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray


@dataclass
class ClassGroundTruth:
    """Ground truth of one class: per image ``(boxes (N, 4), difficult (N,))``."""

    by_image: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def num_positives(self) -> int:
        """Ground truths that count (not difficult)."""
        return int(sum((~difficult).sum() for _, difficult in self.by_image.values()))


def match_detections(dets: ClassDetections, gt: ClassGroundTruth, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The PASCAL VOC devkit's matching (``VOCevaldet``), per class.

    Detections are taken by descending score (ties keep input order, as
    MATLAB's stable ``sort`` does); each is matched to the ground truth of its
    image with the highest IoU. IoU >= threshold with a difficult ground truth:
    ignored (neither true nor false positive); with an unmatched one: true
    positive (and the ground truth is taken); with a taken one: false positive
    (a duplicate). Below the threshold: false positive.

    Continuous coordinates make the devkit's ``+1`` pixel convention implicit
    (a VOC box ``xmin..xmax`` is ``[xmin - 1, xmax]`` here).

    Returns:
        ``(tp, fp)``, ``(D,)`` float arrays in score order.
    """
    order = np.argsort(-np.asarray(dets.scores, dtype=np.float64), kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    taken = {image_id: np.zeros(len(boxes), bool) for image_id, (boxes, _) in gt.by_image.items()}
    for rank, d in enumerate(order):
        image_id = dets.image_ids[d]
        boxes, difficult = gt.by_image.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = box_ops.iou(dets.boxes[d : d + 1], boxes).numpy()[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            if difficult[best]:
                continue
            if not taken[image_id][best]:
                tp[rank] = 1
                taken[image_id][best] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ``(recall, precision)`` along the score order."""
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / max(num_positives, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t.

    The thresholds are the floats py-faster-rcnn's, detectron2's and mmdetection's
    ``voc_eval`` use (``np.arange(0, 1.1, 0.1)``): 0.3, 0.6 and 0.7 come out a hair above
    (0.30000000000000004, ...), so a recall of exactly 3/10, 6/10 or 7/10 does not reach
    that threshold (the devkit's MATLAB ``0:0.1:1`` shares the 0.3 case). Kept so that
    figures compare with theirs.
    """
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        mask = recall >= t
        ap += (precision[mask].max() if mask.any() else 0.0) / 11
    return float(ap)


def voc_area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope (``VOCap``)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def average_precision(dets: ClassDetections, gt: ClassGroundTruth, metric: str = "voc07", iou_threshold: float = 0.5) -> float:
    """AP of one class; ``nan`` when the class has no (non-difficult) ground truth."""
    npos = gt.num_positives
    if npos == 0:
        return float("nan")
    tp, fp = match_detections(dets, gt, iou_threshold)
    recall, precision = precision_recall(tp, fp, npos)
    if len(recall) == 0:
        return 0.0
    return voc07_ap(recall, precision) if metric == "voc07" else voc_area_ap(recall, precision)


# ---------------------------------------------------------------- datasets and files


@dataclass
class GroundTruthImage:
    """Ground truth of one image for evaluation: ``(N, 4)`` ``xyxy`` boxes with class names and flags."""

    boxes: np.ndarray
    class_names: list[str]
    difficult: np.ndarray
    iscrowd: np.ndarray
    width: int | None = None
    height: int | None = None

    @classmethod
    def from_record(cls, record, classes: list[str]) -> "GroundTruthImage":
        """From a :class:`spp_cli.data.ImageRecord` and its dataset's class list."""
        return cls(record.boxes, [classes[int(i)] for i in record.labels], record.difficult, record.iscrowd, record.width, record.height)


def pair_with_detections(records, classes: list[str], detection_images) -> tuple[list[tuple[GroundTruthImage, list[dict]]], int]:
    """Each dataset image's ground truth beside its detections, as :func:`evaluate_voc` takes them.

    An image's entry in a detections file is found by its resolved path, else by its id
    (a file made on another machine); an image without one has no detections.

    Args:
        records: the split's :class:`spp_cli.data.ImageRecord` list.
        classes: the dataset's class names (records' labels index them).
        detection_images: a detections file's entries (``path``, ``id``, ``detections``).

    Returns:
        ``(pairs, missing)``: one pair per record in its order; how many records had no entry.
    """
    by_path = {str(Path(e.path).resolve()): e for e in detection_images}
    by_id = {e.id: e for e in detection_images}
    pairs, missing = [], 0
    for record in records:
        entry = by_path.get(str(Path(record.path).resolve())) or by_id.get(record.image_id)
        missing += entry is None
        pairs.append((GroundTruthImage.from_record(record, classes), entry.detections if entry else []))
    return pairs, missing


@dataclass
class EvalResult:
    """Per-class AP and their mean over classes that have ground truth."""

    metric: str
    per_class: dict[str, float]
    counts: dict[str, int]  # ground truths per class (not difficult, not crowd)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mean_ap(self) -> float:
        values = [v for v in self.per_class.values() if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


def evaluate_voc(images: list[tuple[GroundTruthImage, list[dict]]], classes: list[str], metric: str = "voc07") -> EvalResult:
    """VOC AP per class.

    Args:
        images: ``(ground truth, detections)`` per dataset image (crowd
            boxes count as difficult); detections are dicts with ``box``,
            ``class``, ``score``.
        classes: the classes to evaluate (names).
        metric: ``voc07`` (11-point) or ``voc`` (area).
    """
    per_class, counts = {}, {}
    for name in classes:
        detections, gt = class_inputs(images, name)
        per_class[name] = average_precision(detections, gt, metric)
        counts[name] = gt.num_positives
    return EvalResult(metric, per_class, counts)


def class_inputs(images: list[tuple[GroundTruthImage, list[dict]]], name: str) -> tuple[ClassDetections, ClassGroundTruth]:
    """One class's detections and ground truth over ``images`` (as :func:`evaluate_voc` takes them;
    crowd boxes count as difficult), images keyed by their place in the list."""
    gt_by_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ids, scores, boxes = [], [], []
    for n, (record, dets) in enumerate(images):
        key = str(n)
        mask = np.array([c == name for c in record.class_names], dtype=bool)
        gt_by_image[key] = (record.boxes[mask], (record.difficult | record.iscrowd)[mask])
        for d in dets:
            if d["class"] == name:
                ids.append(key)
                scores.append(d["score"])
                boxes.append(d["box"])
    detections = ClassDetections(ids, np.asarray(scores, float), np.asarray(boxes, np.float32).reshape(-1, 4))
    return detections, ClassGroundTruth(gt_by_image)


def evaluate_coco(images: list[tuple[GroundTruthImage, list[dict]]], classes: list[str]) -> EvalResult:
    """COCO mAP@[.5:.95] (and AP50) per class through pycocotools."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = {name: k + 1 for k, name in enumerate(classes)}
    gt = {"images": [], "annotations": [], "categories": [{"id": v, "name": k} for k, v in cat_ids.items()]}
    results = []
    for n, (record, dets) in enumerate(images):
        gt["images"].append({"id": n, "width": record.width or 1, "height": record.height or 1})
        for box, name, crowd in zip(record.boxes, record.class_names, record.iscrowd | record.difficult):
            if name not in cat_ids:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": n, "category_id": cat_ids[name], "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd)}
            )
        for d in dets:
            if d["class"] in cat_ids:
                x1, y1, x2, y2 = d["box"]
                results.append({"image_id": n, "category_id": cat_ids[d["class"]], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    per_class = {name: float("nan") for name in classes}
    counts = {name: 0 for name in classes}
    for ann in gt["annotations"]:
        if not ann["iscrowd"]:
            counts[classes[ann["category_id"] - 1]] += 1
    if not results:
        return EvalResult("coco", {n: (0.0 if counts[n] else float("nan")) for n in classes}, counts, {"AP50": 0.0})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M max dets)
    ap50 = {}
    for k, name in enumerate(classes):
        if counts[name] == 0:
            continue
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
        p50 = precision[0, :, k, 0, -1]
        ap50[name] = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else 0.0
    return EvalResult("coco", per_class, counts, {"AP50": float(ev.stats[1]), "mAP@[.5:.95]": float(ev.stats[0]), **{f"AP50/{k}": v for k, v in ap50.items()}})
