"""One process against torchrun's ranks, with the toolkit's own commands, in one run.

1. propose and cache on raccoon (200 photos): `python -m spp_cli` as one
   process, then `torchrun --standalone --nproc_per_node 2 -m spp_cli` (one
   thread / worker per rank, `--threads 1` on both sides), alternating,
   --repeat rounds (best of each: a shared machine's slow spells); images/s of each,
   their ratio, and whether the merged props.json and the cache (entry keys,
   conv maps, proposals) equal the one-process run's.
2. train-svm on bccd (3 classes; the first --bccd-images ids of trainval,
   sorted): one process vs 2 ranks (the classes divided), seconds, the one
   process's peak RSS, and whether the models' tensors are equal.
3. finetune on raccoon train: one process vs 2 ranks (DistributedDataParallel),
   then train-svm --features fc7 and detect + eval on raccoon test for both:
   held-out window accuracy of the head and VOC07 mAP side by side.

Prints a table per part and a last line of JSON.

    python benchmarks/scale_out.py [--parts propose,cache,train-svm,finetune] [--repeat 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np

REPO = checkout.REPO
SHARED = REPO.parent / "shared" / "data"


# One process reports its own peak RSS on the way out (its exit code kept).
RSS_WRAPPER = (
    "import resource, runpy, sys\n"
    "sys.argv = ['spp'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('spp_cli', run_name='__main__')\n"
    "finally:\n"
    "    print(f'peak-rss-kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
)
PEAK_RSS_MB: dict[str, float] = {}  # command name -> peak RSS (MB) of its last one-process run


def run(command: list[str], ranks: int) -> float:
    """Seconds of wall time for ``spp COMMAND`` as one process or ``ranks`` torchrun ranks."""
    env = dict(checkout.ENV, SPP_THREADS="1")
    if ranks == 1:
        argv = [sys.executable, "-c", RSS_WRAPPER, *command]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "spp_cli", *command]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    for line in done.stderr.splitlines():
        if line.startswith("peak-rss-kb "):
            PEAK_RSS_MB[command[0]] = int(line.split()[1]) / 1024
    return seconds


def same_cache(a: Path, b: Path) -> bool:
    from spp_cli.cache import FeatureCache

    one, two = FeatureCache.open(a), FeatureCache.open(b)
    if one.keys() != two.keys():
        return False
    for key in one.keys():
        x, y = one.read(key), two.read(key)
        if x.image_id != y.image_id or not np.array_equal(x.proposals, y.proposals):
            return False
        if any(not np.array_equal(m.numpy(), n.numpy()) for m, n in zip(x.maps, y.maps)):
            return False
    return True


def same_model(a: Path, b: Path) -> tuple[bool, float]:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "np") as x, safe_open(str(b), "np") as y:
        if sorted(x.keys()) != sorted(y.keys()):
            return False, float("inf")
        for name in x.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
            worst = max(worst, float(np.abs(x.get_tensor(name).astype(np.float64) - y.get_tensor(name)).max()))
    return worst == 0.0, worst


def best_of_interleaved(repeat: int, once: Callable[[int], float]) -> tuple[float, float]:
    """Best seconds of one process and of 2 ranks over ``repeat`` rounds, the two alternating
    (1, 2, 1, 2, ...), so that a slow spell of a shared machine does not land on one side only."""
    one, two = [], []
    for _ in range(repeat):
        one.append(once(1))
        two.append(once(2))
    return min(one), min(two)


def part_propose_cache(work: Path, figures: dict, parts: list[str], repeat: int) -> None:
    data = SHARED / "raccoon"
    images = 200
    rows = []
    if "propose" in parts:
        out = {1: work / "props-1.json", 2: work / "props-2.json"}

        def propose(ranks: int) -> float:
            out[ranks].unlink(missing_ok=True)  # a fresh run each round, not a resumed one
            return run(["propose", "--data", str(data), "--out", str(out[ranks]), "--workers", "1"], ranks)

        t1, t2 = best_of_interleaved(repeat, propose)
        equal = out[1].read_bytes() == out[2].read_bytes()
        rows.append(("propose", t1, t2, equal))
    if "cache" in parts:
        props = work / "props-1.json"
        if not props.is_file():
            run(["propose", "--data", str(data), "--out", str(props)], 1)
        folders = {1: work / "feats-1", 2: work / "feats-2"}

        def cache(ranks: int) -> float:
            shutil.rmtree(folders[ranks], ignore_errors=True)
            return run(["cache", "--data", str(data), "--props", str(props), "--cache", str(folders[ranks])], ranks)

        t1, t2 = best_of_interleaved(repeat, cache)
        rows.append(("cache", t1, t2, same_cache(folders[1], folders[2])))
    print(f"\n{'raccoon, 200 photos':<22}{'1 process':>12}{'2 ranks':>12}{'img/s 1':>9}{'img/s 2':>9}{'ratio':>7}  identical  (best of {repeat}, interleaved)")
    for name, t1, t2, equal in rows:
        print(f"{name:<22}{t1:>11.1f}s{t2:>11.1f}s{images / t1:>9.2f}{images / t2:>9.2f}{t1 / t2:>7.2f}  {equal}")
        figures[name] = {"one_s": round(t1, 1), "two_s": round(t2, 1), "ratio": round(t1 / t2, 3), "identical": equal}


def part_train_svm(work: Path, figures: dict, images: int) -> None:
    data = SHARED / "bccd"
    props, feats = work / "bccd-props.json", work / "bccd-feats"
    if not props.is_file():
        run(["propose", "--data", str(data), "--out", str(props)], 1)
    run(["cache", "--data", str(data), "--props", str(props), "--cache", str(feats)], 1)
    ids = sorted((data / "ImageSets" / "Main" / "trainval.txt").read_text().split())[:images]
    split = work / f"bccd-trainval-{len(ids)}.txt"
    split.write_text("\n".join(ids) + "\n")
    one, two = work / "bccd-1.safetensors", work / "bccd-2.safetensors"
    args = ["train-svm", "--cache", str(feats), "--data", str(data), "--split", str(split)]
    t1 = run([*args, "--out", str(one)], 1)
    rss = PEAK_RSS_MB["train-svm"]
    t2 = run([*args, "--out", str(two)], 2)
    equal, worst = same_model(one, two)
    print(f"\ntrain-svm, bccd, {len(ids)} trainval images (3 classes): 1 process {t1:.1f} s (peak RSS {rss:.0f} MB), 2 ranks {t2:.1f} s ({t1 / t2:.2f}x); "
          f"models identical: {equal} (max |difference| {worst:.2e})")
    figures["train_svm_bccd"] = {"images": len(ids), "one_s": round(t1, 1), "two_s": round(t2, 1), "ratio": round(t1 / t2, 3), "identical": equal,
                                 "max_diff": worst, "one_peak_rss_mb": round(rss)}


def part_finetune(work: Path, figures: dict) -> None:
    from spp_cli.head import Head

    data = SHARED / "raccoon"
    props, feats = work / "props-1.json", work / "feats-1"
    if not props.is_file():
        run(["propose", "--data", str(data), "--out", str(props)], 1)
    if not (feats / "cache.json").is_file():
        run(["cache", "--data", str(data), "--props", str(props), "--cache", str(feats)], 1)
    print(f"\n{'finetune, raccoon':<22}{'seconds':>9}{'best epoch':>12}{'held-out acc':>14}{'mAP (fc7+bbox+vote)':>21}")
    for ranks in (1, 2):
        head, model, dets, metrics = (work / f"{stem}-{ranks}{ext}" for stem, ext in
                                      (("head", ".safetensors"), ("fc7", ".safetensors"), ("dets", ".json"), ("metrics", ".json")))
        seconds = run(["finetune", "--cache", str(feats), "--data", str(data), "--split", "train", "--out", str(head)], ranks)
        run(["train-svm", "--cache", str(feats), "--data", str(data), "--split", "train", "--features", "fc7", "--head", str(head), "--out", str(model)], 1)
        run(["detect", "--data", str(data), "--split", "test", "--cache", str(feats), "--model", str(model), "--out", str(dets)], 1)
        run(["eval", str(dets), "--data", str(data), "--split", "test", "--out", str(metrics)], 1)
        training = Head.load(head).training
        best = training["history"][training["best_epoch"] - 1]
        mean_ap = json.loads(metrics.read_text())["mAP"]
        print(f"{f'{ranks} rank(s)':<22}{seconds:>9.0f}{training['best_epoch']:>12}{best['val_accuracy']:>14.3f}{mean_ap:>21.3f}")
        figures[f"finetune_{ranks}"] = {"seconds": round(seconds, 1), "best_epoch": training["best_epoch"],
                                        "val_accuracy": round(best["val_accuracy"], 4), "map": round(mean_ap, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="propose,cache,train-svm,finetune")
    parser.add_argument("--work", type=Path, default=None, help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=2, help="propose and cache: rounds of (1 process, 2 ranks), best of each")
    parser.add_argument("--bccd-images", type=int, default=80, help="trainval images for the train-svm part (all 292 take over 27 minutes on one core)")
    args = parser.parse_args()
    checkout.check()
    parts = args.parts.split(",")
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="spp-scale-out-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "propose" in parts or "cache" in parts:
            part_propose_cache(work, figures, parts, args.repeat)
        if "train-svm" in parts:
            part_train_svm(work, figures, args.bccd_images)
        if "finetune" in parts:
            part_finetune(work, figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
