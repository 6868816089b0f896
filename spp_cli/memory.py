"""Keep a long-running process's memory at its working set (glibc only).

Conv activations differ in size from image to image and scale to scale. With
glibc's default dynamic mmap threshold, freed blocks of up to 32 MB stay in
the heap and fragment it, so RSS keeps growing over a run: `spp cache` over
coco128 at 5 scales peaked at 2.9 GB. Serving every allocation of 64 KB or
more with its own mmap (returned to the system when freed) and trimming the
heap eagerly kept the same run at ~1.5 GB, and was faster
(benchmarks/features.py). The setting is process-wide and harmless where it
does not apply.
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
