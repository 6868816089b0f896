"""Detection settings on the validation part of an `spp train` run: NMS IoU, proposal count, objectness.

Reuses the work folder of an `spp train` run (its cache, its candidate
pool5 model, its split) and scores that candidate on the validation part of
the training split (never the test split) by VOC07 mAP, as `spp train`
scores it (a run that held out by --val-fraction, not --val-split), with
one setting changed at a time:

- the per-class NMS IoU (`spp detect --nms`; default 0.3);
- the number of learned proposals per image (the model's default 300);
- an objectness term: each window's SVM scores plus ``alpha`` times the log
  of the proposal network's sigmoid objectness (0 = the SVM score alone);
- iterative localisation (Gidaris and Komodakis, 2015): each candidate
  (window, class above the voting floor) is pooled again at its regressed
  box, scored there by its class's SVM and regressed a second time; kept as
  ``rescore`` (the regressed box, its new score), ``twice`` (the box
  regressed twice, the new score), ``mean`` (the same box, the mean of both
  scores) or ``union`` (both iterations' candidates into one NMS and vote).
  ``once`` is `spp detect`'s own (a check: it must equal the defaults);
- each window's class score minus gamma times the L1 norm of its box
  deltas for that class (``--delta-penalty``), gamma 0 / 0.25 / 0.5 / 1 / 2;
- per-class NMS again after box voting (``--renms``), at the same IoU: voting
  moves two kept boxes of one object (a whole raccoon and its head, at IoU
  under 0.3 before voting) towards the same candidates, and so towards each
  other; the model's own objectness weight in the score, as `spp detect`;
- soft-NMS (Bodla et al., 2017) in place of per-class NMS (``--soft``): the
  Gaussian decay of exp(score) by exp(-IoU^2 / sigma), i.e. each lower
  candidate's margin minus IoU^2 / sigma with the box kept, sigma 0.25 /
  0.5 / 1; then the same threshold, detection cap and box voting.
- horizontal-flip test-time augmentation (``--flip``): the image mirrored
  through the backbone too, each window pooled at its mirror image there,
  and its class scores (SVM and localisation term) and box deltas (``dx``
  negated) averaged with the window's own (``mean``), or its scores alone
  averaged (``scores``), or the larger score kept (``max``); the model's
  objectness weight in the score, as `spp detect`. It doubles the conv pass.
- each detection dropped when it lies mostly inside a higher-scoring one of
  its class or mostly holds one (``--contain``), after NMS and voting: their
  intersection at least 0.95 / 0.9 / 0.8 / 0.7 of the smaller box.

    spp train --data ../shared/data/bccd --split trainval --scales 1024 --out b.safetensors --work W
    python benchmarks/detect_settings.py --dataset bccd --work W [--iterate | --soft | --renms | --delta-penalty | --flip | --contain]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import checkout  # this checkout's spp_cli first


def detect_iterated(detector, entry, boxes, config, keep_as: str) -> list[dict]:
    """Detections of one cached image with one more localisation step (the module's docstring)."""
    import torch

    from spp_cli.bbox_reg import decode
    from spp_cli.boxes import top_batched_nms, vote_boxes
    from spp_cli.spp import PyramidPooler

    def pool(windows):
        return PyramidPooler(entry.maps, entry.factors, windows, detector.alignment, detector.levels).vectors().float()

    def regress(features, windows, cls):
        deltas = detector.regressors.predict_all(features * detector.pool5_scale)[torch.arange(len(cls)), cls]
        out = decode(windows, deltas)
        out[:, 0::2] = out[:, 0::2].clamp(0, entry.width)
        out[:, 1::2] = out[:, 1::2].clamp(0, entry.height)
        return out

    windows = torch.as_tensor(boxes, dtype=torch.float32)
    first = pool(windows)
    scores = detector.svms.scores(first, scaled=False).cpu()
    window, cls = torch.nonzero(scores > min(config.score_threshold, config.voting_floor), as_tuple=True)
    once_scores = scores[window, cls]
    once = regress(first[window], windows[window], cls)
    if keep_as == "once":
        boxes_out, scores_out, cls_out = once, once_scores, cls
    else:
        again = pool(once)
        again_scores = detector.svms.scores(again, scaled=False).cpu()[torch.arange(len(cls)), cls]
        twice = regress(again, once, cls)
        boxes_out, scores_out, cls_out = {
            "rescore": (once, again_scores, cls),
            "twice": (twice, again_scores, cls),
            "mean": (twice, (once_scores + again_scores) / 2, cls),
            "union": (torch.cat([once, twice]), torch.cat([once_scores, again_scores]), torch.cat([cls, cls])),
        }[keep_as]
    keep = top_batched_nms(boxes_out, scores_out, cls_out, config.nms_iou, config.max_detections, config.score_threshold)
    final = vote_boxes(keep, boxes_out, scores_out, cls_out, config.voting_iou) if len(keep) else boxes_out[keep]
    return [{"box": final[j].tolist(), "class": detector.classes[int(cls_out[i])], "score": float(scores_out[i])}
            for j, i in enumerate(keep.tolist())]


def soft_nms(boxes, scores, classes, sigma: float, floor: float):
    """Indices of the candidates in soft-NMS order and their decayed scores (``(K,)`` each, best first per class)."""
    import torch
    from torchvision import ops

    kept, decayed = [], []
    for k in classes.unique().tolist():
        rows = torch.nonzero(classes == k).flatten()
        left, margins = rows.clone(), scores[rows].clone()
        while len(left):
            best = int(margins.argmax())
            if float(margins[best]) <= floor:
                break
            kept.append(int(left[best]))
            decayed.append(float(margins[best]))
            overlap = ops.box_iou(boxes[left[best]][None], boxes[left])[0]
            margins = margins - overlap**2 / sigma
            mask = torch.ones(len(left), dtype=torch.bool)
            mask[best] = False
            left, margins = left[mask], margins[mask]
    order = torch.tensor(decayed).argsort(descending=True) if decayed else torch.zeros(0, dtype=torch.long)
    return torch.tensor(kept, dtype=torch.long)[order], torch.tensor(decayed)[order]


def detect_soft(detector, entry, boxes, config, sigma: float) -> list[dict]:
    """`spp detect`'s candidates (scored, regressed), then soft-NMS instead of NMS, then voting."""
    import torch

    from spp_cli.boxes import vote_boxes

    found = detector.detect_windows(entry.maps, entry.factors, boxes, entry.width, entry.height,
                                    replace(config, nms_iou=1.0, box_voting=False, max_detections=10**6,
                                            score_threshold=min(config.score_threshold, config.voting_floor)))
    if not found:
        return []
    cand_boxes = torch.tensor([d.box for d in found], dtype=torch.float32)
    cand_scores = torch.tensor([d.score for d in found], dtype=torch.float32)
    cand_cls = torch.tensor([d.class_id for d in found])
    keep, decayed = soft_nms(cand_boxes, cand_scores, cand_cls, sigma, config.score_threshold)
    keep, decayed = keep[: config.max_detections], decayed[: config.max_detections]
    final = vote_boxes(keep, cand_boxes, cand_scores, cand_cls, config.voting_iou) if len(keep) else cand_boxes[keep]
    return [{"box": final[j].tolist(), "class": detector.classes[int(cand_cls[i])], "score": float(decayed[j])}
            for j, i in enumerate(keep.tolist())]


def detect_flipped(detector, entry, mirrored_maps, boxes, config, prior, mode: str) -> list[dict]:
    """`spp detect`'s steps with each window's scores (and, ``mean``, deltas) combined with
    those of its mirror image on the mirrored image's maps (the module's docstring)."""
    import torch

    from spp_cli.bbox_reg import decode
    from spp_cli.boxes import top_batched_nms, vote_boxes
    from spp_cli.spp import PyramidPooler

    def scored(maps, windows):
        features = PyramidPooler(maps, entry.factors, windows, detector.alignment, detector.levels).vectors().float()
        scores = detector.svms.scores(features, scaled=False)
        if config.iou_weight:
            scores = scores + config.iou_weight * detector.localisation.predict_all(features, scale=detector.pool5_scale)
        return scores, detector.regressors.predict_all(features, scale=detector.pool5_scale)

    windows = torch.as_tensor(boxes, dtype=torch.float32)
    scores, deltas = scored(entry.maps, windows)
    mirrored = windows.clone()
    mirrored[:, 0], mirrored[:, 2] = entry.width - windows[:, 2], entry.width - windows[:, 0]
    flipped_scores, flipped_deltas = scored(mirrored_maps, mirrored)
    if mode == "max":
        scores = torch.maximum(scores, flipped_scores)
    else:
        scores = (scores + flipped_scores) / 2
    if mode == "mean":
        flipped_deltas[..., 0] = -flipped_deltas[..., 0]  # a shift right on the mirror is a shift left here
        deltas = (deltas + flipped_deltas) / 2
    if prior is not None:
        scores = scores + prior[:, None]
    window, cls = torch.nonzero(scores > min(config.score_threshold, config.voting_floor), as_tuple=True)
    kept_scores = scores[window, cls]
    kept = decode(windows[window], deltas[window, cls]) if len(window) else windows[:0]
    kept[:, 0::2] = kept[:, 0::2].clamp(0, entry.width)
    kept[:, 1::2] = kept[:, 1::2].clamp(0, entry.height)
    keep = top_batched_nms(kept, kept_scores, cls, config.nms_iou, config.max_detections, config.score_threshold)
    final = vote_boxes(keep, kept, kept_scores, cls, config.voting_iou) if len(keep) else kept[keep]
    return [{"box": final[j].tolist(), "class": detector.classes[int(cls[i])], "score": float(kept_scores[i])}
            for j, i in enumerate(keep.tolist())]


def suppress_contained(found: list, ratio: float) -> list:
    """Drop each detection whose box lies mostly inside (or mostly holds) a higher-scoring one of its class.

    ``found``: detections in score order (as `Detector.detect_windows` returns them), boxes (x1, y1, x2, y2) in
    pixels. Two boxes of one class clash when their intersection covers at least ``ratio`` of the smaller box
    (the "intersection over minimum" that detectors of parts use): a raccoon's head inside its body clashes
    at any IoU.
    """
    import numpy as np

    boxes = np.array([d.box for d in found], np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    for i, detection in enumerate(found):
        held = [j for j in kept if found[j].class_id == detection.class_id]
        sides = np.clip(np.minimum(boxes[held, 2:], boxes[i, 2:]) - np.maximum(boxes[held, :2], boxes[i, :2]), 0, None)
        smaller = np.minimum(areas[held], areas[i])
        if not ((smaller > 0) & (sides.prod(1) >= ratio * smaller)).any():
            kept.append(i)
    return [found[i] for i in kept]


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(checkout.DATASETS), required=True)
    parser.add_argument("--work", type=Path, required=True, help="an spp train work folder (or its scale-<S> folder)")
    parser.add_argument("--iterate", action="store_true", help="only the iterative-localisation variants")
    parser.add_argument("--soft", action="store_true", help="only the soft-NMS variants")
    parser.add_argument("--delta-penalty", action="store_true", help="only scores minus gamma x the L1 norm of the box deltas")
    parser.add_argument("--renms", action="store_true", help="only NMS again after voting, with the model's objectness weight")
    parser.add_argument("--contain", action="store_true", help="only dropping detections inside a higher one of their class")
    parser.add_argument("--flip", action="store_true", help="only horizontal-flip test-time augmentation, with the model's objectness weight")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision import ops

    import spp_cli.model
    from spp_cli.cache import FeatureCache, image_key
    from spp_cli.config import DetectConfig
    from spp_cli.data import open_dataset
    from spp_cli.evaluate import GroundTruthImage, evaluate_voc
    from spp_cli.model import Detector
    from spp_cli.pipeline import split_for_validation

    data, split, _ = checkout.DATASETS[args.dataset]
    # The run's own plan: its validation fraction; a scale-<S> folder's cache is its feats/.
    state_file = next(p for p in (args.work / "train-state.json", args.work.parent / "train-state.json") if p.exists())
    plan = json.loads(state_file.read_text())["plan"]
    dataset = open_dataset(data, split)
    held = set(split_for_validation([r.image_id for r in dataset.records], None, plan["val_fraction"]).val_ids)
    detector = Detector.load(args.work / "val-pool5.safetensors")
    cache = FeatureCache.open(Path(plan["cache"]) if state_file.parent == args.work else args.work / "feats")
    # As spp train scores its candidates (pipeline.validation_results): an image is one cache entry under the
    # id the cache recorded (raccoon's byte-identical duplicates score once), and the classes are the model's
    # (a class it has no SVM for would count as AP 0).
    cached_ids = {cache.metadata(k).get("image_id") for k in cache.keys()}
    records = [r for r in dataset.records if r.image_id in held and r.image_id in cached_ids]
    classes = [c for c in dataset.classes if c in detector.classes]

    # One scoring chunk per image, so the per-window term lines up with the scored rows.
    spp_cli.model.SCORE_CHUNK = 10**7
    svm_scores, term = detector.svms.scores, {"alpha x log objectness": None}

    def scores_with_term(features, scaled=False):
        extra = term["alpha x log objectness"]
        plain = svm_scores(features, scaled=scaled)
        if term.get("gamma"):  # minus gamma x the L1 norm of each class's box deltas (pool5 models: the same features)
            deltas = detector.regressors.predict_all(features, scale=1.0 if scaled else detector.pool5_scale)
            plain = plain - term["gamma"] * deltas.abs().sum(-1)
        return plain if extra is None else plain + extra[:, None].to(plain.dtype)

    detector.svms.scores = scores_with_term
    images = [(GroundTruthImage.from_record(r, dataset.classes), cache.read(image_key(r.path))) for r in records]
    learned = detector.proposal_model
    defaults = DetectConfig(score_threshold=detector.detect.score_threshold)
    default_top = learned.config.top_n if learned is not None else None

    def score(nms: float = defaults.nms_iou, top: int | None = default_top, alpha: float = 0.0, keep_as: str | None = None,
              sigma: float | None = None, renms: bool = False, flip: str | None = None,
              contain: float | None = None) -> str:
        pairs = []
        for truth, entry in images:
            if learned is not None:  # the model's own call for that many boxes, as `spp detect` makes it
                boxes, logits = learned.propose(entry.maps, entry.factors, entry.width, entry.height, top_n=top)
                term["alpha x log objectness"] = alpha * F.logsigmoid(torch.from_numpy(logits)) if alpha else None
            else:
                boxes = entry.proposals
            config = replace(defaults, nms_iou=nms)
            if keep_as is not None:
                pairs.append((truth, detect_iterated(detector, entry, boxes, config, keep_as)))
                continue
            if flip is not None:
                prior = term["alpha x log objectness"]
                term["alpha x log objectness"] = None  # added by detect_flipped, after the mean
                pairs.append((truth, detect_flipped(detector, entry, mirrored[id(entry)], boxes, config, prior, flip)))
                continue
            if sigma is not None:
                pairs.append((truth, detect_soft(detector, entry, boxes, config, sigma)))
                continue
            found = detector.detect_windows(entry.maps, entry.factors, boxes, entry.width, entry.height, config)
            if renms and found:
                kept = ops.batched_nms(torch.tensor([d.box for d in found]), torch.tensor([d.score for d in found]),
                                       torch.tensor([d.class_id for d in found]), nms)
                found = [found[i] for i in kept.tolist()]
            if contain is not None:
                found = suppress_contained(sorted(found, key=lambda d: -d.score), contain)
            pairs.append((truth, [{"box": d.box, "class": detector.classes[d.class_id], "score": d.score} for d in found]))
        term["alpha x log objectness"] = None
        result = evaluate_voc(pairs, classes, "voc07")
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in result.per_class.items() if not np.isnan(v))
        return f"{result.mean_ap:.3f} ({per_class})"

    print(f"{args.dataset}: {len(records)} validation image(s); candidate {args.work / 'val-pool5.safetensors'}", flush=True)
    print(f"defaults (NMS {defaults.nms_iou}, {default_top or 'selective-search'} proposals, SVM score alone): {score()}", flush=True)
    if args.delta_penalty:
        alpha = detector.detect.objectness_weight if learned is not None else 0.0
        for gamma in (0.0, 0.25, 0.5, 1.0, 2.0):
            term["gamma"] = gamma
            print(f"objectness weight {alpha:g}, minus {gamma:g} x |box deltas|: {score(alpha=alpha)}", flush=True)
        return
    if args.renms:
        alpha = detector.detect.objectness_weight if learned is not None else 0.0
        print(f"the model's objectness weight {alpha:g}: {score(alpha=alpha)}", flush=True)
        print(f"the same, NMS again after voting: {score(alpha=alpha, renms=True)}", flush=True)
        return
    if args.contain:
        alpha = detector.detect.objectness_weight if learned is not None else 0.0
        print(f"the model's objectness weight {alpha:g}: {score(alpha=alpha)}", flush=True)
        for ratio in (0.95, 0.9, 0.8, 0.7):
            print(f"detections inside a higher one (>= {ratio:g} of the smaller box) dropped: "
                  f"{score(alpha=alpha, contain=ratio)}", flush=True)
        return
    if args.flip:
        from spp_cli.backbones import extractor_for
        from spp_cli.features import feature_pyramid
        from spp_cli.images import load_image

        extractor = extractor_for(detector.features, str(args.work))
        mirrored = {}
        for record, (_, entry) in zip(records, images):
            maps = feature_pyramid(extractor, np.ascontiguousarray(load_image(record.path)[:, ::-1]), detector.features.scales,
                                   detector.features.max_side)[0]
            mirrored[id(entry)] = [m.to(entry.maps[0].dtype) for m in maps]  # as the cache stores them
        alpha = detector.detect.objectness_weight if learned is not None else 0.0
        print(f"the model's objectness weight {alpha:g}: {score(alpha=alpha)}", flush=True)
        for mode in ("mean", "scores", "max"):
            print(f"flip, {mode}: {score(alpha=alpha, flip=mode)}", flush=True)
        return
    if args.soft:
        for sigma in (0.25, 0.5, 1.0):
            print(f"soft-NMS, sigma {sigma}: {score(sigma=sigma)}", flush=True)
        return
    if args.iterate:
        for keep_as in ("once", "rescore", "twice", "mean", "union"):
            print(f"iterative localisation, {keep_as}: {score(keep_as=keep_as)}", flush=True)
        return
    for nms in (0.4, 0.5):
        print(f"NMS IoU {nms}: {score(nms=nms)}", flush=True)
    if learned is None:
        return
    for top in (100, 200, 500, 1000):
        print(f"{top} learned proposals: {score(top=top)}", flush=True)
    for alpha in (0.25, 0.5, 1.0):
        for top in (default_top, 1000):
            print(f"objectness alpha {alpha}, {top} proposals: {score(top=top, alpha=alpha)}", flush=True)


if __name__ == "__main__":
    main()
