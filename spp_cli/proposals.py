"""Region proposals by selective search (OpenCV ximgproc), and props.json.

Boxes are ``xyxy`` float32 in continuous pixels of the original image
(:mod:`spp_cli.boxes`). Shape letters: R proposals.

Selective search is assembled from OpenCV's parts so that more than its two
built-in modes are available: the colour spaces the image is segmented in,
the graph-segmentation ``k`` values, and the similarity measures that drive
the hierarchical grouping.

Ranking matters because only the top N boxes are kept. OpenCV ranks all
boxes of all runs together by a random number times the hierarchy level
counted from the initial segments, so small regions come first. The
``stratified`` ranking instead keeps OpenCV's order within each
(colour space, k) run, splits each run's boxes by size (sqrt(area) in
original pixels < 16, 16-32, ..., >= 256 px) and takes them round-robin over
all (run, size) lists, then drops near-duplicates (IoU > 0.8 with a
better-ranked box).

The ``original-fast-fine`` strategy adds two things, both measured
on coco128 at 2000 boxes, single process (``benchmarks/proposals.py``):
a fine run (Lab, k=50, texture+size+fill similarity, long side 640) of which
only boxes under 32 px join the ranking as one more run, for the small
objects that the long-side-500 runs miss; and diverse-first ordering: the
boxes overlapping no better-ranked kept box above IoU 0.65 come first, the
others after, so the top-N cut covers more places. Recall@0.5 0.766 ->
0.791 (recall@0.7 0.499 -> 0.463), 0.66 -> 0.88 s per image; 0.80 was not
reached within 1 s per image: more runs give the pool the recall (0.83-0.87
with all boxes) but the 2000-box cut loses it again. The default stays
``original-fast``: the caches, models and accuracy figures are built on it,
and the finer strategy's looser boxes (recall@0.7) may cost detection more
than its small objects gain; that is unmeasured.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from spp_cli import boxes as box_ops
from spp_cli.errors import ProposalError, SPPError
from spp_cli.fileio import read_versioned_json, recorded_stamp

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
        ranking: ``opencv`` (one grouping over all runs, OpenCV's order) or
            ``stratified`` (see module docstring).
        duplicate_iou: with ``stratified``, drop boxes overlapping a
            better-ranked one by more than this IoU.
        diverse_iou: with ``stratified``, rank first the boxes that overlap
            no better-ranked kept box above this IoU, then the rest
            (``1.0``: off); only the order, hence a top-N cut, changes.
        fine_colour_spaces, fine_ks, fine_similarities: extra runs at a
            higher resolution (none when ``fine_ks`` is empty), one per
            (colour space, k), each ranked as one more run.
        fine_max_side: the fine runs' long side: at most
            ``max(fine_max_side, max_side)`` (full size when ``max_side`` is 0).
        fine_max_box: of the fine runs keep only boxes with sqrt(area) below
            this, in original pixels.
        rank_in_original_pixels: rank (size bins, duplicate drops) boxes in
            original pixels, as runs at several resolutions need; else in the
            pixels the image was segmented at, then map back (the ranking
            ``original-fast`` has always had, kept so its proposals, and the
            caches and models built on them, do not change).
    """

    colour_spaces: tuple[str, ...]
    ks: tuple[int, ...]
    similarities: tuple[str, ...]
    sigma: float = 0.8
    min_size_factor: float = 1.0
    ranking: str = "opencv"
    duplicate_iou: float = 1.0
    diverse_iou: float = 1.0
    fine_colour_spaces: tuple[str, ...] = ()
    fine_ks: tuple[int, ...] = ()
    fine_similarities: tuple[str, ...] = ()
    fine_max_side: int = 640
    fine_max_box: float = 32.0
    rank_in_original_pixels: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.fine_ks and not self.rank_in_original_pixels:
            raise ValueError("fine runs are segmented at another resolution: rank in original pixels")


STRATEGIES: dict[str, Strategy] = {
    # The best recall@0.5 at 2000 boxes within 1 s per image: the
    # fast mode below, plus a Lab k=50 run at long side 640 with the cheap
    # texture+size+fill similarity whose boxes under 32 px (sqrt area) join
    # the ranking, and diverse-first ordering (IoU 0.65) before the top-N cut.
    "original-fast-fine": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(50, 100),
        similarities=("color+texture+size+fill", "texture+size+fill"),
        ranking="stratified",
        duplicate_iou=0.8,
        diverse_iou=0.65,
        fine_colour_spaces=("lab",),
        fine_ks=(50,),
        fine_similarities=("texture+size+fill",),
        fine_max_side=640,
        fine_max_box=32.0,
        rank_in_original_pixels=True,
        description="original-fast + a Lab k=50 run at long side 640 for boxes under 32 px, diverse-first ranking",
    ),
    # The MATLAB fast mode used by R-CNN and SPPnet (Uijlings et al. 2013),
    # with the stratified ranking: the default.
    "original-fast": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(50, 100),
        similarities=("color+texture+size+fill", "texture+size+fill"),
        ranking="stratified",
        duplicate_iou=0.8,
        description="Uijlings/R-CNN fast mode (HSV+Lab, k=50/100, min size k), stratified ranking",
    ),
    # The same segmentations ranked by OpenCV alone.
    "original-fast-opencv-rank": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(50, 100),
        similarities=("color+texture+size+fill", "texture+size+fill"),
        description="Uijlings/R-CNN fast mode, OpenCV's ranking",
    ),
    # OpenCV's switchToSelectiveSearchFast(150, 150, 0.8), spelled out.
    "opencv-fast": Strategy(
        colour_spaces=("hsv", "lab"),
        ks=(150, 300, 450),
        similarities=("color+fill+size+texture", "fill+size+texture"),
        min_size_factor=100 / 150,  # OpenCV keeps GraphSegmentation's default min_size=100 for every k
        description="OpenCV's built-in fast mode: HSV+Lab, k=150/300/450",
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
    min_size: int = 0  # 5% of coco128's boxes have a side under 6 px

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
    return rank_runs(search_runs(image, params), image.shape[:2], params)


def search_runs(image: np.ndarray, params: ProposalParams) -> tuple[list[np.ndarray], tuple[float, float]]:
    """The first half of :func:`propose`: OpenCV's runs, ``(R_k, 4)`` ``xyxy`` boxes each,
    and the factors from segmented to original pixels. Draws on the C library's
    ``rand()`` (seeded here) and imports no torch: :mod:`spp_cli.prefetch` runs it on a
    second thread while the main one may be importing torch."""
    strategy = STRATEGIES.get(params.strategy)
    _seed_ranking()
    in_original = strategy is not None and strategy.rank_in_original_pixels
    runs, factors = _runs(image, params.strategy, params.max_side, map_back=in_original)
    if strategy is not None and strategy.fine_ks:
        # Fine runs: a second segmentation at a higher resolution, of which
        # only the small boxes join the ranking as extra runs.
        fine_side = 0 if params.max_side == 0 else max(params.max_side, strategy.fine_max_side)
        for boxes in _runs(image, params.strategy, fine_side, fine=True)[0]:
            runs.append(boxes[_sqrt_area(boxes) < strategy.fine_max_box])
    return runs, factors


def rank_runs(searched: tuple[list[np.ndarray], tuple[float, float]], image_size: tuple[int, int],
              params: ProposalParams) -> np.ndarray:
    """The second half of :func:`propose`: :func:`search_runs`' boxes of an image of
    ``image_size`` ``(H, W)`` ranked, filtered and mapped to original pixels (no ``rand()``)."""
    runs, factors = searched
    strategy = STRATEGIES.get(params.strategy)
    in_original = strategy is not None and strategy.rank_in_original_pixels
    if strategy is not None and strategy.ranking == "stratified":
        boxes = _stratified(runs)
        if strategy.duplicate_iou < 1.0 and len(boxes):
            boxes = boxes[_drop_near_duplicates(boxes, strategy.duplicate_iou)]
        if strategy.diverse_iou < 1.0 and len(boxes):
            boxes = boxes[_diverse_first(boxes, strategy.diverse_iou)]
    else:
        boxes = np.concatenate(runs) if runs else np.zeros((0, 4), np.float32)
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    if not in_original and factors != (1.0, 1.0):
        height, width = image_size
        boxes = _to_original(boxes, factors, width, height)
    if params.min_size > 0:
        sizes = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        boxes = boxes[sizes >= params.min_size]
    boxes = boxes[box_ops.dedupe(np.round(boxes, 1))]
    return np.ascontiguousarray(boxes[: params.top], dtype=np.float32)


def _runs(
    image: np.ndarray, strategy_name: str, max_side: int, fine: bool = False, map_back: bool = True
) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Selective search of ``image`` downscaled to ``max_side`` (0: as is):
    ``xyxy`` boxes, one array per run (see :func:`_selective_search`), in
    original pixels (``map_back``) or in the segmented image's, and the
    ``(x, y)`` factors from segmented to original pixels."""
    import cv2

    height, width = image.shape[:2]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        small = cv2.resize(
            image,
            (max(1, round(width * scale)), max(1, round(height * scale))),
            interpolation=cv2.INTER_AREA,
        )
    else:
        small = image
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    runs = [box_ops.from_xywh(r) for r in _selective_search(bgr, strategy_name, fine)]
    if small is image:
        return runs, (1.0, 1.0)
    factors = (width / small.shape[1], height / small.shape[0])
    if not map_back:
        return runs, factors
    return [_to_original(r, factors, width, height) for r in runs], factors


def _to_original(boxes: np.ndarray, factors: tuple[float, float], width: int, height: int) -> np.ndarray:
    """Segmented-image boxes -> original pixels. Continuous coordinates scale
    exactly; clip because rounding in the resize can overshoot by a fraction."""
    sx, sy = factors
    return box_ops.clip(boxes * np.array([sx, sy, sx, sy], np.float32), width, height)


def _sqrt_area(boxes: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6))


# sqrt(area) bins of the stratified ranking: < 16, 16-32, ..., >= 256 px
_SIZE_BIN_FIRST, _SIZE_BINS = 16.0, 6


def _stratified(runs: list[np.ndarray]) -> np.ndarray:
    """Round-robin over (run, size bin) lists, OpenCV's order kept inside each."""
    keys, pieces = [], []
    for run_index, boxes in enumerate(runs):
        if len(boxes) == 0:
            continue
        size_bin = np.clip(np.floor(np.log2(_sqrt_area(boxes) / _SIZE_BIN_FIRST)) + 1, 0, _SIZE_BINS - 1).astype(np.int64)
        position = np.zeros(len(boxes), np.int64)
        for b in np.unique(size_bin):
            members = size_bin == b
            position[members] = np.arange(members.sum())
        # Sort by position in its list first, then by (bin, run): round robin.
        keys.append(position * (_SIZE_BINS * len(runs)) + size_bin * len(runs) + run_index)
        pieces.append(boxes)
    if not pieces:
        return np.zeros((0, 4), np.float32)
    boxes = np.concatenate(pieces)[np.argsort(np.concatenate(keys), kind="stable")]
    return boxes[box_ops.dedupe(boxes)]


def _drop_near_duplicates(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices (in rank order) of boxes not overlapping a better-ranked kept box above the threshold."""
    import torch
    from torchvision.ops import nms

    # nms keeps the highest score first: the score is the rank, reversed.
    rank_score = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
    return np.sort(nms(torch.from_numpy(np.ascontiguousarray(boxes)), rank_score, iou_threshold).numpy())


def _diverse_first(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """A permutation of ``range(len(boxes))``: first the boxes that overlap no
    better-ranked kept box above the threshold (greedy, in rank order), then
    the others, each group in rank order. Keeps every box; only reorders, so
    that a top-N cut spends its boxes on more places."""
    kept = _drop_near_duplicates(boxes, iou_threshold)
    rest = np.ones(len(boxes), bool)
    rest[kept] = False
    return np.concatenate([kept, np.flatnonzero(rest)])


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


def _selective_search(bgr: np.ndarray, strategy_name: str, fine: bool = False) -> list[np.ndarray]:
    """Rects ``(R, 4)`` ``[x, y, w, h]`` in OpenCV's order: one array, or one per
    (colour space, k) run for the stratified ranking; ``fine``: the strategy's
    fine runs instead."""
    import cv2

    seg = cv2.ximgproc.segmentation
    if strategy_name == "opencv-quality":
        ss = seg.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        ss.switchToSelectiveSearchQuality()
        return [np.asarray(ss.process()).reshape(-1, 4)]
    strategy = STRATEGIES[strategy_name]
    spaces = strategy.fine_colour_spaces if fine else strategy.colour_spaces
    run_ks = strategy.fine_ks if fine else strategy.ks
    similarities = strategy.fine_similarities if fine else strategy.similarities
    images = []
    for space in spaces:
        code = _COLOUR_CODES[space]
        converted = bgr if code is None else cv2.cvtColor(bgr, getattr(cv2, code))
        if converted.ndim == 2:
            converted = cv2.cvtColor(converted, cv2.COLOR_GRAY2BGR)
        images.append(converted)
    makers = {
        "color": seg.createSelectiveSearchSegmentationStrategyColor,
        "texture": seg.createSelectiveSearchSegmentationStrategyTexture,
        "size": seg.createSelectiveSearchSegmentationStrategySize,
        "fill": seg.createSelectiveSearchSegmentationStrategyFill,
    }

    def grouping(run_images: list[np.ndarray], ks: tuple[int, ...]) -> np.ndarray:
        ss = seg.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        ss.clearImages()
        ss.clearGraphSegmentations()
        ss.clearStrategies()
        for image in run_images:
            ss.addImage(image)
        for k in ks:
            ss.addGraphSegmentation(seg.createGraphSegmentation(strategy.sigma, float(k), int(k * strategy.min_size_factor)))
        for combo in similarities:
            parts = [makers[name]() for name in combo.split("+")]
            ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(*parts))
        return np.asarray(ss.process()).reshape(-1, 4)

    if strategy.ranking == "stratified":
        return [grouping([image], (k,)) for image in images for k in run_ks]
    return [grouping(images, run_ks)]


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
    warnings: list[str] = field(default_factory=list)  # what reading the image warned of; not stored
    # The image file's size and mtime before it was searched (`fileio.file_stamp`): `spp propose`
    # reuses the boxes only while the file still has both. None: not known (the make rule then).
    file: dict | None = None

    def to_json(self) -> dict:
        doc = {
            "id": self.image_id,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "boxes": np.round(self.boxes.astype(np.float64), 2).tolist(),
        }
        if self.file is not None:
            doc["file"] = self.file
        return doc


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


def _pool_worker_init(parent_pid: int) -> None:
    """A pool worker leaves interrupts to the parent, which stops the pool.

    Ctrl-C reaches the whole process group; a worker that raised
    KeyboardInterrupt too would print its own traceback. SIGTERM (the pool's
    terminate, or a fork of a parent that turns it into KeyboardInterrupt)
    just ends the worker. On Linux a worker also gets SIGTERM when its parent
    dies (SIGKILL, the OOM killer): without that it would finish its image and
    print a BrokenPipeError traceback from its pipe to the dead parent.
    """
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the traceback case above remains
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the call: nothing would signal it
            os._exit(0)
    _worker_init()


def _worker_init() -> None:
    import cv2

    # One OpenCV thread per worker: the pool provides the parallelism, and
    # OpenCV's own threads would only compete with it for the same cores.
    cv2.setNumThreads(1)


def _run_task(args: tuple[ProposalTask, ProposalParams]) -> ImageProposals | TaskFailure:
    from spp_cli.images import load_image

    task, params = args
    warnings: list[str] = []
    try:
        image = load_image(task.path, warn=warnings.append)
    except SPPError as exc:
        return TaskFailure(task.image_id, task.path, str(exc))
    start = time.perf_counter()
    try:
        found = propose(image, params)
    except Exception as exc:  # OpenCV raises cv2.error on pathological inputs
        return TaskFailure(task.image_id, task.path, f"{task.path}: selective search failed ({exc})")
    seconds = time.perf_counter() - start
    height, width = image.shape[:2]
    return ImageProposals(task.image_id, task.path, width, height, found, seconds, warnings)


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
    import sys

    # fork keeps start-up cheap (no re-import per worker) while the parent
    # holds no threads; once torch is loaded (`spp train` after a step that
    # ran the network, a script using the API) its thread pools may be
    # running, and a forked child can hang on their locks: start afresh then.
    ctx = mp.get_context("spawn" if "torch" in sys.modules else "fork")
    with ctx.Pool(processes=min(workers, len(tasks)), initializer=_pool_worker_init, initargs=(os.getpid(),)) as pool:
        yield from pool.imap(_run_task, [(t, params) for t in tasks], chunksize=1)


# ---------------------------------------------------------------- props.json


@dataclass
class ProposalSet:
    """The content of a props.json file."""

    params: dict
    images: list[ImageProposals] = field(default_factory=list)
    _by_path: dict | None = field(default=None, repr=False, compare=False)
    _by_id: dict | None = field(default=None, repr=False, compare=False)

    def lookup(self, image_id: str, path: str | Path) -> ImageProposals | None:
        """The entry of an image, matched by resolved path first, then by id.

        The indexes are built on the first call (commands look up every image
        of a batch, so rebuilding them per call would be quadratic).
        """
        if self._by_path is None:
            self._by_path = {str(Path(e.path).resolve()): e for e in self.images}
            self._by_id = {e.image_id: e for e in self.images}
        return self._by_path.get(str(Path(path).resolve())) or self._by_id.get(image_id)


def proposals_document(params: ProposalParams | dict, images: Iterable[ImageProposals]) -> dict:
    """The versioned props.json document; ``params`` a selective-search run's settings, or a
    dict (``{"strategy": "learned", "model": ..., "model_sha256": ..., "top": N}``)."""
    return {
        "format": PROPOSALS_FORMAT,
        "version": PROPOSALS_VERSION,
        "params": params if isinstance(params, dict) else asdict(params),
        "images": [e.to_json() for e in images],
    }


def read_proposals(path: str | Path) -> ProposalSet:
    """Load and validate a props.json file.

    Raises:
        ProposalError: missing, not JSON, another format or version, or a
            malformed entry; the message names the file.
    """
    path = Path(path)
    doc = read_versioned_json(
        path, PROPOSALS_FORMAT, PROPOSALS_VERSION, "proposals", f"create it with `spp propose ... --out {path}`", ProposalError
    )
    out = ProposalSet(params=doc.get("params", {}))
    images = doc.get("images", [])
    if not isinstance(images, list):
        raise ProposalError(f"{path}: \"images\" is not a list of images")
    for n, entry in enumerate(images):
        try:
            boxes = np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4)
            out.images.append(ImageProposals(str(entry["id"]), str(entry["path"]), int(entry["width"]), int(entry["height"]), boxes,
                                             file=recorded_stamp(entry.get("file")))
            )
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a width of 1e999
            raise ProposalError(f"{path}: images[{n}] is malformed (needs id, path, width, height, boxes [[x1,y1,x2,y2],...])") from None
        if not np.isfinite(boxes).all():
            raise ProposalError(f"{path}: images[{n}] has a box with a coordinate that is not a finite number")
        if "\0" in out.images[-1].path:  # no file can have it; Path.resolve() would raise ValueError at lookup
            raise ProposalError(f"{path}: images[{n}] has a path with a NUL character")
    return out
