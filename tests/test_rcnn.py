"""The R-CNN mode: warped-window features for training (`train-svm --mode rcnn`) and detection.

Small generated images and few windows (propose --top 20), the random-weight
backbone: R-CNN runs the network once per window, so this is what keeps it fast.
"""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TEST, TRAIN, invoke, write_image, write_shapes
from safetensors import safe_open
from safetensors.torch import save_file

from spp_cli import backbones
from spp_cli.bbox_reg import BoxRegressors
from spp_cli.cache import CacheEntry, CacheSettings, FeatureCache, image_key
from spp_cli.errors import CacheError, ModelError
from spp_cli.images import load_image
from spp_cli.model import Detector
from spp_cli.rcnn import RCNNFeaturizer, extractor_for, rcnn_features
from spp_cli.spp import output_dim
from spp_cli.svm import LinearSVMs

SCALE = "96"


@pytest.fixture(scope="module")
def extractor():
    return backbones.FeatureExtractor(backbones.get_spec("efficientnet_lite0"), backbones.RANDOM_WEIGHTS)


def _entry(path, proposals, gt=None) -> CacheEntry:
    entry = CacheEntry(image_key(path), "img", str(path), 64, 48, [], [], np.asarray(proposals, np.float32))
    if gt is not None:
        entry.gt_boxes = np.asarray(gt, np.float32)
    return entry


# ---------------------------------------------------------------- the featurizer


def test_featurizer_rows_are_rcnn_features_computed_once_per_image(extractor, tmp_path):
    image_path = write_image(tmp_path / "a.jpg", 64, 48)
    proposals = [[0, 0, 20, 20], [10, 5, 60, 40], [3.5, 2.25, 30, 47], [10, 5, 60, 40]]  # one exact duplicate
    entry = _entry(image_path, proposals, gt=[[11, 11, 30, 30]])
    seen = []
    featurizer = RCNNFeaturizer(extractor, on_image=lambda *a: seen.append(a))

    assert featurizer.distinct(entry, entry.proposals).tolist() == [0, 1, 2]
    before = backbones.FORWARD_CALLS
    first = featurizer.features(entry, entry.proposals[[2, 0]])
    assert backbones.FORWARD_CALLS - before == 1  # GT + 3 distinct proposals: one batch
    assert seen == [(1, 4)]
    gt = featurizer.features(entry, entry.gt_boxes)
    every = featurizer.features(entry, entry.proposals)
    assert backbones.FORWARD_CALLS - before == 1 and featurizer.images_computed == 1  # later requests are look-ups

    image = load_image(image_path)
    other = np.array([[5, 5, 25, 40]], np.float32)
    expected = rcnn_features(extractor, image, np.concatenate([entry.gt_boxes, entry.proposals, other]))
    assert expected.shape == (6, 320 * 50)
    # Rows are stored at the cache's precision (fp16), as SPP features are.
    expected = expected.half().float()
    assert first.dtype == torch.float32 and first.shape == (2, 320 * 50)
    torch.testing.assert_close(first, expected[[3, 1]], rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(gt, expected[:1], rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(every, expected[1:5], rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(every[1], every[3])
    # A window that is neither ground truth nor a proposal is computed on the spot.
    torch.testing.assert_close(featurizer.features(entry, other), expected[5:], rtol=2e-3, atol=1e-3)

    # Kept on disk instead: the same rows, from a memory-mapped .npy per image.
    on_disk = RCNNFeaturizer(extractor, folder=tmp_path / "rows")
    torch.testing.assert_close(on_disk.features(entry, entry.proposals), every, rtol=2e-3, atol=1e-3)
    assert (tmp_path / "rows" / f"{entry.key}.npy").is_file()


def test_featurizer_refuses_an_image_changed_since_caching(extractor, tmp_path):
    image_path = write_image(tmp_path / "a.jpg", 64, 48)
    entry = _entry(image_path, [[0, 0, 20, 20]])
    write_image(image_path, 64, 48, seed=5)
    with pytest.raises(CacheError, match=re.escape(f"{image_path}: the image changed since it was cached (sha256 differs)")):
        RCNNFeaturizer(extractor).features(entry, entry.proposals)
    image_path.unlink()
    with pytest.raises(CacheError, match=re.escape(f"{image_path}: cannot read the cached image")):
        RCNNFeaturizer(extractor).features(entry, entry.proposals)


def test_extractor_for_refuses_weights_it_cannot_rebuild():
    spec = backbones.get_spec("efficientnet_lite0")
    settings = CacheSettings(spec.name, "ab" * 32, spec.layer, spec.stride, spec.offset, spec.channels, (688,), 2000, "fp16", spec.preprocess)
    with pytest.raises(ModelError, match=r"^feats: features were computed with efficientnet_lite0 weights abababababab, not this installation's default weights"):
        extractor_for(settings, "feats")


# ---------------------------------------------------------------- the model records its mode


def _tiny_detector(mode: str) -> Detector:
    spec = backbones.get_spec("efficientnet_lite0")
    settings = CacheSettings(spec.name, "random:0", spec.layer, spec.stride, spec.offset, spec.channels, (96,), 2000, "fp16", spec.preprocess)
    width = output_dim(spec.channels, (1, 2))  # pool5 of levels 1 and 2: a model that fits together loads
    svms = LinearSVMs(["cat"], np.ones((1, width), np.float32), np.zeros(1, np.float32), 0.5)
    return Detector(settings, (1, 2), svms, BoxRegressors(np.zeros((1, width, 4), np.float32), np.zeros((1, 4), np.float32)), mode=mode)


def test_mode_is_saved_and_loaded_and_old_models_are_spp(tmp_path):
    for mode in ("spp", "rcnn"):
        _tiny_detector(mode).save(tmp_path / f"{mode}.safetensors")
        assert Detector.load(tmp_path / f"{mode}.safetensors").mode == mode

    # A model written before the field existed: no "mode" in its metadata.
    with safe_open(str(tmp_path / "spp.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["spp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta.pop("mode") == "spp"
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"spp": json.dumps(meta)})
    assert Detector.load(tmp_path / "old.safetensors").mode == "spp"

    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={"spp": json.dumps({**meta, "mode": "yolo"})})
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'odd.safetensors'}: unknown feature mode 'yolo' (this spp knows spp, rcnn)")):
        Detector.load(tmp_path / "odd.safetensors")


def test_rcnn_model_does_not_score_pooled_maps():
    with pytest.raises(ValueError, match="detect_features"):
        _tiny_detector("rcnn").detect_windows([torch.zeros(8, 4, 4)], [1.0], np.zeros((1, 4), np.float32), 64, 48)


# ---------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def rcnn_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcnn")
    data = write_shapes(root / "shapes")
    props = root / "props.json"
    result = invoke("propose", "--data", data, "--out", props, "--workers", "1", "--top", "20")
    assert result.exit_code == 0, result.output
    cache = root / "feats"
    result = invoke("cache", "--data", data, "--split", "train", "--props", props, "--cache", cache, "--scales", SCALE, "--weights", "random")
    assert result.exit_code == 0, result.output
    model = root / "rcnn.safetensors"
    before = backbones.FORWARD_CALLS
    train = invoke("train-svm", "--cache", cache, "--out", model, "--mode", "rcnn")
    return SimpleNamespace(data=data, props=props, cache=cache, model=model, train=train, train_forwards=backbones.FORWARD_CALLS - before)


def test_train_svm_rcnn_then_detect_and_eval(rcnn_pipeline, tmp_path):
    p = rcnn_pipeline
    assert p.train.exit_code == 0, p.train.output
    assert "R-CNN mode: every ground-truth box and proposal of every image is warped and run through the network" in p.train.stderr
    windows = int(re.search(r"R-CNN features \((\d+) windows through the network\)", p.train.stderr)[1])
    assert len(TRAIN) * 2 < windows <= len(TRAIN) * (20 + 2)  # GT + distinct proposals, each once
    assert p.train_forwards > 0
    detector = Detector.load(p.model)
    assert detector.mode == "rcnn" and detector.classes == ["blue", "red"]
    assert detector.features == FeatureCache.open(p.cache).settings
    assert detector.training["rcnn"] == {"windows": windows, "window_size": 224, "context_padding": 16}

    dets = tmp_path / "dets.json"
    before = backbones.FORWARD_CALLS
    result = invoke("detect", "--data", p.data, "--split", "test", "--model", p.model, "--props", p.props, "--out", dets)
    assert result.exit_code == 0, result.output
    assert backbones.FORWARD_CALLS > before
    doc = json.loads(dets.read_text())
    assert [im["id"] for im in doc["images"]] == TEST and doc["classes"] == ["blue", "red"]
    assert all(im["detections"] for im in doc["images"])
    n_props = sum(len(im["boxes"]) for im in json.loads(p.props.read_text())["images"] if im["id"] in TEST)
    speed = re.fullmatch(
        r"Speed: ([\d.]+)ms proposals, ([\d.]+)ms conv, ([\d.]+)ms pooling, ([\d.]+)ms classify, ([\d.]+)ms nms per image "
        rf"\(R-CNN: {n_props} warped window\(s\) of 2 image\(s\) through the network on cpu\); [\d.]+ms per image in all",
        result.stderr.strip().splitlines()[-1],
    )
    assert speed, result.stderr
    assert float(speed[2]) > 0 and float(speed[3]) == 0  # the network per window; no pooling of maps

    result = invoke("eval", dets, "--data", p.data, "--split", "test", "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "m.json").read_text())["per_class"]) == {"blue", "red"}


def test_rcnn_detect_with_cache_uses_its_proposals_not_its_maps(rcnn_pipeline, tmp_path):
    p = rcnn_pipeline
    one = tmp_path / "one.txt"
    one.write_text("s00\n")  # a training image: in the cache
    common = ["--data", p.data, "--split", one, "--model", p.model]
    before = backbones.FORWARD_CALLS
    cached = invoke("detect", *common, "--cache", p.cache, "--out", tmp_path / "cached.json")
    assert cached.exit_code == 0, cached.output
    assert backbones.FORWARD_CALLS > before  # the windows still go through the network
    assert f"R-CNN model: {p.cache} supplies proposals only; every window goes through the network" in cached.stderr
    last = cached.stderr.strip().splitlines()[-1]
    assert last.startswith("Speed: 0.0ms proposals") and re.search(r"through the network on cpu, proposals of 1 from the cache\); [\d.]+ms per image in all$", last)

    fresh = invoke("detect", *common, "--props", p.props, "--cache", p.cache, "--out", tmp_path / "fresh.json")
    assert fresh.exit_code == 0, fresh.output
    assert f"R-CNN model: {p.cache} is not used (proposals come from --props); every window goes through the network" in fresh.stderr
    assert re.search(r"warped window\(s\) of 1 image\(s\) through the network on cpu\); [\d.]+ms per image in all$", fresh.stderr.strip().splitlines()[-1])
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("cached.json", "fresh.json"))
    assert a == b and sum(len(im["detections"]) for im in a["images"]) > 0
