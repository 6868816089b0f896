"""Region proposals by selective search (OpenCV ximgproc), and props.json.

Boxes are ``xyxy`` float32 in continuous pixels of the original image
(:mod:`spp_cli.boxes`). Shape letters: R proposals.

Selective search is assembled from OpenCV's parts so that more than its two
built-in modes are available: the colour spaces the image is segmented in,
the graph-segmentation ``k`` values, and the similarity measures that drive
the hierarchical grouping. Each (colour space, k, similarity) combination
is one grouping run; OpenCV ranks all their boxes together (hierarchy level
times a random factor, as in Uijlings et al.), and the top N are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from spp_cli import boxes as box_ops
from spp_cli.errors import ProposalError, SPPError

PROPOSALS_FORMAT = "spp-proposals"
PROPOSALS_VERSION = 1


@dataclass(frozen=True)
class Strategy:
    """One selective-search configuration.

    Attributes:
        colour_spaces: OpenCV colour spaces to segment in (``hsv``, ``lab``,
            ``rgb``, ``gray``, ``ycrcb``...).
        ks: graph-segmentation thresholds; larger k = larger initial regions.
        min_size_factor: each segmentation's minimum region size is
            ``k * min_size_factor`` pixels (Uijlings: ``min_size = k``).
        sigma: Gaussian smoothing before graph segmentation.
        similarities: each a ``+``-joined set of ``color``, ``texture``,
            ``size``, ``fill`` combined with equal weights.
    """

    colour_spaces: tuple[str, ...]
    ks: tuple[int, ...]
    similarities: tuple[str, ...]
    sigma: float = 0.8
    min_size_factor: float = 1.0
    description: str = ""


STRATEGIES: dict[str, Strategy] = {
    # OpenCV's switchToSelectiveSearchFast(150, 150, 0.8), spelled out.
    "opencv-fast": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(150, 300, 450),
        similarities=("color+fill+size+texture", "fill+size+texture"),
        description="OpenCV's built-in fast mode: HSV+Lab, k=150/300/450",
    ),
    # The MATLAB fast mode used by R-CNN and SPPnet (Uijlings et al. 2013).
    "original-fast": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(50, 100),
        similarities=("color+texture+size+fill", "texture+size+fill"),
        description="Uijlings/R-CNN fast mode: HSV+Lab, k=50/100, min size k",
    ),
}

DEFAULT_STRATEGY = "original-fast"


@dataclass(frozen=True)
class ProposalParams:
    """Settings of one proposal run; recorded in props.json.

    Attributes:
        strategy: a name from :data:`STRATEGIES`, or ``opencv-quality``.
        max_side: downscale so the long side is at most this many pixels
            before segmenting (``0`` = full resolution); boxes are mapped back.
        top: keep at most this many boxes per image, best-ranked first.
        min_size: drop boxes narrower or shorter than this, in original pixels.
    """

    strategy: str = DEFAULT_STRATEGY
    max_side: int = 500
    top: int = 2000
    min_size: int = 10

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES and self.strategy != "opencv-quality":
            valid = ", ".join([*STRATEGIES, "opencv-quality"])
            raise SPPError(f"unknown proposal strategy '{self.strategy}' (valid: {valid})")


def strategy_names() -> list[str]:
    """Every valid ``--mode`` / strategy name."""
    return [*STRATEGIES, "opencv-quality"]


def propose(image: np.ndarray, params: ProposalParams) -> np.ndarray:
    """Selective-search boxes of one image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (from :func:`spp_cli.images.load_image`).
        params: the run's settings.

    Returns:
        ``(R, 4)`` float32 ``xyxy`` boxes in original-image pixels, ranked
        best first, distinct, each at least ``min_size`` wide and high,
        ``R <= params.top``.
    """
    import cv2

    height, width = image.shape[:2]
    scale = 1.0
    if params.max_side and max(height, width) > params.max_side:
        scale = params.max_side / max(height, width)
        small = cv2.resize(
            image,
            (max(1, round(width * scale)), max(1, round(height * scale))),
            interpolation=cv2.INTER_AREA,
        )
    else:
        small = image
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    rects = _selective_search(bgr, params.strategy)
    if len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    boxes = box_ops.from_xywh(rects)
    if scale != 1.0:
        # Map back to original pixels. Continuous coordinates scale exactly;
        # clip because rounding in the resize can overshoot by a fraction.
        boxes = box_ops.clip(boxes / scale, width, height)
    sizes = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[sizes >= params.min_size]
    boxes = boxes[box_ops.dedupe(np.round(boxes, 1))]
    return np.ascontiguousarray(boxes[: params.top], dtype=np.float32)


_COLOUR_CODES = {
    "hsv": "COLOR_BGR2HSV",
    "lab": "COLOR_BGR2Lab",
    "ycrcb": "COLOR_BGR2YCrCb",
    "rgb": None,
    "gray": "COLOR_BGR2GRAY",
}


def _seed_ranking() -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search ranks with.

    Seeded before every image, a box list does not depend on which worker
    ran it or what ran before it: proposals, caches and models reproduce.
    """
    global _srand
    if _srand is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or ctypes.util.find_library("msvcrt"))
            _srand = libc.srand
        except (OSError, AttributeError, TypeError):
            _srand = False
    if _srand:
        _srand(0)


_srand = None


def _selective_search(bgr: np.ndarray, strategy_name: str) -> np.ndarray:
    import cv2

    seg = cv2.ximgproc.segmentation
    _seed_ranking()
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if strategy_name == "opencv-quality":
        ss.switchToSelectiveSearchQuality()
        return np.asarray(ss.process()).reshape(-1, 4)
    strategy = STRATEGIES[strategy_name]
    ss.clearImages()
    ss.clearGraphSegmentations()
    ss.clearStrategies()
    for space in strategy.colour_spaces:
        code = _COLOUR_CODES[space]
        converted = bgr if code is None else cv2.cvtColor(bgr, getattr(cv2, code))
        if converted.ndim == 2:
            converted = cv2.cvtColor(converted, cv2.COLOR_GRAY2BGR)
        ss.addImage(converted)
    for k in strategy.ks:
        ss.addGraphSegmentation(
            seg.createGraphSegmentation(strategy.sigma, float(k), int(k * strategy.min_size_factor))
        )
    makers = {
        "color": seg.createSelectiveSearchSegmentationStrategyColor,
        "texture": seg.createSelectiveSearchSegmentationStrategyTexture,
        "size": seg.createSelectiveSearchSegmentationStrategySize,
        "fill": seg.createSelectiveSearchSegmentationStrategyFill,
    }
    for combo in strategy.similarities:
        parts = [makers[name]() for name in combo.split("+")]
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(*parts))
    return np.asarray(ss.process()).reshape(-1, 4)


# ---------------------------------------------------------------- batch runs


@dataclass
class ImageProposals:
    """Proposals of one image, as stored in props.json."""

    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (R, 4) float32 xyxy
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "id": self.image_id,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "boxes": np.round(self.boxes.astype(np.float64), 2).tolist(),
        }


@dataclass
class ProposalTask:
    """One image to process in a worker."""

    image_id: str
    path: str


@dataclass
class TaskFailure:
    """An image that could not be processed, with a one-line reason."""

    image_id: str
    path: str
    message: str


def _worker_init() -> None:
    import cv2

    # One OpenCV thread per worker: the pool provides the parallelism, and
    # OpenCV's own threads would only compete with it for the same cores.
    cv2.setNumThreads(1)


def _run_task(args: tuple[ProposalTask, ProposalParams]) -> ImageProposals | TaskFailure:
    from spp_cli.images import load_image

    task, params = args
    try:
        image = load_image(task.path)
    except SPPError as exc:
        return TaskFailure(task.image_id, task.path, str(exc))
    start = time.perf_counter()
    try:
        found = propose(image, params)
    except Exception as exc:  # OpenCV raises cv2.error on pathological inputs
        return TaskFailure(task.image_id, task.path, f"{task.path}: selective search failed ({exc})")
    seconds = time.perf_counter() - start
    height, width = image.shape[:2]
    return ImageProposals(task.image_id, task.path, width, height, found, seconds)


def run_proposals(
    tasks: list[ProposalTask], params: ProposalParams, workers: int = 1
) -> Iterator[ImageProposals | TaskFailure]:
    """Yield each task's result as it finishes (in task order), using ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        _worker_init()
        for task in tasks:
            yield _run_task((task, params))
        return
    import multiprocessing as mp

    # fork keeps start-up cheap (no re-import per worker); the parent holds no
    # threads of ours at this point.
    ctx = mp.get_context("fork")
    with ctx.Pool(processes=min(workers, len(tasks)), initializer=_worker_init) as pool:
        yield from pool.imap(_run_task, [(t, params) for t in tasks], chunksize=1)


# ---------------------------------------------------------------- props.json


@dataclass
class ProposalSet:
    """The content of a props.json file."""

    params: dict
    images: list[ImageProposals] = field(default_factory=list)

    def by_path(self) -> dict[str, ImageProposals]:
        """Entries keyed by resolved image path."""
        return {str(Path(e.path).resolve()): e for e in self.images}

    def by_id(self) -> dict[str, ImageProposals]:
        return {e.image_id: e for e in self.images}

    def lookup(self, image_id: str, path: str | Path) -> ImageProposals | None:
        """The entry of an image, matched by path first, then by id."""
        return self.by_path().get(str(Path(path).resolve())) or self.by_id().get(image_id)


def proposals_document(params: ProposalParams, images: Iterable[ImageProposals]) -> dict:
    """The versioned props.json document."""
    return {
        "format": PROPOSALS_FORMAT,
        "version": PROPOSALS_VERSION,
        "params": asdict(params),
        "images": [e.to_json() for e in images],
    }


def read_proposals(path: str | Path) -> ProposalSet:
    """Load and validate a props.json file.

    Raises:
        ProposalError: missing, not JSON, another format or version, or a
            malformed entry; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ProposalError(f"{path}: proposals file not found (create it with `spp propose ... --out {path}`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProposalError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != PROPOSALS_FORMAT:
        raise ProposalError(f"{path}: not a proposals file (expected \"format\": \"{PROPOSALS_FORMAT}\")")
    if doc.get("version") != PROPOSALS_VERSION:
        raise ProposalError(
            f"{path}: proposals format version {doc.get('version')} is not supported (this spp reads version {PROPOSALS_VERSION})"
        )
    out = ProposalSet(params=doc.get("params", {}))
    for n, entry in enumerate(doc.get("images", [])):
        try:
            boxes = np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4)
            out.images.append(
                ImageProposals(str(entry["id"]), str(entry["path"]), int(entry["width"]), int(entry["height"]), boxes)
            )
        except (KeyError, TypeError, ValueError):
            raise ProposalError(f"{path}: images[{n}] is malformed (needs id, path, width, height, boxes [[x1,y1,x2,y2],...])") from None
    return out
