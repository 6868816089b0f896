"""Selective search ahead of the network (spp_cli.prefetch): the same boxes, in order, errors in place."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from conftest import REPO

from spp_cli import prefetch
from spp_cli.cli import cli
from spp_cli.errors import ImageError
from spp_cli.images import load_image
from spp_cli.prefetch import ProposalPrefetch
from spp_cli.proposals import ProposalParams, propose

PHOTOS = [REPO / "tests" / "data" / f"{name}.jpg" for name in ("chelsea", "coffee")]
PARAMS = ProposalParams(max_side=200)  # the default strategy on smaller images: quick


def test_boxes_are_a_serial_runs_and_a_bad_image_fails_in_its_place(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [PHOTOS[0], broken, PHOTOS[1], PHOTOS[0]]
    with ProposalPrefetch(paths, PARAMS, load_image, ahead=1) as ahead:
        got = []
        for index in range(len(paths)):
            try:
                image, boxes, seconds = ahead.take(index)
            except ImageError as exc:
                got.append(str(exc))
                continue
            assert image.shape[2] == 3 and seconds > 0
            got.append(boxes)
    assert got[1].startswith(f"{broken}: ")
    for index in (0, 2, 3):
        # The reference: one image after another on this thread (rand() seeded per image).
        expected = propose(load_image(paths[index]), PARAMS)
        assert len(expected) > 10 and np.array_equal(got[index], expected)


def test_it_searches_at_most_ahead_images_beyond_the_last_taken():
    paths = [PHOTOS[0]] * 5
    with ProposalPrefetch(paths, PARAMS, load_image, ahead=2) as ahead:
        assert sorted(ahead._futures) == [0, 1]
        ahead.take(0)
        assert sorted(ahead._futures) == [1, 2]
        ahead.take(1)
        assert sorted(ahead._futures) == [2, 3]
        assert ahead.searching_after(3) and not ahead.searching_after(4)
        assert (ahead.network_threads(3, 2), ahead.network_threads(4, 2), ahead.network_threads(0, 1)) == (1, 2, 1)


def test_one_core_or_threads_1_searches_on_the_main_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not prefetch.second_core_free()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert not prefetch.second_core_free()


def test_detect_with_the_search_ahead_finds_what_it_finds_without(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "second_core_free", lambda: True)  # whatever this machine's cores
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    threads = torch.get_num_threads()
    runs = {}
    for flag in ("--prefetch", "--no-prefetch"):
        out = tmp_path / f"{flag}.json"
        # (The shipped detector proposes with its own network: selective search is asked for.)
        args = ["detect", str(folder), "--proposals", "selective-search", "--conf", "-1.5", "--out", str(out), flag]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        ahead_note = "selective search ran ahead on a second thread: proposals is the wait for it)"
        assert (ahead_note in result.output.splitlines()[-1]) == (flag == "--prefetch")
        assert torch.get_num_threads() == threads  # lowered beside the search, then as it was
        runs[flag] = json.loads(out.read_text())["images"]
    ahead, serial = runs["--prefetch"], runs["--no-prefetch"]
    assert [Path(e["path"]).name for e in ahead] == [Path(e["path"]).name for e in serial] == ["chelsea.jpg", "coffee.jpg"]
    for a, s in zip(ahead, serial):
        assert len(a["detections"]) == len(s["detections"]) > 0
        # The same proposals; the network ran on one thread fewer beside the search: float rounding only.
        for da, ds in zip(a["detections"], s["detections"]):
            assert da["class"] == ds["class"] and abs(da["score"] - ds["score"]) < 1e-3
            assert np.allclose(da["box"], ds["box"], atol=0.1)


def test_the_search_thread_imports_no_torch():
    # The main thread imports torch meanwhile; two threads importing one package at once can see it half-initialised.
    import subprocess
    import sys

    code = ("import sys; from spp_cli.images import load_image; from spp_cli.proposals import search_runs, ProposalParams; "
            f"search_runs(load_image({str(PHOTOS[0])!r}), ProposalParams(max_side=200)); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
