"""spp_cli.memory: the allocator limit holds inside `bounded_heap` (and `spp cache`) only."""

import ctypes
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke
from spp_cli.memory import bounded_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt thresholds")

BLOCK = 1 << 20  # above the limit's 64 KB threshold, below the grown 32 MB one
BLOCKS = 256  # more than the heap's free chunks can hold, so the threshold decides


def blocks_from_heap(count: int = BLOCKS, size: int = BLOCK) -> int:
    """Of ``count`` live ``malloc(size)`` blocks on this (the main) thread, how many the brk heap
    serves rather than an mmap of their own (its free chunks serve a few either way)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointers = [libc.malloc(size) for _ in range(count)]
    try:
        with open("/proc/self/maps", encoding="ascii") as maps:
            heap = [line.split()[0] for line in maps if line.rstrip().endswith("[heap]")]
        low, high = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
        return sum(low <= p < high for p in pointers)
    finally:
        for pointer in pointers:
            libc.free(pointer)


def limit_holds_inside_the_block_only() -> None:
    with bounded_heap() as applied:
        assert applied
        assert blocks_from_heap() < BLOCKS
        with bounded_heap():
            assert blocks_from_heap() < BLOCKS
        assert blocks_from_heap() < BLOCKS  # an inner block's end keeps the outer one's limit
    assert blocks_from_heap() == BLOCKS


def test_the_limit_holds_inside_the_block_only():
    # In a fresh process: after other tests, this one's heap may hold enough free chunks to serve the blocks either way.
    run = subprocess.run([sys.executable, "-c", "import test_memory; test_memory.limit_holds_inside_the_block_only()"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_spp_cache_lifts_the_limit_when_done(xml_dataset, tmp_path):
    result = invoke("cache", "--data", xml_dataset, "--cache", tmp_path / "feats", "--scales", "96", "--no-proposals")
    assert result.exit_code == 0, result.output
    assert blocks_from_heap() == BLOCKS  # what runs next in the process (spp train's steps) is not slowed by it
