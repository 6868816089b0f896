"""Fine-tuning the backbone's top block on cached maps of the layer below it, judged by the SVMs on its maps.

One of issue 14's candidates: SPPnet fine-tunes only its fully-connected layers
(the paper's section 3.1.2); Fast R-CNN gains by fine-tuning conv layers too.
This script reuses the work folder of an `spp train` run (its cache, its
proposal network, its split), and

1. computes each image's map of the block below the trained ones
   (``blocks.<top - 1>``: ``blocks.5`` under the default cut's ``blocks.6``)
   with the same network and scale as the cache (one forward pass per image,
   held in memory);
2. trains a copy of the top blocks (``--top``: the blocks from that index to
   the cut) on the fit part with Fast R-CNN's loss on SPP-pooled windows
   (``torchvision.ops.roi_pool`` per pyramid level, the bins spp pools): a
   ``(K + 1)``-way softmax and class-wise smooth-L1 box regression on the
   pool5 vector; per image ``--per-image`` windows of the run's windows (its
   proposal network's where it kept learned proposals) and the ground truth,
   sampled as `spp finetune` samples them (``spp_cli.finetune.window_table``:
   at most a quarter at IoU >= 0.5, background from [0.1, 0.5)); AdamW
   (blocks ``--lr``, heads ``--head-lr``), x0.1 for the last quarter of
   ``--epochs`` (rounded down); the batch norms are folded into the
   convolutions (no batch statistics; their scale and shift train with the
   conv weights);
3. writes a cache of the fine-tuned blocks' maps for every fit and validation
   image (the run's windows stored as each entry's proposals; its settings
   name the fine-tuned weights, so no command pairs them with the stock
   backbone), repeats the run's SVM step on it (`checkout.svm_step`, as `spp
   train` mines, with the run's positives and C) and scores it on the
   validation part as `spp train` scores a candidate without objectness in
   the score (the windows come from the cache, not from a network carried by
   the model). ``--epochs 0`` keeps the blocks as they were: the same steps
   on the run's maps recomputed, the baseline.

No test split is read. The validation images' maps go through the fine-tuned
blocks too (they were not trained on), so the validation mAP is what a model
carrying them would score.

    spp train --data ../shared/data/raccoon --split train --out r.safetensors --work W
    python benchmarks/top_block.py --dataset raccoon --work W --out F [--epochs 8] [--lr 1e-4]
    (bccd's stride-16 candidate, its last stage: --work W/efficientnet_lite0_b4-scale-688 --top 4)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
import torch

# Fast R-CNN's box-delta normalisation (BBOX_NORMALIZE_STDS).
DELTA_STD = torch.tensor([0.1, 0.1, 0.2, 0.2])


def training_windows(table, gt_count: int, per_image: int, config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`spp finetune`'s sampling of one image's :class:`~spp_cli.finetune.WindowTable` (Fast
    R-CNN's: a quarter foreground at IoU >= 0.5, background from [0.1, 0.5)): ``(R, 4)`` ``xyxy``
    original-pixel windows, ``(R,)`` labels (0 background, k + 1 class k) and the ``(F, 4)`` box
    deltas of the F foreground windows, which come first. ``gt_count``: the table's first rows,
    its usable ground truth."""
    from spp_cli import boxes as box_ops
    from spp_cli.bbox_reg import encode
    from spp_cli.finetune import sample_windows

    chosen = sample_windows(table, per_image, config.fg_fraction, rng)
    chosen = chosen[np.argsort(table.labels[chosen] == 0, kind="stable")]  # foreground first (an image with no background repeats it)
    windows, labels = table.boxes[chosen], table.labels[chosen]
    foreground, gt = windows[labels > 0], table.boxes[:gt_count]
    deltas = encode(foreground, gt[box_ops.iou(foreground, gt).numpy().argmax(1)]) if len(foreground) else np.zeros((0, 4), np.float32)
    return windows, labels, deltas


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(checkout.DATASETS), required=True)
    parser.add_argument("--work", type=Path, required=True, help="an spp train work folder (or a candidate's folder in it)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned block's cache and SVMs")
    parser.add_argument("--top", type=int, default=6, help="index of the first trained block (blocks[top:] of the cut; 4 on blocks.4)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--per-image", type=int, default=64)
    args = parser.parse_args()
    if args.out.resolve() == args.work.resolve() or args.work.resolve() in args.out.resolve().parents:
        parser.error("--out is emptied first: give a folder outside --work")

    from spp_cli.backbones import extractor_for
    from spp_cli.cache import CacheEntry, FeatureCache, image_key, tensor_digest
    from spp_cli.features import feature_pyramid
    from spp_cli.finetune import FinetuneConfig, window_table
    from spp_cli.images import load_image
    from spp_cli.pipeline import validation_results
    from spp_cli.rpn import LearnedWindows, ProposalModel
    from spp_cli.spp import DEFAULT_LEVELS, output_dim, project_windows, spatial_pyramid_pool_roi

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    run = checkout.train_run(args.dataset, args.work)
    cache, settings = run.cache, run.cache.settings
    if len(settings.scales) != 1:
        raise SystemExit(f"{args.work}: a one-scale cache is needed (this one: {settings.scales})")
    network = checkout.proposal_model(run, args.work)  # the run's windows at this map (as positives.py)
    learned = network is not None
    windows_of = LearnedWindows(cache, ProposalModel.load(network)) if learned else cache
    val_keys = [image_key(record.path) for record, _ in run.val]
    tap = f"blocks.{args.top - 1}"

    # 1. The maps under the trained blocks, from the cache's network at the cache's scale.
    start = time.perf_counter()
    extractor = extractor_for(settings, str(cache.root))
    block = copy.deepcopy(extractor.network.blocks[args.top:]).requires_grad_(True).eval()
    lower, entries = {}, {}
    for key in run.fit_keys + val_keys:
        entry = windows_of.read(key)
        with extractor.tapping(tap) as taken:
            maps, factors, _ = feature_pyramid(extractor, load_image(entry.path), settings.scales, settings.max_side)
        if factors != entry.factors or maps[0].shape != entry.maps[0].shape:
            raise SystemExit(f"{entry.path}: recomputed map {tuple(maps[0].shape)} at {factors}, the cache's "
                             f"{tuple(entry.maps[0].shape)} at {entry.factors}")
        lower[key] = taken[0][0].float().clone()  # out of inference mode, for autograd
        entry.maps = []  # the cached maps are not used again: memory
        entries[key] = entry
    print(f"{args.dataset}: {tap} maps of {len(lower)} images, windows {'learned' if learned else 'selective search'}, "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    # 2. The block and two linear heads on its pool5, Fast R-CNN's loss.
    classes = list(entries[run.fit_keys[0]].classes)
    dim = output_dim(settings.channels, DEFAULT_LEVELS)
    classify, regress = torch.nn.Linear(dim, len(classes) + 1), torch.nn.Linear(dim, 4 * len(classes))
    torch.nn.init.normal_(classify.weight, std=0.001)
    torch.nn.init.normal_(regress.weight, std=0.0001)
    torch.nn.init.zeros_(classify.bias)
    torch.nn.init.zeros_(regress.bias)
    optimizer = torch.optim.AdamW([{"params": block.parameters(), "lr": args.lr},
                                   {"params": [*classify.parameters(), *regress.parameters()], "lr": args.head_lr}], weight_decay=1e-4)
    sampling = FinetuneConfig()
    tables = {key: window_table(entries[key], classes, sampling) for key in run.fit_keys}
    start = time.perf_counter()
    for epoch in range(args.epochs):
        if epoch == args.epochs - args.epochs // 4:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        losses = []
        for i in rng.permutation(len(run.fit_keys)):
            key = run.fit_keys[i]
            gt_count = len(tables[key].boxes) - len(entries[key].proposals)
            windows, label, deltas = training_windows(tables[key], gt_count, args.per_image, sampling, rng)
            if len(windows) == 0:
                continue
            fmap = block(lower[key].unsqueeze(0))[0]
            cells = project_windows(torch.from_numpy(windows), entries[key].factors[0], settings.alignment, fmap.shape[1], fmap.shape[2])
            pool5 = spatial_pyramid_pool_roi(fmap, cells, DEFAULT_LEVELS)
            loss = torch.nn.functional.cross_entropy(classify(pool5), torch.from_numpy(label))
            fg = len(deltas)
            if fg:
                predicted = regress(pool5[:fg]).view(fg, len(classes), 4)[torch.arange(fg), torch.from_numpy(label[:fg] - 1)]
                loss = loss + torch.nn.functional.smooth_l1_loss(predicted, torch.from_numpy(deltas) / DELTA_STD,
                                                                  reduction="sum", beta=1 / 9) / len(label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        print(f"  epoch {epoch + 1}: loss {np.mean(losses):.4f}", flush=True)
    finetune_s = time.perf_counter() - start

    # 3. Its maps as a cache, the run's SVM step on them, scored on the validation part.
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    # Settings that name these weights: no command rebuilds the stock backbone for this cache's maps.
    tuned = tensor_digest({k: v.detach().flatten().clone() for k, v in block.state_dict().items()})  # flat: channels-last strides
    out = FeatureCache.create_or_open(args.out / "feats", dataclasses.replace(settings, weights_sha256=f"top_block:{tuned}"))
    with torch.no_grad():
        for key, e in entries.items():
            out.write(CacheEntry(key=e.key, image_id=e.image_id, path=e.path, width=e.width, height=e.height,
                                 maps=[block(lower[key].unsqueeze(0))[0]], factors=e.factors, proposals=e.proposals,
                                 gt_boxes=e.gt_boxes, gt_labels=e.gt_labels, gt_difficult=e.gt_difficult,
                                 gt_iscrowd=e.gt_iscrowd, classes=e.classes))
    detector = args.out / "detector.safetensors"
    plan = run.state["plan"]
    svm_s = checkout.svm_step(run, args.out, detector, plan["positive_iou"], C=plan.get("svm_c"))
    mean_ap, per_class, _ = validation_results(detector, args.out / "feats", run.val)
    row = {"dataset": args.dataset, "work": str(args.work), "top": args.top, "epochs": args.epochs, "lr": args.lr,
           "head_lr": args.head_lr, "per_image": args.per_image, "validation_map": round(mean_ap, 4),
           "validation_ap": {k: round(v, 4) for k, v in per_class.items() if v is not None},
           "finetune_s": round(finetune_s, 1), "svm_s": round(svm_s, 1)}
    print(f"  validation mAP {mean_ap:.4f}, fine-tuning {finetune_s:.0f} s, SVM step {svm_s:.0f} s")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
