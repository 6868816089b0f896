"""spp_cli.memory: the allocator limit holds inside `bounded_heap` (and a multi-scale `spp cache`) only (glibc)."""

import ctypes
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke
from spp_cli.memory import bounded_heap, heap_for_scales

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt thresholds")

BLOCK = 1 << 20  # above the limit's 64 KB threshold, below the grown 32 MB one
BLOCKS = 256  # more than the heap's free chunks can hold, so the threshold decides
IS_MMAPPED = 0x2  # glibc: the bit of a chunk's size field (the word before the block) for a block that is its own mmap


def own_mmaps(count: int = BLOCKS, size: int = BLOCK) -> int:
    """Of ``count`` live ``malloc(size)`` blocks, how many glibc served with an mmap of their own
    rather than from its arena (free chunks there serve a few either way)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointers = [libc.malloc(size) for _ in range(count)]
    try:
        return sum(bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & IS_MMAPPED) for p in pointers)
    finally:
        for pointer in pointers:
            libc.free(pointer)


def limit_holds_inside_the_block_only() -> None:
    with bounded_heap() as applied:
        assert applied
        assert own_mmaps() > 0
        with bounded_heap():
            assert own_mmaps() > 0
        assert own_mmaps() > 0  # an inner block's end keeps the outer one's limit
    assert own_mmaps() == 0


def test_the_limit_holds_inside_the_block_only():
    # In a fresh process: after other tests, this one's heap may hold enough free chunks to serve the blocks either way.
    run = subprocess.run([sys.executable, "-c", "import test_memory; test_memory.limit_holds_inside_the_block_only()"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def only_a_multi_scale_cache_holds_the_limit() -> None:
    small = 100_000  # under glibc's starting mmap threshold (128 KB), over the limit's 64 KB
    with heap_for_scales(1) as applied:
        assert not applied
        assert own_mmaps(size=small) == 0
    with heap_for_scales(5) as applied:
        assert applied
        assert own_mmaps(size=small) > 0


def test_only_a_multi_scale_cache_holds_the_limit():
    run = subprocess.run([sys.executable, "-c", "import test_memory; test_memory.only_a_multi_scale_cache_holds_the_limit()"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_spp_cache_lifts_the_limit_when_done(xml_dataset, tmp_path):
    result = invoke("cache", "--data", xml_dataset, "--cache", tmp_path / "feats", "--scales", "96,128", "--no-proposals")
    assert result.exit_code == 0, result.output
    assert own_mmaps() == 0  # what runs next in the process (spp train's steps) is not slowed by it


def test_spp_detect_trims_every_few_images_with_a_one_scale_model(tmp_path, monkeypatch):
    """The shipped detector has one scale: the free heap goes back every ONE_SCALE_TRIM_EVERY images
    (each trim's pages fault in again on the next pass); a model of several scales trims before each."""
    from conftest import write_image

    from spp_cli import memory

    for i in range(5):
        write_image(tmp_path / "photos" / f"{i}.jpg", 96, 72, seed=i)
    trims = []
    monkeypatch.setattr(memory, "ONE_SCALE_TRIM_EVERY", 2)
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    result = invoke("detect", tmp_path / "photos", "--out", tmp_path / "dets.json")
    assert result.exit_code == 0, result.output
    assert len(trims) == 2  # before the 2nd and the 4th image
    assert memory.images_per_trim(5) == 1 and memory.images_per_trim(1) == 2


def test_a_one_scale_cache_trims_every_few_images(xml_dataset, tmp_path, monkeypatch):
    from spp_cli import memory

    trims = []
    monkeypatch.setattr(memory, "ONE_SCALE_TRIM_EVERY", 2)
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    result = invoke("cache", "--data", xml_dataset, "--cache", tmp_path / "feats", "--scales", "96", "--no-proposals")
    assert result.exit_code == 0, result.output
    assert "3 image(s) computed" in result.stderr and len(trims) == 1  # after the 2nd image
