"""Hard-negative mining (spp_cli.svm) on small synthetic features."""

import numpy as np
import pytest
import torch

from spp_cli.config import SVMConfig
from spp_cli.svm import HardNegativeMiner, NegativeStore

CLASSES = ["a", "b", "c"]


def mine(threads: int, spill=None, dim: int = 40, images: int = 6) -> tuple[np.ndarray, np.ndarray, list]:
    """Three classes of ``dim``-d features, ``images`` images of 300 windows; retrain every 100 new hard negatives.
    With ``spill`` (a folder) the store keeps every row in files there."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), dim)).astype(np.float32)
    log = []
    miner = HardNegativeMiner(CLASSES, dim, SVMConfig(retrain_every=100), on_retrain=lambda *row: log.append(row),
                              spill=spill, memory_rows=0 if spill else None)
    for k, name in enumerate(CLASSES):
        miner.add_positives(name, centres[k] * 3 + rng.normal(0, 1, (20, dim)).astype(np.float32))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(images):
            features = torch.from_numpy(rng.normal(0, 1, (300, dim)).astype(np.float32))
            miner.add_image(features, {name: np.arange(300) for name in CLASSES})
        assert all(isinstance(chunk, np.memmap) == bool(spill) for chunk in miner.store.chunks)
        svms = miner.finish(1.0)
    finally:
        torch.set_num_threads(before)
    return svms.weight, svms.bias, log


@pytest.mark.parametrize(("dim", "images", "threads"), [(40, 6, 2), (16000, 6, 2), (1024, 12, 4), (512, 6, 2)])
def test_mining_is_reproducible_whatever_the_thread_count(dim, images, threads):
    """16,000-d as pool5 of the default cut, 1,024 as a fine-tuned fc7 (more threads than cores
    are allowed): MKL's dot, its transposed gemv and a batch of windows' gemm against the classes
    split their sums by thread at such sizes; the solver's sums are numpy's, its products
    one-row gemms, and MKL runs in its strict reproducible mode (tests/conftest.py, as the training commands)."""
    w1, b1, log1 = mine(threads=1, dim=dim, images=images)
    w2, b2, log2 = mine(threads=threads, dim=dim, images=images)
    assert len(log1) > len(CLASSES)  # several retrains per class happened
    assert log1 == log2  # the same retrains, in class order
    assert np.array_equal(w1, w2) and np.array_equal(b1, b2)


def test_mining_with_the_store_spilled_to_files_gives_the_same_svms(tmp_path):
    w1, b1, log1 = mine(threads=2)
    w2, b2, log2 = mine(threads=2, spill=tmp_path)
    assert log1 == log2
    assert np.array_equal(w1, w2) and np.array_equal(b1, b2)


def test_the_memory_limit_is_at_most_the_machines():
    import os

    from spp_cli.svm import memory_limit, store_memory_rows

    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory_limit() <= machine
    assert store_memory_rows(16_001) == int(memory_limit() * 0.25) // 32_002


def test_the_mined_svms_separate_their_class():
    weight, bias, _ = mine(threads=2)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), 40)).astype(np.float32)
    scores = centres * 3 @ weight.T + bias
    assert (scores.argmax(1) == np.arange(len(CLASSES))).all()
    assert (np.diag(scores) > 0).all()
    background = rng.normal(0, 1, (500, 40)).astype(np.float32) @ weight.T + bias
    assert (background < 0).mean() > 0.95



def test_newton_solver_reaches_liblinears_squared_hinge_optimum():
    """The Newton solver against liblinear's own primal solver (-s 2) run to a tight tolerance."""
    from sklearn.svm import LinearSVC

    from spp_cli.svm import fit_linear_svm

    rng = np.random.default_rng(1)
    positives = (rng.normal(0, 1, (60, 30)) + 1.5).astype(np.float32)
    negatives = rng.normal(0, 1, (400, 30)).astype(np.float32)
    config = SVMConfig(C=0.1, newton_tol=1e-6)
    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.concatenate([np.ones(60), -np.ones(400)])

    def objective(weight, bias):
        cost = np.where(y > 0, config.C * config.positive_weight, config.C)
        loss = np.maximum(0, 1 - y * (x @ weight + bias))
        return 0.5 * (weight @ weight + (bias / config.bias_multiplier) ** 2) + (cost * loss**2).sum()

    reference = LinearSVC(C=config.C, loss="squared_hinge", dual=False, tol=1e-8, max_iter=10_000,
                          class_weight={1: config.positive_weight, -1: 1.0}, intercept_scaling=config.bias_multiplier).fit(x, y)
    weight, bias = fit_linear_svm(positives, negatives, config)
    best = objective(reference.coef_[0], reference.intercept_[0])
    assert objective(weight.astype(np.float64), bias) == pytest.approx(best, rel=1e-4)
    assert np.allclose(x @ weight + bias, reference.decision_function(x), atol=1e-2)
    # Started from another model, it reaches the same optimum.
    warm_weight, warm_bias = fit_linear_svm(positives, negatives, config, start=(rng.normal(0, 1, 30).astype(np.float32), 3.0))
    assert objective(warm_weight.astype(np.float64), warm_bias) == pytest.approx(best, rel=1e-4)


def test_the_store_keeps_each_window_once_and_compaction_keeps_rows_and_order():
    store = NegativeStore(4)
    first = store.add(np.arange(12, dtype=np.float16).reshape(3, 4))
    second = store.add(np.arange(12, 24, dtype=np.float16).reshape(3, 4))
    holders = [np.array([first[0], second[2]]), np.array([first[2], second[2]])]
    before = [store.take(numbers) for numbers in holders]
    renumbered = store.compact(holders)
    assert store.count == 3  # rows held by no class are gone; the shared one is kept once
    for numbers, rows in zip(renumbered, before):
        assert np.array_equal(store.take(numbers), rows)
        assert (np.diff(numbers) > 0).all()  # still in mined order


@pytest.mark.parametrize("spill", [False, True])
def test_the_store_reads_rows_across_chunks_as_one_array_would(spill, tmp_path):
    """Rows in chunks of 5 against a plain array of every row added (the slow reference); with
    ``spill``, every chunk after the first is a mapped file, and no file is left in the folder."""
    rng = np.random.default_rng(3)
    store = NegativeStore(3, chunk_rows=5, spill=tmp_path if spill else None, memory_rows=5)
    reference = np.zeros((0, 3), np.float16)
    for count in (2, 7, 0, 5, 1, 9):
        rows = rng.normal(0, 1, (count, 3)).astype(np.float16)
        assert np.array_equal(store.add(rows), np.arange(len(reference), len(reference) + count))
        reference = np.concatenate([reference, rows])
    assert store.count == len(reference) == 24 and len(store.chunks) == 5
    assert [isinstance(chunk, np.memmap) for chunk in store.chunks] == [False] + [spill] * 4
    numbers = np.sort(rng.choice(24, 13, replace=False))
    for size in (1, 4, 512):
        blocks = list(store.blocks(numbers, size))
        assert all(len(block) <= size for block in blocks)
        assert np.array_equal(np.concatenate(blocks), reference[numbers])
    holders = [numbers[::2], numbers[1::3], np.array([23])]
    renumbered = store.compact(holders)
    assert store.count == len(np.unique(np.concatenate(holders)))
    for old, new in zip(holders, renumbered):
        assert np.array_equal(store.take(new), reference[old])
    assert np.array_equal(store.add(reference[:2]), [store.count - 2, store.count - 1])  # adds go on after compaction
    assert list(tmp_path.iterdir()) == []  # the spilled chunks' files are unlinked as soon as they are mapped


def test_a_window_hard_for_several_classes_is_stored_once():
    miner = HardNegativeMiner(CLASSES, 40, SVMConfig(retrain_every=10_000))
    rng = np.random.default_rng(0)
    for name in CLASSES:
        miner.add_positives(name, rng.normal(3, 1, (5, 40)).astype(np.float32))
    miner.add_image(torch.from_numpy(rng.normal(0, 1, (50, 40)).astype(np.float32)), {name: np.arange(50) for name in CLASSES})
    # No model yet: every window is hard for all three classes, and stored once.
    assert miner.store.count == 50
    assert all(np.array_equal(miner.state[name].negatives, np.arange(50)) for name in CLASSES)


def test_design_matrix_stacks_fp16_blocks_with_the_bias_column_in_a_reused_buffer():
    from spp_cli.svm import Scratch, design_matrix

    rng = np.random.default_rng(2)
    blocks = [rng.normal(0, 1, (n, 6)).astype(np.float16) for n in (3, 0, 5)]
    scratch = Scratch()
    big = design_matrix(20, 6, [torch.from_numpy(rng.normal(0, 1, (20, 6)).astype(np.float32))], 10.0, scratch)
    rows = design_matrix(8, 6, (torch.from_numpy(block) for block in blocks), 10.0, scratch)
    reference = np.concatenate([np.concatenate(blocks).astype(np.float32), np.full((8, 1), 10.0, np.float32)], axis=1)
    assert np.array_equal(rows.numpy(), reference)
    assert rows.data_ptr() == big.data_ptr()  # the smaller matrix reuses the first one's memory


def test_the_solver_returns_each_rows_score():
    from spp_cli.svm import design_matrix, solve_squared_hinge

    rng = np.random.default_rng(3)
    positives, negatives = (rng.normal(0, 1, (30, 12)) + 1).astype(np.float32), rng.normal(0, 1, (200, 12)).astype(np.float32)
    x = design_matrix(230, 12, [torch.from_numpy(positives), torch.from_numpy(negatives)], 10.0)
    weight, bias, scores = solve_squared_hinge(x, 30, SVMConfig())
    assert np.allclose(scores.numpy(), np.concatenate([positives, negatives]) @ weight + bias, atol=1e-4)



def test_a_solve_started_from_the_rows_scores_ends_where_one_that_computes_them_does():
    from spp_cli.svm import design_matrix, solve_squared_hinge

    rng = np.random.default_rng(4)
    positives, negatives = (rng.normal(0, 1, (30, 12)) + 1).astype(np.float32), rng.normal(0, 1, (200, 12)).astype(np.float32)
    x = design_matrix(230, 12, [torch.from_numpy(positives), torch.from_numpy(negatives)], 10.0)
    start = (rng.normal(0, 0.1, 12).astype(np.float32), 0.3)
    start_scores = torch.from_numpy(np.concatenate([positives, negatives]) @ start[0] + start[1])
    config = SVMConfig(newton_tol=1e-7)  # both to the optimum, as far as float32 goes
    computed = solve_squared_hinge(x, 30, config, start)
    given = solve_squared_hinge(x, 30, config, start, start_scores=start_scores)
    assert np.allclose(computed[0], given[0], atol=2e-4) and abs(computed[1] - given[1]) < 2e-3
    assert np.allclose(given[2].numpy(), np.concatenate([positives, negatives]) @ given[0] + given[1], atol=1e-4)
    # The scores it was given are the ones it starts from: wrong ones lead elsewhere.
    misled = solve_squared_hinge(x, 30, SVMConfig(newton_steps=1), start, start_scores=start_scores + 5)
    assert not np.allclose(misled[0], given[0], atol=1e-2)


def test_the_miner_keeps_each_classs_row_scores_under_its_model():
    # What the next solve starts from: the scores of the class's rows (positives, then its
    # negatives in the store) under its weight and bias, without a product to compute them.
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), 40)).astype(np.float32)
    miner = HardNegativeMiner(CLASSES, 40, SVMConfig(retrain_every=30))
    for k, name in enumerate(CLASSES):
        miner.add_positives(name, centres[k] * 3 + rng.normal(0, 1, (20, 40)).astype(np.float32))
    for _ in range(6):
        features = torch.from_numpy(rng.normal(0, 1, (300, 40)).astype(np.float32).astype(np.float16).astype(np.float32))
        miner.add_image(features, {name: np.arange(300) for name in CLASSES})
    for name in CLASSES:
        state = miner.state[name]
        assert state.retrains >= 2
        rows = np.concatenate([*state.positives, miner.store.take(state.negatives)]).astype(np.float32)
        assert state.scores is not None and len(state.scores) == len(rows)
        np.testing.assert_allclose(state.scores, rows @ state.weight + state.bias, atol=1e-3)
