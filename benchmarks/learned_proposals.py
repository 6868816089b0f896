"""Learned proposals against selective search: recall on the test splits, in one run.

Per dataset: `spp cache` of the training split, `spp train-proposals` on it,
then `spp propose --report` on the test split with the learned model (300 and
at most 1000 boxes per image) and with selective search (the default, up to
2000), and the recall of the raccoon-trained model on the other test splits
(the proposals are class-agnostic: what a user gets who trains on one set
and proposes on another). Prints a table of recall@0.5 / recall@0.7 and
boxes per image, and a last line of JSON. Not a test: ~20 min on 2 cores.

With ``--detection``: detection instead, per dataset `spp train --proposals
learned` and `spp train --proposals selective-search` on the training split
(the same data and defaults otherwise, each from its own empty work folder),
then `spp detect` and `spp eval --metric voc07` on the test split: a table of
test mAP, training seconds and detect seconds per image for both (~35 min for
raccoon and bccd on 2 cores).

    python benchmarks/learned_proposals.py [--datasets raccoon,bccd,coco128] [--detection] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses

REPO = checkout.REPO
DATASETS = checkout.DATASETS
# The console may wrap long lines: match across whitespace of any kind.
ALL_ROW = re.compile(r"│ all\s+│\s+(\d+)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│")
BOXES = re.compile(r"Wrote\s.+?:\s+\d+\s+images,\s+(\d+)\s+boxes/image", re.S)


def spp(*args) -> str:
    return checkout.run_spp(*args, allowed=(0,))[1]


def report(*args) -> dict:
    """`spp propose ... --report`'s overall recall and boxes per image."""
    output = spp("propose", *args, "--report")
    row, boxes = ALL_ROW.search(output), BOXES.search(output)
    if row is None or boxes is None:
        raise SystemExit(f"no recall table in the output of spp propose:\n{output[-2000:]}")
    return {"gt": int(row.group(1)), "recall@0.5": float(row.group(2)), "recall@0.7": float(row.group(3)), "boxes": int(boxes.group(1))}


def detection(names: list[str], work: Path, scales: str = "auto") -> None:
    """Test mAP of `spp train` with learned proposals and with selective search, side by side."""
    from spp_cli.data import open_dataset

    rows = []
    for name in names:
        data, train, test = DATASETS[name]
        row = {"dataset": name}
        images = len(open_dataset(data, test).records)
        for proposals in ("learned", "selective-search"):
            folder = work / name / proposals
            folder.mkdir(parents=True, exist_ok=True)
            model, dets, metrics = folder / "model.safetensors", folder / "dets.json", folder / "metrics.json"
            train_s, _ = checkout.run_spp("train", "--data", data, "--split", train, "--out", model, "--proposals", proposals, "--scales", scales, allowed=(0,))
            detect_s, _ = checkout.run_spp("detect", "--data", data, "--split", test, "--model", model, "--out", dets, allowed=(0,))
            spp("eval", dets, "--data", data, "--split", test, "--metric", "voc07", "--out", metrics)
            row[proposals] = {"mAP": json.loads(metrics.read_text())["mAP"], "train_s": round(train_s), "detect_s_per_image": round(detect_s / images, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"{'test split':<10} | {'learned: mAP, train s, detect s/img':>36} | {'selective search: mAP, train s, detect s/img':>46}")
    for row in rows:
        a, b = row["learned"], row["selective-search"]
        print(f"{row['dataset']:<10} | {a['mAP']:>14.3f} {a['train_s']:>9} {a['detect_s_per_image']:>11.3f} | "
              f"{b['mAP']:>24.3f} {b['train_s']:>9} {b['detect_s_per_image']:>11.3f}")
    print(json.dumps({"detection": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="raccoon,bccd,coco128")
    parser.add_argument("--detection", action="store_true", help="test mAP of spp train with each kind of proposals instead of recall")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--scales", default="auto", help="spp train --scales for --detection (688: one scale, half the training)")
    args = parser.parse_args()
    checkout.check()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if args.detection:
        with tempfile.TemporaryDirectory() as tmp:
            detection(names, args.work or Path(tmp), args.scales)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows, models = [], {}
        for name in names:
            data, train, test = DATASETS[name]
            folder = work / name
            folder.mkdir(parents=True, exist_ok=True)
            spp("cache", "--data", data, "--split", train, "--cache", folder / "feats")
            models[name] = folder / "proposals.safetensors"
            spp("train-proposals", "--cache", folder / "feats", "--data", data, "--split", train, "--out", models[name])
            row = {"dataset": name}
            for top in (300, 1000):
                row[f"learned_{top}"] = report("--data", data, "--split", test, "--method", "learned", "--model", models[name],
                                               "--top", str(top), "--out", folder / f"learned-{top}.json")
            row["selective_search"] = report("--data", data, "--split", test, "--out", folder / "ss.json")
            print(json.dumps(row), flush=True)
            rows.append(row)
        cross = []
        if "raccoon" in models:
            for name in names:
                if name != "raccoon":
                    data, _, test = DATASETS[name]
                    found = report("--data", data, "--split", test, "--method", "learned", "--model", models["raccoon"],
                                   "--out", work / name / "learned-from-raccoon.json")
                    cross.append({"dataset": name, **found})
    print(f"{'test split':<10} {'boxes':>6} | {'learned 300':>13} | {'learned <=1000':>16} | {'selective search':>24}")
    for row in rows:
        cells = [row["learned_300"], row["learned_1000"], row["selective_search"]]
        text = " | ".join(f"{c['recall@0.5']:.3f} / {c['recall@0.7']:.3f} ({c['boxes']})" for c in cells)
        print(f"{row['dataset']:<10} {row['learned_300']['gt']:>6} | {text}")
    for row in cross:
        print(f"raccoon's model on {row['dataset']}: recall@0.5 {row['recall@0.5']:.3f}, @0.7 {row['recall@0.7']:.3f} ({row['boxes']} boxes/image)")
    print(json.dumps({"rows": rows, "from_raccoon": cross}))


if __name__ == "__main__":
    main()
