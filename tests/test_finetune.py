"""Fine-tuning the fc head on cached SPP vectors: sampling, the flip, learning, resuming, the CLI."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_cli.boxes import iou
from spp_cli.cache import CacheEntry, CacheSettings, FeatureCache
from spp_cli.cli import cli
from spp_cli.finetune import (
    Finetuner,
    FinetuneConfig,
    checkpoint_path,
    flip_spp_vectors,
    sample_windows,
    window_table,
)
from spp_cli.head import BACKGROUND, Head
from spp_cli.spp import DEFAULT_LEVELS, Alignment, spatial_pyramid_pool

CLASSES = ["ring", "bar"]
STRIDE = 16
SETTINGS = CacheSettings("synthetic", "random:0", "map", STRIDE, 0.0, 4, (320,), 2000)


def _synthetic_entry(index: int, rng: np.random.Generator) -> CacheEntry:
    """A 320 x 320 image whose 20 x 20 map lights channel k inside objects of class k.

    Channel 2 is noise everywhere, channel 3 marks object borders, so that a
    window's SPP bins tell a tight window from a loose one.
    """
    size, cells = 320, 20
    fmap = torch.from_numpy(rng.random((4, cells, cells), dtype=np.float32) * 0.2)
    gt, labels = [], []
    for k in range(2):
        w, h = rng.integers(5, 9, 2)
        x0 = int(rng.integers(0, 10 - w)) + 10 * k
        y0 = int(rng.integers(0, cells - h))
        fmap[k, y0 : y0 + h, x0 : x0 + w] += 1.0
        fmap[3, y0 : y0 + h, [x0, x0 + w - 1]] += 1.0
        fmap[3, [y0, y0 + h - 1], x0 : x0 + w] += 1.0
        gt.append([x0 * STRIDE, y0 * STRIDE, (x0 + w) * STRIDE, (y0 + h) * STRIDE])
        labels.append(k)
    gt_boxes = np.array(gt, np.float32)
    # Proposals: tight jitters of the ground truth (foreground), half-shifted
    # copies (IoU ~0.2-0.35: background in range) and random boxes.
    jitter = np.repeat(gt_boxes, 30, 0) + rng.normal(0, 6, (60, 4)).astype(np.float32)
    widths = np.repeat(gt_boxes[:, 2:] - gt_boxes[:, :2], 20, 0)
    shift = widths * rng.choice([-0.6, 0.6], (40, 2)) * rng.integers(0, 2, (40, 1)).repeat(2, 1).clip(0, 1)
    shift[shift.sum(1) == 0] = widths[shift.sum(1) == 0] * 0.6
    near = np.repeat(gt_boxes, 20, 0) + np.concatenate([shift, shift], 1).astype(np.float32)
    corners = rng.uniform(0, size, (120, 2, 2)).astype(np.float32)
    random_boxes = np.concatenate([corners.min(1), corners.max(1) + 16], 1)
    proposals = np.clip(np.concatenate([jitter, near, random_boxes]), 0, size)
    proposals = proposals[(proposals[:, 2] - proposals[:, 0] > 8) & (proposals[:, 3] - proposals[:, 1] > 8)]
    return CacheEntry(
        key=f"{index:064x}", image_id=f"img{index}", path=f"img{index}.jpg", width=size, height=size,
        maps=[fmap.half()], factors=[1.0], proposals=proposals.astype(np.float32),
        gt_boxes=gt_boxes, gt_labels=np.array(labels, np.int64), gt_difficult=np.zeros(2, bool),
        gt_iscrowd=np.zeros(2, bool), classes=list(CLASSES),
    )


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    cache = FeatureCache.create_or_open(tmp_path_factory.mktemp("ft") / "cache", SETTINGS)
    rng = np.random.default_rng(0)
    for i in range(30):
        cache.write(_synthetic_entry(i, rng))
    return cache


# ---------------------------------------------------------------- sampling


def test_sampling_fraction_and_iou_ranges(synthetic_cache):
    config = FinetuneConfig()
    entry = synthetic_cache.read(synthetic_cache.keys()[0])
    table = window_table(entry, CLASSES, config)
    overlaps = iou(table.boxes, entry.gt_boxes).numpy().max(1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = sample_windows(table, 64, 0.25, rng)
        assert len(picked) == 64
        fg = picked[table.labels[picked] > 0]
        assert len(fg) == 16, "a quarter of the windows are foreground when the image has enough"
        assert (overlaps[fg] >= 0.5).all()
        bg = picked[table.labels[picked] == 0]
        assert ((overlaps[bg] >= 0.1) & (overlaps[bg] < 0.5)).all()
    # Labels name the best-overlapping ground truth's class (1-based; 0 is background).
    fg_all = table.foreground
    best = iou(table.boxes[fg_all], entry.gt_boxes).numpy().argmax(1)
    np.testing.assert_array_equal(table.labels[fg_all], entry.gt_labels[best] + 1)


def test_sampling_with_few_foreground_windows_fills_with_background():
    config = FinetuneConfig()
    entry = _synthetic_entry(0, np.random.default_rng(1))
    entry.proposals = entry.proposals[iou(entry.proposals, entry.gt_boxes).numpy().max(1) < 0.5]
    table = window_table(entry, CLASSES, config)
    picked = sample_windows(table, 64, 0.25, np.random.default_rng(0))
    assert len(picked) == 64 and (table.labels[picked] > 0).sum() == 2  # only the two ground-truth boxes


def test_difficult_ground_truth_is_neither_foreground_nor_background():
    entry = _synthetic_entry(0, np.random.default_rng(2))
    entry.gt_difficult = np.array([True, False])
    table = window_table(entry, CLASSES, FinetuneConfig())
    near_difficult = iou(table.boxes, entry.gt_boxes[:1]).numpy()[:, 0] >= 0.1
    assert not set(np.flatnonzero(near_difficult)) & set(table.background)
    assert (table.labels != 1).all()


# ---------------------------------------------------------------- flip


def _flip_reference(vector: torch.Tensor, channels: int, levels) -> torch.Tensor:
    out, start = vector.clone(), 0
    for n in levels:
        for c in range(channels):
            for row in range(n):
                for col in range(n):
                    out[start + (c * n + row) * n + col] = vector[start + (c * n + row) * n + (n - 1 - col)]
        start += channels * n * n
    return out


def test_flip_matches_a_slow_reference():
    vectors = torch.randn(3, 5 * sum(n * n for n in DEFAULT_LEVELS))
    flipped = flip_spp_vectors(vectors, 5, DEFAULT_LEVELS)
    for v, f in zip(vectors, flipped):
        torch.testing.assert_close(f, _flip_reference(v, 5, DEFAULT_LEVELS))
    torch.testing.assert_close(flip_spp_vectors(flipped, 5, DEFAULT_LEVELS), vectors)


def test_flip_is_pooling_the_mirrored_map():
    # A whole-map window over a width every level divides: bins are symmetric, so exact.
    fmap = torch.randn(3, 10, 12)
    cells = torch.tensor([[0.0, 0.0, 11.0, 9.0]])
    levels = (1, 2, 3, 6)
    pooled = spatial_pyramid_pool(fmap, cells, levels)
    mirrored = spatial_pyramid_pool(fmap.flip(-1).contiguous(), cells, levels)
    torch.testing.assert_close(flip_spp_vectors(pooled, 3, levels), mirrored)


# ---------------------------------------------------------------- learning


def _tuner(cache, **overrides) -> Finetuner:
    config = FinetuneConfig(**{"epochs": 12, "hidden": 64, "lr": 2e-3, "patience": 20, "val_fraction": 0.2, **overrides})
    tuner = Finetuner(cache, cache.keys(), CLASSES, config)
    tuner.prepare()
    return tuner


def test_head_learns_a_synthetic_problem(synthetic_cache):
    tuner = _tuner(synthetic_cache)
    reports = []
    head = tuner.run(None, on_epoch=reports.append)
    assert reports[-1].val_accuracy > 0.95, [round(r.val_accuracy, 3) for r in reports]
    assert head.classes == [BACKGROUND, *CLASSES]
    # The head's own prediction on a fresh image's ground truth boxes.
    entry = _synthetic_entry(99, np.random.default_rng(99))
    from spp_cli.spp import pool_windows

    pool5 = pool_windows(entry.maps, entry.factors, torch.from_numpy(entry.gt_boxes), Alignment(STRIDE, 0.0))
    assert head.probabilities(pool5).argmax(1).tolist() == [1, 2]


def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(synthetic_cache, tmp_path):
    straight = _tuner(synthetic_cache, epochs=4).run(None)

    checkpoint = tmp_path / "head.safetensors.ckpt"
    interrupted = _tuner(synthetic_cache, epochs=4)

    def stop_after_two(report):
        if report.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.run(checkpoint, on_epoch=stop_after_two)
    assert checkpoint.is_file()
    epochs_seen = []
    resumed = _tuner(synthetic_cache, epochs=4).run(checkpoint, on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [3, 4]
    for name, weight in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[name], weight, rtol=0, atol=0)


def test_checkpoint_of_another_run_is_refused(synthetic_cache, tmp_path):
    checkpoint = tmp_path / "h.ckpt"
    _tuner(synthetic_cache, epochs=1).run(checkpoint)
    from spp_cli.errors import ModelError

    with pytest.raises(ModelError, match="checkpoint of a run with other data or settings; delete it"):
        _tuner(synthetic_cache, epochs=1, lr=0.5).run(checkpoint)


def test_compressed_head_is_fc6_at_its_top_singular_values():
    from spp_cli.head import FCHead

    torch.manual_seed(0)
    head = Head(FCHead(40, 16, 3).eval(), [BACKGROUND, *CLASSES], 0.5, SETTINGS, DEFAULT_LEVELS)
    x = torch.randn(7, 40)
    # Slow reference: fc6's weight rebuilt from its 8 largest singular triples in float64.
    w = head.network.fc6.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    w8 = torch.from_numpy((u[:, :8] * s[:8]) @ vt[:8]).float()
    fc6 = torch.relu(x * 0.5 @ w8.T + head.network.fc6.bias.detach())
    expected = torch.relu(head.network.fc7(fc6)).detach()
    torch.testing.assert_close(head.compressed(8).fc7(x), expected, atol=1e-5, rtol=1e-4)
    assert isinstance(head.network.fc6, torch.nn.Linear)  # the head itself is left as it was
    assert head.compressed(0) is head and head.compressed(16) is head  # nothing to save at rank >= min(H, D)
    torch.testing.assert_close(head.compressed(15).fc7(x), head.fc7(x), atol=0.05, rtol=0.0)


# ---------------------------------------------------------------- files and CLI


def test_finetune_command_writes_a_head_and_train_svm_uses_it(synthetic_cache, tmp_path):
    out = tmp_path / "head.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["finetune", "--cache", str(synthetic_cache.root), "--out", str(out), "--epochs", "2", "--hidden", "32"])
    assert result.exit_code == 0, result.output
    assert not checkpoint_path(out).exists(), "a finished run leaves no checkpoint"
    head = Head.load(out)
    assert head.hidden == 32 and head.features == SETTINGS and head.training["epochs_run"] == 2
    assert "epoch 2: train loss" in result.stderr

    model = tmp_path / "model.safetensors"
    result = runner.invoke(cli, ["train-svm", "--cache", str(synthetic_cache.root), "--out", str(model), "--features", "fc7", "--head", str(out)])
    assert result.exit_code == 0, result.output
    from spp_cli.model import Detector

    detector = Detector.load(model)
    assert detector.feature_kind == "fc7" and detector.svms.weight.shape == (2, 32)
    assert detector.regressors.weight.shape == (2, 4 * sum(n * n for n in DEFAULT_LEVELS), 4)
    torch.testing.assert_close(detector.head.network.fc6.weight, head.network.fc6.weight)
    # Detection's compressed head: made once per rank, made again for a replaced head.
    compressed = detector._detection_head(8)
    assert compressed is detector._detection_head(8) and compressed is not detector.head
    assert detector._detection_head(32) is detector.head  # rank >= the hidden width: nothing to save
    assert detector._detection_head(8) is compressed  # another rank asked for in between: still made once
    detector.head = head
    assert detector._detection_head(8) is not compressed


def test_train_svm_fc7_without_head(synthetic_cache, tmp_path):
    result = CliRunner().invoke(cli, ["train-svm", "--cache", str(synthetic_cache.root), "--out", str(tmp_path / "m.safetensors"), "--features", "fc7"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --features fc7 needs --head FILE (a head from `spp finetune`)"


def test_head_from_another_cache_is_refused(synthetic_cache, tmp_path):
    head = _tuner(synthetic_cache, epochs=1).run(None)
    other = CacheSettings("synthetic", "random:0", "map", STRIDE, 0.0, 4, (480,), 2000)
    head.features = other
    path = tmp_path / "other-head.safetensors"
    head.save(path)
    result = CliRunner().invoke(cli, ["train-svm", "--cache", str(synthetic_cache.root), "--out", str(tmp_path / "m.safetensors"), "--features", "fc7", "--head", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: the head was fine-tuned on backbone synthetic (map, weights random:0), scales 480")


def test_damaged_head_file(tmp_path):
    path = tmp_path / "head.safetensors"
    path.write_bytes(b"not a head")
    result = CliRunner().invoke(cli, ["train-svm", "--cache", str(tmp_path), "--out", str(tmp_path / "m.safetensors"), "--features", "fc7", "--head", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path}: not a readable spp head (")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["finetune", "train-svm"])
def test_split_needs_data(synthetic_cache, tmp_path, command):
    result = CliRunner().invoke(cli, [command, "--cache", str(synthetic_cache.root), "--out", str(tmp_path / "x.safetensors"), "--split", "train"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --split needs --data SPEC (the dataset the split belongs to)"


def test_split_of_images_not_in_the_cache(synthetic_cache, tmp_path):
    from conftest import voc_xml, write_image

    data = tmp_path / "other"
    write_image(data / "images" / "elsewhere.jpg")
    (data / "annotations").mkdir()
    (data / "annotations" / "elsewhere.xml").write_text(voc_xml("elsewhere.jpg", 64, 48, [("ring", 2, 2, 30, 30)]))
    result = CliRunner().invoke(cli, ["finetune", "--cache", str(synthetic_cache.root), "--out", str(tmp_path / "h.safetensors"), "--data", str(data)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {synthetic_cache.root}: none of the 1 images of {data} is in the cache"


def test_cli_refuses_a_foreign_checkpoint_before_reading_the_cache(synthetic_cache, tmp_path, monkeypatch):
    out = tmp_path / "head.safetensors"
    _tuner(synthetic_cache, epochs=1).run(checkpoint_path(out))  # another run's settings
    monkeypatch.setattr(Finetuner, "prepare", lambda *a, **k: pytest.fail("read the cache before checking the checkpoint"))
    result = CliRunner().invoke(cli, ["finetune", "--cache", str(synthetic_cache.root), "--out", str(out), "--epochs", "2"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {checkpoint_path(out)}: checkpoint of a run with other data or settings; delete it to start over, or use the same settings"
    )
