"""Anchor sets of the proposal network, compared on the training splits only (3-fold held-out recall).

Per dataset: `spp cache --no-proposals` of the training split, then for each
anchor set the proposal network (`spp train-proposals`' trainer, the
defaults otherwise) trained three times, each time on two thirds of the
cached images (folds by the sha256 rank of the image id) with the third
held out: that third gives the kept network's recall@0.7 / @0.5 at 300
boxes per image (docs/proposals.md's anchor figures were measured when the
trainer let that third pick the epoch as well). Prints each fold, the mean per anchor set, and a last line
of JSON. No test split is read. Not a test: ~35 min for the three datasets
and two anchor sets on 2 cores.

    python benchmarks/anchors.py [--datasets raccoon,bccd,coco128] [--anchors 16,32,64,128,256,512 16,32,64,128,256,512,768] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np

DATASETS = checkout.DATASETS
FOLDS = 3


def training_cache(name: str, work: Path):
    """`spp cache --no-proposals` of the dataset's training split in ``work/<name>/feats``: the
    cache, and the keys of its annotated images by the sha256 rank of their ids (the folds' order)."""
    from spp_cli.cache import FeatureCache
    from spp_cli.pipeline import id_rank

    data, train, _ = DATASETS[name]
    cache_dir = work / name / "feats"
    checkout.run_spp("cache", "--data", data, "--split", train, "--cache", cache_dir, "--no-proposals", allowed=(0, 1))
    cache = FeatureCache.open(cache_dir)
    keys = sorted((k for k in cache.keys() if cache.metadata(k).get("has_gt")), key=lambda k: id_rank(cache.metadata(k).get("image_id", k)))
    return cache, keys


def held_out_recall(cache, keys: list[str], sizes: tuple[int, ...]) -> list[tuple[float, float]]:
    """(recall@0.7, recall@0.5) of each fold's held-out third, ``sizes`` as the anchor sides."""
    from spp_cli.rpn import ProposalConfig, ProposalTrainer

    results = []
    for fold in range(FOLDS):
        held = keys[fold::FOLDS]
        rest = [k for k in keys if k not in set(held)]
        trainer = ProposalTrainer(cache, keys, ProposalConfig(anchor_sizes=sizes))
        # The trainer reads its held-out images first, then the rest (ProposalTrainer.prepare).
        trainer.keys, trainer.val_keys, trainer.train_keys = held + rest, held, rest
        trainer.prepare()
        results.append(trainer.evaluate(trainer.run()))
        print(f"  {sizes}: fold {fold}: recall@0.7 {results[-1][0]:.3f}, @0.5 {results[-1][1]:.3f} ({len(held)} images held out)", flush=True)
    return results


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="raccoon,bccd,coco128")
    parser.add_argument("--anchors", nargs="+", default=["16,32,64,128,256,512", "16,32,64,128,256,512,768"])
    parser.add_argument("--work", type=Path, help="keep the caches here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="spp-anchors-"))
    rows = []
    for name in args.datasets.split(","):
        cache, keys = training_cache(name, work)
        print(f"{name} ({DATASETS[name][1]}):", flush=True)
        for anchors in args.anchors:
            sizes = tuple(int(side) for side in anchors.split(","))
            r7, r5 = np.mean(held_out_recall(cache, keys, sizes), axis=0)
            print(f"{name} {sizes}: mean held-out recall@0.7 {r7:.3f}, @0.5 {r5:.3f}", flush=True)
            rows.append({"dataset": name, "anchor_sizes": list(sizes), "recall@0.7": round(float(r7), 3), "recall@0.5": round(float(r5), 3)})
    print(json.dumps({"anchors": rows}))


if __name__ == "__main__":
    main()
