"""Detection accuracy of the SPPnet steps, with the toolkit's own commands.

For each dataset (raccoon: its train/test split; coco128: the fixed split in
benchmarks/splits/) and each pyramid (1 scale: 688; 5 scales:
480,576,688,864,1200), one proposal file and one feature cache of the whole
dataset (every image through the network once), then:

    pool5        train-svm on SPP vectors,               detect --no-bbox-reg --no-vote
    pool5+bbox   the same model,                         detect --no-vote (box regression)
    +vote        the same model,                         detect (box regression, box voting: the default)
    ftfc7        finetune, train-svm --features fc7,     detect --no-bbox-reg --no-vote
    ftfc7+bbox   the same model,                         detect --no-vote
    +vote        the same model,                         detect

each scored with `spp eval --metric voc07` on the test split (AP at IoU 0.5).
The SPPnet steps (pool5, ftfc7, box regression) are measured without box
voting, the paper's protocol; the +vote columns are what `spp detect` does.
Prints a table of every setting; nothing is picked by its test score. The
figure that stands for a dataset is the toolkit's default flow (`spp cache`'s
one scale, pool5 SVMs, `spp detect`'s defaults: `1scale_pool5_bbox_vote`, or
the first pyramid of --scales without 1), and for coco128 the per-class AP
of classes with >= 5 test instances is printed at that setting. The last
line is a JSON object mapping each setting to its mAP (keys like
`raccoon_1scale_ftfc7_bbox`), plus `<dataset>_default_flow_map` and
`coco128_person_ap50` (at the default flow).

    python benchmarks/accuracy.py [--datasets raccoon,coco128] [--scales 1,5] [--work DIR]

Every run starts from nothing in a temporary folder. --work DIR keeps the
files; a later run with --work DIR reuses them only if they were made by the
same spp_cli source, backbone and settings (a stamp file says), and starts
afresh there otherwise, so that new code never scores a stale model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses

from spp_cli.backbones import DEFAULT_BACKBONE

REPO = checkout.REPO
SHARED = REPO.parent / "shared" / "data"
SCALES = {"1scale": "688", "5scale": "480,576,688,864,1200"}
DATASETS = {
    "raccoon": (str(SHARED / "raccoon"), "train", "test"),
    "coco128": (
        str(SHARED / "coco128" / "annotations" / "instances_train2017.json"),
        str(REPO / "benchmarks" / "splits" / "coco128-train.txt"),
        str(REPO / "benchmarks" / "splits" / "coco128-test.txt"),
    ),
}
STEPS = ("pool5", "pool5_bbox", "pool5_bbox_vote", "ftfc7", "ftfc7_bbox", "ftfc7_bbox_vote")
# `spp detect` flags of each step (the model: pool5 or fc7, by the step's name).
DETECT_FLAGS = {
    "pool5": ["--no-bbox-reg", "--no-vote"], "pool5_bbox": ["--no-vote"], "pool5_bbox_vote": [],
    "ftfc7": ["--no-bbox-reg", "--no-vote"], "ftfc7_bbox": ["--no-vote"], "ftfc7_bbox_vote": [],
}


def spp(*args: str) -> float:
    """Run `spp ARGS` in a subprocess; seconds taken. Stops the benchmark on failure."""
    return checkout.run_spp(*args, allowed=(0,))[0]


def source_fingerprint() -> str:
    """sha256 over this checkout's spp_cli sources: what made the work files."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "spp_cli").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def prepare_work(work: Path, stamp: dict) -> None:
    """Reuse ``work`` only if its stamp matches ``stamp``; else empty it."""
    stamp_file = work / "stamp.json"
    if work.exists():
        try:
            previous = json.loads(stamp_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == stamp:
            print(f"reusing {work} (same spp_cli source and settings)", flush=True)
            return
        print(f"{work}: made by other code or settings; starting afresh", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    stamp_file.write_text(json.dumps(stamp))


def default_flow(scales: list[str]) -> str:
    """The setting the toolkit's default commands give (no choice made on test)."""
    return f"{'1scale' if '1scale' in scales else scales[0]}_pool5_bbox_vote"


def evaluate(dets: Path, spec: str, split: str, out: Path) -> dict:
    spp("eval", dets, "--data", spec, "--split", split, "--metric", "voc07", "--out", out)
    return json.loads(out.read_text())


def test_instances(spec: str, split: str) -> dict[str, int]:
    from spp_cli.data import open_dataset

    counts: dict[str, int] = {}
    dataset = open_dataset(spec, split)
    for record in dataset.records:
        for label, difficult, crowd in zip(record.labels, record.difficult, record.iscrowd):
            if not difficult and not crowd:
                name = dataset.classes[int(label)]
                counts[name] = counts.get(name, 0) + 1
    return counts


def run_dataset(name: str, scales: list[str], work: Path, figures: dict, backbone: str) -> None:
    spec, train, test = DATASETS[name]
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    props = root / "props.json"
    if not props.is_file():
        seconds = spp("propose", "--data", spec, "--out", props)
        print(f"{name}: proposals {seconds:.0f} s", flush=True)
    for scale_name in scales:
        cache = root / f"cache-{scale_name}"
        seconds = spp("cache", "--data", spec, "--props", props, "--cache", cache, "--scales", SCALES[scale_name], "--backbone", backbone)
        print(f"{name} {scale_name}: cache {seconds:.0f} s", flush=True)
        pool5 = root / f"pool5-{scale_name}.safetensors"
        head = root / f"head-{scale_name}.safetensors"
        fc7 = root / f"fc7-{scale_name}.safetensors"
        if not pool5.is_file():
            figures[f"{name}_{scale_name}_train_svm_pool5_s"] = round(spp("train-svm", "--cache", cache, "--data", spec, "--split", train, "--out", pool5), 1)
        if not head.is_file():
            figures[f"{name}_{scale_name}_finetune_s"] = round(spp("finetune", "--cache", cache, "--data", spec, "--split", train, "--out", head), 1)
        if not fc7.is_file():
            figures[f"{name}_{scale_name}_train_svm_fc7_s"] = round(
                spp("train-svm", "--cache", cache, "--data", spec, "--split", train, "--features", "fc7", "--head", head, "--out", fc7), 1
            )
        for step in STEPS:
            model = pool5 if step.startswith("pool5") else fc7
            dets = root / f"dets-{scale_name}-{step}.json"
            flags = DETECT_FLAGS[step]
            spp("detect", "--data", spec, "--split", test, "--cache", cache, "--model", model, "--out", dets, *flags)
            metrics = evaluate(dets, spec, test, root / f"metrics-{scale_name}-{step}.json")
            figures[f"{name}_{scale_name}_{step}"] = round(metrics["mAP"], 4)
            figures.setdefault("_per_class", {})[f"{name}_{scale_name}_{step}"] = metrics["per_class"]
            print(f"{name} {scale_name} {step}: mAP {metrics['mAP']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="raccoon,coco128")
    parser.add_argument("--scales", default="1,5", help="1, 5 or 1,5")
    parser.add_argument("--work", type=Path, default=None, help="keep the work files here (reused only by the same code and settings)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="registry name (spp cache --backbone)")
    args = parser.parse_args()
    checkout.check()
    scales = [f"{s}scale" for s in args.scales.split(",")]
    figures: dict = {}
    datasets = args.datasets.split(",")
    with tempfile.TemporaryDirectory(prefix="spp-accuracy-") as tmp:
        work = args.work or Path(tmp) / "work"
        prepare_work(work, {"spp_cli": source_fingerprint(), "backbone": args.backbone})
        for name in datasets:
            run_dataset(name, scales, work, figures, args.backbone)
    per_class = figures.pop("_per_class")
    reported = default_flow(scales)

    print()
    print(f"{'dataset':<9} {'scales':<7} " + " ".join(f"{s:>15}" for s in STEPS))
    for name in datasets:
        for scale_name in scales:
            row = " ".join(f"{figures[f'{name}_{scale_name}_{s}']:>15.3f}" for s in STEPS)
            print(f"{name:<9} {scale_name:<7} {row}")
        figures[f"{name}_default_flow_map"] = figures[f"{name}_{reported}"]
    print(f"default flow ({reported}): " + ", ".join(f"{n} {figures[f'{n}_default_flow_map']:.3f}" for n in datasets))
    if "coco128" in datasets:
        spec, _, test = DATASETS["coco128"]
        counts = test_instances(spec, test)
        setting = f"coco128_{reported}"
        frequent = sorted((c for c, n in counts.items() if n >= 5), key=lambda c: -counts[c])
        print(f"\ncoco128 per-class AP50 at the default flow, {reported} (classes with >= 5 test instances):")
        for c in frequent:
            print(f"  {c:<14} {counts[c]:>4} instances  AP {(per_class[setting].get(c) or 0.0):.3f}")
        figures["coco128_person_ap50"] = round(per_class[setting].get("person") or 0.0, 4)
        figures["coco128_frequent_class_ap50"] = {c: round(per_class[setting].get(c) or 0.0, 4) for c in frequent}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
