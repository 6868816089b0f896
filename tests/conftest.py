"""Shared fixtures: tiny generated datasets of every format, and the real data.

Integration tests read ``../shared/data`` (beside the repository). Outside CI
they are skipped when it is absent; with ``CI=true`` its absence is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_cli.config import hold_reproducible_blas

# The tests train in this process as the training commands do: MKL's reproducible sums, set
# before torch's first matrix product (spp_cli.config.hold_reproducible_blas).
hold_reproducible_blas()


@pytest.fixture(autouse=True)
def _thread_count_restored():
    """`spp --threads N` sets OMP_NUM_THREADS and torch's thread count for the process (as a
    run should); invoked in this process by a test, it must not leave every later test, and
    the subprocesses they start, at N threads."""
    import sys

    omp = os.environ.get("OMP_NUM_THREADS")
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    if threads is not None and sys.modules["torch"].get_num_threads() != threads:
        sys.modules["torch"].set_num_threads(threads)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RACCOON = SHARED_DATA / "raccoon"
COCO128 = SHARED_DATA / "coco128"


def invoke(*args):
    """``spp ARGS`` through click's runner (arguments as strings); a Python exception propagates, traceback and all."""
    from click.testing import CliRunner

    from spp_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line(result) -> str:
    """The one line a command wrote to stderr (fails on more or fewer)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing; CI must run with ../shared beside the repository")
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB") -> Path:
    """A small image with a few flat rectangles (something selective search can find)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 200, np.uint8)
    for _ in range(3):
        x1, y1 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x2, y2 = x1 + rng.integers(8, width // 2), y1 + rng.integers(8, height // 2)
        pixels[y1:y2, x1:x2] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def voc_xml(filename: str, width: int, height: int, objects: list[tuple]) -> str:
    """A VOC annotation; ``objects`` are ``(name, xmin, ymin, xmax, ymax[, difficult])``."""
    parts = [f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for obj in objects:
        name, x1, y1, x2, y2 = obj[:5]
        difficult = obj[5] if len(obj) > 5 else 0
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


# The shapes dataset of the pipeline and R-CNN tests: one red and one blue
# rectangle per 160 x 120 image, four training images and two test images.
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
TRAIN, TEST = ["s00", "s01", "s02", "s03"], ["s04", "s05"]


def write_shapes(root: Path) -> Path:
    """XML-beside-images dataset: one red and one blue rectangle per image, on a light noisy background."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, image_id in enumerate(TRAIN + TEST):
        pixels = np.full((120, 160, 3), 245, np.uint8) - rng.integers(0, 12, (120, 160, 3), dtype=np.uint8)
        objects = []
        for name, x0 in zip(("red", "blue") if i % 2 == 0 else ("blue", "red"), (0, 80)):
            w, h = int(rng.integers(30, 60)), int(rng.integers(30, 70))
            x1, y1 = x0 + int(rng.integers(5, 76 - w)), int(rng.integers(5, 115 - h))
            pixels[y1 : y1 + h, x1 : x1 + w] = COLOURS[name]
            objects.append((name, x1, y1, x1 + w, y1 + h))
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg", quality=95)
        (root / "annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", 160, 120, objects))
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "test.txt").write_text("\n".join(TEST) + "\n")
    return root


@pytest.fixture
def xml_dataset(tmp_path: Path) -> Path:
    """raccoon-style: images/, annotations/, train.txt, test.txt; 3 images, 2 classes."""
    root = tmp_path / "xmlset"
    objects = {
        "a": [("cat", 11, 11, 30, 30), ("dog", 1, 1, 64, 48, 1)],
        "b": [("dog", 5, 5, 20, 20)],
        "c": [("cat", 30, 10, 60, 40)],
    }
    for seed, (image_id, objs) in enumerate(objects.items()):
        write_image(root / "images" / f"{image_id}.jpg", seed=seed)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", 64, 48, objs))
    (root / "train.txt").write_text("a\nb\n")
    (root / "test.txt").write_text("c\n")
    return root


@pytest.fixture
def voc_dataset(tmp_path: Path) -> Path:
    """PASCAL VOC layout: Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt."""
    root = tmp_path / "VOC2007"
    for seed, (image_id, objs) in enumerate({"000001": [("person", 2, 3, 40, 45)], "000002": [("car", 10, 10, 50, 30, 1)]}.items()):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed=seed)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", 64, 48, objs))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    return root


def coco_document() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "one.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "two.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 64, 48], "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [5.5, 6.5, 10, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


@pytest.fixture
def coco_dataset(tmp_path: Path) -> Path:
    """COCO layout: annotations/instances_train.json + images/train/."""
    root = tmp_path / "coco"
    for seed, name in enumerate(("one.jpg", "two.jpg")):
        write_image(root / "images" / "train" / name, seed=seed)
    (root / "annotations").mkdir(parents=True)
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(coco_document()))
    return path


@pytest.fixture
def yolo_dataset(tmp_path: Path) -> Path:
    """YOLO layout: data.yaml, images/{train,val}/, labels/{train,val}/."""
    root = tmp_path / "yolo"
    write_image(root / "images" / "train" / "p.jpg", 100, 50)
    write_image(root / "images" / "val" / "q.jpg", 100, 50)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "p.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.2 0.2\n")
    (root / "labels" / "val" / "q.txt").write_text("1 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: bird\n  1: fish\n")
    return root / "data.yaml"


def model_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, by name (for comparing two models)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safetensors handles have no __iter__)
