"""The detections file (`spp detect` writes it; `spp draw` and `spp eval` read it).

Two files are written side by side:

- ``dets.json``: ``{"format": "spp-detections", "version": 1, "classes": [...],
  "images": [{"id", "path", "width", "height", "coco_id"?, "detections":
  [{"box": [x1, y1, x2, y2], "class", "class_id", "score"}]}]}`` with boxes
  ``xyxy`` in continuous pixels of the original image and raw SVM scores;
- ``dets.coco.json``: the COCO results format (``image_id``, ``category_id``,
  ``bbox`` ``[x, y, w, h]``, ``score``). Detections of a COCO JSON dataset
  (``--data``) carry its image and category ids (``dets.json`` records the
  categories as ``"coco_categories"``: class name -> id), so the file scores
  against that JSON; otherwise images are numbered in order and
  ``category_id`` is the class index + 1.

Standard library only, so reading needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from spp_cli.errors import SPPError
from spp_cli.fileio import read_versioned_json

DETECTIONS_FORMAT = "spp-detections"
DETECTIONS_VERSION = 1


def coco_results_path(path: str | Path) -> Path:
    """``dets.json`` -> ``dets.coco.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".coco.json")


def detections_document(classes: list[str], images: list[dict], coco_categories: dict | None = None,
                        class_filter: list[str] | None = None) -> dict:
    """The versioned per-image document; ``images`` as described above; ``coco_categories``
    (class name -> category id) where the images come from a COCO JSON; ``class_filter`` the
    classes a ``spp detect --classes`` run detected (`spp eval` scores those alone)."""
    doc = {"format": DETECTIONS_FORMAT, "version": DETECTIONS_VERSION, "classes": list(classes), "images": images}
    if coco_categories is not None:
        doc["coco_categories"] = dict(coco_categories)
    if class_filter is not None:
        doc["class_filter"] = list(class_filter)
    return doc


def coco_results(images: list[dict], coco_categories: dict | None = None) -> list[dict]:
    """COCO results list; ``image_id`` is the entry's ``coco_id`` or its index, ``category_id``
    the class's id in ``coco_categories`` (a detection of a class missing there is left out: the
    JSON could not score it), or without them the class index + 1."""
    out = []
    for n, image in enumerate(images):
        image_id = image.get("coco_id", n)
        for det in image["detections"]:
            if coco_categories is not None and det["class"] not in coco_categories:
                continue
            x1, y1, x2, y2 = det["box"]
            out.append(
                {
                    "image_id": image_id,
                    "category_id": det["class_id"] + 1 if coco_categories is None else coco_categories[det["class"]],
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": det["score"],
                }
            )
    return out


@dataclass
class DetectionsImage:
    """One image entry of a detections file; ``path`` exactly as written there."""

    id: str
    path: str
    width: int | None
    height: int | None
    detections: list[dict] = field(default_factory=list)


@dataclass
class DetectionsFile:
    classes: list[str]
    images: list[DetectionsImage]
    class_filter: list[str] | None = None  # `spp detect --classes`: the only classes detected


def read_detections(path: str | Path) -> DetectionsFile:
    """Load and validate a detections file written by `spp detect`.

    Format (UTF-8 JSON)::

        {"format": "spp-detections", "version": 1, "classes": [...],
         "images": [{"id", "path", "width", "height",
                     "detections": [{"box": [x1, y1, x2, y2], "class", "class_id", "score"}]}]}

    Raises:
        SPPError: missing, not JSON, another format or version, or a malformed
            entry; the message names the file (and the entry).
    """
    path = Path(path)
    doc = read_versioned_json(path, DETECTIONS_FORMAT, DETECTIONS_VERSION, "detections", f"create it with `spp detect ... --out {path}`")
    entries = doc.get("images", [])
    if not isinstance(entries, list):
        raise SPPError(f"{path}: \"images\" is not a list")
    images = [read_image_entry(path, n, entry) for n, entry in enumerate(entries)]
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise SPPError(f"{path}: \"classes\" is not a list of class names")
    class_filter = doc.get("class_filter")
    if class_filter is not None and (not isinstance(class_filter, list) or not all(isinstance(c, str) for c in class_filter)):
        raise SPPError(f"{path}: \"class_filter\" is not a list of class names")
    return DetectionsFile(classes=list(classes), images=images, class_filter=class_filter)


def read_image_entry(path: Path, n: int, entry) -> DetectionsImage:
    """``images[n]`` of the detections file ``path``, checked; raises SPPError naming both."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("detections"), list):
        raise SPPError(f"{path}: images[{n}] is malformed (needs path and detections [{{box, class, score}}, ...])")
    if "\0" in entry["path"]:  # no file can have it; Path.resolve() would raise ValueError at lookup
        raise SPPError(f"{path}: images[{n}] has a path with a NUL character")
    size = []
    for key in ("width", "height"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise SPPError(f"{path}: images[{n}] has a bad {key} ({value!r})")
        size.append(value)
    dets = []
    for k, det in enumerate(entry["detections"]):
        if not _valid_detection(det):
            raise SPPError(
                f"{path}: images[{n}].detections[{k}] is malformed (needs box [x1, y1, x2, y2], class, score; a probability must be a number)"
            )
        x1, y1, x2, y2 = det["box"]
        if x2 < x1 or y2 < y1:  # would be drawn, and scored by eval, as some other box
            raise SPPError(f"{path}: images[{n}].detections[{k}] has box {det['box']} with x2 < x1 or y2 < y1")
        dets.append(det)
    return DetectionsImage(str(entry.get("id", Path(entry["path"]).stem)), entry["path"], size[0], size[1], dets)


def _number(value) -> bool:
    # bool is an int in Python, but `true` is no coordinate or score; NaN and
    # infinity (which Python's json accepts) cannot be drawn.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_detection(det) -> bool:
    return (
        isinstance(det, dict)
        and isinstance(det.get("box"), list)
        and len(det["box"]) == 4
        and all(_number(v) for v in det["box"])
        and isinstance(det.get("class"), str)
        and _number(det.get("score"))
        and (det.get("probability") is None or _number(det["probability"]))  # drawn as a percentage
    )
