"""The SVMs' positives (ground truth only, R-CNN's, against ground truth plus the windows at IoU >= X) and C.

Reuses the work folder of an `spp train` run (its cache, its proposal
network, its split): for each value of ``--ious`` the SVM step of that run
is repeated with positives at IoU >= X on the fit part (`checkout.svm_step`: the
run's fit keys in the run's order, as `spp train` mines them), then
scored on the validation part (as `spp train` scores its candidates) and,
with ``--test``, by `spp detect` + `spp eval --metric voc07` on the
dataset's test split. Every value mines the images in the same order, so the
columns differ by the positives alone. ``--cs`` repeats each with other SVM
regularisations C (default: `spp train`'s).

    spp train --data ../shared/data/raccoon --split train --out r.safetensors --work W
    python benchmarks/positives.py --dataset raccoon --work W [--ious 0,0.7] [--cs 0.03,0.1] [--test]
    (a second candidate of --scales auto: --work W/<its folder>, e.g. W/efficientnet_lite0_b4-scale-688)

With one value (``--ious 0.7``, spp train's) it times spp train's SVM step
alone: its train_svm_s and the spp process's peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(checkout.DATASETS), required=True)
    parser.add_argument("--work", type=Path, required=True, help="an spp train work folder (or its scale-<S> folder)")
    parser.add_argument("--ious", default="0,0.7")
    parser.add_argument("--cs", help="SVM regularisations C, comma-separated (default: spp train's)")
    parser.add_argument("--test", action="store_true", help="also detect and score the test split")
    args = parser.parse_args()

    from spp_cli.pipeline import TrainPlan, validation_results

    run = checkout.train_run(args.dataset, args.work)
    data, val, test_split = run.data, run.val, checkout.DATASETS[args.dataset][2]
    proposal_model = checkout.proposal_model(run, args.work)  # the run's windows at this map
    learned = proposal_model is not None
    print(f"{args.dataset}: {len(run.fit_keys)} fit / {len(val)} validation images, windows {'learned' if learned else 'selective search'}")
    rows = []
    cs = [float(c) for c in args.cs.split(",")] if args.cs else [TrainPlan.svm_c]
    for iou, C in itertools.product(args.ious.split(","), cs):
        model = args.work / f"positives-{iou}-C{C:g}.safetensors"
        seconds = checkout.svm_step(run, args.work, model, float(iou), proposal_model, C)
        # The largest spp process's peak so far: train-svm's own on the first value.
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        mean, per_class, _ = validation_results(model, args.work / "feats", val)
        row = {"positive_iou": float(iou), "C": C, "validation_map": round(mean, 4), "train_svm_s": round(seconds, 1),
               "peak_rss_gb_so_far": round(peak_gb, 2)}
        if args.test:
            dets = model.with_suffix(".dets.json")
            checkout.run_spp("detect", "--data", data, "--split", test_split, "--model", str(model), "--out", str(dets))
            metrics = model.with_suffix(".metrics.json")
            checkout.run_spp("eval", str(dets), "--data", data, "--split", test_split, "--metric", "voc07", "--out", str(metrics))
            row["test_map"] = round(json.loads(metrics.read_text())["mAP"], 4)
        print(f"  positive IoU {iou}, C {C:g}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("positive_iou", "C")), flush=True)
        rows.append(row)
    print(json.dumps({"dataset": args.dataset, "rows": rows}))


if __name__ == "__main__":
    main()
