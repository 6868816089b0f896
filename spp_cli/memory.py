"""Keep a long-running process's memory at its working set (glibc only).

Conv activations differ in size from image to image and scale to scale. With
glibc's default dynamic mmap threshold, freed blocks of up to 32 MB stay in
the heap and fragment it, so RSS keeps growing over a run: `spp cache` over
coco128 at 5 scales peaked at 2.9 GB. Serving every allocation of 64 KB or
more with its own mmap (returned to the system when freed) and trimming the
heap eagerly kept the same run at ~1.5 GB, and was faster
(benchmarks/features.py). The setting is process-wide and harmless where it
does not apply.

It has a price: every temporary of 64 KB or more is then a fresh mmap whose
pages fault in on first touch. Measured here (1 scale, 500 x 375 photos),
`spp detect` ran its conv pass ~1.5x and its pooling ~1.3x slower with it,
at the same peak RSS (1.16 vs 1.19 GB). So `spp cache`, whose multi-scale
batch runs are what grew, applies it (:func:`limit_heap_growth`), and
`spp detect` only hands the free heap back between images
(:func:`release_free_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024

_done = False


def limit_heap_growth() -> bool:
    """Apply the allocator settings once; ``True`` if they took effect."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 0))
    return _done


def release_free_memory() -> bool:
    """Return the heap's free pages to the system now (glibc ``malloc_trim(0)``).

    Cheap between images: what one image freed is not kept as resident
    fragments while the next one runs. ``True`` if it ran.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True
