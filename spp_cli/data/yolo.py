"""YOLO reader: ``data.yaml`` (names, split folders) + ``images/`` + ``labels/``.

Label lines are ``class cx cy w h`` normalised to [0, 1]; a label file is
found by replacing the last ``images`` folder of the image path with
``labels`` and the suffix with ``.txt`` (the ultralytics convention). As
ultralytics reads them, a segmentation line ``class x1 y1 x2 y2 x3 y3 ...``
(more than 5 fields) is its polygon's bounding box, and a pose dataset's
lines (``kpt_shape`` in the yaml) are a box followed by its keypoints.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spp_cli.boxes import from_cxcywh_normalised
from spp_cli.data.records import Dataset, ImageRecord, sanitise
from spp_cli.data.registry import ALL_IMAGES, read_id_list
from spp_cli.errors import DatasetError
from spp_cli.images import IMAGE_SUFFIXES, image_size


class LabelError(Exception):
    """One label file that cannot be used; its image is skipped."""


def read_yolo(yaml_path: Path, split: str | None) -> Dataset:
    """Read a YOLO dataset described by ``yaml_path``.

    ``split`` names a key of the yaml (``train``, ``val``, ``test``) whose value
    is an image folder or a ``.txt`` list of images, or is the path of a
    ``.txt`` file of image ids (file stems) to select from all splits.
    ``None`` means the images of every split key, without repeats.
    """
    try:
        config = yaml.safe_load(_read_text(yaml_path, DatasetError))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict) or "names" not in config:
        raise DatasetError(f"{yaml_path}: missing key 'names'")
    classes = _names(yaml_path, config["names"])
    keypoints = _keypoint_numbers(config.get("kpt_shape")) if "kpt_shape" in config else None  # a pose dataset
    root = config.get("path") or "."
    if not isinstance(root, str):
        raise DatasetError(f"{yaml_path}: 'path' is {root!r}, not a folder")
    base = Path(root)
    base = base if base.is_absolute() else yaml_path.parent / base

    split_keys = [k for k in ("train", "val", "test") if config.get(k)]
    if split == ALL_IMAGES and not config.get(ALL_IMAGES):  # a key named all is that split
        split = None
    id_filter = None
    if split is None or (split.endswith(".txt") and Path(split).is_file()):
        if split is not None:
            id_filter = read_id_list(Path(split))
        keys = split_keys
    elif split in config and config[split]:
        keys = [split]
    else:
        raise DatasetError(f"{yaml_path}: no split '{split}' (splits: {', '.join(split_keys) or 'none'})")

    images: list[Path] = []
    for key in keys:
        images.extend(_split_images(yaml_path, base, key, config[key], required=(split is not None and id_filter is None)))
    images = list(dict.fromkeys(images))
    unknown_ids: list[tuple[Path, str]] = []
    if id_filter is not None:
        listed = set(id_filter)
        images = [p for p in images if p.stem in listed]
        found = {p.stem for p in images}
        unknown_ids = [(Path(split), f"'{i}' is no image of {yaml_path}'s splits") for i in dict.fromkeys(id_filter) if i not in found]
    if not images:
        raise DatasetError(f"{yaml_path}: no images found for split '{split or 'all'}'")

    records, warnings, bad = [], [], list(unknown_ids)
    for image_path in images:
        label_path = label_path_for(image_path)
        try:
            rows = _read_labels(label_path, len(classes), keypoints)
        except LabelError as exc:
            bad.append((label_path, str(exc)))
            continue
        record = ImageRecord(image_id=image_path.stem, path=image_path)
        try:
            width, height = image_size(image_path)
            xyxy = from_cxcywh_normalised([r[1:] for r in rows], width, height) if rows else []
        except Exception:
            xyxy = []  # unreadable image: reported when its pixels are read
            rows = []
        sanitise(record, xyxy, [r[0] for r in rows], [False] * len(rows), [False] * len(rows), label_path, warnings)
        records.append(record)
    return Dataset(root=yaml_path, format="yolo", classes=classes, records=records, bad=bad, warnings=warnings)


def label_path_for(image_path: Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt``."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _names(yaml_path: Path, names: object) -> list[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' keys must be class indices") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: 'names' indices must run 0..{len(keys) - 1}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    raise DatasetError(f"{yaml_path}: 'names' must be a list or a mapping")


def _split_images(yaml_path: Path, base: Path, key: str, value: object, required: bool) -> list[Path]:
    entries = value if isinstance(value, list) else [value]
    out: list[Path] = []
    for entry in entries:
        path = Path(str(entry))
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file() and path.suffix == ".txt":
            for line in _read_text(path, DatasetError).splitlines():
                if line.strip():
                    p = Path(line.strip())
                    out.append(p if p.is_absolute() else base / p)
        elif required:
            raise DatasetError(f"{yaml_path}: split '{key}' points to {path}, which does not exist")
    return out


def _read_labels(path: Path, num_classes: int, keypoints: int | None = None) -> list[tuple[int, float, float, float, float]]:
    """``(class, cx, cy, w, h)`` normalised, one per label line: a box line's own or, in a file
    where a line holds more than 6 fields (ultralytics' test, per file), each line's polygon's
    bounding box; with ``keypoints`` (a pose dataset: the numbers each line's keypoints take,
    -1 where ``kpt_shape`` cannot be read) the box that leads each line."""
    if not path.exists():
        return []  # YOLO convention: no label file = no objects
    lines = [(n, line.split()) for n, line in enumerate(_read_text(path, LabelError, name=False).splitlines(), start=1)]
    lines = [(n, fields) for n, fields in lines if fields]
    polygons = keypoints is None and any(len(fields) > 6 for _, fields in lines)
    rows = []
    for n, fields in lines:
        line = " ".join(fields)
        if keypoints is not None:
            if len(fields) < 5 or (keypoints >= 0 and len(fields) != 5 + keypoints):
                wanted = f"5 + {keypoints}" if keypoints >= 0 else "at least 5"
                raise LabelError(f"line {n}: expected 'class cx cy w h' and the keypoints of data.yaml's kpt_shape ({wanted} fields), got {len(fields)} fields")
        elif polygons:
            if len(fields) < 5 or len(fields) % 2 == 0:
                raise LabelError(f"line {n}: expected a polygon 'class x1 y1 x2 y2 ...' as on the file's other lines, got {len(fields)} fields")
        elif len(fields) != 5:
            likely = " (a confidence column, as `yolo predict save_conf=True` writes?)" if len(fields) == 6 else ""
            raise LabelError(f"line {n}: expected 'class cx cy w h', got {len(fields)} fields{likely}")
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise LabelError(f"line {n}: not numbers: {line!r}") from None
        if polygons:
            xs, ys = values[0::2], values[1::2]
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        else:
            cx, cy, w, h = values[:4]
        if not 0 <= cls < num_classes:
            raise LabelError(f"line {n}: class id {cls} out of range (data.yaml names {num_classes} classes)")
        rows.append((cls, cx, cy, w, h))
    return rows


def _keypoint_numbers(kpt_shape: object) -> int:
    """The numbers a pose label line holds after its box: ``kpt_shape`` ``[k, d]`` -> ``k * d``;
    -1 where it is not two counts (the lines are then taken as a box and anything after it)."""
    if isinstance(kpt_shape, list) and len(kpt_shape) == 2 and all(isinstance(v, int) and v > 0 for v in kpt_shape):
        return kpt_shape[0] * kpt_shape[1]
    return -1


def _read_text(path: Path, error: type[Exception], name: bool = True) -> str:
    """The UTF-8 text of ``path``; ``error("<path>: <problem>")`` if it is unreadable.

    ``name=False`` leaves the path out of the message, for :class:`LabelError`
    (its image is listed as skipped with the label file's path beside it).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except OSError as exc:
        problem = f"cannot read ({exc.strerror or exc})"
    raise error(f"{path}: {problem}" if name else problem)
