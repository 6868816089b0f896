import json

import numpy as np
import pytest

from spp_cli.errors import ProposalError, SPPError
from spp_cli.evaluate import best_overlaps, proposal_recall
from spp_cli.proposals import (
    ImageProposals,
    ProposalParams,
    propose,
    proposals_document,
    read_proposals,
    strategy_names,
)


def _scene(width=320, height=240):
    """Three flat-coloured rectangles on a textured background, and their boxes."""
    rng = np.random.default_rng(1)
    img = rng.integers(90, 110, (height, width, 3)).astype(np.uint8)
    objects = np.array([[20, 30, 120, 110], [150, 60, 300, 200], [60, 150, 110, 230]], np.float32)
    colours = [(220, 30, 30), (30, 200, 40), (20, 40, 230)]
    for (x1, y1, x2, y2), colour in zip(objects.astype(int), colours):
        img[y1:y2, x1:x2] = colour
    return img, objects


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_finds_flat_objects(strategy):
    img, objects = _scene()
    boxes = propose(img, ProposalParams(strategy=strategy, max_side=0, top=2000, min_size=0))
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    # > 0.8, not ~1: near-duplicate removal may keep a slightly different box.
    assert best_overlaps(boxes, objects).min() > 0.8


def test_downscaled_boxes_map_back_to_original_pixels():
    img, objects = _scene(640, 480)
    objects = objects * 2
    for (x1, y1, x2, y2), colour in zip(objects.astype(int), [(220, 30, 30), (30, 200, 40), (20, 40, 230)]):
        img[y1:y2, x1:x2] = colour
    boxes = propose(img, ProposalParams(max_side=320, top=2000, min_size=0))
    assert boxes[:, 2].max() <= 640 and boxes[:, 3].max() <= 480
    assert best_overlaps(boxes, objects).min() > 0.8


def test_top_min_size_and_distinct():
    img, _ = _scene()
    boxes = propose(img, ProposalParams(max_side=0, top=15, min_size=20))
    assert len(boxes) <= 15
    assert (boxes[:, 2] - boxes[:, 0] >= 20).all() and (boxes[:, 3] - boxes[:, 1] >= 20).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(SPPError, match=r"unknown proposal strategy 'best' \(valid: .*opencv-quality\)"):
        ProposalParams(strategy="best")


def test_props_json_round_trip(tmp_path):
    entry = ImageProposals("x", "imgs/x.jpg", 64, 48, np.array([[1, 2, 30.25, 40]], np.float32))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(proposals_document(ProposalParams(), [entry])))
    loaded = read_proposals(path)
    assert loaded.params["top"] == 2000
    got = loaded.lookup("x", "imgs/x.jpg")
    assert got is not None and (got.width, got.height) == (64, 48)
    np.testing.assert_allclose(got.boxes, entry.boxes)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", r"p\.json: not valid JSON"),
        ('{"format": "other"}', r'p\.json: not a proposals file \(expected "format": "spp-proposals"\)'),
        ('{"format": "spp-proposals", "version": 9}', r"p\.json: proposals format version 9 is not supported"),
        ('{"format": "spp-proposals", "version": 1, "images": [{"id": "a"}]}', r"p\.json: images\[0\] is malformed"),
        ('{"format": "spp-proposals", "version": 1, "images": null}', r'p\.json: "images" is not a list of images'),
        ('{"format": "spp-proposals", "version": 1, "images": {"a": []}}', r'p\.json: "images" is not a list of images'),
        ('{"format": "spp-proposals", "version": 1, "images": [{"id": "a", "path": "a.jpg", "width": 1e999, "height": 4, "boxes": []}]}',
         r"p\.json: images\[0\] is malformed"),
        ('{"format": "spp-proposals", "version": 1, "images": [{"id": "a", "path": "a\\u0000.jpg", "width": 4, "height": 4, "boxes": []}]}',
         r"p\.json: images\[0\] has a path with a NUL character"),
    ],
)
def test_read_proposals_errors(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProposalError, match=message):
        read_proposals(path)


def test_read_proposals_missing_file(tmp_path):
    with pytest.raises(ProposalError, match=r"nope\.json: proposals file not found"):
        read_proposals(tmp_path / "nope.json")


def _slow_best_overlap(proposals, gts):
    out = []
    for g in gts:
        best = 0.0
        for p in proposals:
            ix = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
            iy = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
            inter = ix * iy
            union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
            best = max(best, inter / union)
        out.append(best)
    return np.array(out)


def test_recall_and_mabo_against_slow_reference():
    rng = np.random.default_rng(0)

    def rand_boxes(n):
        xy = rng.uniform(0, 100, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], 1).astype(np.float32)

    items = [(rand_boxes(50), rand_boxes(4), np.array([0, 1, 1, 0])) for _ in range(5)]
    overall, per_class, mabo = proposal_recall(items, ["a", "b"])
    slow = [_slow_best_overlap(p, g) for p, g, _ in items]
    allbest = np.concatenate(slow)
    assert overall.count == 20
    assert overall.recall(0.5) == pytest.approx(np.mean(allbest >= 0.5))
    assert overall.recall(0.7) == pytest.approx(np.mean(allbest >= 0.7))
    class_means = [np.mean(np.concatenate([s[l == c] for s, (_, _, l) in zip(slow, items)])) for c in (0, 1)]
    assert mabo == pytest.approx(np.mean(class_means), rel=1e-5)
    assert per_class["a"].count == 10


def test_best_overlap_without_proposals():
    assert best_overlaps(np.zeros((0, 4)), np.ones((2, 4))).tolist() == [0.0, 0.0]


def test_proposals_are_reproducible():
    img, _ = _scene()
    first = propose(img, ProposalParams())
    propose(img, ProposalParams(strategy="opencv-fast"))  # advances the C library's random state
    assert np.array_equal(first, propose(img, ProposalParams()))


def test_stratified_ranking_interleaves_sizes_and_runs():
    from spp_cli.proposals import _stratified

    small = np.array([[0, 0, 4, 4], [1, 1, 5, 5]], np.float32)  # sqrt(area) 4: first bin
    large = np.array([[0, 0, 300, 300], [0, 0, 290, 300]], np.float32)  # last bin
    run_a = np.concatenate([small, large])  # OpenCV order: small regions first
    run_b = np.array([[10, 10, 14, 14]], np.float32)
    ranked = _stratified([run_a, run_b])
    # position 0 of every (run, bin) list first: small of a, small of b, large of a; then position 1
    np.testing.assert_array_equal(ranked, [small[0], run_b[0], large[0], small[1], large[1]])


def _slow_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("threshold", [0.3, 0.65])
def test_diverse_first_against_slow_reference(threshold):
    from spp_cli.proposals import _diverse_first

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 60, (80, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (80, 2))], 1).astype(np.float32)
    kept = []
    for i, box in enumerate(boxes):  # greedy in rank order
        if all(_slow_iou(box, boxes[j]) <= threshold for j in kept):
            kept.append(i)
    expected = kept + [i for i in range(len(boxes)) if i not in kept]
    order = _diverse_first(boxes, threshold)
    assert 0 < len(kept) < len(boxes)  # both groups present: the reordering is exercised
    assert order.tolist() == expected


def test_fine_runs_add_only_small_boxes(monkeypatch):
    import dataclasses

    import spp_cli.proposals as P

    img, _ = _scene(640, 480)
    # 10 px: this scene's fine run has boxes on both sides of it that the coarse runs lack
    strategy = dataclasses.replace(P.STRATEGIES["original-fast-fine"], fine_max_box=10.0)
    monkeypatch.setitem(P.STRATEGIES, "original-fast-fine", strategy)
    calls = []
    real = P._runs

    def spy(image, name, max_side, fine=False, map_back=True):
        runs, factors = real(image, name, max_side, fine, map_back)
        calls.append((max_side, fine, list(runs)))
        return runs, factors

    monkeypatch.setattr(P, "_runs", spy)
    boxes = propose(img, ProposalParams(strategy="original-fast-fine", max_side=320, top=100000))
    assert [(c[0], c[1]) for c in calls] == [(320, False), (640, True)]

    def as_set(b):
        return {tuple(np.round(x, 1)) for x in b}

    coarse = as_set(np.concatenate(calls[0][2]))
    fine = np.concatenate(calls[1][2])
    side = np.sqrt((fine[:, 2] - fine[:, 0]) * (fine[:, 3] - fine[:, 1]))
    only_fine_small = as_set(fine[side < 10]) - coarse
    only_fine_large = as_set(fine[side >= 10]) - coarse
    out = as_set(boxes)
    assert only_fine_small and only_fine_large
    assert out & only_fine_small  # small fine boxes join the ranking
    assert not out & only_fine_large  # larger ones do not
    assert out <= coarse | only_fine_small


def _propose_mid_run(tmp_path, images: int):
    """`spp propose` over ``images`` generated photos with 2 workers, once 2 images are journaled:
    the process, its workers, its command, --out and the journal."""
    import subprocess
    import sys
    import time

    import psutil

    from conftest import write_image

    folder = tmp_path / "imgs"
    for i in range(images):
        write_image(folder / f"{i:02d}.jpg", 640, 480, seed=i)
    out = tmp_path / "props.json"
    cmd = [sys.executable, "-m", "spp_cli", "propose", str(folder), "--out", str(out), "--workers", "2"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out.with_name("props.json.partial")
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 3):
        time.sleep(0.02)
    return process, psutil.Process(process.pid).children(recursive=True), cmd, out, journal


def test_the_workers_end_quietly_with_a_parent_killed_by_sigkill(tmp_path):
    """SIGKILL (the OOM killer, a lost job) reaches only the parent: its workers end too, at once,
    without finishing their images into the dead parent's pipe (a BrokenPipeError traceback each)."""
    import psutil

    process, workers, _, _, _ = _propose_mid_run(tmp_path, 40)
    process.kill()  # SIGKILL
    _, stderr = process.communicate(timeout=60)  # until every writer of the pipe, the workers too, is gone
    assert len(workers) == 2
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


def test_sigterm_stops_the_workers_and_keeps_the_finished_images(tmp_path):
    """`kill PID` ends a run as Ctrl-C does: one line, code 130, no orphaned worker, resumable."""
    import subprocess

    import psutil

    process, workers, cmd, out, journal = _propose_mid_run(tmp_path, 60)
    process.terminate()  # SIGTERM
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "Interrupted. Finished work is kept; run the same command again to resume."
    assert "Traceback" not in stderr and "Process" not in stderr
    assert len(workers) == 2
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    done = journal.read_text().count("\n") - 1  # a header line, then one line per image
    assert 2 <= done < 60, "the signal should land mid-run"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {done} of 60 images already done." in resumed.stderr
    assert len(json.loads(out.read_text())["images"]) == 60
