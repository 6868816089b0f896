"""SPP vs R-CNN detection on raccoon, side by side: accuracy, training time, detection time.

Raccoon train -> test, the default backbone (EfficientNet-Lite0, ImageNet
weights), 1 scale (688), SVMs + box regression, through the toolkit's own
commands (`python -m spp_cli` subprocesses, this checkout first on the path):

    propose (train and test, --top N, not timed) -> cache (train, 1 scale)
    -> train-svm (SPP) and train-svm --mode rcnn -> detect (test, the same
    proposals; the papers' protocol `--no-vote`, and with box voting) ->
    eval (VOC07 11-point mAP)

Both modes see the same proposals; `--top` bounds their number, because
R-CNN runs the network on every window (about 7 ms each on one core of this
machine's CPU, so 160 images x 500 windows is ~10 minutes). Training time:
SPP = `spp cache` (the conv pass) + `spp train-svm`; R-CNN = `spp train-svm
--mode rcnn` (its network pass is inside; it reads only proposals and ground
truth from the cache). Detection time is per image after proposals: the
network ("conv") + pooling + classify + NMS from `spp detect`'s timing line.
Wall-clock figures are as measured: on a shared machine they move with the
load. The mAP gap comes with a paired bootstrap interval over test images
(the same resampled images for both modes): raccoon test has 44 boxes, and
one box found or missed moves AP by about 2 points. The last line is a JSON
object of the figures.

    python benchmarks/rcnn_vs_spp.py [--top 500] [--threads 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses

REPO = checkout.REPO
from spp_cli.commands.detect import STAGES, parse_speed_line


def spp(args: list, env: dict, log: Path) -> tuple[float, str]:
    """Run `python -m spp_cli ARGS`; (wall seconds, stderr). Exits with the command's output on failure."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spp_cli", *map(str, args)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with log.open("a") as f:
        f.write(f"$ spp {' '.join(map(str, args))}\n{done.stderr}\n[{seconds:.1f} s, exit {done.returncode}]\n\n")
    if done.returncode != 0:
        raise SystemExit(f"spp {args[0]} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def detect_and_eval(model: Path, data: Path, props: Path, work: Path, env: dict, log: Path) -> dict:
    """mAP with the SPPnet/R-CNN test protocol (box regression, NMS: `--no-vote`), and with
    `spp detect`'s default box voting; stage times from the default run."""
    name = model.stem
    out = {}
    for variant, flags in (("", ["--no-vote"]), ("_vote", [])):
        dets, metrics = work / f"{name}{variant}-dets.json", work / f"{name}{variant}-metrics.json"
        _, stderr = spp(["detect", "--data", data, "--split", "test", "--model", model, "--props", props, "--out", dets, *flags], env, log)
        stages = parse_speed_line(stderr)
        if stages is None:
            raise SystemExit(f"no timing line in the output of spp detect:\n{stderr[-2000:]}")
        spp(["eval", dets, "--data", data, "--split", "test", "--out", metrics], env, log)
        out[f"map{variant}"] = json.loads(metrics.read_text())["mAP"]
        if variant == "_vote":  # stage times of what `spp detect` does by default
            out["detect_ms"] = sum(stages[s] for s in STAGES if s != "proposals")
            out["stages"] = stages
    return out


def paired_bootstrap(data: Path, dets_files: list[Path], rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of ``100 * (mAP of file 0 - mAP of file 1)`` over
    test images resampled with replacement (the same sample for both files)."""
    import numpy as np

    from spp_cli.data import open_dataset
    from spp_cli.detections import read_detections
    from spp_cli.evaluate import GroundTruthImage, evaluate_voc

    dataset = open_dataset(data, "test")
    pairs = []
    for path in dets_files:
        by_id = {e.id: e.detections for e in read_detections(path).images}
        pairs.append([(GroundTruthImage.from_record(r, dataset.classes), by_id.get(r.image_id, [])) for r in dataset.records])
    rng = np.random.default_rng(seed)
    n = len(dataset.records)
    gaps = []
    for _ in range(rounds):
        sample = rng.integers(0, n, n)
        a, b = (evaluate_voc([images[i] for i in sample], dataset.classes).mean_ap for images in pairs)
        gaps.append(100 * (a - b))
    low, high = np.percentile(gaps, [5, 95])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--top", type=int, default=500, help="proposals per image for both modes (R-CNN's cost grows with it)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per command (default: torch's choice)")
    parser.add_argument("--work", type=Path, default=None, help="keep proposals, cache, models, detections and a log here (default: a temporary folder)")
    args = parser.parse_args()
    checkout.check()

    data = args.data_root / "raccoon"
    env = dict(checkout.ENV)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="spp-rcnn-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "log.txt"
        print(f"raccoon train -> test, efficientnet_lite0, 1 scale (688), top {args.top} proposals, "
              f"threads {args.threads or 'default'}; command log in {log}", flush=True)

        props = {}
        for split in ("train", "test"):
            props[split] = work / f"{split}-top{args.top}.json"
            if not props[split].is_file():  # proposals are the same for both modes and not timed
                spp(["propose", "--data", data, "--split", split, "--top", args.top, "--out", props[split]], env, log)

        feats = work / "feats"
        shutil.rmtree(feats, ignore_errors=True)  # a fresh cache, so its conv time is measured
        cache_s, _ = spp(["cache", "--data", data, "--split", "train", "--props", props["train"], "--cache", feats], env, log)
        print(f"spp cache: {cache_s:.1f} s", flush=True)
        spp_train_s, _ = spp(["train-svm", "--cache", feats, "--out", work / "spp.safetensors"], env, log)
        print(f"spp train-svm: {spp_train_s:.1f} s", flush=True)
        rcnn_train_s, _ = spp(["train-svm", "--cache", feats, "--out", work / "rcnn.safetensors", "--mode", "rcnn"], env, log)
        print(f"spp train-svm --mode rcnn: {rcnn_train_s:.1f} s", flush=True)

        results = {}
        for mode in ("spp", "rcnn"):
            results[mode] = detect_and_eval(work / f"{mode}.safetensors", data, props["test"], work, env, log)
            print(f"{mode} detect + eval done", flush=True)
        low, high = paired_bootstrap(data, [work / "spp-dets.json", work / "rcnn-dets.json"])

    spp_r, rcnn_r = results["spp"], results["rcnn"]
    train = {"spp": cache_s + spp_train_s, "rcnn": rcnn_train_s}
    speedup = rcnn_r["detect_ms"] / spp_r["detect_ms"]
    gap = 100 * (spp_r["map"] - rcnn_r["map"])
    print(f"\n{'mode':<6}{'VOC07 mAP':>11}{'+ voting':>10}{'train s':>10}{'detect ms/img':>15}{'conv':>9}{'pooling':>9}{'classify':>10}{'nms':>7}{'speed-up':>10}")
    for mode, r in results.items():
        x = rcnn_r["detect_ms"] / r["detect_ms"]
        st = r["stages"]
        print(f"{mode:<6}{r['map']:>11.3f}{r['map_vote']:>10.3f}{train[mode]:>10.1f}{r['detect_ms']:>15.1f}{st['conv']:>9.1f}{st['pooling']:>9.1f}"
              f"{st['classify']:>10.1f}{st['nms']:>7.1f}{x:>9.1f}x")
    print(f"(SPP training = spp cache {cache_s:.1f} s + train-svm {spp_train_s:.1f} s; R-CNN training = train-svm --mode rcnn, "
          f"{train['rcnn'] / train['spp']:.1f}x SPP's; detection after proposals, {args.top} proposals per image)")
    print(f"SPP mAP - R-CNN mAP = {gap:+.1f} points: {'within' if abs(gap) <= 1.5 else 'NOT within'} 1.5 points; "
          f"90% paired bootstrap interval over test images [{low:+.1f}, {high:+.1f}]")
    print(json.dumps({
        "spp_map": round(spp_r["map"], 4),
        "rcnn_map": round(rcnn_r["map"], 4),
        "spp_map_vote": round(spp_r["map_vote"], 4),
        "rcnn_map_vote": round(rcnn_r["map_vote"], 4),
        "map_gap_points": round(gap, 2),
        "map_gap_90_interval": [round(low, 2), round(high, 2)],
        "spp_detect_ms": round(spp_r["detect_ms"], 1),
        "rcnn_detect_ms": round(rcnn_r["detect_ms"], 1),
        "detect_speedup": round(speedup, 1),
        "spp_train_s": round(train["spp"], 1),
        "rcnn_train_s": round(train["rcnn"], 1),
        "top": args.top,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
