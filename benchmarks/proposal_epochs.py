"""Which epoch of the proposal network to keep, compared on the training splits only (3-fold).

`spp train-proposals` holds out a tenth of its images and reports their
recall after each epoch. On raccoon that tenth is 14 images and 15 boxes: one
box moves recall@0.7 by 0.067, so an epoch picked by it is close to a draw.
This script measures three rules for keeping an epoch, each on data none of
them saw (`proposal_keep.py` follows them through to the SVMs):

- ``recall@0.7``: the best held-out recall@0.7 (recall@0.5 breaks ties, the later epoch wins a full tie);
- ``AR``: the highest average recall over IoU 0.5, 0.55, ..., 0.95 (Hosang et
  al., 2015: what tracks detection accuracy best) on the same held-out tenth;
- ``last``: no choice, the last epoch of the schedule (Faster R-CNN's way, and the trainer's).

Per dataset: `spp cache --no-proposals` of the training split, then three
folds by the sha256 rank of the image id; each trains the proposal network
(`spp train-proposals`' trainer and defaults, its own held-out tenth) on two
thirds and records, after every epoch, recall@0.5 / @0.7 and AR at 300 boxes
on the third it never saw. Prints, per rule, the mean over folds of that
third's figures at the epoch the rule keeps, and a last line of JSON. No
test split is read. Not a test: ~15 min for the three datasets on 2 cores.

    python benchmarks/proposal_epochs.py [--datasets raccoon,bccd,coco128] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
from anchors import FOLDS, training_cache  # the same caches and folds as the anchor comparison
AR_IOUS = tuple(0.5 + 0.05 * i for i in range(10))
RULES = ("recall@0.7", "AR", "last")


def figures(found: list[np.ndarray], truth: list[np.ndarray]) -> dict:
    from spp_cli.rpn import recall

    return {"recall@0.5": recall(found, truth, 0.5), "recall@0.7": recall(found, truth, 0.7),
            "AR": float(np.mean([recall(found, truth, iou) for iou in AR_IOUS]))}


def fold_history(cache, keys: list[str], held: list[str]) -> list[dict]:
    """Per epoch: the trainer's own held-out tenth's figures (``inner``) and the fold's third's (``outer``)."""
    from spp_cli.rpn import ProposalConfig, ProposalTrainer

    # The third, read as the trainer reads its own held-out images (crowd boxes dropped): all of it held out.
    outer = ProposalTrainer(cache, held, ProposalConfig(val_fraction=1.0))
    outer.prepare()
    history: list[dict] = []

    def held_out_figures(model, reader: ProposalTrainer) -> dict:
        found = [model.propose(reader.maps(i), i.factors, i.width, i.height)[0] for i in reader.val]
        return figures(found, [i.gt_boxes for i in reader.val])

    class Recording(ProposalTrainer):
        def evaluate(self, model):
            inner = held_out_figures(model, self)
            history.append({"inner": inner, "outer": held_out_figures(model, outer)})
            return inner["recall@0.7"], inner["recall@0.5"]

    trainer = Recording(cache, [k for k in keys if k not in set(held)], ProposalConfig())
    trainer.prepare()
    trainer.run()
    return history


def kept_epoch(history: list[dict], rule: str) -> int:
    """Index of the epoch ``rule`` keeps (the later of equals, as the trainer does)."""
    if rule == "last":
        return len(history) - 1
    if rule == "AR":
        key = lambda i: history[i]["inner"]["AR"]  # noqa: E731
    else:
        key = lambda i: (history[i]["inner"]["recall@0.7"], history[i]["inner"]["recall@0.5"])  # noqa: E731
    best = 0
    for i in range(len(history)):
        if key(i) >= key(best):
            best = i
    return best


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="raccoon,bccd,coco128")
    parser.add_argument("--work", type=Path, help="keep the caches here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="spp-epochs-"))
    rows = []
    for name in args.datasets.split(","):
        cache, keys = training_cache(name, work)
        per_rule: dict[str, list[dict]] = {rule: [] for rule in RULES}
        for fold in range(FOLDS):
            history = fold_history(cache, keys, keys[fold::FOLDS])
            for rule in RULES:
                epoch = kept_epoch(history, rule)
                per_rule[rule].append({"epoch": epoch + 1, **history[epoch]["outer"]})
                shown = history[epoch]["outer"]
                print(f"  {name} fold {fold} {rule:>10}: epoch {epoch + 1:2d}, unseen third recall@0.5 {shown['recall@0.5']:.3f}, "
                      f"@0.7 {shown['recall@0.7']:.3f}, AR {shown['AR']:.3f}", flush=True)
        for rule in RULES:
            mean = {k: round(float(np.mean([r[k] for r in per_rule[rule]])), 4) for k in ("recall@0.5", "recall@0.7", "AR")}
            print(f"{name} {rule:>10}: mean over folds, unseen third: recall@0.5 {mean['recall@0.5']:.3f}, @0.7 {mean['recall@0.7']:.3f}, "
                  f"AR {mean['AR']:.3f} (epochs {[r['epoch'] for r in per_rule[rule]]})", flush=True)
            rows.append({"dataset": name, "rule": rule, **mean, "epochs": [r["epoch"] for r in per_rule[rule]]})
    print(json.dumps({"proposal_epochs": rows}))


if __name__ == "__main__":
    main()
