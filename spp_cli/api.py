"""The Python face of spp: load a detector, call it on images.

::

    import spp_cli

    detector = spp_cli.Detector.load()  # the shipped detector; or .load("model.safetensors")
    for d in detector("examples/raccoon.jpg"):
        print(d.class_name, d.score, d.box)

A call runs what ``spp detect`` runs on an image (selective search, or the
model's learned proposals where it carries a proposal network; one conv pass per scale, SPP pooling, SVM scores, box regression, NMS, box voting),
through the same functions, so it returns the same numbers as the command
(as it does, they move in the last digits with the torch thread count).
Images are a path, a Pillow image, or a uint8 array ``(H, W, 3)`` in RGB
order (OpenCV's ``imread`` gives BGR: pass ``img[:, :, ::-1]``), ``(H, W)``
or ``(H, W, 1)`` grey, or ``(H, W, 4)`` RGBA (composited onto white, as the
loader does with transparent files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import math
import operator
import os
import threading

import numpy as np

from spp_cli.errors import ModelError


@dataclass(frozen=True)
class Detection:
    """One detection, rounded as the detections file holds it: ``box`` ``(x1, y1, x2, y2)``
    in continuous pixels of the image as it is shown (after its EXIF orientation, as
    ``PIL.ImageOps.exif_transpose`` turns it; 2 decimals), the class, its score (4
    decimals: the SVM margin, plus the model's localisation term where it has one;
    ``spp detect`` shows those at or above the model's display threshold) and, from a
    calibrated model (`spp train`), its probability of being right."""

    box: tuple[float, float, float, float]
    class_name: str
    class_id: int
    score: float
    probability: float | None = None

    def to_dict(self) -> dict:
        """The detection as an entry of `spp detect`'s detections file (``box``, ``class``,
        ``class_id``, ``score``, and ``probability`` where there is one): JSON-ready."""
        entry = {"box": list(self.box), "class": self.class_name, "class_id": self.class_id, "score": self.score}
        if self.probability is not None:
            entry["probability"] = self.probability
        return entry


@dataclass(eq=False, repr=False)
class Detector:
    """A loaded detector with the network it needs.

    Calls may come from several threads (the network is built once, on the first).
    ``detect_many`` sets torch's thread count while it runs, for the whole process.

    Attributes:
        model: the trained :class:`spp_cli.model.Detector` (SVMs, regressors, settings).
        path: the file it came from.
        device: ``cpu`` or ``cuda``.
    """

    model: object
    path: Path
    device: str = "cpu"
    _extractor: object = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._building = threading.Lock()  # not a field: asdict and replace copy fields

    def __repr__(self) -> str:
        shown = ", ".join(self.classes[:5]) + (f", ... ({len(self.classes)} in all)" if len(self.classes) > 5 else "")
        return f"Detector(path={str(self.path)!r}, classes=[{shown}], device={self.device!r})"

    def __getstate__(self) -> dict:
        """Pickled without its network or lock (rebuilt on first use after unpickling)."""
        return {"model": self.model, "path": self.path, "device": self.device}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @classmethod
    def load(cls, path: str | Path | None = None, gpu: bool = False) -> Detector:
        """The detector in ``path``, or the shipped default one without a path.

        Raises:
            ModelError: no such file, a damaged or foreign one, no default
                detector installed, or ``gpu`` without CUDA.
        """
        from spp_cli import backbones
        from spp_cli.commands.models import default_model_path
        from spp_cli.model import Detector as Model

        if path is None:
            path = default_model_path()
            if path is None:
                raise ModelError("no default detector is installed (weights/default.safetensors)")
        model = Model.load(Path(path))
        if model.mode != "spp":
            raise ModelError(f"{path}: an R-CNN model; run it with `spp detect --model {path}`")
        return cls(model, Path(path), backbones.select_device(gpu, "gpu=True"))

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    def __call__(self, image, conf: float | None = None, nms: float = 0.3, max_det: int | None = None,
                 bbox_reg: bool = True, vote: bool = True, warn: Callable[[str], None] | None = None,
                 min_prob: float | None = None, proposals: str | None = None, classes: Iterable[str | int] | None = None) -> list[Detection]:
        """Detections in one image, best first, scoring at least ``conf`` or with a
        probability of at least ``min_prob`` (default: the model's display
        threshold, as ``spp detect`` shows them). ``nms``, ``max_det`` (default: the
        model's), ``bbox_reg`` and ``vote`` are ``spp detect``'s options of those names,
        checked as it checks them (ValueError). ``proposals``: ``learned`` (the
        default where the model carries a proposal network) or ``selective-search``,
        as ``spp detect --proposals``. ``classes``: only these classes (names, or ids
        as ``class_id`` gives them), as ``spp detect --classes`` (one the model lacks
        raises ModelError). ``warn``: called with each warning's line (a truncated
        file, a GPU that ran out of memory, ...); without it they are Python warnings.

        Raises:
            ImageError: the image cannot be read, or is empty.
            TypeError: ``image`` is not a path, Pillow image or array.
        """
        self._check_options(conf, nms, max_det, min_prob, proposals)
        class_ids = self._class_ids(classes)
        pixels, name = _pixels(image, warn)
        self._say_foreign_scores(self.model.proposal_model is not None and proposals != "selective-search", warn)
        return self._detect(pixels, name, None, conf, nms, max_det, bbox_reg, vote, warn, min_prob, proposals, class_ids)

    def detect_many(self, images: Iterable, conf: float | None = None, nms: float = 0.3, max_det: int | None = None,
                    bbox_reg: bool = True, vote: bool = True, warn: Callable[[str], None] | None = None,
                    min_prob: float | None = None, proposals: str | None = None, classes: Iterable[str | int] | None = None) -> list[list[Detection]]:
        """Detections in each of ``images``, in order, with the options of a call. Where
        selective search runs, it runs on a second thread ahead of the network, as in
        ``spp detect`` (:mod:`spp_cli.prefetch`): the same boxes, and the network on one
        thread fewer meanwhile. An image that cannot be read raises, as a call does."""
        from spp_cli.prefetch import ProposalPrefetch, second_core_free
        from spp_cli.proposals import ProposalParams

        if isinstance(images, (str, os.PathLike)) or _is_pillow(images) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            raise TypeError(f"detect_many takes a list of images, not one {type(images).__name__}: call the detector on it")
        self._check_options(conf, nms, max_det, min_prob, proposals)
        class_ids = self._class_ids(classes)
        items = list(images)
        options = (conf, nms, max_det, bbox_reg, vote, warn, min_prob, proposals)
        learned = self.model.proposal_model is not None and proposals != "selective-search"
        self._say_foreign_scores(learned, warn)
        if learned or len(items) < 2 or not second_core_free():
            return [self._detect(*_pixels(item, warn), None, *options, class_ids) for item in items]
        import torch

        params = ProposalParams(**self.model.proposals) if self.model.proposals else ProposalParams()
        # torch's thread count is the process's: two runs that overlap would restore it out of order
        with _THREAD_COUNT:
            threads = torch.get_num_threads()
            results = []
            try:
                with ProposalPrefetch(items, params, lambda item: _pixels(item, warn)[0]) as ahead:
                    for index, item in enumerate(items):
                        pixels, boxes, _ = ahead.take(index)
                        torch.set_num_threads(ahead.network_threads(index, threads))
                        name = str(item) if isinstance(item, (str, os.PathLike)) else "image"
                        results.append(self._detect(pixels, name, boxes, *options, class_ids))
            finally:
                torch.set_num_threads(threads)
        return results

    def _say_foreign_scores(self, learned: bool, warn: Callable[[str], None] | None) -> None:
        """Once per call or run, as `spp detect` says it once."""
        if self.model.detect.objectness_weight and not learned:
            (warn or _python_warning)(self.model.foreign_proposals_warning(str(self.path)))

    def _check_options(self, conf, nms, max_det, min_prob, proposals: str | None) -> None:
        """What `spp detect`'s options accept: a finite ``conf``, ``nms`` in [0, 1] (None: the
        model's), a whole ``max_det`` of at least 1, ``min_prob`` strictly between 0 and 1, not
        both thresholds. Numbers may be numpy or torch scalars."""
        def real(value) -> bool:
            if isinstance(value, (bool, str, bytes)):
                return False
            try:
                return math.isfinite(float(value))
            except (TypeError, ValueError):
                return False

        def whole(value) -> bool:
            if isinstance(value, bool):
                return False
            try:
                return operator.index(value) >= 1
            except TypeError:
                return False

        if conf is not None and not real(conf):
            raise ValueError(f"conf must be a finite number (a score threshold), not {conf!r}")
        if nms is not None and not (real(nms) and 0 <= float(nms) <= 1):
            raise ValueError(f"nms must be an IoU from 0 to 1, not {nms!r}")
        if max_det is not None and not whole(max_det):
            raise ValueError(f"max_det must be a whole number of at least 1 (or None: the model's), not {max_det!r}")
        if min_prob is not None and not (real(min_prob) and 0 < float(min_prob) < 1):
            raise ValueError(f"min_prob must be a probability strictly between 0 and 1, not {min_prob!r}")
        if conf is not None and min_prob is not None:
            raise ValueError("conf and min_prob both set a threshold: give one")
        if proposals not in (None, "learned", "selective-search"):
            raise ValueError(f"proposals must be 'learned' or 'selective-search', not {proposals!r}")
        if proposals == "learned" and self.model.proposal_model is None:
            raise ModelError(f"{self.path}: carries no proposal network (proposals='learned')")

    def _class_ids(self, classes: Iterable[str | int] | None) -> tuple[int, ...] | None:
        """Names, or class ids as ultralytics takes them (``classes=[0]``)."""
        if isinstance(classes, (str, int, np.integer)):  # one class, not a name's letters
            classes = [classes]
        if classes is None:
            return None
        classes = list(classes)
        if not classes:
            raise ValueError("classes names no class (give names, or None for every class)")
        names = []
        for c in classes:
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= c < len(self.model.classes):
                    raise ModelError(f"{self.path}: has no class id {int(c)} (its ids: 0-{len(self.model.classes) - 1})")
                names.append(self.model.classes[int(c)])
            else:
                names.append(c)
        return self.model.class_indices(names, str(self.path))

    def _detect(self, pixels: np.ndarray, name: str, boxes: np.ndarray | None, conf, nms, max_det, bbox_reg, vote, warn, min_prob,
                proposals, class_ids: tuple[int, ...] | None = None) -> list[Detection]:
        if min_prob is not None:
            conf = self.model.margin_at_probability(float(min_prob), str(self.path))
        threshold = self.model.detect.display_threshold if conf is None else float(conf)
        config = self.model.detect_config(score_threshold=threshold, nms_iou=None if nms is None else float(nms),
                                          max_detections=None if max_det is None else operator.index(max_det),
                                          bbox_regression=bool(bbox_reg), box_voting=bool(vote), classes=class_ids)
        learned = self.model.proposal_model is not None and proposals != "selective-search"
        report = warn or _python_warning
        found = detect_pixels(self.model, self.extractor, pixels, config, boxes, name=name, warn=report, learned=learned)
        return [Detection(tuple(d.box), self.model.classes[d.class_id], d.class_id, d.score, self.model.probability(d.score)) for d in found]

    @property
    def extractor(self):
        """The backbone, built on first use (once, whatever the threads calling)."""
        with self._building:
            if self._extractor is None:
                from spp_cli import backbones

                self._extractor = backbones.extractor_for(self.model.features, str(self.path), self.device)
        return self._extractor


def detect_pixels(model, extractor, pixels: np.ndarray, config, boxes: np.ndarray | None = None,
                  timings: dict | None = None, name: str = "image", warn: Callable[[str], None] = lambda _: None,
                  learned: bool | None = None) -> list:
    """One image through an SPP detector: what ``spp detect`` does to an image it
    does not find in a cache.

    Args:
        pixels: ``(H, W, 3)`` uint8 RGB.
        boxes: ``(R, 4)`` proposals (``xyxy``, original pixels); when ``None``,
            the model's own proposal network's boxes from the conv maps
            (``learned``, the default where the model carries one), else
            selective search with the model's settings.
        timings: if given, accumulates ``proposals``, ``conv``, ``pool``,
            ``classify``, ``nms`` seconds (learned proposals: the proposal
            head only; the conv pass is counted once, as ``conv``).

    Returns:
        :class:`spp_cli.model.Detection` objects, best first.
    """
    import time

    from spp_cli.cache import DTYPES
    from spp_cli.features import feature_pyramid
    from spp_cli.proposals import ProposalParams, propose

    timings = {} if timings is None else timings
    height, width = pixels.shape[:2]
    learned = model.proposal_model is not None if learned is None else learned
    if boxes is None and not learned:
        t0 = time.perf_counter()
        boxes = propose(pixels, ProposalParams(**model.proposals) if model.proposals else ProposalParams())
        timings["proposals"] = timings.get("proposals", 0.0) + time.perf_counter() - t0
    settings = model.features
    maps, factors, seconds = feature_pyramid(extractor, pixels, settings.scales, settings.max_side, warn=warn, name=name)
    timings["conv"] = timings.get("conv", 0.0) + sum(seconds)
    # The model was trained on maps stored at the cache's precision (fp16 by
    # default): round fresh maps the same way, so that detections are the
    # same with or without a cache.
    maps = [m.to(DTYPES[settings.dtype]) for m in maps]
    objectness = None
    if boxes is None:
        boxes, objectness = learned_proposals(model, maps, factors, width, height, timings)
    return model.detect_windows(maps, factors, boxes, width, height, config, timings, objectness)


def learned_proposals(model, maps, factors, width: int, height: int, timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's proposal network's boxes ``(R, 4)`` of one image from its conv maps and their
    objectness logits ``(R,)`` (seconds to ``timings["proposals"]``)."""
    import time

    from spp_cli.errors import ModelError

    if model.proposal_model is None:
        raise ModelError("the model carries no proposal network; train one with `spp train-proposals` and embed it with `spp train-svm --proposal-model`")
    t0 = time.perf_counter()
    boxes, logits = model.proposal_model.propose(maps, factors, width, height)
    if timings is not None:
        timings["proposals"] = timings.get("proposals", 0.0) + time.perf_counter() - t0
    return boxes, logits


# Held while detect_many changes torch's thread count (the process's) and restores it.
_THREAD_COUNT = threading.Lock()


def _is_pillow(image) -> bool:
    return hasattr(image, "convert") and hasattr(image, "size") and hasattr(image, "mode")


def _python_warning(message: str) -> None:
    """Without ``warn=``, a run's warnings are Python warnings (shown once per place, filterable)."""
    import warnings

    warnings.warn(message, UserWarning, stacklevel=4)


def _pixels(image, warn: Callable[[str], None] | None) -> tuple[np.ndarray, str]:
    """``(H, W, 3)`` uint8 RGB pixels of a path, Pillow image or array, and a name for messages."""
    from spp_cli.errors import ImageError

    if isinstance(image, (str, os.PathLike)):
        from spp_cli.images import load_image

        pixels, name = load_image(image, warn=warn), str(image)
    elif _is_pillow(image):
        from spp_cli.images import rgb_pixels

        name = str(getattr(image, "filename", "") or "image")
        pixels = rgb_pixels(image, name)
    elif isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        pixels, name = _array_pixels(np.asarray(image)), "image"
    else:
        hint = " (a list of images: detect_many)" if isinstance(image, (list, tuple)) else ""
        raise TypeError(f"an image is a path, a Pillow image or a uint8 array, not {type(image).__name__}{hint}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageError(f"{name}: empty image ({pixels.shape[1]} x {pixels.shape[0]} pixels)")
    return pixels, name


def _array_pixels(array: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from an array the API takes (see the module's docstring)."""
    from spp_cli.errors import ImageError
    from spp_cli.images import rgba_to_rgb

    if array.dtype != np.uint8:
        hint = " (scale to 0-255 and .astype(np.uint8))" if np.issubdtype(array.dtype, np.number) else ""
        raise ImageError(f"an image array must be uint8, not {array.dtype}{hint}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4 and array.size:
        array = rgba_to_rgb(array)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"an image array must be (H, W, 3) RGB, (H, W) grey or (H, W, 4) RGBA (got shape {array.shape})")
    return np.ascontiguousarray(array)
