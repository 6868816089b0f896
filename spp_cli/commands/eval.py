"""`spp eval`: per-class AP of a detections file against a dataset split."""

from __future__ import annotations

import math
from pathlib import Path

from spp_cli import ui
from spp_cli.data.registry import dataset_files
from spp_cli.errors import DatasetError
from spp_cli.fileio import atomic_write_json, check_not_input, check_writable


def run_eval(detections_file: Path, data: str, split: str | None, metric: str, out: Path | None) -> int:
    from rich.table import Table

    from spp_cli.data import open_dataset
    from spp_cli.detections import read_detections
    from spp_cli.evaluate import evaluate_coco, evaluate_voc, pair_with_detections

    if out is not None:
        check_writable(out)
        check_not_input(out, [detections_file, *dataset_files(data, split)])
    dets = read_detections(detections_file)
    dataset = open_dataset(data, split)
    ui.print_warnings(dataset.warnings)
    detected = [c for c in dataset.classes if c in dets.classes]
    # Every class of the dataset is scored, as the VOC devkit and pycocotools score them: one the
    # detections lack (a model that never learned it) has AP 0 where the split holds its boxes.
    # A `spp detect --classes` run is scored on the classes it asked for.
    shared = [c for c in dataset.classes if dets.class_filter is None or c in dets.class_filter]
    if not dataset.records and dataset.bad:
        ui.print_bad(list(dataset.bad))
        raise DatasetError(f"{data}: no image of split '{split or 'all'}' has usable annotations (the files above)")
    if not dataset.records:
        raise DatasetError(f"{data}: no images in split '{split or 'all'}'")
    if not detected:
        raise DatasetError(
            f"{data}: none of the dataset's classes ({', '.join(dataset.classes[:6])}) is among the detections' classes "
            f"({', '.join(dets.classes[:6])}); was the model trained on another dataset?"
        )
    pairs, missing = pair_with_detections(dataset.records, dataset.classes, dets.images)
    if missing == len(dataset.records):
        raise DatasetError(f"{detections_file}: none of the {missing} image(s) of {data} (split '{split or 'all'}') has an entry; "
                           "were the detections made on another split?")
    if missing:
        ui.warn(f"{missing} of {len(dataset.records)} image(s) have no entry in {detections_file}; counted as without detections")
    unasked = [c for c in dataset.classes if c in dets.classes and c not in shared]
    if unasked:
        ui.warn(f"not evaluated (not detected: `spp detect --classes` asked for {', '.join(dets.class_filter)}): {', '.join(unasked)}")
    scores = [d["score"] for e in dets.images for d in e.detections]
    if metric != "coco" and scores and min(scores) >= 0:
        ui.console.print("note: no detection scores below 0; AP counts only what was kept (`spp detect --conf -1.5` keeps the full ranking)")

    result = evaluate_coco(pairs, shared) if metric == "coco" else evaluate_voc(pairs, shared, metric)
    unknown = [c for c in shared if c not in dets.classes and result.counts.get(c)]
    if unknown:
        ui.warn(f"AP 0 (no such class in the detections; the split holds their boxes): {', '.join(unknown)}")
    title = {"voc07": "VOC07 11-point AP (IoU 0.5)", "voc": "VOC area AP (IoU 0.5)", "coco": "COCO AP@[.5:.95]"}[metric]
    table = Table(title=f"{title}: {len(dataset.records)} image(s)")
    table.add_column("class")
    table.add_column("GT", justify="right")
    table.add_column("AP", justify="right")
    if metric == "coco":
        table.add_column("AP50", justify="right")
    for name in shared:
        ap = result.per_class[name]
        row = [name, str(result.counts[name]), "-" if math.isnan(ap) else f"{ap:.3f}"]
        if metric == "coco":
            ap50 = result.extra.get(f"AP50/{name}")
            row.append("-" if ap50 is None else f"{ap50:.3f}")
        table.add_row(*row)
    mean_row = ["mAP", str(sum(result.counts.values())), f"{result.mean_ap:.3f}"]
    if metric == "coco":
        mean_row.append(f"{result.extra['AP50']:.3f}")
    table.add_row(*mean_row, style="bold")
    ui.console.print(table)
    if out is not None:
        doc = {
            "metric": metric,
            "mAP": None if math.isnan(result.mean_ap) else round(result.mean_ap, 6),
            "per_class": {k: (None if math.isnan(v) else round(v, 6)) for k, v in result.per_class.items()},
            "ground_truth": result.counts,
        }
        if metric == "coco":
            doc["AP50"] = round(result.extra["AP50"], 6)
            doc["per_class_AP50"] = {k[5:]: round(v, 6) for k, v in result.extra.items() if k.startswith("AP50/")}
        atomic_write_json(out, doc, indent=2)
    # Images whose annotations cannot be used are not evaluated: list them, exit 1.
    ui.print_bad(list(dataset.bad))
    return 1 if dataset.bad else 0
