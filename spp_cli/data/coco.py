"""COCO JSON reader (``instances_*.json``)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from spp_cli.boxes import from_xywh
from spp_cli.data.records import Dataset, ImageRecord, sanitise
from spp_cli.data.registry import read_id_list, split_file
from spp_cli.errors import DatasetError


def read_coco(json_path: Path, split: str | None) -> Dataset:
    """Read a COCO detection file; images are looked up beside it.

    The image folder is the first of ``<root>/images/<stem>``,
    ``<root>/<stem>``, ``<root>/images``, ``<root>`` (``root`` = the folder
    above ``annotations/``, ``stem`` = ``train2017`` for
    ``instances_train2017.json``) that holds the first image. A split is an id
    list (``<root>/<split>.txt`` or a ``.txt`` path) of file-name stems or
    numeric COCO ids.
    """
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{json_path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{json_path}: missing key '{key}'")
    categories = _require_each(json_path, data["categories"], "categories", {"id": _ID, "name": _NAME})
    images = _require_each(json_path, data["images"], "images", {"id": _ID, "file_name": _NAME})
    annotations = _require_each(json_path, data["annotations"], "annotations", {"image_id": _ID, "category_id": _ID, "bbox": None})
    if len({type(c["id"]) for c in categories}) > 1:
        raise DatasetError(f"{json_path}: category ids mix numbers and strings")
    file_of: dict = {}
    for im in images:
        if im["id"] in file_of:
            raise DatasetError(f"{json_path}: image id {json.dumps(im['id'])} appears twice ({file_of[im['id']]}, {im['file_name']})")
        file_of[im["id"]] = im["file_name"]

    categories = sorted(categories, key=lambda c: c["id"])
    # A class is a name (models keep names): categories that share one are one class, whose
    # results carry the first one's id.
    ids_of: dict[str, list] = {}
    for c in categories:
        ids_of.setdefault(str(c["name"]), []).append(c["id"])
    classes = list(ids_of)
    class_index = {category: k for k, ids in enumerate(ids_of.values()) for category in ids}
    category_ids = {name: ids[0] for name, ids in ids_of.items()}
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    image_dir = _find_image_dir(json_path, root, images)

    unknown_ids: list[tuple[Path, str]] = []
    listed_in = None if split is None else split_file(split, root, json_path)
    if listed_in is not None:  # else every image (no split, or all)
        wanted = read_id_list(listed_in)
        listed = set(wanted)
        images = [im for im in images if Path(im["file_name"]).stem in listed or str(im["id"]) in listed]
        if not images:
            raise DatasetError(f"{json_path}: split '{split}' selects no image of this file")
        known = {Path(im["file_name"]).stem for im in images} | {str(im["id"]) for im in images}
        unknown_ids = [(listed_in, f"'{i}' is no image of {json_path} (neither a file name's stem nor an image id)") for i in dict.fromkeys(wanted) if i not in known]

    by_image = defaultdict(list)
    orphans = []
    for ann in annotations:
        if ann["image_id"] in file_of:
            by_image[ann["image_id"]].append(ann)
        else:
            orphans.append(ann["image_id"])

    records, warnings, bad = [], [], list(unknown_ids)
    for name, ids in ids_of.items():
        if len(ids) > 1:
            warnings.append(f"{json_path}: categories {', '.join(map(json.dumps, ids))} share the name {name!r}: one class "
                            f"(its results carry id {json.dumps(ids[0])})")
    if orphans:
        what = "1 annotation has an image_id" if len(orphans) == 1 else f"{len(orphans)} annotations have an image_id"
        warnings.append(f"{json_path}: {what} that is in no image (e.g. {json.dumps(orphans[0])}); ignored")
    for im in images:
        anns = by_image.get(im["id"], [])
        try:
            labels = [_category(json_path, class_index, ann) for ann in anns]
            xywh = [_bbox(json_path, ann) for ann in anns]
        except ValueError as exc:
            bad.append((json_path, str(exc)))
            continue
        record = ImageRecord(image_id=Path(im["file_name"]).stem, path=image_dir / im["file_name"], coco_id=im["id"])
        sanitise(
            record,
            from_xywh(xywh, np.float64) if xywh else [],
            labels,
            [False] * len(anns),
            [bool(ann.get("iscrowd", 0)) for ann in anns],
            f"{json_path}: image {im['file_name']}",  # box warnings say which image
            warnings,
        )
        records.append(record)
    return Dataset(root=json_path, format="coco", classes=classes, records=records, bad=bad, warnings=warnings,
                   category_ids=category_ids)


# What a field may hold: ids are numbers (the COCO format) or strings (some exporters); names are strings.
_ID = ((int, str), "a number or a string")
_NAME = ((str,), "a string")


def _require_each(path: Path, items: object, key: str, fields: dict[str, tuple | None]) -> list[dict]:
    """``items`` as a list of objects, each with ``fields`` of the given kind (``None``: checked later)."""
    if not isinstance(items, list):
        raise DatasetError(f"{path}: '{key}' is not a list")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: {key}[{n}] is not an object")
        for f, kind in fields.items():
            if f not in item:
                raise DatasetError(f"{path}: {key}[{n}] missing key '{f}'")
            value = item[f]
            if kind is not None and (isinstance(value, bool) or not isinstance(value, kind[0]) or value == ""):
                raise DatasetError(f"{path}: {key}[{n}] '{f}' is {json.dumps(value)[:40]}, not {kind[1]}")
    return items


def _category(path: Path, class_index: dict, ann: dict) -> int:
    if ann["category_id"] not in class_index:
        raise ValueError(f"annotation {ann.get('id', '?')} has unknown category_id {ann['category_id']}")
    return class_index[ann["category_id"]]


def _bbox(path: Path, ann: dict) -> list[float]:
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"annotation {ann.get('id', '?')} has a bbox that is not [x, y, w, h]")
    return [float(v) for v in bbox]


def _find_image_dir(json_path: Path, root: Path, images: list[dict]) -> Path:
    stem = json_path.stem.split("_")[-1]  # instances_train2017 -> train2017
    candidates = [root / "images" / stem, root / stem, root / "images", root, json_path.parent]
    if not images:
        return candidates[0]
    first = images[0]["file_name"]
    for folder in candidates:
        if (folder / first).exists():
            return folder
    tried = ", ".join(str(c) for c in candidates[:4])
    raise DatasetError(f"{json_path}: cannot find image '{first}' (looked in {tried})")
