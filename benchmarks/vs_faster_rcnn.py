"""spp's one-command flow against torchvision's Faster R-CNN on the same pretrained backbone, in one run.

Per dataset, both trained on its training split and scored by `spp eval
--metric voc07` on its test split:

(a) torchvision ``FasterRCNN`` on ImageNet EfficientNet-Lite0 cut at stride 16
    (``blocks.4``, the checkpoint spp ships), batch norms frozen; anchors
    32-512 x ratios 0.5/1/2 on the one map, RoIAlign 7x7, min side 512 /
    max 853; SGD lr 0.005 with a 100-iteration linear warm-up, momentum 0.9,
    weight decay 1e-4, batch 2, horizontal flips, 12 epochs with lr x0.1 for
    the last quarter, gradient-norm clip 10. Test: score threshold 0.001,
    100 detections per image.
(b) `spp train --data D --split TRAIN --out model.safetensors` with its
    defaults (cache, proposal network, the proposal choice, pool5 SVMs and
    their validation: every step from images to model), then `spp detect
    --data D --split TEST` from the images (proposals and conv pass included
    in its time).

Prints a table (dataset x {Faster R-CNN mAP, train s, test s/img; spp mAP,
train s, detect s/img; the mAP gain and its 95% interval over test splits
resampled from the test split, `paired_bootstrap.py`}) and a last line of
JSON, whose rows also hold the
recall of Faster R-CNN's own proposals on the test split (its region proposal
network's top 300 / 1000 boxes, IoU 0.5 / 0.7); the trained Faster R-CNN is
kept as ``<work>/<dataset>/frcnn.pt``. Not a test: about an hour per dataset
on a 2-core CPU.

Both detectors' s/img are timed the same way: the loop over the test images,
each read from disk and detected, the first image's one-time costs included,
the process start and the model load not (`spp detect`'s own "ms per image in
all"; the JSON's ``spp_detect_process_s_per_img`` is its whole process).
``--detect-only`` trains nothing: the models a run kept in ``--work`` detect
and are scored again (a few minutes).

    python benchmarks/vs_faster_rcnn.py [--datasets raccoon,bccd,coco128] [--epochs 12] [--work DIR]
        [--skip frcnn|spp] [--spp-train-args '--backbone efficientnet_lite2'] [--detect-only]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import tempfile
import time
from pathlib import Path

import checkout  # this checkout's spp_cli first, here and in the subprocesses
import numpy as np
import torch
from torch import nn

REPO = checkout.REPO
DATASETS = checkout.DATASETS


def spp(*args: str) -> tuple[float, str]:
    """Seconds and output of ``spp ARGS`` in a fresh process (this checkout)."""
    return checkout.run_spp(*args)


def voc07_map(dets: Path, data: str, split: str, work: Path) -> float:
    metrics = work / f"{dets.stem}.metrics.json"
    spp("eval", str(dets), "--data", data, "--split", split, "--metric", "voc07", "--out", str(metrics))
    return float(json.loads(metrics.read_text())["mAP"])


# ------------------------------------------------------------------ Faster R-CNN


class FrozenBatchNormTrunk(nn.Module):
    """The Lite0 trunk with every batch norm kept in eval mode, its affine parameters frozen."""

    def __init__(self, trunk: nn.Module, channels: int):
        super().__init__()
        self.body = trunk
        self.out_channels = channels
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                for p in module.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": self.body(x)}


def faster_rcnn(num_classes: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from spp_cli.backbones import build_trunk, get_spec

    spec = get_spec("efficientnet_lite0_b4")
    state, _ = spec.default_weights()
    backbone = FrozenBatchNormTrunk(build_trunk(spec, state), spec.channels)
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    return FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        min_size=512,
        max_size=853,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        box_score_thresh=0.001,
        box_detections_per_img=100,
    )


def load_rgb(path: Path) -> torch.Tensor:
    from spp_cli.images import load_image

    return torch.from_numpy(load_image(path).copy()).permute(2, 0, 1).float().div_(255.0)


def train_faster_rcnn(records, classes: list[str], epochs: int, log) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    model = faster_rcnn(len(classes))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)
    usable = [r for r in records if len(r.boxes)]
    steps_per_epoch = math.ceil(len(usable) / 2)
    total = epochs * steps_per_epoch
    drop_at = int(round(0.75 * total))
    warmup = 100
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(usable))
        for first in range(0, len(order), 2):
            images, targets = [], []
            for k in order[first : first + 2]:
                record = usable[k]
                image = load_rgb(record.path)
                boxes = torch.as_tensor(record.boxes, dtype=torch.float32)
                if rng.random() < 0.5:
                    image = image.flip(-1)
                    width = image.shape[-1]
                    boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
                images.append(image)
                targets.append({"boxes": boxes, "labels": torch.as_tensor(record.labels, dtype=torch.int64) + 1})
            lr = 0.005 * (0.1 if step >= drop_at else 1.0) * (min(1.0, (step + 1) / warmup))
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            step += 1
            if step % 20 == 0 or step == total:
                log(f"  faster r-cnn epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model, time.perf_counter() - start


@torch.inference_mode()
def detect_faster_rcnn(model: nn.Module, records, classes: list[str], out: Path) -> float:
    from spp_cli.detections import detections_document
    from spp_cli.fileio import atomic_write_json

    model.eval()
    images = []
    # Timed as `spp detect` times its own loop ("ms per image in all"): each image read and
    # detected, the first one's one-time costs included, the process start and model load not.
    start = time.perf_counter()
    for record in records:
        image = load_rgb(record.path)
        found = model([image])[0]
        images.append({
            "id": record.image_id, "path": str(record.path), "width": int(image.shape[-1]), "height": int(image.shape[-2]),
            "detections": [
                {"box": [round(float(v), 2) for v in box], "class": classes[int(label) - 1], "class_id": int(label) - 1, "score": round(float(score), 5)}
                for box, label, score in zip(found["boxes"], found["labels"], found["scores"])
            ],
        })
    seconds = time.perf_counter() - start
    atomic_write_json(out, detections_document(classes, images))
    return seconds / max(len(records), 1)


@torch.inference_mode()
def rpn_recall(model: nn.Module, records, classes: list[str], tops: tuple[int, ...] = (300, 1000)) -> dict[str, float]:
    """Recall at IoU 0.5 / 0.7 of the trained model's own region proposal network on ``records``.

    Its proposals after its NMS (1000 per image at test time), best first, the
    top N of each mapped back to the image's pixels; the same measure as `spp
    propose --report` (``spp_cli.evaluate.proposal_recall``).
    """
    from torchvision.models.detection.transform import resize_boxes

    from spp_cli.evaluate import proposal_recall

    model.eval()
    items: dict[int, list] = {top: [] for top in tops}
    for record in records:
        image = load_rgb(record.path)
        batch, _ = model.transform([image])
        proposals, _ = model.rpn(batch, model.backbone(batch.tensors))
        boxes = resize_boxes(proposals[0], batch.image_sizes[0], tuple(image.shape[-2:])).numpy()
        keep = ~record.iscrowd  # as `spp propose --report`: crowd boxes are not counted
        for top in tops:
            items[top].append((boxes[:top], record.boxes[keep], record.labels[keep]))
    figures = {}
    for top in tops:
        overall, _, _ = proposal_recall(items[top], classes)
        figures[f"recall@0.5_top{top}"] = round(overall.recall(0.5), 3)
        figures[f"recall@0.7_top{top}"] = round(overall.recall(0.7), 3)
    return figures


# ------------------------------------------------------------------ the run


def run_dataset(name: str, work: Path, epochs: int, skip: set[str], log, spp_train_args: tuple[str, ...] = (),
                detect_only: bool = False) -> dict:
    """One dataset's row. ``detect_only``: no training; both models a run kept in ``work``
    (``spp-model.safetensors``, ``frcnn.pt``) detect and are scored again."""
    from spp_cli.commands.detect import WALL_FIGURE
    from spp_cli.data import open_dataset

    data, train_split, test_split = DATASETS[name]
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"dataset": name}
    if "spp" not in skip:
        model = work / "spp-model.safetensors"
        if not detect_only:
            seconds, output = spp("train", "--data", data, "--split", train_split, "--out", str(model), "--work", str(work / "spp-work"), *spp_train_args)
            (work / "spp-train.log").write_text(output)  # its closing summary: validation AP, choice, time per step
            chose = next((line for line in output.splitlines() if line.startswith("Chose ")), "")
            log(f"  spp train: {seconds:.0f} s; {chose[:160]}")
            row["spp_train_s"] = seconds
        dets = work / "spp-dets.json"
        test_images = len(open_dataset(data, test_split).records)
        detect_seconds, output = spp("detect", "--data", data, "--split", test_split, "--model", str(model), "--out", str(dets))
        # Its own loop's figure (images read and detected), as Faster R-CNN's below; the
        # process's, start and model load included, beside it.
        loop = WALL_FIGURE.search(output)
        row.update(spp_map=voc07_map(dets, data, test_split, work), spp_detect_s_per_img=float(loop.group(1)) / 1000 if loop else math.nan,
                   spp_detect_process_s_per_img=detect_seconds / max(test_images, 1))
        log(f"  spp: mAP {row['spp_map']:.3f}")
    if "frcnn" not in skip:
        train_set = open_dataset(data, train_split)
        test_set = open_dataset(data, test_split)
        classes = list(train_set.classes)
        test_records = test_set.records
        if detect_only:
            model = faster_rcnn(len(classes))
            model.load_state_dict(torch.load(work / "frcnn.pt", weights_only=True))
        else:
            model, row["frcnn_train_s"] = train_faster_rcnn(train_set.records, classes, epochs, log)
            torch.save(model.state_dict(), work / "frcnn.pt")  # for a later look without the hour of training
        dets = work / "frcnn-dets.json"  # detections carry class names: eval matches them to the test split's by name
        per_image = detect_faster_rcnn(model, test_records, classes, dets)
        row.update(frcnn_map=voc07_map(dets, data, test_split, work), frcnn_test_s_per_img=per_image)
        log(f"  faster r-cnn: mAP {row['frcnn_map']:.3f}")
        row["frcnn_rpn_recall"] = rpn_recall(model, test_records, list(test_set.classes))
        log(f"  faster r-cnn's own proposals on the test split: {row['frcnn_rpn_recall']}")
    if "spp_map" in row and "frcnn_map" in row:
        row["gain_interval95"] = gain_interval(work / "spp-dets.json", work / "frcnn-dets.json", data, test_split)
    return row


def gain_interval(spp_dets: Path, frcnn_dets: Path, data: str, split: str, resamples: int = 2000) -> list[float]:
    """95% interval of spp's mAP minus Faster R-CNN's over test splits resampled from this one
    (``paired_bootstrap.py``: the same resample for both)."""
    from paired_bootstrap import bootstrap_differences, score_file
    from spp_cli.data import open_dataset

    test_set = open_dataset(data, split)
    (a, _), (b, _) = score_file(spp_dets, test_set), score_file(frcnn_dets, test_set)
    diff = bootstrap_differences(a, b, len(test_set.records), resamples)
    return [float(v) for v in np.percentile(diff, [2.5, 97.5])]


def main() -> None:
    checkout.check()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="raccoon,bccd,coco128")
    parser.add_argument("--epochs", type=int, default=12, help="Faster R-CNN epochs (the recipe: 12)")
    parser.add_argument("--skip", default="", help="frcnn and/or spp: leave that side out (a quick check)")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--spp-train-args", default="", help="extra options of `spp train`, e.g. '--backbone efficientnet_lite2' (Faster R-CNN keeps Lite0)")
    parser.add_argument("--detect-only", action="store_true",
                        help="train nothing: the models a run kept in --work (<dataset>/spp-model.safetensors, frcnn.pt) detect again")
    args = parser.parse_args()
    if args.detect_only and args.work is None:
        parser.error("--detect-only needs --work: the folder of a run that kept its models")
    names = [n for n in args.datasets.split(",") if n]
    skip = {s for s in args.skip.split(",") if s}
    work = args.work or Path(tempfile.mkdtemp(prefix="spp-vs-frcnn-"))

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"torch threads {torch.get_num_threads()}; work {work}; Faster R-CNN epochs {args.epochs}; spp train {args.spp_train_args or 'defaults'}")
    rows = []
    for name in names:
        log(f"{name}:")
        rows.append(run_dataset(name, work / name, args.epochs, skip, log, tuple(shlex.split(args.spp_train_args)), args.detect_only))
        log(f"  row: {json.dumps(rows[-1])}")  # kept in the log should a later dataset fail

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else format("-", ">" + fmt.split(".")[0])

    header = (f"{'dataset':10} {'FRCNN mAP':>9} {'train s':>8} {'test s/img':>10} | {'spp mAP':>7} {'train s':>8} {'detect s/img':>12} | "
              f"{'mAP gain':>8} {'95% interval':>16} {'train ratio':>11}")
    print(header)
    for row in rows:
        gain = f"{row['spp_map'] - row['frcnn_map']:+.3f}" if "spp_map" in row and "frcnn_map" in row else "-"
        ratio = f"{row['spp_train_s'] / row['frcnn_train_s']:.2f}" if "spp_train_s" in row and "frcnn_train_s" in row else "-"
        interval = "[{:+.3f}, {:+.3f}]".format(*row["gain_interval95"]) if "gain_interval95" in row else "-"
        print(f"{row['dataset']:10} {cell(row, 'frcnn_map', '9.3f')} {cell(row, 'frcnn_train_s', '8.0f')} {cell(row, 'frcnn_test_s_per_img', '10.3f')} | "
              f"{cell(row, 'spp_map', '7.3f')} {cell(row, 'spp_train_s', '8.0f')} {cell(row, 'spp_detect_s_per_img', '12.3f')} | {gain:>8} {interval:>16} {ratio:>11}")
    print(json.dumps({"epochs": args.epochs, "rows": rows}))


if __name__ == "__main__":
    main()
