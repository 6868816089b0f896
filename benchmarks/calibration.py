"""Are `spp train`'s probabilities right as often as they say? A reliability table per dataset.

Per dataset: `spp train --data D --split TRAIN` with its defaults (the
probabilities are fitted on the validation part of the training split),
then `spp detect --data D --split TEST` from the image files and every
detection marked right or wrong by the VOC devkit's matching (IoU 0.5,
difficult boxes left out). Prints, per probability bin, how many
detections fell in it, their mean predicted probability and the share that
was right (observed precision); the expected calibration error (the
bins' |predicted - observed| weighted by their counts); and the precision
of the detections shown by default (probability >= 0.5). Last line: JSON.

    python benchmarks/calibration.py [--datasets raccoon,bccd,coco128] [--work DIR]

`--work` keeps each dataset's `spp train` folder, so a rerun only refits
the final model (and, with a folder from an spp that did not calibrate,
scores the validation part again).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
from vs_faster_rcnn import DATASETS  # the same datasets and splits

REPO = checkout.REPO
SHARED = REPO.parent / "shared" / "data"
SPLITS = REPO / "benchmarks" / "splits"



def spp(*args: str) -> float:
    return checkout.run_spp(*args)[0]


def reliability(name: str, work: Path) -> dict:
    from spp_cli.calibration import detection_outcomes, reliability_table
    from spp_cli.data import open_dataset
    from spp_cli.detections import read_detections
    from spp_cli.evaluate import pair_with_detections
    from spp_cli.model import Detector

    data, train, test = DATASETS[name]
    model, dets = work / "model.safetensors", work / "dets.json"
    train_s = spp("train", "--data", data, "--split", train, "--out", model, "--work", work / "train")
    detect_s = spp("detect", "--data", data, "--split", test, "--model", model, "--out", dets)
    metrics = work / "metrics.json"
    spp("eval", dets, "--data", data, "--split", test, "--metric", "voc07", "--out", metrics)
    test_map = json.loads(metrics.read_text())["mAP"]
    detector = Detector.load(model)
    if detector.calibration is None:
        return {"dataset": name, "calibrated": False, "test_mAP": round(float(test_map), 4)}
    dataset = open_dataset(data, test)
    pairs, _ = pair_with_detections(dataset.records, dataset.classes, read_detections(dets).images)  # as spp eval pairs them
    margins, right = detection_outcomes(pairs, [c for c in dataset.classes if c in detector.classes])
    probabilities = detector.calibration.probability(margins)
    rows = reliability_table(probabilities, right)
    ece = sum(r["detections"] * abs(r["predicted"] - r["observed"]) for r in rows) / max(len(right), 1)
    shown = probabilities >= detector.calibration.display_probability
    return {
        "dataset": name,
        "calibrated": True,
        "fitted_on": {"detections": detector.calibration.detections, "right": detector.calibration.right, "images": detector.calibration.images},
        "features": detector.feature_kind,
        "test_mAP": round(float(test_map), 4),
        "test_detections": int(len(right)),
        "bins": rows,
        "ece": round(float(ece), 4),
        "shown": int(shown.sum()),
        "shown_precision": round(float(right[shown].mean()), 4) if shown.any() else None,
        "shown_mean_probability": round(float(probabilities[shown].mean()), 4) if shown.any() else None,
        "train_s": round(train_s, 1),
        "detect_s": round(detect_s, 1),
    }


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="raccoon,bccd,coco128")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="spp-calibration-"))
    results = []
    for name in args.datasets.split(","):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        result = reliability(name, work)
        results.append(result)
        if not result["calibrated"]:
            print(f"{name}: test VOC07 mAP {result['test_mAP']:.3f}; too few validation detections to fit probabilities")
            continue
        fitted = result["fitted_on"]
        print(f"\n{name} (test VOC07 mAP {result['test_mAP']:.3f}, {result['features']}; fitted on {fitted['detections']} validation detections, {fitted['right']} right, "
              f"{fitted['images']} images; {result['test_detections']} test detections)")
        print(f"{'probability':>12}{'detections':>12}{'predicted':>11}{'observed':>10}")
        for row in result["bins"]:
            print(f"{row['bin']:>12}{row['detections']:>12}{row['predicted']:>11.3f}{row['observed']:>10.3f}")
        print(f"expected calibration error {result['ece']:.3f}; shown (probability >= 0.5): {result['shown']}, "
              f"precision {result['shown_precision']} at mean probability {result['shown_mean_probability']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
