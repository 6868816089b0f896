"""Proposal quality and speed: strategy x max-side on coco128 and raccoon.

Prints a table (boxes/image, recall at IoU 0.5 and 0.7, MABO, seconds per
image on one core) per dataset, then the images/s speed-up of 2 worker
processes over 1 for the default settings. The last line is a JSON object
of the default settings' figures.

    python benchmarks/proposals.py [--data-root ../shared/data] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np

from spp_cli.data import open_dataset
from spp_cli.evaluate import proposal_recall
from spp_cli.proposals import ProposalParams, ProposalTask, TaskFailure, run_proposals

REPO = checkout.REPO


def evaluate(dataset, params: ProposalParams, workers: int) -> dict:
    tasks = [ProposalTask(r.image_id, str(r.path)) for r in dataset.records]
    start = time.perf_counter()
    results = list(run_proposals(tasks, params, workers))
    wall = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, TaskFailure)]
    if failures:
        raise SystemExit(f"{failures[0].message}")
    items = []
    for record, result in zip(dataset.records, results):
        keep = ~record.iscrowd
        items.append((result.boxes, record.boxes[keep], record.labels[keep]))
    overall, _, mabo = proposal_recall(items, dataset.classes)
    return {
        "boxes_per_image": float(np.mean([len(r.boxes) for r in results])),
        "recall50": overall.recall(0.5),
        "recall70": overall.recall(0.7),
        "mabo": mabo,
        "s_per_image": float(np.mean([r.seconds for r in results])),
        "images_per_s": len(results) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--quick", action="store_true", help="only the default settings")
    args = parser.parse_args()
    checkout.check()

    datasets = {
        "coco128": open_dataset(args.data_root / "coco128" / "annotations" / "instances_train2017.json"),
        "raccoon": open_dataset(args.data_root / "raccoon", "test"),
    }
    default = ProposalParams()
    grid = [default]
    if not args.quick:
        grid += [
            ProposalParams(strategy="opencv-fast", max_side=500),
            ProposalParams(strategy="opencv-fast", max_side=0),
            ProposalParams(strategy="original-fast-opencv-rank", max_side=500),
            ProposalParams(strategy="original-fast", max_side=500),
            ProposalParams(strategy="original-fast", max_side=400),
            ProposalParams(strategy="original-fast", max_side=640),
            ProposalParams(strategy="original-fast-fine", max_side=500),
        ]
        grid = list(dict.fromkeys(grid))

    figures: dict[str, dict] = {}
    for name, dataset in datasets.items():
        print(f"\n{name}: {len(dataset)} images, {dataset.num_boxes} ground-truth boxes (iscrowd excluded)")
        print(f"{'strategy':<20}{'max side':>9}{'top':>6}{'boxes/img':>11}{'R@0.5':>8}{'R@0.7':>8}{'MABO':>8}{'s/img':>8}")
        for params in grid:
            row = evaluate(dataset, params, workers=2)
            if params == default:
                figures[name] = row
            side = params.max_side or "full"
            print(
                f"{params.strategy:<20}{side:>9}{params.top:>6}{row['boxes_per_image']:>11.0f}"
                f"{row['recall50']:>8.3f}{row['recall70']:>8.3f}{row['mabo']:>8.3f}{row['s_per_image']:>8.2f}"
                + ("  <- default" if params == default else ""),
                flush=True,
            )

    coco = datasets["coco128"]
    one = evaluate(coco, default, workers=1)["images_per_s"]
    two = evaluate(coco, default, workers=2)["images_per_s"]
    print(f"\nworkers on coco128 (default settings): 1 -> {one:.2f} img/s, 2 -> {two:.2f} img/s, speed-up {two / one:.2f}x")

    summary = {
        "default_strategy": default.strategy,
        "default_max_side": default.max_side,
        "coco128_recall50": round(figures["coco128"]["recall50"], 4),
        "coco128_recall70": round(figures["coco128"]["recall70"], 4),
        "coco128_mabo": round(figures["coco128"]["mabo"], 4),
        "coco128_boxes_per_image": round(figures["coco128"]["boxes_per_image"], 1),
        "coco128_s_per_image": round(figures["coco128"]["s_per_image"], 3),
        "raccoon_recall50": round(figures["raccoon"]["recall50"], 4),
        "raccoon_boxes_per_image": round(figures["raccoon"]["boxes_per_image"], 1),
        "worker_speedup_2v1": round(two / one, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
