"""The records every reader produces, and the single place boxes are checked.

Shape letters: N ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spp_cli import boxes as box_ops
from spp_cli.errors import ImageError
from spp_cli.images import image_size


@dataclass
class ImageRecord:
    """One image and its ground truth.

    Attributes:
        image_id: the image's id within the dataset (file stem for VOC/YOLO,
            the ``file_name`` stem for COCO).
        path: the image file.
        width, height: image size in pixels, read from the image file (not the
            annotation, which is sometimes wrong); ``None`` if unreadable.
        boxes: ``(N, 4)`` float32, ``xyxy`` continuous pixels.
        labels: ``(N,)`` int64 indices into :attr:`Dataset.classes`.
        difficult: ``(N,)`` bool, VOC ``<difficult>`` (ignored by VOC AP).
        iscrowd: ``(N,)`` bool, COCO ``iscrowd`` (ignored by COCO AP).
        coco_id: the numeric COCO image id when the source is COCO JSON.
    """

    image_id: str
    path: Path
    width: int | None = None
    height: int | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    coco_id: int | None = None


@dataclass
class Dataset:
    """An opened dataset split.

    Attributes:
        root: the folder (or annotation file) the dataset was opened from.
        format: one of :data:`spp_cli.data.FORMATS`.
        classes: class names; ``labels`` index into this list.
        records: the images that were read successfully, in split order.
        bad: ``(file, problem)`` for images whose annotation could not be
            used; commands skip them and list them at the end.
        warnings: one line each, e.g. boxes clipped to the image.
        category_ids: a COCO JSON's category id of each class name (its results use them).
    """

    root: Path
    format: str
    classes: list[str]
    records: list[ImageRecord]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    category_ids: dict[str, int | str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_boxes(self) -> int:
        """Ground-truth boxes that are not ``iscrowd``."""
        return int(sum(int((~r.iscrowd).sum()) for r in self.records))


def sanitise(
    record: ImageRecord,
    raw_boxes: list[list[float]] | np.ndarray,
    labels: list[int],
    difficult: list[bool],
    iscrowd: list[bool],
    annotation_file: Path | str,
    warnings: list[str],
) -> ImageRecord:
    """Fill ``record`` with checked boxes; the one place boxes are validated.

    The image size comes from the image file's header. Boxes reaching beyond
    the image are clipped, boxes with ``x2 <= x1`` or ``y2 <= y1`` and boxes
    wholly outside the image (nothing left after clipping) are dropped, and so
    are boxes with a coordinate that is not a finite number below 1e9; each
    with a warning that says which of these happened. Each warning starts with
    ``annotation_file`` (a path, or a path and which image of it).
    """
    exact = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 4)
    # NaN, infinity, or beyond any image (and float32): the source file is damaged there.
    unusable = ~(np.abs(exact) < 1e9).all(axis=1)
    b = np.where(unusable[:, None], 0.0, exact).astype(np.float32)
    keep_labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep_difficult = np.asarray(difficult, dtype=bool).reshape(-1)
    keep_crowd = np.asarray(iscrowd, dtype=bool).reshape(-1)
    try:
        record.width, record.height = image_size(record.path)
    except ImageError:
        # The image itself is reported by the command that reads its pixels.
        record.width = record.height = None
    for i in np.flatnonzero(unusable):
        warnings.append(f"{annotation_file}: box {i + 1} {_fmt(exact[i])} has a coordinate that is not a usable number; dropped")
    degenerate = box_ops.is_degenerate(b) & ~unusable
    if degenerate.any():
        for i in np.flatnonzero(degenerate):
            warnings.append(f"{annotation_file}: box {i + 1} {_fmt(b[i])} has no area (x2 <= x1 or y2 <= y1); dropped")
    degenerate |= unusable
    if record.width is not None and record.height is not None:
        # Sub-pixel overshoot is rounding in the source format (YOLO's
        # normalised floats): clip it silently; warn about real overshoot.
        outside = box_ops.is_outside(b, record.width, record.height, tolerance=1.0) & ~degenerate
        clipped = box_ops.clip(b, record.width, record.height)
        emptied = box_ops.is_degenerate(clipped)
        size = f"{record.width}x{record.height}"
        for i in np.flatnonzero(outside):
            if emptied[i]:
                warnings.append(f"{annotation_file}: box {i + 1} {_fmt(b[i])} lies wholly outside the {size} image; dropped")
            else:
                warnings.append(
                    f"{annotation_file}: box {i + 1} {_fmt(b[i])} extends beyond the {size} image; clipped to {_fmt(clipped[i])}"
                )
        b = clipped
        degenerate |= emptied
    keep = ~degenerate
    record.boxes = b[keep]
    record.labels = keep_labels[keep]
    record.difficult = keep_difficult[keep]
    record.iscrowd = keep_crowd[keep]
    return record


def _fmt(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
