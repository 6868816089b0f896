"""Learned proposals: anchors and box decoding against slow references, learning a synthetic set, resuming, files."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_cli.cache import CacheEntry, CacheSettings, FeatureCache
from spp_cli.cli import cli
from spp_cli.errors import ModelError
from spp_cli.finetune import checkpoint_path
from spp_cli.rpn import LearnedWindows, ProposalConfig, ProposalModel, ProposalNet, ProposalTrainer, cell_anchors, grid_anchors, recall
from spp_cli.spp import Alignment

STRIDE = 16
SETTINGS = CacheSettings("synthetic", "random:0", "map", STRIDE, 7.5, 16, (320,), 2000)
# Small, quick settings for the synthetic maps (20 x 20 cells).
SMALL = ProposalConfig(anchor_sizes=(32, 64), epochs=20, lr=0.05, top_n=20, pre_nms_top_n=600)


# ---------------------------------------------------------------- anchors and decoding


def test_anchor_grid_matches_slow_reference():
    config = ProposalConfig(anchor_sizes=(16, 64), aspect_ratios=(0.5, 1.0, 2.0))
    align = Alignment(32, 15.5)
    height, width = 3, 4
    anchors = grid_anchors(cell_anchors(config), height, width, align)
    expected = []
    for y in range(height):  # row-major over cells, then anchors: ratios outer, sizes inner (torchvision's order)
        for x in range(width):
            cx, cy = x * 32 + 15.5, y * 32 + 15.5
            for ratio in config.aspect_ratios:
                for size in config.anchor_sizes:
                    h = size * math.sqrt(ratio)
                    w = size / math.sqrt(ratio)
                    expected.append([cx + round(-w / 2), cy + round(-h / 2), cx + round(w / 2), cy + round(h / 2)])
    assert anchors.shape == (height * width * 6, 4)
    np.testing.assert_allclose(anchors.numpy(), np.array(expected), atol=1e-4)


def test_the_anchor_grid_is_built_on_the_networks_device():
    # Under --gpu the network's anchors are a CUDA buffer: the grid must not mix in CPU tensors
    # (a CUDA machine failed there). The meta device stands in for CUDA on a CPU-only machine.
    base = cell_anchors(ProposalConfig()).to("meta")
    assert grid_anchors(base, 3, 4, Alignment(32, 15.5)).device.type == "meta"


def test_box_decoding_matches_slow_reference():
    net = ProposalNet(16, SMALL)
    rng = np.random.default_rng(0)
    anchors = torch.as_tensor(np.sort(rng.uniform(0, 300, (50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4), dtype=torch.float32)
    anchors = torch.stack([anchors[:, 0], anchors[:, 1], anchors[:, 0] + 5 + anchors[:, 2] / 3, anchors[:, 1] + 5 + anchors[:, 3] / 3], 1)
    deltas = torch.as_tensor(rng.normal(0, 0.5, (50, 4)), dtype=torch.float32)
    decoded = net.box_coder.decode_single(deltas, anchors)
    for (x1, y1, x2, y2), (dx, dy, dw, dh), got in zip(anchors.tolist(), deltas.tolist(), decoded.tolist()):
        w, h = x2 - x1, y2 - y1
        cx, cy = x1 + w / 2 + dx * w, y1 + h / 2 + dy * h
        pw, ph = w * math.exp(dw), h * math.exp(dh)
        np.testing.assert_allclose(got, [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], rtol=1e-5, atol=1e-3)
    # Encoding ground truth against the anchors and decoding gives the ground truth back.
    truth = anchors + torch.as_tensor(rng.normal(0, 4, (50, 4)), dtype=torch.float32)
    truth[:, 2:] = torch.maximum(truth[:, 2:], truth[:, :2] + 2)
    back = net.box_coder.decode_single(net.box_coder.encode_single(truth, anchors), anchors)
    np.testing.assert_allclose(back.numpy(), truth.numpy(), atol=1e-3)


# ---------------------------------------------------------------- learning


def _synthetic_entry(index: int, rng: np.random.Generator) -> CacheEntry:
    """A 320 x 320 image with two objects on a 20 x 20 map, each of an anchor's shape at a
    random cell (one in each half): inside an object channel 0 is lit and channels 1-4 hold
    the cell's distances to the object's sides; the centre cell lights channel 5 + the
    shape's index (what a deep layer's wide receptive field tells a 3 x 3 conv about the
    extent of what it sits on)."""
    cells = 20
    fmap = torch.from_numpy(rng.random((SETTINGS.channels, cells, cells), dtype=np.float32) * 0.1)
    shapes = cell_anchors(SMALL).numpy()
    gt = []
    for k in range(2):
        while True:
            x, y = int(rng.integers(0, 10)) + 10 * k, int(rng.integers(0, cells))
            shape = int(rng.integers(len(shapes)))
            box = shapes[shape] + [x * STRIDE + 7.5, y * STRIDE + 7.5] * 2
            if box.min() >= 0 and box.max() <= 320 and (k == 0 or box[0] >= gt[0][2]):
                break
        centres = np.arange(cells) * STRIDE + 7.5
        inside_x = (centres > box[0]) & (centres < box[2])
        inside_y = (centres > box[1]) & (centres < box[3])
        ys, xs = np.meshgrid(centres[inside_y], centres[inside_x], indexing="ij")
        region = np.ix_(np.flatnonzero(inside_y), np.flatnonzero(inside_x))
        fmap[0][region] += 10.0
        for channel, distance in zip((1, 2, 3, 4), (xs - box[0], ys - box[1], box[2] - xs, box[3] - ys)):
            fmap[channel][region] += torch.from_numpy(distance / 8).float()
        fmap[5 + shape, y, x] += 20.0
        gt.append(box.tolist())
    return CacheEntry(
        key=f"{index:064x}", image_id=f"img{index}", path=f"img{index}.jpg", width=320, height=320,
        maps=[fmap.half()], factors=[1.0], proposals=np.zeros((0, 4), np.float32),
        gt_boxes=np.array(gt, np.float32), gt_labels=np.zeros(2, np.int64), gt_difficult=np.zeros(2, bool),
        gt_iscrowd=np.zeros(2, bool), classes=["thing"],
    )


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    cache = FeatureCache.create_or_open(tmp_path_factory.mktemp("rpn") / "cache", SETTINGS)
    rng = np.random.default_rng(0)
    for i in range(24):
        cache.write(_synthetic_entry(i, rng))
    return cache


@pytest.fixture(scope="module")
def trained(synthetic_cache):
    trainer = ProposalTrainer(synthetic_cache, synthetic_cache.keys(), SMALL)
    trainer.prepare()
    return trainer, trainer.run()


def test_maps_read_from_the_cache_at_each_step_train_the_same_network(synthetic_cache, trained):
    # Held maps keep their anchors' targets from the first epoch on; maps read again match them again.
    _, held = trained
    streaming = ProposalTrainer(synthetic_cache, synthetic_cache.keys(), SMALL, hold_bytes=0)
    streaming.prepare()
    assert all(image.maps is None for image in streaming.train + streaming.val)
    model = streaming.run()
    for name, tensor in held.net.head.state_dict().items():
        assert torch.equal(tensor, model.net.head.state_dict()[name]), name
    assert model.training == held.training


def test_learned_proposals_find_every_object_of_a_synthetic_set(trained):
    trainer, model = trained
    assert (len(trainer.train), len(trainer.val)) == (22, 2)
    images = trainer.train + trainer.val
    found = [model.propose(im.maps, im.factors, im.width, im.height)[0] for im in images]
    truth = [im.gt_boxes for im in images]
    assert all(len(boxes) <= SMALL.top_n for boxes in found)
    assert recall(found, truth, 0.7) == 1.0
    # Best first: the top 10 boxes of each image already hold both objects at IoU 0.5.
    assert recall([boxes[:10] for boxes in found], truth, 0.5) == 1.0
    for boxes, image in zip(found, images):
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.width).all() and (boxes[:, 3] <= image.height).all()
    assert model.training["held_out_recall@0.7"] == model.training["history"][-1]["recall@0.7"] == 1.0


def test_more_boxes_asked_for_decode_more_anchors(trained):
    """NMS leaves fewer boxes than it is given: a top_n above pre_nms_top_n (600 here)
    still gets its boxes, and the best ones are those of the default top_n."""
    trainer, model = trained
    image = trainer.val[0]
    assert image.maps[0].shape[1] * image.maps[0].shape[2] * len(model.net.base_anchors) >= 2 * 800
    default, _ = model.propose(image.maps, image.factors, 320, 320)
    many, _ = model.propose(image.maps, image.factors, 320, 320, top_n=800)
    assert len(many) == 800 > SMALL.pre_nms_top_n
    np.testing.assert_array_equal(many[: len(default)], default)


def test_learned_windows_run_the_network_once_per_entry(synthetic_cache, trained, monkeypatch):
    """An entry's boxes are the network's on its cached maps, computed on the first read only."""
    _, model = trained
    windows = LearnedWindows(synthetic_cache, model)
    key = synthetic_cache.keys()[0]
    stored = synthetic_cache.read(key)
    expected = model.propose(stored.maps, stored.factors, stored.width, stored.height)[0]
    first = windows.read(key)
    np.testing.assert_array_equal(first.proposals, expected)
    first.proposals[:] = 0  # a reader's change to its entry is not the next reader's
    calls = []
    monkeypatch.setattr(model, "propose", lambda *args, **kw: calls.append(args) or (np.zeros((0, 4), np.float32), None))
    np.testing.assert_array_equal(windows.read(key).proposals, expected)
    assert calls == []
    assert len(windows.read(synthetic_cache.keys()[1]).proposals) == 0 and len(calls) == 1
    assert windows.keys() == synthetic_cache.keys()  # everything else is the cache's


def test_a_saved_model_proposes_the_same_boxes(trained, tmp_path):
    trainer, model = trained
    path = tmp_path / "props-model.safetensors"
    model.save(path)
    loaded = ProposalModel.load(path)
    image = trainer.val[0]
    # Weights are stored in fp16: the same boxes within rounding, in the same order at the top.
    np.testing.assert_allclose(loaded.propose(image.maps, image.factors, 320, 320)[0][:4],
                               model.propose(image.maps, image.factors, 320, 320)[0][:4], atol=0.5)
    assert loaded.config == SMALL and loaded.features == SETTINGS


def test_a_damaged_or_foreign_file_is_refused(trained, tmp_path):
    _, model = trained
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="proposal model is damaged"):
        ProposalModel.load(path)
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelError, match="not a proposal model"):
        ProposalModel.load(other)


def test_an_interrupted_run_resumes_to_the_same_model(synthetic_cache, tmp_path):
    config = ProposalConfig(anchor_sizes=(32, 64), epochs=3, lr=0.05, top_n=20, pre_nms_top_n=600)
    keys = synthetic_cache.keys()[:8]

    def trainer():
        t = ProposalTrainer(synthetic_cache, keys, config)
        t.prepare()
        return t

    whole = trainer().run()
    checkpoint = tmp_path / "m.safetensors.ckpt"

    def stop_after_two(state):
        if state.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer().run(checkpoint, on_epoch=stop_after_two)
    resumed = trainer().run(checkpoint)
    for name, tensor in whole.net.head.state_dict().items():
        torch.testing.assert_close(resumed.net.head.state_dict()[name], tensor)
    assert resumed.training["history"] == whole.training["history"]


def test_a_tenth_is_held_out_unless_the_fraction_is_zero(synthetic_cache):
    keys = synthetic_cache.keys()[:12]
    held = ProposalTrainer(synthetic_cache, keys, ProposalConfig())
    assert (len(held.val_keys), len(held.train_keys)) == (1, 11)
    none = ProposalTrainer(synthetic_cache, keys, ProposalConfig(val_fraction=0.0))
    assert none.val_keys == [] and sorted(none.train_keys) == sorted(keys)


def test_the_last_epoch_is_kept_whatever_its_held_out_recall(synthetic_cache, tmp_path):
    """Held-out recall is reported, not used to pick an epoch: the model is the weights
    that the last epoch's checkpoint holds, even where the first epoch recalled most."""
    from safetensors.torch import load_file

    class FallingRecall(ProposalTrainer):
        epochs_seen = 0

        def evaluate(self, model):
            super().evaluate(model)
            self.epochs_seen += 1
            falling = 1.25 - 0.25 * self.epochs_seen  # 1.0, 0.75, 0.5, 0.25: the first epoch is the best
            return falling, falling

    config = ProposalConfig(anchor_sizes=(32, 64), epochs=4, lr=0.05, top_n=20, pre_nms_top_n=600)
    trainer = FallingRecall(synthetic_cache, synthetic_cache.keys()[:8], config)
    trainer.prepare()
    checkpoint = tmp_path / "m.safetensors.ckpt"
    model = trainer.run(checkpoint)
    last = {k[len("net."):]: v for k, v in load_file(checkpoint).items() if k.startswith("net.")}
    assert sorted(last) == sorted(model.net.head.state_dict())
    for name, tensor in model.net.head.state_dict().items():
        assert torch.equal(tensor, last[name]), name
    history = model.training["history"]
    assert [(h["epoch"], h["recall@0.7"]) for h in history] == [(1, 1.0), (2, 0.75), (3, 0.5), (4, 0.25)]
    assert (model.training["epochs_run"], model.training["held_out_recall@0.7"], model.training["held_out_recall@0.5"]) == (4, 0.25, 0.25)


# ---------------------------------------------------------------- the command


def test_train_proposals_command(synthetic_cache, tmp_path):
    out = tmp_path / "props-model.safetensors"
    result = CliRunner().invoke(cli, ["train-proposals", "--cache", str(synthetic_cache.root), "--out", str(out), "--epochs", "2", "--top", "50"])
    assert result.exit_code == 0, result.output
    assert "Training proposals (18 anchors per cell) on 22 cached image(s) (+2 held out to report recall), on cpu" in result.output
    assert f"Wrote {out}: 2 epochs, held-out recall at 50 boxes" in result.output
    assert not checkpoint_path(out).exists()
    model = ProposalModel.load(out)
    assert model.config.top_n == 50 and model.training["epochs_run"] == 2


def test_train_proposals_on_ground_truth_without_boxes(tmp_path):
    from conftest import invoke, one_line, write_image

    data = tmp_path / "data"
    for name in ("a", "b"):
        write_image(data / "images" / f"{name}.jpg", seed=ord(name))
        (data / "annotations").mkdir(exist_ok=True)
        (data / "annotations" / f"{name}.xml").write_text(f"<annotation><filename>{name}.jpg</filename>"
                                                          "<size><width>64</width><height>48</height><depth>3</depth></size></annotation>")
    cache = tmp_path / "feats"
    built = invoke("cache", "--data", data, "--cache", cache, "--backbone", "zf5", "--weights", "random", "--scales", "96", "--no-proposals")
    assert built.exit_code == 0, built.output
    out = tmp_path / "p.safetensors"
    result = invoke("train-proposals", "--cache", cache, "--out", out, "--epochs", "1")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {cache}: the ground truth of its 2 image(s) holds no box; nothing to train on"
    assert not out.exists() and not checkpoint_path(out).exists()


def test_train_proposals_refuses_a_foreign_checkpoint(synthetic_cache, tmp_path):
    out = tmp_path / "p.safetensors"
    checkpoint_path(out).write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["train-proposals", "--cache", str(synthetic_cache.root), "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {checkpoint_path(out)}: not a readable proposal-training checkpoint")


def test_held_out_images_without_a_box_report_no_recall_rather_than_nan(tmp_path):
    from conftest import invoke, voc_xml, write_image

    from spp_cli.pipeline import id_rank

    names = ["a", "b", "c"]
    held_out = min(names, key=id_rank)  # the one image of three held out (a tenth, at least one)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    for name in names:
        write_image(data / "images" / f"{name}.jpg", seed=ord(name))
        objects = [] if name == held_out else [("cat", 8, 6, 40, 36)]
        (data / "annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", 64, 48, objects))
    cache = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--cache", cache, "--backbone", "zf5", "--weights", "random", "--scales", "96",
                  "--no-proposals").exit_code == 0
    out = tmp_path / "p.safetensors"
    result = invoke("train-proposals", "--cache", cache, "--out", out, "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "epoch 1: loss " in result.output and "nan" not in result.output
    assert f"Wrote {out}: 1 epochs, no held-out recall (1 held-out image(s), no box among them), " in result.output


def test_kept_anchor_targets_are_torchvisions_matching_and_encoding():
    net = ProposalNet(16, SMALL)
    anchors = grid_anchors(net.base_anchors, 12, 16, SETTINGS.alignment)
    gt = torch.tensor([[20.0, 30.0, 90.0, 120.0], [150.0, 10.0, 250.0, 60.0]])
    labels, matched = net.rpn.assign_targets_to_anchors([anchors], [{"boxes": gt}])
    encoded = net.box_coder.encode(matched, [anchors])[0]
    kept = net.targets(anchors, gt)
    assert torch.equal(kept.labels.float(), labels[0])
    assert torch.equal(kept.positive, torch.nonzero(labels[0] == 1).flatten()) and len(kept.positive) > 0
    assert torch.equal(kept.encoded, encoded[kept.positive])
    # With or without them the loss is the same (the anchor sampler seeded alike).
    fmap = torch.randn(16, 12, 16)
    torch.manual_seed(5)
    computed = net.loss(fmap, SETTINGS.alignment, gt)
    torch.manual_seed(5)
    given = net.loss(fmap, SETTINGS.alignment, gt, kept)
    assert all(torch.equal(a, b) for a, b in zip(computed, given))
