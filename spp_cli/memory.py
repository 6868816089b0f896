"""Keep a long-running process's memory at its working set (glibc only).

Conv activations differ in size from image to image and scale to scale. With
glibc's default dynamic mmap threshold, freed blocks of up to 32 MB stay in
the heap and fragment it, so RSS keeps growing over a run: `spp cache` over
coco128 at 5 scales peaked at 2.9 GB. Serving every allocation of 64 KB or
more with its own mmap (returned to the system when freed) and trimming the
heap eagerly kept the same run at ~1.5 GB, and was faster
(benchmarks/features.py).

It has a price: every temporary of 64 KB or more is then a fresh mmap whose
pages fault in on first touch. Measured here (1 scale, 500 x 375 photos),
`spp detect` ran its conv pass ~1.5x and its pooling ~1.3x slower with it,
at the same peak RSS (1.16 vs 1.19 GB). The setting is process-wide, so
everything after it in the process pays too: in `spp train`, whose cache
step runs in-process, the proposal network trained at 7-8 s per bccd epoch
after it instead of 4. So `spp cache`, whose multi-scale batch runs are what
grew, holds it only while it builds the cache (:func:`bounded_heap`), and
`spp detect` only hands the free heap back between images
(:func:`release_free_memory`, :func:`images_per_trim`).

A cache of one scale does without the limit (:func:`heap_for_scales`): its
maps vary less in size, and trimming keeps its peak near the limit's.
`spp cache --no-proposals` at 688 with a trim after each image against the
limit (this machine, 2 threads): bccd trainval 48 vs 70 s (conv 0.14 vs 0.22 s
per image), peak RSS 0.93 vs 0.90 GB; coco128's train split 23 vs 26 s, 1.15 vs
1.10 GB; with a trim every 16 images (:func:`images_per_trim`) bccd took 41-44
s against 46-47 s for one per image, 0.96-0.98 GB. At 5 scales (coco128's train
split) a trim after each image alone was 112 vs 157 s but 1.97 vs 1.31 GB, at
the 2 GB that the 5-scale cache is held to.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024
# Where glibc's dynamic thresholds end up in a process that frees large blocks (64-bit
# DEFAULT_MMAP_THRESHOLD_MAX, and trimming at twice the mmap threshold). Setting either threshold
# turns the dynamic rule off for good, so these stand in for it once the limit is lifted.
GROWN_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
GROWN_TRIM_THRESHOLD_BYTES = 2 * GROWN_MMAP_THRESHOLD_BYTES

_depth = 0  # bounded_heap blocks open


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``: about 1 ms, and
    `spp detect` trims between images); ``None`` off Linux or without glibc's allocator calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds; ``True`` if both took effect."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextmanager
def bounded_heap() -> Iterator[bool]:
    """Within the block, every allocation of ``MMAP_THRESHOLD_BYTES`` or more is its own mmap and
    the heap is trimmed eagerly; after it, the grown thresholds (the free heap handed back).
    Yields whether the settings took effect; nested blocks keep them until the outermost ends.
    Usable as a decorator."""
    global _depth
    _depth += 1
    try:
        yield _mallopt(MMAP_THRESHOLD_BYTES, 0)
    finally:
        _depth -= 1
        if _depth == 0 and _mallopt(GROWN_MMAP_THRESHOLD_BYTES, GROWN_TRIM_THRESHOLD_BYTES):
            release_free_memory()


def heap_for_scales(scales: int) -> AbstractContextManager[bool]:
    """The heap settings to build a cache of ``scales`` scales in: :func:`bounded_heap` for
    several, glibc's own for one (with :func:`release_free_memory` every
    :func:`images_per_trim` images). Yields whether the limit took effect."""
    return bounded_heap() if scales > 1 else nullcontext(False)


# `spp detect` with a one-scale model, and a one-scale `spp cache`, trim every this many images.
ONE_SCALE_TRIM_EVERY = 16


def images_per_trim(scales: int) -> int:
    """How often `spp detect` and a one-scale `spp cache` hand the free heap back
    (:func:`release_free_memory`): for every image at several scales, every
    :data:`ONE_SCALE_TRIM_EVERY` images at one (the cache: the module's docstring).

    Each trim returns the pages the last image's pass used, and the next pass faults them in
    again. `spp detect` with the shipped one-scale detector (this machine, 2 threads): on the
    128 coco128 images a trim before each image gave 206 ms per image and a peak RSS of 1.18
    GB, one every 16 images 145 ms and 1.44 GB, none 142 ms and 1.49 GB; on raccoon's 40 test
    photos 216-241 ms and 1.16-1.23 GB against 160 ms and 1.33 GB (one every 16). The trims
    every 16 images bound a long run's growth; several scales keep one per image, as their
    cache keeps its limit (the fragmentation measured there was at 5 scales).
    """
    return 1 if scales > 1 else ONE_SCALE_TRIM_EVERY


class PeriodicTrim:
    """Call once per image: every :func:`images_per_trim` calls it hands the free heap back
    (`spp cache` after an image's pass, `spp detect` before one)."""

    def __init__(self, scales: int):
        self.every, self.calls = images_per_trim(scales), 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            release_free_memory()


def release_free_memory() -> bool:
    """Return the heap's free pages to the system now (glibc ``malloc_trim(0)``).

    What the last images freed is not kept as resident fragments; the next pass faults
    those pages in again (:func:`images_per_trim` says what that costs). ``True`` if it ran.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
