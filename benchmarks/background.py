"""What background negatives do to a raccoon detector, in one run.

One cache holds raccoon (train and test), the coco128 images of the fixed
*train* split (benchmarks/splits; COCO has no raccoon class, so none holds
one) and coco128's test split, plus scikit-image's chelsea, astronaut and
coffee (tests/data). Two pool5 detectors are trained on raccoon train with
`examples/train_voc.sh`'s pool5 recipe (`spp train-svm`, defaults): without and with
`--negatives` = the coco128 train images. Each is scored on

- raccoon test: VOC07 AP (`spp eval`), the detector's defaults;
- images holding no raccoon (the 3 scikit-image photos, the coco128 test
  split): the share with a detection at or above the display threshold.

    python benchmarks/background.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses

REPO = checkout.REPO
SHARED = REPO.parent / "shared" / "data"
COCO = SHARED / "coco128" / "images" / "train2017"


def spp(*args: str) -> float:
    return checkout.run_spp(*args)[0]


def coco_paths(split: str) -> list[Path]:
    ids = (REPO / "benchmarks" / "splits" / f"coco128-{split}.txt").read_text().split()
    return [COCO / f"{i}.jpg" for i in ids]


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="spp-background-"))
    work.mkdir(parents=True, exist_ok=True)
    raccoon = SHARED / "raccoon"
    negatives = work / "coco-train.txt"
    negatives.write_text("\n".join(map(str, coco_paths("train"))) + "\n")
    photos = [REPO / "tests" / "data" / f"{name}.jpg" for name in ("chelsea", "astronaut", "coffee")]
    no_raccoon = work / "no-raccoon.txt"
    no_raccoon.write_text("\n".join(map(str, photos + coco_paths("test"))) + "\n")
    feats = work / "feats"
    seconds = spp("cache", "--data", raccoon, "--cache", feats)
    seconds += spp("cache", negatives, no_raccoon, "--cache", feats)
    print(f"cache: raccoon 200 + coco128 {len(coco_paths('train'))} train + {len(photos)} photos + {len(coco_paths('test'))} coco128 test, {seconds:.0f} s")

    from spp_cli.detections import read_detections
    from spp_cli.model import Detector

    rows = {}
    for name, extra in (("without negatives", []), ("with coco128-train negatives", ["--negatives", negatives])):
        model = work / f"model-{len(extra)}.safetensors"
        train_s = spp("train-svm", "--cache", feats, "--data", raccoon, "--split", "train", "--out", model, *extra)
        dets, metrics = work / f"dets-{len(extra)}.json", work / f"metrics-{len(extra)}.json"
        spp("detect", "--data", raccoon, "--split", "test", "--cache", feats, "--model", model, "--out", dets)
        spp("eval", dets, "--data", raccoon, "--split", "test", "--out", metrics)
        shown_at = Detector.load(model).detect.display_threshold
        background = work / f"background-{len(extra)}.json"
        spp("detect", no_raccoon, "--cache", feats, "--model", model, "--conf", str(shown_at), "--out", background)
        images = read_detections(background).images
        with_shown = [e for e in images if e.detections]
        top = max((d["score"] for e in images for d in e.detections), default=float("nan"))
        photo_hits = [Path(e.path).stem for e in with_shown if Path(e.path).parent == REPO / "tests" / "data"]
        rows[name] = {
            "raccoon_test_ap": json.loads(metrics.read_text())["mAP"],
            "no_raccoon_images": len(images),
            "with_a_shown_detection": len(with_shown),
            "clean_share": round(1 - len(with_shown) / max(len(images), 1), 4),
            "photos_with_a_shown_detection": photo_hits,
            "top_score": top,
            "train_svm_s": round(train_s, 1),
        }
    print(f"\n{'':32}{'raccoon AP':>11}{'clean':>8}{'shown on':>10}{'top score':>10}{'train s':>9}  photos shown")
    for name, row in rows.items():
        print(f"{name:32}{row['raccoon_test_ap']:>11.3f}{row['clean_share']:>8.3f}{row['with_a_shown_detection']:>6}/{row['no_raccoon_images']:<3}"
              f"{row['top_score']:>10.2f}{row['train_svm_s']:>9.0f}  {', '.join(row['photos_with_a_shown_detection']) or '-'}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
