"""Hard-negative mining (spp_cli.svm) on small synthetic features."""

import numpy as np
import torch

from spp_cli.config import SVMConfig
from spp_cli.svm import HardNegativeMiner

CLASSES = ["a", "b", "c"]


def mine(threads: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Three classes of 40-d features, 6 images of 300 windows; retrain every 100 new hard negatives."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), 40)).astype(np.float32)
    log = []
    miner = HardNegativeMiner(CLASSES, 40, SVMConfig(retrain_every=100), on_retrain=lambda *row: log.append(row))
    for k, name in enumerate(CLASSES):
        miner.add_positives(name, centres[k] * 3 + rng.normal(0, 1, (20, 40)).astype(np.float32))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(6):
            features = torch.from_numpy(rng.normal(0, 1, (300, 40)).astype(np.float32))
            miner.add_image(features, {name: np.arange(300) for name in CLASSES})
        svms = miner.finish(1.0)
    finally:
        torch.set_num_threads(before)
    return svms.weight, svms.bias, log


def test_mining_is_reproducible_whatever_the_thread_count():
    w1, b1, log1 = mine(threads=1)
    w2, b2, log2 = mine(threads=2)
    assert len(log1) > len(CLASSES)  # several retrains per class happened
    assert log1 == log2  # the same retrains, in class order
    assert np.array_equal(w1, w2) and np.array_equal(b1, b2)


def test_the_mined_svms_separate_their_class():
    weight, bias, _ = mine(threads=2)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), 40)).astype(np.float32)
    scores = centres * 3 @ weight.T + bias
    assert (scores.argmax(1) == np.arange(len(CLASSES))).all()
    assert (np.diag(scores) > 0).all()
    background = rng.normal(0, 1, (500, 40)).astype(np.float32) @ weight.T + bias
    assert (background < 0).mean() > 0.95

