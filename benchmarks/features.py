"""SPP vs R-CNN feature extraction on this machine, side by side.

Per image (raccoon and coco128 photos, default backbone, CPU unless --gpu):
conv time at 1 scale (688) and at 5 scales (480..1200), SPP pooling time for
2000 proposal windows, and the R-CNN baseline (warp each of the same 2000
windows, run the same network on each, pool the same way). Every figure is
timed the same way: one untimed warm-up run, then the best of --repeat.
Speed-up = R-CNN time / (conv + pooling), both summed over the same images
(the ones R-CNN runs on). Also: cache size per image per scale (fp16), and
the peak RSS of `spp cache` over coco128 at 5 scales (a subprocess). The
last line is a JSON object of the figures.

    python benchmarks/features.py [--images 4] [--rcnn-images 2] [--repeat 2] [--skip-rss] [--gpu]

`--compare-backbones efficientnet_lite0,efficientnet_lite2` times only the
1-scale conv pass (688) of each named backbone on the same photos, the
backbones taking turns image by image, and prints their ratios to the first.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
import torch

from spp_cli.backbones import FeatureExtractor, get_spec, select_device
from spp_cli.data import open_dataset
from spp_cli.features import DEFAULT_MAX_SIDE, FIVE_SCALES
from spp_cli.images import load_image
from spp_cli.proposals import ProposalParams, propose
from spp_cli.rcnn import rcnn_features
from spp_cli.spp import pool_windows

REPO = checkout.REPO
WINDOWS = 2000


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warm_up=None):
    """(best seconds of ``repeat`` runs after one untimed warm-up run, the last result).

    ``warm_up`` replaces the warm-up run where a whole run costs minutes.
    """
    sync(device)
    (warm_up or fn)()
    best, result = float("inf"), None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def windows_for(image: np.ndarray) -> np.ndarray:
    """Up to 2000 selective-search windows, topped up with random ones to exactly 2000."""
    boxes = propose(image, ProposalParams(top=WINDOWS))
    if len(boxes) < WINDOWS:
        h, w = image.shape[:2]
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, [w - 20, h - 20], (WINDOWS - len(boxes), 2))
        wh = rng.uniform(16, [w, h], (WINDOWS - len(boxes), 2))
        extra = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
        boxes = np.concatenate([boxes, extra])
    return boxes[:WINDOWS]


def peak_rss_of_cache(data_root: Path, scales: str, backbone: str) -> tuple[float, float]:
    """(peak RSS MB, seconds) of `spp cache` over coco128 with precomputed proposals."""
    with tempfile.TemporaryDirectory() as tmp:
        props = Path(tmp) / "p.json"
        coco = data_root / "coco128" / "annotations" / "instances_train2017.json"
        subprocess.run([sys.executable, "-m", "spp_cli", "propose", "--data", str(coco), "--out", str(props)], env=checkout.ENV, check=True, capture_output=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "spp_cli", "cache", "--data", str(coco), "--props", str(props), "--cache", str(Path(tmp) / "feats"), "--scales", scales, "--backbone", backbone]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(cmd, env=checkout.ENV, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # ru_maxrss of children is the largest child so far; the propose run
        # (workers) is far smaller than the cache run, so this is the cache's.
        return max(peak, before) / 1024, seconds


def compare_backbones(names: list[str], records, device: str, repeat: int) -> None:
    """Conv pass at one scale (688) of each backbone on the same images, side by side."""
    extractors = {name: FeatureExtractor(get_spec(name), device=device) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    print(f"device: {device}, torch threads: {torch.get_num_threads()}; conv pass at 688, best of {repeat} after a warm-up")
    print(f"{'image':<22}{'size':>10}" + "".join(f"{name:>22}" for name in names))
    for record in records:
        image = load_image(record.path)
        for name, extractor in extractors.items():
            best, _ = timed(lambda: extractor.image_pyramid(image, [688], DEFAULT_MAX_SIDE), device, repeat)
            seconds[name].append(best)
        h, w = image.shape[:2]
        print(f"{record.image_id:<22}{f'{w}x{h}':>10}" + "".join(f"{seconds[name][-1]:>22.3f}" for name in names), flush=True)
    mean = {name: float(np.mean(values)) for name, values in seconds.items()}
    print("mean s/image: " + ", ".join(f"{name} {mean[name]:.3f} ({mean[name] / mean[names[0]]:.2f}x)" for name in names))
    print(json.dumps({"device": device, "conv_s_1scale": {name: round(value, 4) for name, value in mean.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=4, help="images timed for conv and pooling (half raccoon, half coco128)")
    parser.add_argument("--rcnn-images", type=int, default=2, help="images on which the R-CNN baseline runs all 2000 windows")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each step after its warm-up run (best is kept)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS run of `spp cache` over coco128")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="registry name (efficientnet_lite0_b4: the blocks.4 figures in benchmarks/README.md)")
    parser.add_argument("--compare-backbones", help="comma-separated registry names: time their 1-scale conv pass side by side, nothing else")
    args = parser.parse_args()
    checkout.check()

    device = select_device(args.gpu)
    raccoon = open_dataset(args.data_root / "raccoon", "test").records
    coco = open_dataset(args.data_root / "coco128" / "annotations" / "instances_train2017.json").records
    half = max(1, args.images // 2)
    records = raccoon[:half] + coco[:half]
    if args.compare_backbones:
        compare_backbones(args.compare_backbones.split(","), records, device, args.repeat)
        return
    spec = get_spec(args.backbone)
    extractor = FeatureExtractor(spec, device=device)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, backbone: {spec.name} ({spec.layer}, {spec.channels} ch, stride {spec.stride})")
    print(f"{'image':<22}{'size':>10}{'conv 1s':>9}{'conv 5s':>9}{'pool 1s':>9}{'pool 5s':>9}{'R-CNN':>9}{'x 1s':>8}{'x 5s':>8}")

    # R-CNN is slow (minutes per image): run it on the first raccoon and the
    # first coco128 image, then alternate, up to --rcnn-images.
    order = [i for pair in zip(range(half), range(half, 2 * half)) for i in pair]
    rcnn_indices = set(order[: args.rcnn_images])
    rows = []
    for n, record in enumerate(records):
        image = load_image(record.path)
        boxes = torch.from_numpy(windows_for(image))
        conv1, (maps1, f1, _) = timed(lambda: extractor.image_pyramid(image, [688], DEFAULT_MAX_SIDE), device, args.repeat)
        conv5, (maps5, f5, _) = timed(lambda: extractor.image_pyramid(image, list(FIVE_SCALES), DEFAULT_MAX_SIDE), device, args.repeat)
        # Pool from fp16 maps, as read from the cache.
        maps1 = [m.half() for m in maps1]
        maps5 = [m.half() for m in maps5]
        pool1, _ = timed(lambda: pool_windows(maps1, f1, boxes, spec.alignment), device, args.repeat)
        pool5, _ = timed(lambda: pool_windows(maps5, f5, boxes, spec.alignment), device, args.repeat)
        rcnn = float("nan")
        if n in rcnn_indices:
            # Its warm-up is a tenth of the windows: the network's first
            # batches are what needs warming, not all 2000 windows again.
            windows = boxes.numpy()
            rcnn, _ = timed(
                lambda: rcnn_features(extractor, image, windows), device, args.repeat,
                warm_up=lambda: rcnn_features(extractor, image, windows[: WINDOWS // 10]),
            )
        row = {"conv1": conv1, "conv5": conv5, "pool1": pool1, "pool5": pool5, "rcnn": rcnn}
        rows.append(row)
        h, w = image.shape[:2]
        x1 = rcnn / (conv1 + pool1)
        x5 = rcnn / (conv5 + pool5)
        print(f"{record.image_id:<22}{f'{w}x{h}':>10}{conv1:>9.3f}{conv5:>9.3f}{pool1:>9.3f}{pool5:>9.3f}{rcnn:>9.2f}{x1:>8.0f}{x5:>8.0f}", flush=True)

    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    # The speed-up compares the two methods on the same photos: the rows R-CNN ran on.
    paired = [r for r in rows if not np.isnan(r["rcnn"])]
    rcnn_total = sum(r["rcnn"] for r in paired)
    speed1 = rcnn_total / sum(r["conv1"] + r["pool1"] for r in paired)
    speed5 = rcnn_total / sum(r["conv5"] + r["pool5"] for r in paired)
    print(f"\nmean s/image over {len(rows)} image(s): conv 1-scale {mean['conv1']:.3f}, 5-scale {mean['conv5']:.3f}; pooling 2000 windows "
          f"{mean['pool1']:.3f} (1-scale), {mean['pool5']:.3f} (5-scale); R-CNN 2000 windows {mean['rcnn']:.2f} ({len(paired)} image(s))")
    print(f"speed-up over R-CNN (conv + pooling) on the {len(paired)} image(s) both ran on: {speed1:.0f}x at 1 scale, {speed5:.0f}x at 5 scales")

    # Cache size per image per scale, fp16, from real entries.
    from spp_cli.cache import CacheEntry, CacheSettings, FeatureCache

    with tempfile.TemporaryDirectory() as tmp:
        settings = CacheSettings(spec.name, "bench", spec.layer, spec.stride, spec.offset, spec.channels, FIVE_SCALES, DEFAULT_MAX_SIDE, "fp16", spec.preprocess)
        cache = FeatureCache.create_or_open(Path(tmp) / "feats", settings)
        sizes = []
        for record in records:
            image = load_image(record.path)
            maps, factors, _ = extractor.image_pyramid(image, list(FIVE_SCALES), DEFAULT_MAX_SIDE)
            entry = CacheEntry(record.image_id, record.image_id, str(record.path), image.shape[1], image.shape[0], maps, factors, np.zeros((2000, 4), np.float32))
            cache.write(entry)
            sizes.append(cache.entry_path(entry.key).stat().st_size / 1e6 / len(FIVE_SCALES))
    cache_mb = float(np.mean(sizes))
    print(f"cache: {cache_mb:.2f} MB per image per scale (fp16, mean over the 5 scales)")

    rss_mb = rss_s = float("nan")
    if not args.skip_rss:
        rss_mb, rss_s = peak_rss_of_cache(args.data_root, ",".join(map(str, FIVE_SCALES)), args.backbone)
        print(f"spp cache over coco128 at 5 scales: peak RSS {rss_mb:.0f} MB, {rss_s:.0f} s")

    print(json.dumps({
        "device": device,
        "speedup_1scale": round(speed1, 1),
        "speedup_5scale": round(speed5, 1),
        "conv_s_1scale": round(mean["conv1"], 4),
        "conv_s_5scale": round(mean["conv5"], 4),
        "pool_s_2000": round(mean["pool1"], 4),
        "pool_s_2000_5scale": round(mean["pool5"], 4),
        "rcnn_s_2000": round(mean["rcnn"], 3),
        "cache_mb_per_image_scale": round(cache_mb, 3),
        "peak_rss_mb_5scale": None if np.isnan(rss_mb) else round(rss_mb, 1),
    }))


if __name__ == "__main__":
    main()
