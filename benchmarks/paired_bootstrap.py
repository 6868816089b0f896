"""How sure a mAP difference is: a paired bootstrap over the test images of two detection files.

A test split of 40 images (raccoon's) moves VOC07 mAP by several points with
the images it happens to hold. This resamples the split's images with
replacement, the same resample for both files, and scores both on each
(the VOC devkit's matching, as `spp eval --metric voc07`): the spread of
the difference is what another test split of the same size could have shown.

Each detection's true / false positive flag depends only on its own image
(the devkit matches within an image, in score order), so the flags are
computed once and a resample only weighs each image by how often it was
drawn; with every weight 1 the figures are `spp eval`'s (checked at start).
A resample equals scoring a split that holds each image as often as drawn up
to the order of tied scores (a few 1e-4 of mAP on coco128's files, whose
detections share scores: far below the intervals' widths).

    python benchmarks/paired_bootstrap.py --dataset raccoon --a W/raccoon/spp-dets.json --b W/raccoon/frcnn-dets.json
        [--resamples 2000] [--seed 0] [--margin 0.02]

``W`` is a ``vs_faster_rcnn.py --work`` folder; prints one line per dataset
and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import checkout  # this checkout's spp_cli first
import numpy as np


@dataclass
class ClassMatches:
    """One class's detections over a split, matched once.

    Attributes:
        image: ``(D,)`` index of each detection's image, detections in score order.
        tp, fp: ``(D,)`` the devkit's flags (a detection of a difficult box is neither).
        positives: ``(I,)`` boxes of the class per image that count (not difficult).
    """

    image: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: np.ndarray


def class_matches(pairs: list, name: str) -> ClassMatches:
    """``pairs`` as :func:`spp_cli.evaluate.pair_with_detections` makes them."""
    from spp_cli.evaluate import class_inputs, match_detections

    detections, gt = class_inputs(pairs, name)
    tp, fp = match_detections(detections, gt)
    order = np.argsort(-np.asarray(detections.scores, dtype=np.float64), kind="stable")  # match_detections' order
    image = np.array([int(detections.image_ids[d]) for d in order], dtype=np.int64)
    positives = np.array([int((~gt.by_image[str(n)][1]).sum()) for n in range(len(pairs))], dtype=np.float64)
    return ClassMatches(image, tp, fp, positives)


def weighted_map(matches: list[ClassMatches], weights: np.ndarray) -> np.ndarray:
    """VOC07 11-point mAP of each row of ``weights`` ``(B, I)``: image i counted ``weights[b, i]`` times.

    A class without a counted box in a row is left out of that row's mean, as
    `spp eval` leaves out a class without ground truth. Returns ``(B,)``.
    """
    per_class = []
    for m in matches:
        positives = weights @ m.positives  # (B,)
        w = weights[:, m.image]  # (B, D)
        ctp, cfp = np.cumsum(w * m.tp, axis=1), np.cumsum(w * m.fp, axis=1)
        recall = ctp / np.maximum(positives, 1)[:, None]
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        ap = np.zeros(len(weights))
        if m.image.size:
            for t in np.linspace(0, 1, 11):
                ap += np.where(recall >= t, precision, 0.0).max(axis=1) / 11
        per_class.append(np.where(positives > 0, ap, np.nan))
    return np.nanmean(np.stack(per_class, axis=1), axis=1)


def score_file(dets_path: Path, dataset) -> tuple[list[ClassMatches], float]:
    """Matches per class (every class of the dataset, as `spp eval` scores them) and `spp eval`'s
    mAP, which the matches give with every image weighed once (checked)."""
    from spp_cli.detections import read_detections
    from spp_cli.evaluate import evaluate_voc, pair_with_detections

    dets = read_detections(dets_path)
    pairs, missing = pair_with_detections(dataset.records, dataset.classes, dets.images)
    if missing == len(pairs):
        raise SystemExit(f"{dets_path}: no image of the split has an entry")
    classes = [c for c in dataset.classes if dets.class_filter is None or c in dets.class_filter]
    matches, expected = [class_matches(pairs, c) for c in classes], evaluate_voc(pairs, classes, "voc07").mean_ap
    got = float(weighted_map(matches, np.ones((1, len(pairs))))[0])
    if not np.isclose(got, expected, rtol=0, atol=1e-9):
        raise SystemExit(f"{dets_path}: the bootstrap's mAP {got} differs from spp eval's {expected}")
    return matches, expected


def bootstrap_differences(a: list[ClassMatches], b: list[ClassMatches], images: int, resamples: int = 2000,
                          seed: int = 0) -> np.ndarray:
    """``(resamples,)`` mAP of ``a`` minus ``b`` over splits of ``images`` images drawn with
    replacement, the same draw for both (weight matrices of 250 rows at a time)."""
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 250):
        rows = min(250, resamples - start)
        weights = np.stack([np.bincount(rng.integers(0, images, images), minlength=images) for _ in range(rows)]).astype(np.float64)
        differences.append(weighted_map(a, weights) - weighted_map(b, weights))
    return np.concatenate(differences)


def main() -> None:
    checkout.check()
    from spp_cli.data import open_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(checkout.DATASETS))
    parser.add_argument("--a", type=Path, required=True, help="detections file (spp's)")
    parser.add_argument("--b", type=Path, required=True, help="detections file to compare with (Faster R-CNN's)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.02, help="the share of resamples with a >= b + margin is printed")
    args = parser.parse_args()

    data, _, test_split = checkout.DATASETS[args.dataset]
    dataset = open_dataset(data, test_split)
    a, a_map = score_file(args.a, dataset)
    b, b_map = score_file(args.b, dataset)
    n = len(dataset.records)
    diff = bootstrap_differences(a, b, n, args.resamples, args.seed)
    low, high = np.percentile(diff, [2.5, 97.5])
    share = float(np.mean(diff >= args.margin))
    print(f"{args.dataset}: {n} images; a {a_map:.3f}, b {b_map:.3f}, a - b {a_map - b_map:+.3f}; "
          f"95% interval of a - b [{low:+.3f}, {high:+.3f}] ({args.resamples} resamples); "
          f"a >= b + {args.margin:g} in {share:.1%} of them")
    print(json.dumps({"dataset": args.dataset, "images": n, "a_map": a_map, "b_map": b_map, "diff": a_map - b_map,
                      "interval95": [float(low), float(high)], "share_a_ge_b_plus_margin": share, "margin": args.margin,
                      "resamples": args.resamples, "seed": args.seed}))


if __name__ == "__main__":
    main()
