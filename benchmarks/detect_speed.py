"""`spp detect` speed on ~500 x 375 photos at 1 scale, and SPP pooling side by side.

1. Pooling 2000 windows of each photo from its fp16 conv map (the default
   backbone, 1 scale): the toolkit's pooling (each distinct bin rectangle
   once, spp_cli.spp) against torchvision's roi_pool per pyramid level
   (spp_cli.spp.spatial_pyramid_pool_roi), same maps and windows, same
   vectors (checked), in one run.
2. The real CLI: `spp detect` with the shipped detector on the raccoon test
   photos of about 500 x 375 (within 30% of its pixel count; the shipped
   detector never trained on them), each twice under two names so that the
   first image's warm-up is shared by all, first with selective search's
   proposals from --props (the timing line's stages after proposals), then
   computing proposals (the whole: the detector's own, its proposal network
   where it carries one), and once more with --no-vote (what box voting costs).

3. Learned proposals against selective search, end to end (proposals +
   conv + pooling + classify + NMS), one after the other on the same
   photos, with a model that carries a proposal network (``--model``, e.g.
   from `spp train`; by default the shipped detector where it carries one):
   `spp detect --proposals selective-search` then `spp detect` (learned).
4. Selective search (`--proposals selective-search`) on a second thread
   ahead of the network (its default) against one stage after the other
   (`--no-prefetch`): wall-clock ms per image on the doubled photos; and the
   README's main command in a fresh process (startup included) with the
   detector's own proposals and both ways of selective search, alternating.

Prints the per-stage timing lines, the sum after proposals against the
issue's 300 ms, and a last line of JSON.

    python benchmarks/detect_speed.py [--data-root ../shared/data] [--model raccoon.safetensors]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
import torch
from PIL import Image

from spp_cli.commands.detect import STAGES, parse_speed_line, parse_wall_ms

REPO = checkout.REPO


def spp(*args) -> str:
    return checkout.run_spp(*args, allowed=(0,))[1]


def speed_line(output: str) -> dict[str, float]:
    """Prints `spp detect`'s timing line; its ms per image by stage."""
    stages = parse_speed_line(output)
    if stages is None:
        sys.exit(f"no timing line in the output of spp detect:\n{output[-2000:]}")
    print(f"  {next(line for line in output.splitlines() if line.startswith('Speed:'))}")
    return stages


def pooling_side_by_side(photos: list[Path], repeat: int = 3) -> tuple[float, float]:
    """Mean seconds per photo: (spp_cli pooling, roi_pool per level) for 2000 windows."""
    from spp_cli.backbones import FeatureExtractor, get_spec
    from spp_cli.features import DEFAULT_MAX_SIDE
    from spp_cli.images import load_image
    from spp_cli.proposals import ProposalParams, propose
    from spp_cli.spp import pool_windows, project_windows, spatial_pyramid_pool_roi

    spec = get_spec("efficientnet_lite0")
    extractor = FeatureExtractor(spec)
    ours, reference = [], []
    for path in photos:
        image = load_image(path)
        boxes = torch.from_numpy(propose(image, ProposalParams(top=2000)))
        maps, factors, _ = extractor.image_pyramid(image, [688], DEFAULT_MAX_SIDE)
        fmap = maps[0].half()  # as read from the cache
        cells = project_windows(boxes, factors[0], spec.alignment, fmap.shape[1], fmap.shape[2])
        times = {"ours": [], "roi": []}
        for _ in range(repeat):
            start = time.perf_counter()
            a = pool_windows([fmap], factors, boxes, spec.alignment)
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            b = spatial_pyramid_pool_roi(fmap, cells)
            times["roi"].append(time.perf_counter() - start)
        if not torch.equal(a, b):
            sys.exit(f"{path}: the two poolings disagree")
        ours.append(min(times["ours"]))
        reference.append(min(times["roi"]))
        print(f"  {path.name}: {len(boxes)} windows on a {tuple(fmap.shape)} map: {1000 * ours[-1]:.1f} ms vs roi_pool {1000 * reference[-1]:.1f} ms")
    return float(np.mean(ours)), float(np.mean(reference))


def doubled(photos: list[Path], tmp: Path) -> Path:
    """A folder holding each photo twice under two names, so that the first image's warm-up is shared by all."""
    folder = tmp / "photos"
    folder.mkdir()
    for path in photos:
        for copy in ("a", "b"):
            shutil.copy(path, folder / f"{path.stem}-{copy}.jpg")
    return folder


def test_photos_near(dataset: Path, pixels: int, within: float = 0.3) -> list[Path]:
    """The test split's photos whose pixel count is within ``within`` of ``pixels``."""
    from spp_cli.data import open_dataset

    records = open_dataset(dataset, "test").records
    return [r.path for r in records if abs(np.prod(Image.open(r.path).size) / pixels - 1) <= within]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", type=Path, help="a detector that carries a proposal network (default: the shipped one, if it does)")
    args = parser.parse_args()
    checkout.check()
    photos = test_photos_near(args.data_root / "raccoon", 500 * 375)
    sizes = ", ".join(f"{p.name} ({'x'.join(map(str, Image.open(p).size))})" for p in photos)
    print(f"{len(photos)} raccoon test photos of about 500 x 375: {sizes}; torch threads: {torch.get_num_threads()}")

    print("SPP pooling of 2000 windows, 1 scale (688), fp16 map:")
    ours, roi = pooling_side_by_side(photos)
    print(f"  mean {1000 * ours:.1f} ms vs {1000 * roi:.1f} ms: {roi / ours:.1f}x faster than roi_pool per level")

    figures: dict = {"pool_ms": round(1000 * ours, 1), "roi_pool_ms": round(1000 * roi, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = doubled(photos, Path(tmp))
        props = Path(tmp) / "props.json"
        spp("propose", folder, "--out", props)
        runs = {
            "after_proposals": ["--props", props],
            "whole": [],
            "after_proposals_no_vote": ["--props", props, "--no-vote"],
        }
        for name, extra in runs.items():
            print(f"spp detect on {2 * len(photos)} images, {name.replace('_', ' ')}:")
            stages = speed_line(spp("detect", folder, "--out", Path(tmp) / f"{name}.json", *extra))
            figures[name] = stages
    after = figures["after_proposals"]
    total = sum(after[s] for s in STAGES[1:])
    whole = sum(figures["whole"].values())
    print(f"after proposals: {total:.0f} ms per image (conv {after['conv']:.0f} + pooling {after['pooling']:.0f} + classify "
          f"{after['classify']:.0f} + nms/voting {after['nms']:.1f}; target < 300); whole with proposals: {whole:.0f} ms")
    figures["after_proposals_ms"] = round(total, 1)
    figures["whole_ms"] = round(whole, 1)
    figures.update(learned_side_by_side(photos, args.model))
    figures.update(search_ahead_side_by_side(photos))
    print(json.dumps(figures))


# The two ways spp detect runs selective search: on a second thread ahead of the network, or inline
# (named: the shipped detector's own proposals are its network's).
SEARCH_MODES = {"ahead": ["--proposals", "selective-search"], "serial": ["--proposals", "selective-search", "--no-prefetch"]}


def search_ahead_side_by_side(photos: list[Path], repeat: int = 2) -> dict:
    """Selective search on a second thread ahead of the network (the default) against one stage after
    the other (--no-prefetch): wall-clock ms per image over a folder, and the README's main command
    (one photo, a fresh process: imports, model and network included), alternating, ``repeat`` times each."""
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = doubled(photos, Path(tmp))
        for name, extra in SEARCH_MODES.items():
            print(f"spp detect on {2 * len(photos)} images, selective search {name}:")
            output = spp("detect", folder, "--out", Path(tmp) / f"{name}.json", *extra)
            speed_line(output)
            figures[f"search_{name}_wall_ms"] = parse_wall_ms(output)
    modes = {"default": [], **SEARCH_MODES}
    main_job: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeat):
        for name, extra in modes.items():
            main_job[name].append(checkout.run_spp("detect", REPO / "examples" / "raccoon.jpg", *extra, allowed=(0,))[0])
    for name, seconds in main_job.items():
        figures[f"main_command_{name}_s"] = round(float(np.mean(seconds)), 2)
    print(f"selective search ahead of the network vs one stage after the other: {figures['search_ahead_wall_ms']:.0f} vs "
          f"{figures['search_serial_wall_ms']:.0f} ms per image in all ({figures['search_serial_wall_ms'] / figures['search_ahead_wall_ms']:.2f}x); "
          f"`spp detect examples/raccoon.jpg` in a fresh process: {figures['main_command_ahead_s']:.2f} vs {figures['main_command_serial_s']:.2f} s; "
          f"with the shipped detector's own proposals (the README's command): {figures['main_command_default_s']:.2f} s (mean of {repeat})")
    return figures


def learned_side_by_side(photos: list[Path], model: Path | None) -> dict:
    """End to end ms per image of `spp detect` with selective search, then with the model's learned proposals."""
    from spp_cli.commands.models import default_model_path
    from spp_cli.model import Detector

    model = model or default_model_path()
    if model is None or Detector.load(model).proposal_model is None:
        print(f"learned proposals: skipped ({model or 'no model'} carries no proposal network; pass --model from `spp train`)")
        return {}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = doubled(photos, Path(tmp))
        for name, extra in {"selective_search": ["--proposals", "selective-search"], "learned": []}.items():
            print(f"spp detect --model {model} on {2 * len(photos)} images, {name.replace('_', ' ')} proposals, end to end:")
            stages = speed_line(spp("detect", folder, "--model", model, "--out", Path(tmp) / f"{name}.json", *extra))
            figures[f"{name}_whole_ms"] = round(sum(stages.values()), 1)
            figures[f"{name}_stages"] = stages
    ratio = figures["selective_search_whole_ms"] / max(figures["learned_whole_ms"], 1e-9)
    print(f"end to end: learned {figures['learned_whole_ms']:.0f} ms per image vs selective search {figures['selective_search_whole_ms']:.0f} ms "
          f"({ratio:.1f}x faster; target <= 300 ms)")
    figures["learned_speedup"] = round(ratio, 2)
    return figures


if __name__ == "__main__":
    main()
