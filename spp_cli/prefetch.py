"""Selective search ahead of the network: the next images' boxes on a second thread.

`spp detect` on the selective-search path spends most of each image in
OpenCV's selective search (about 1.7 s of 2.6 s for a 1024 x 768 photo on a
2-core CPU) and the rest in the network. OpenCV releases the GIL while it
segments and groups, so one background thread can search image k+1 while
the main thread runs image k through the network, and the first image's
search overlaps the seconds it takes to import torch and build the
backbone. The boxes are the same: OpenCV ranks with the C library's global
``rand()``, seeded before every image (spp_cli.proposals); a single worker
thread is the only caller while a prefetch runs, so the sequence of draws
per image is the one a serial run makes.

The worker thread runs OpenCV's part of the search only
(:func:`spp_cli.proposals.search_runs`, no torch): the ranking, which takes
torchvision's NMS, runs on the thread that takes the boxes, so the two
threads never import torch at once (a package imported from two threads at
the same time can be seen half-initialised by one of them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
import numpy as np

from spp_cli.config import cpu_budget
from spp_cli.proposals import ProposalParams, rank_runs, search_runs

# How many images the search may run ahead of the network: one keeps both
# cores busy; a second absorbs an image whose search is unusually quick.
DEFAULT_AHEAD = 2


class ProposalPrefetch:
    """Images and their selective-search boxes, computed in order on one worker thread.

    ``load`` turns each of ``items`` (paths for `spp detect`; paths, Pillow images
    or arrays for the Python API) into ``(H, W, 3)`` uint8 RGB pixels. ``take(k)``
    returns item ``k`` as ``(pixels, boxes (R, 4) float32 xyxy in original pixels,
    seconds of the search)``, or raises what loading or searching it raised (an
    :class:`spp_cli.errors.SPPError` for a bad image). Items must be taken in
    order; at most ``ahead`` are searched ahead of the last one taken, so memory
    stays bounded on long folders.
    """

    def __init__(self, items: list, params: ProposalParams, load: Callable[[object], np.ndarray], ahead: int = DEFAULT_AHEAD):
        self._items = list(items)
        self._params = params
        self._load = load
        self._ahead = max(1, ahead)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spp-proposals")  # one caller of rand()
        self._futures: dict[int, Future] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._submit_up_to(self._ahead)

    def _work(self, item) -> tuple[np.ndarray, tuple, float]:
        image = self._load(item)
        start = time.perf_counter()
        searched = search_runs(image, self._params)  # OpenCV and numpy only: no import races with the main thread
        return image, searched, time.perf_counter() - start

    def _submit_up_to(self, end: int) -> None:
        with self._lock:
            while self._next < min(end, len(self._items)):
                self._futures[self._next] = self._pool.submit(self._work, self._items[self._next])
                self._next += 1

    def take(self, index: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Image ``index``, its boxes and the search's seconds (waits for them). The ranking
        (torchvision's NMS) runs here, on the calling thread."""
        self._submit_up_to(index + 1 + self._ahead)
        future = self._futures.pop(index)
        image, searched, seconds = future.result()  # re-raises the worker's SPPError (or anything else) here
        start = time.perf_counter()
        boxes = rank_runs(searched, image.shape[:2], self._params)
        return image, boxes, seconds + time.perf_counter() - start

    def searching_after(self, index: int) -> bool:
        """Whether items after ``index`` are still to be searched (the worker is busy)."""
        return index + 1 < len(self._items)

    def network_threads(self, index: int, threads: int) -> int:
        """The torch threads for item ``index``'s network pass out of ``threads``: one
        fewer while the next items are searched beside it (two threads on one core
        ran the conv pass 3x slower), all of them for the last."""
        return max(1, threads - 1) if self.searching_after(index) else threads

    def close(self) -> None:
        """Drop the searches not yet started; wait for the one running (at most one image)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProposalPrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def second_core_free() -> bool:
    """Whether a search thread beside the network has a core of its own: not on
    one core, and not under ``spp --threads 1`` (OMP_NUM_THREADS=1), which
    asks spp to keep to one."""
    return cpu_budget() > 1

