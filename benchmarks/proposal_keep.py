"""Which weights of the proposal network to keep, judged by the detector they lead to.

`proposal_epochs.py` compares rules for keeping an epoch by the network's own
recall. This script follows each rule through to the SVMs: it reuses the
work folder of an `spp train` run (its cache, its split), trains the proposal
network on the fit part with `spp train`'s trainer and defaults once per seed
(recording every epoch's weights), and for each rule

- ``best``: the epoch of best held-out recall@0.7 (recall@0.5 breaks ties, the
  later of equals wins) on the trainer's held-out tenth;
- ``last``: the last epoch (the trainer's rule);
- ``avg4`` / ``avg8``: the mean of the last 4 / 8 epochs' weights (4: the
  epochs after the learning rate's drop);
- ``all``: the last epoch of a second network, trained on every fit image
  (no held-out tenth; the same seed)

repeats the run's SVM step (`checkout.svm_step`: the run's fit keys in the
run's order, the rule's network carried, positives at IoU 0.7) and scores it on the validation part as `spp train` scores its
candidates. Per rule it prints the mean over seeds of the validation mAP and
of the network's recall@0.5 / @0.7 at 300 boxes on the validation part (which
neither the network nor the SVMs saw), then a last line of JSON. No test
split is read. The seeds stand in for what another CPU's rounding does to the
network's 2,000-odd SGD steps.

    spp train --data ../shared/data/raccoon --split train --out r.safetensors --work W
    python benchmarks/proposal_keep.py --dataset raccoon --work W [--seeds 0,1,2,3] [--rules best,last,avg4,avg8,all] [--C 0.1]
    (a second candidate of spp train: --work W/<its folder>, e.g. W/efficientnet_lite0_b4-scale-688)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
import torch

RULES = ("best", "last", "avg4", "avg8", "all")


def kept_weights(snapshots: list[dict], history: list[dict], rule: str) -> dict:
    """The head weights ``rule`` keeps of a run's per-epoch ``snapshots``."""
    if rule == "last":
        return snapshots[-1]
    if rule == "best":
        best = 0
        for i, h in enumerate(history):
            if (h["recall@0.7"], h["recall@0.5"]) >= (history[best]["recall@0.7"], history[best]["recall@0.5"]):
                best = i
        return snapshots[best]
    chosen = snapshots[-int(rule.removeprefix("avg")):]
    return {name: torch.stack([s[name] for s in chosen]).mean(0) for name in chosen[0]}


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(checkout.DATASETS), required=True)
    parser.add_argument("--work", type=Path, required=True, help="an spp train work folder (or a candidate's folder in it)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default="best,last,avg4,avg8")
    parser.add_argument("--C", type=float, help="the SVMs' regularisation (default: spp train's)")
    args = parser.parse_args()
    unknown = sorted(set(args.rules.split(",")) - set(RULES))
    if unknown:
        parser.error(f"unknown rule(s) {', '.join(unknown)}: choose from {', '.join(RULES)}")

    from spp_cli.cache import image_key
    from spp_cli.pipeline import validation_results
    from spp_cli.rpn import ProposalConfig, ProposalTrainer, recall

    run = checkout.train_run(args.dataset, args.work)
    cache, val = run.cache, run.val
    fit_keys = [k for k in run.fit_keys if cache.metadata(k).get("has_gt")]  # what run_train_proposals trains on
    val_entries = [cache.read(image_key(r.path)) for r, _ in val]
    truth = [np.asarray(e.gt_boxes if e.gt_boxes is not None else np.zeros((0, 4)), np.float32) for e in val_entries]
    print(f"{args.dataset}: proposal network and SVMs on {len(fit_keys)} fit images, scored on {len(val)} validation images")

    snapshots: list[dict] = []

    class Recording(ProposalTrainer):
        def evaluate(self, model):  # after each epoch: keep its weights too
            snapshots.append({k: v.detach().clone() for k, v in model.net.head.state_dict().items()})
            return super().evaluate(model)

    rows = []
    for seed in map(int, args.seeds.split(",")):
        snapshots.clear()
        start = time.perf_counter()
        trainer = Recording(cache, fit_keys, ProposalConfig(seed=seed))
        trainer.prepare()
        model = trainer.run()
        network_s = time.perf_counter() - start
        kept = {rule: kept_weights(snapshots, model.training["history"], rule) for rule in args.rules.split(",") if rule != "all"}
        if "all" in args.rules.split(","):
            start = time.perf_counter()
            every = ProposalTrainer(cache, fit_keys, ProposalConfig(seed=seed, val_fraction=0.0))
            every.prepare()
            kept["all"] = {k: v.detach().clone() for k, v in every.run().net.head.state_dict().items()}
            network_s += time.perf_counter() - start
        for rule in args.rules.split(","):
            model.net.head.load_state_dict(kept[rule])
            found = [model.propose(e.maps, e.factors, e.width, e.height)[0] for e in val_entries]
            network = args.work / f"proposal-keep-{seed}-{rule}.safetensors"
            model.save(network)
            detector = args.work / f"proposal-keep-{seed}-{rule}.detector.safetensors"
            svm_s = checkout.svm_step(run, args.work, detector, 0.7, network, args.C)
            mean_ap, _, _ = validation_results(detector, args.work / "feats", val)
            row = {"seed": seed, "rule": rule, "validation_map": round(mean_ap, 4), "recall@0.5": round(recall(found, truth, 0.5), 4),
                   "recall@0.7": round(recall(found, truth, 0.7), 4), "network_s": round(network_s, 1), "svm_s": round(svm_s, 1)}
            print("  " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            rows.append(row)
    summary = []
    for rule in args.rules.split(","):
        mine = [r for r in rows if r["rule"] == rule]
        mean = {k: round(float(np.mean([r[k] for r in mine])), 4) for k in ("validation_map", "recall@0.5", "recall@0.7")}
        print(f"{args.dataset} {rule:>5}: mean over {len(mine)} seeds: validation mAP {mean['validation_map']:.3f} "
              f"({', '.join(format(r['validation_map'], '.3f') for r in mine)}), recall@0.5 {mean['recall@0.5']:.3f}, @0.7 {mean['recall@0.7']:.3f}")
        summary.append({"rule": rule, **mean})
    print(json.dumps({"dataset": args.dataset, "work": str(args.work), "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
