"""`spp train-svm`, `spp detect`, `spp eval`: the detector pipeline on small generated images.

One pipeline is built per module and shared: a dataset of red and blue
rectangles (160 x 120), its proposals, a feature cache of the training split
at one small scale, and a model trained on it. The tests then detect, evaluate
and feed each command bad input.
"""

import json
import os
import re
import time
from dataclasses import replace
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEST, TRAIN, invoke, one_line, voc_xml, write_image, write_shapes
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import spp_cli
from spp_cli import backbones
from spp_cli.cache import FeatureCache
from spp_cli.cli import cli
from spp_cli.commands.detect import STAGES, parse_speed_line, parse_wall_ms
from spp_cli.config import DetectConfig
from spp_cli.errors import ModelError
from spp_cli.model import Detector
from spp_cli.spp import DEFAULT_LEVELS

SCALE = "96"
# The shallow cut: a 6 x 8 map of the 120 x 160 toy images, and colour still
# separates the classes there (the default blocks.6 map would be 3 x 4).
BACKBONE = "efficientnet_lite0_b4"


def ground_truth(data: Path, image_id: str) -> list[tuple[str, list[float]]]:
    import xml.etree.ElementTree as ET

    tree = ET.parse(data / "annotations" / f"{image_id}.xml")
    return [
        (o.findtext("name"), [float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        for o in tree.iter("object")
    ]


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_shapes(root / "shapes")
    props = root / "props.json"
    result = invoke("propose", "--data", data, "--out", props, "--workers", "1")
    assert result.exit_code == 0, result.output
    cache = root / "feats"
    result = invoke("cache", "--data", data, "--split", "train", "--props", props, "--cache", cache, "--scales", SCALE, "--backbone", BACKBONE)
    assert result.exit_code == 0, result.output
    model = root / "model.safetensors"
    before = backbones.FORWARD_CALLS
    train = invoke("train-svm", "--cache", cache, "--out", model)
    return SimpleNamespace(data=data, props=props, cache=cache, model=model, train=train, train_forwards=backbones.FORWARD_CALLS - before)


@pytest.fixture(scope="module")
def plain_zf5_cache(tmp_path_factory):
    """A cache of one plain image (no ground truth) with another backbone: zf5, random weights."""
    root = tmp_path_factory.mktemp("zf5")
    image = write_image(root / "imgs" / "plain.jpg")
    cache = root / "zf5-feats"
    result = invoke("cache", image, "--cache", cache, "--backbone", "zf5", "--weights", "random", "--scales", SCALE)
    assert result.exit_code == 0, result.output
    return cache


# ---------------------------------------------------------------- happy path


def test_train_detect_eval(pipeline, tmp_path):
    assert pipeline.train.exit_code == 0, pipeline.train.output
    assert "Training on pool5 features of 4 cached image(s), 2 class(es): blue, red" in pipeline.train.stderr
    assert f"Wrote {pipeline.model}: 2 class(es), box regression on" in pipeline.train.stderr

    dets_path, drawn = tmp_path / "dets.json", tmp_path / "drawn"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--out", dets_path, "--save-dir", drawn)
    assert result.exit_code == 0, result.output
    doc = json.loads(dets_path.read_text())
    assert doc["format"] == "spp-detections" and doc["version"] == 1 and doc["classes"] == ["blue", "red"]
    assert [im["id"] for im in doc["images"]] == TEST
    for im in doc["images"]:
        assert im["path"] == str(pipeline.data / "images" / f"{im['id']}.jpg")
        assert (im["width"], im["height"]) == (160, 120)
        assert 0 < len(im["detections"]) <= 100
        for d in im["detections"]:
            assert d["class"] == doc["classes"][d["class_id"]]
            assert d["score"] >= -1.5  # with --data: the model's threshold, the whole ranking for eval
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
        # The detector finds both rectangles: each one is matched (IoU >= 0.5,
        # right class) by a detection shown by default (score >= the display threshold).
        for name, box in ground_truth(pipeline.data, im["id"]):
            best = max((iou(d["box"], box) for d in im["detections"] if d["class"] == name and d["score"] >= DetectConfig().display_threshold), default=0)
            assert best >= 0.5, (im["id"], name, box, im["detections"][:4])

    # COCO results beside it: the same detections as [x, y, w, h], category = class index + 1.
    coco = json.loads((tmp_path / "dets.coco.json").read_text())
    flat = [(n, d) for n, im in enumerate(doc["images"]) for d in im["detections"]]
    assert len(coco) == len(flat)
    for row, (n, d) in zip(coco, flat):
        assert set(row) == {"image_id", "category_id", "bbox", "score"}
        x1, y1, x2, y2 = d["box"]
        assert row["image_id"] == n and row["category_id"] == d["class_id"] + 1 and row["score"] == d["score"]
        np.testing.assert_allclose(row["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.011)

    for image_id in TEST:
        with Image.open(drawn / f"{image_id}.jpg") as im:
            assert im.size == (160, 120)

    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("2 image(s): ") and f"wrote {dets_path} (+ dets.coco.json), annotated images in {drawn}" in lines[-2]
    speed = re.fullmatch(
        r"Speed: ([\d.]+)ms proposals, ([\d.]+)ms conv, ([\d.]+)ms pooling, ([\d.]+)ms classify, ([\d.]+)ms nms per image "
        r"\(2 image\(s\) through the network on cpu, 0 from the cache"
        r"(?:; selective search ran ahead on a second thread: proposals is the wait for it)?\); ([\d.]+)ms per image in all",
        lines[-1],
    )
    assert speed, lines[-1]
    assert float(speed[2]) > 0  # conv computed here (proposals too: ahead of it on two cores, the wait may round to 0)
    # The benchmarks read the line through parse_speed_line.
    assert parse_speed_line(result.stderr) == dict(zip(STAGES, map(float, speed.groups())))
    assert parse_wall_ms(result.stderr) == float(speed[6]) > 0

    metrics_path = tmp_path / "metrics.json"
    result = invoke("eval", dets_path, "--data", pipeline.data, "--split", "test", "--out", metrics_path)
    assert result.exit_code == 0, result.output
    assert "VOC07 11-point AP (IoU 0.5): 2 image(s)" in result.stderr
    metrics = json.loads(metrics_path.read_text())
    assert metrics["metric"] == "voc07"
    assert set(metrics["per_class"]) == {"blue", "red"} and metrics["ground_truth"] == {"blue": 2, "red": 2}
    assert metrics["mAP"] == pytest.approx(np.mean(list(metrics["per_class"].values())), abs=1e-6)
    assert all(ap >= 0.5 for ap in metrics["per_class"].values()), metrics  # every object found above 0: AP >= 0.5

    result = invoke("eval", dets_path, "--data", pipeline.data, "--split", "test", "--metric", "coco", "--out", metrics_path)
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_path.read_text())
    assert metrics["metric"] == "coco" and {"mAP", "per_class", "AP50", "per_class_AP50"} <= set(metrics)
    assert 0 < metrics["mAP"] <= metrics["AP50"] <= 1


def test_coco_results_of_a_coco_dataset_carry_its_ids_and_score_with_pycocotools_as_spp_eval_does(pipeline, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # The shapes' test images as a COCO JSON whose ids are not 1..K: red 17, blue 4, a class the model lacks 9.
    (tmp_path / "images").symlink_to(pipeline.data / "images")
    ids = {"red": 17, "blue": 4}
    doc = {"images": [], "annotations": [], "categories": [{"id": 17, "name": "red"}, {"id": 4, "name": "blue"}, {"id": 9, "name": "green"}]}
    for n, image_id in enumerate(TEST):
        doc["images"].append({"id": 100 + n, "file_name": f"{image_id}.jpg", "width": 160, "height": 120})
        for name, (x1, y1, x2, y2) in ground_truth(pipeline.data, image_id):
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": 100 + n, "category_id": ids[name],
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    gt_path = tmp_path / "instances.json"
    gt_path.write_text(json.dumps(doc))
    dets = tmp_path / "dets.json"
    result = invoke("detect", "--data", gt_path, "--model", pipeline.model, "--cache", pipeline.cache, "--props", pipeline.props, "--out", dets)
    assert result.exit_code == 0, result.output
    assert json.loads(dets.read_text())["coco_categories"] == {"red": 17, "blue": 4, "green": 9}
    flat = [(100 + n, d) for n, im in enumerate(json.loads(dets.read_text())["images"]) for d in im["detections"]]
    coco = json.loads((tmp_path / "dets.coco.json").read_text())
    assert [(row["image_id"], row["category_id"]) for row in coco] == [(image_id, ids[d["class"]]) for image_id, d in flat]

    truth = COCO(str(gt_path))
    scored = COCOeval(truth, truth.loadRes(str(tmp_path / "dets.coco.json")), "bbox")
    scored.evaluate(), scored.accumulate(), scored.summarize()
    metrics = tmp_path / "metrics.json"
    result = invoke("eval", dets, "--data", gt_path, "--metric", "coco", "--out", metrics)
    assert result.exit_code == 0, result.output
    assert scored.stats[0] > 0.3  # the detector finds the rectangles
    # pycocotools averages over the categories with ground truth; spp eval over the model's classes with it: the same two.
    assert json.loads(metrics.read_text())["mAP"] == pytest.approx(scored.stats[0], abs=1e-4)

def test_a_model_of_dense_images_detects_twice_their_most_objects_per_image(tmp_path):
    from spp_cli.config import DetectConfig, detections_cap

    assert detections_cap(3) == detections_cap(50) == DetectConfig.max_detections == 100 and detections_cap(60) == 120
    # 64 dots in one 160 x 120 image, 2 in another: the model's cap is 128, spp detect's default.
    root = tmp_path / "dots"
    (root / "annotations").mkdir(parents=True)
    for image_id, n in (("many", 64), ("few", 2)):
        pixels = np.full((120, 160, 3), 240, np.uint8)
        boxes = [(4 + 19 * (k % 8), 4 + 14 * (k // 8), 14 + 19 * (k % 8), 14 + 14 * (k // 8)) for k in range(n)]
        for x1, y1, x2, y2 in boxes:
            pixels[y1:y2, x1:x2] = (200, 30, 30)
        write_image(root / "images" / f"{image_id}.jpg")  # the folder, then the dots over it
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg", quality=95)
        (root / "annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", 160, 120, [("dot", *b) for b in boxes]))
    props, cache, model = tmp_path / "p.json", tmp_path / "feats", tmp_path / "m.safetensors"
    assert invoke("propose", "--data", root, "--out", props, "--workers", "1").exit_code == 0
    assert invoke("cache", "--data", root, "--props", props, "--cache", cache, "--scales", SCALE, "--backbone", BACKBONE).exit_code == 0
    assert invoke("train-svm", "--cache", cache, "--out", model).exit_code == 0
    assert Detector.load(model).detect.max_detections == 128
    out = tmp_path / "dets.json"
    result = invoke("detect", root / "images" / "many.jpg", "--model", model, "--cache", cache, "--props", props, "--conf", "-9", "--out", out)
    assert result.exit_code == 0, result.output
    assert 100 < len(json.loads(out.read_text())["images"][0]["detections"]) <= 128

def test_eval_scores_a_class_the_model_never_learned_as_ap_0(pipeline, tmp_path):
    # As the VOC devkit and pycocotools do: the mAP is over the dataset's classes, not the model's.
    data = tmp_path / "shapes"
    shutil.copytree(pipeline.data, data)
    xml = data / "annotations" / f"{TEST[0]}.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>green</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
                                                            "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>"))
    dets, metrics = tmp_path / "dets.json", tmp_path / "metrics.json"
    assert invoke("detect", "--data", data, "--split", "test", "--model", pipeline.model, "--out", dets).exit_code == 0
    result = invoke("eval", dets, "--data", data, "--split", "test", "--out", metrics)
    assert result.exit_code == 0, result.output
    assert "warning: AP 0 (no such class in the detections; the split holds their boxes): green" in result.stderr
    scored = json.loads(metrics.read_text())
    assert scored["per_class"]["green"] == 0.0 and scored["ground_truth"]["green"] == 1
    assert scored["mAP"] == pytest.approx((scored["per_class"]["blue"] + scored["per_class"]["red"]) / 3, abs=1e-6)

def test_model_file_is_safetensors_with_json_metadata(pipeline):
    raw = pipeline.model.read_bytes()
    # safetensors: 8-byte little-endian header length, a JSON header, then raw
    # tensor bytes that fill the rest of the file exactly: no pickle, no zip.
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert 8 + header_len + max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__") == len(raw)

    settings = FeatureCache.open(pipeline.cache).settings
    dim = settings.channels * sum(n * n for n in DEFAULT_LEVELS)
    with safe_open(str(pipeline.model), framework="pt") as f:
        meta = json.loads(f.metadata()["spp"])
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes == {"svm_weight": (2, dim), "svm_bias": (2,), "bbox_weight": (2, dim, 4), "bbox_bias": (2, 4), "iou_weight": (2, dim), "iou_bias": (2,)}
    assert meta["format"] == "spp-detector" and meta["version"] == 1
    assert meta["classes"] == ["blue", "red"]
    assert meta["features"]["backbone"] == BACKBONE and meta["features"]["scales"] == [96]
    assert meta["features"]["weights_sha256"] == settings.weights_sha256 and meta["features"]["dtype"] == "fp16"
    assert meta["levels"] == list(DEFAULT_LEVELS)
    assert meta["feature_scale"] == pytest.approx(20 / meta["training"]["mean_feature_norm"])
    assert meta["detect"] == {"score_threshold": -1.5, "nms_iou": 0.3, "max_detections": 100, "bbox_regression": True, "display_threshold": -0.3,
                              "box_voting": True, "voting_iou": 0.5, "voting_floor": -1.5, "objectness_weight": 0.0, "iou_weight": 2.0,
                              "fc6_rank": 512}
    assert meta["training"]["images"] == 4 and meta["training"]["cache"] == str(pipeline.cache)
    detector = Detector.load(pipeline.model)
    assert detector.features == settings and detector.classes == ["blue", "red"]


# ---------------------------------------------------------------- the cache saves forward passes


def test_detect_from_cache_does_no_forward_pass_and_matches(pipeline, tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("s00\ns03\n")
    common = ["--data", pipeline.data, "--split", two, "--model", pipeline.model, "--props", pipeline.props]

    before = backbones.FORWARD_CALLS
    cached = invoke("detect", *common, "--cache", pipeline.cache, "--out", tmp_path / "cached.json")
    assert cached.exit_code == 0, cached.output
    assert backbones.FORWARD_CALLS == before
    assert re.search(r"per image \(0 image\(s\) through the network on cpu, 2 from the cache\); [\d.]+ms per image in all$",
                     cached.stderr.strip().splitlines()[-1])

    before = backbones.FORWARD_CALLS
    fresh = invoke("detect", *common, "--out", tmp_path / "fresh.json")
    assert fresh.exit_code == 0, fresh.output
    assert backbones.FORWARD_CALLS - before == 2  # one per image (one scale)

    a, b = (json.loads((tmp_path / name).read_text()) for name in ("cached.json", "fresh.json"))
    assert sum(len(im["detections"]) for im in a["images"]) > 0
    assert a == b
    assert (tmp_path / "cached.coco.json").read_text() == (tmp_path / "fresh.coco.json").read_text()


def test_box_voting_moves_boxes_not_scores_and_ignores_conf(pipeline, tmp_path):
    common = ["--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--cache", pipeline.cache, "--props", pipeline.props]

    def detections(name, *flags):
        result = invoke("detect", *common, "--out", tmp_path / f"{name}.json", *flags)
        assert result.exit_code == 0, result.output
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        return {(im["id"], d["class"], d["score"]): d["box"] for im in doc["images"] for d in im["detections"]}

    voted, plain = detections("voted"), detections("plain", "--no-vote")
    assert voted.keys() == plain.keys()  # voting keeps NMS's choice and scores
    assert any(voted[k] != plain[k] for k in voted)  # and moves boxes
    # The voters are every candidate above -1.5, whatever --conf: a stricter
    # --conf keeps a subset of the same detections with the same boxes.
    strict = detections("strict", "--conf", "0")
    assert strict and all(k[2] > 0 for k in strict) and all(voted[k] == box for k, box in strict.items())


def test_detect_classes_keeps_the_asked_classes_as_a_run_over_all_finds_them(pipeline, tmp_path):
    common = ["--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--cache", pipeline.cache, "--props", pipeline.props]

    def detections(name, *flags):
        result = invoke("detect", *common, "--out", tmp_path / f"{name}.json", *flags)
        assert result.exit_code == 0, result.output
        return {im["id"]: [(d["class"], d["score"], d["box"]) for d in im["detections"]] for im in json.loads((tmp_path / f"{name}.json").read_text())["images"]}

    every, red = detections("every"), detections("red", "--classes", " red ,red")
    assert any(c == "blue" for found in every.values() for c, _, _ in found)
    for image_id, found in red.items():
        assert found and all(c == "red" for c, _, _ in found)
        # Per-class NMS and voting: the run over all classes has the same red detections, the best
        # of them where its --max-det left room for fewer.
        theirs = [d for d in every[image_id] if d[0] == "red"]
        assert found[: len(theirs)] == theirs
    # spp eval scores the asked classes alone: red's AP as in the run over all classes, blue left out and said so.
    scored = {}
    for name in ("every", "red"):
        result = invoke("eval", tmp_path / f"{name}.json", "--data", pipeline.data, "--split", "test", "--out", tmp_path / f"{name}.metrics.json")
        assert result.exit_code == 0, result.output
        scored[name] = json.loads((tmp_path / f"{name}.metrics.json").read_text())
    assert "not evaluated (not detected: `spp detect --classes` asked for red): blue" in result.stderr
    assert scored["red"]["mAP"] == scored["every"]["per_class"]["red"] and "blue" not in scored["red"]["per_class"]
    # --max-det counts the asked classes alone; the Python API filters the same way.
    two = detections("two", "--classes", "red", "--max-det", "2")
    assert {image_id: found[:2] for image_id, found in red.items()} == two
    detector, image = spp_cli.Detector.load(pipeline.model), pipeline.data / "images" / f"{TEST[0]}.jpg"
    theirs = [d for d in detector(image, conf=-1.5) if d.class_name == "red"]
    found = detector(image, conf=-1.5, classes="red")
    assert theirs and found[: len(theirs)] == theirs and all(d.class_name == "red" for d in found)


def test_detect_classes_the_model_lacks_are_named_before_any_work(pipeline, tmp_path):
    out = tmp_path / "dets.json"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--out", out, "--classes", "red,green,cat")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {pipeline.model}: has no class 'green', 'cat' (its classes: blue, red)"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--out", out, "--classes", " , ")
    assert result.exit_code == 2
    assert one_line(result) == "Error: --classes: ' , ' names no class (give names separated by commas, e.g. person,car)"
    assert not out.exists() and not (tmp_path / "dets.json.partial").exists()
    with pytest.raises(ModelError, match=r"has no class 'green' \(its classes: blue, red\)"):
        spp_cli.Detector.load(pipeline.model)(pipeline.data / "images" / f"{TEST[0]}.jpg", classes=["green"])
    with pytest.raises(ValueError, match="classes names no class"):
        spp_cli.Detector.load(pipeline.model)(pipeline.data / "images" / f"{TEST[0]}.jpg", classes=[])

def test_train_svm_reads_only_the_cache(pipeline, tmp_path):
    assert pipeline.train_forwards == 0
    model = tmp_path / "red.safetensors"
    before = backbones.FORWARD_CALLS
    result = invoke("train-svm", "--cache", pipeline.cache, "--out", model, "--classes", "red", "--no-bbox-reg")
    assert result.exit_code == 0, result.output
    assert backbones.FORWARD_CALLS == before
    assert f"Wrote {model}: 1 class(es), box regression off" in result.stderr
    with safe_open(str(model), framework="pt") as f:
        assert sorted(f.keys()) == ["svm_bias", "svm_weight"]
        assert json.loads(f.metadata()["spp"])["classes"] == ["red"]


def test_train_svm_unknown_class(pipeline, tmp_path):
    result = invoke("train-svm", "--cache", pipeline.cache, "--out", tmp_path / "m.safetensors", "--classes", "red,cat")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {pipeline.cache}: class(es) cat not in the cache (classes: blue, red)"
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- bad input


def test_cache_of_another_backbone_is_refused(pipeline, plain_zf5_cache, tmp_path):
    image = next((plain_zf5_cache.parent / "imgs").iterdir())
    result = invoke("detect", image, "--model", pipeline.model, "--cache", plain_zf5_cache, "--out", tmp_path / "d.json")
    assert result.exit_code == 1
    message = one_line(result)
    zf5 = FeatureCache.open(plain_zf5_cache).settings.describe()
    model = FeatureCache.open(pipeline.cache).settings.describe()
    assert message == (
        f"Error: {plain_zf5_cache}: features were computed with {zf5}, but the model needs {model}; "
        "use a cache built with the model's settings"
    )
    assert "backbone zf5 (" in message and "weights random:0" in message and f"backbone {BACKBONE} (" in message
    assert not (tmp_path / "d.json").exists()


def test_train_svm_on_a_cache_without_proposals_needs_a_proposal_model(xml_dataset, tmp_path):
    cache = tmp_path / "feats"
    built = invoke("cache", "--data", xml_dataset, "--split", "train", "--cache", cache, "--backbone", "zf5", "--weights", "random",
                   "--scales", SCALE, "--no-proposals")
    assert built.exit_code == 0, built.output
    result = invoke("train-svm", "--cache", cache, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 1
    assert one_line(result) == (f"Error: {cache}: built with --no-proposals (no windows to mine negatives from); "
                                "pass --proposal-model FILE or rebuild the cache without --no-proposals")
    assert not (tmp_path / "m.safetensors").exists()


def test_train_svm_on_a_cache_without_ground_truth(plain_zf5_cache, tmp_path):
    result = invoke("train-svm", "--cache", plain_zf5_cache, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {plain_zf5_cache}: no cached image has ground truth; build the cache with --data SPEC"
    assert not (tmp_path / "m.safetensors").exists()


def test_train_svm_on_ground_truth_without_boxes(tmp_path):
    data = tmp_path / "data"
    write_image(data / "images" / "empty.jpg")
    (data / "annotations").mkdir()
    (data / "annotations" / "empty.xml").write_text("<annotation><filename>empty.jpg</filename>"
                                    "<size><width>64</width><height>48</height><depth>3</depth></size></annotation>")
    cache = tmp_path / "feats"
    built = invoke("cache", "--data", data, "--cache", cache, "--backbone", "zf5", "--weights", "random", "--scales", SCALE, "--no-proposals")
    assert built.exit_code == 0, built.output
    result = invoke("train-svm", "--cache", cache, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {cache}: the ground truth of its 1 image(s) holds no box; nothing to train on"
    assert not (tmp_path / "m.safetensors").exists()


def test_train_svm_when_every_box_is_crowd(coco_dataset, tmp_path):
    doc = json.loads(coco_dataset.read_text())
    for annotation in doc["annotations"]:
        annotation["iscrowd"] = 1  # no class keeps a positive
    coco_dataset.write_text(json.dumps(doc))
    cache = tmp_path / "feats"
    built = invoke("cache", "--data", coco_dataset, "--cache", cache, "--backbone", "zf5", "--weights", "random", "--scales", SCALE)
    assert built.exit_code == 0, built.output
    result = invoke("train-svm", "--cache", cache, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {cache}: no class has a usable ground-truth box (difficult and crowd boxes are not); nothing to train on")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_model_file(pipeline, tmp_path, damage):
    model = tmp_path / "model.safetensors"
    raw = pipeline.model.read_bytes()
    model.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else np.random.default_rng(0).bytes(4096))
    result = invoke("detect", pipeline.data / "images" / "s04.jpg", "--model", model)
    assert result.exit_code == 1
    assert re.fullmatch(rf"Error: {re.escape(str(model))}: not a readable spp model \(.+\)", one_line(result))


def test_model_file_of_another_kind_or_version(pipeline, tmp_path):
    image = pipeline.data / "images" / "s04.jpg"
    weights = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(weights))
    result = invoke("detect", image, "--model", weights)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {weights}: not an spp detector (a safetensors file without spp metadata; models come from `spp train-svm`)"

    with safe_open(str(pipeline.model), framework="pt") as f:
        meta = json.loads(f.metadata()["spp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = tmp_path / "v2.safetensors"
    save_file(tensors, str(newer), metadata={"spp": json.dumps({**meta, "version": 2})})
    result = invoke("detect", image, "--model", newer)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {newer}: model format version 2 is not supported (this spp reads version 1)"

    result = invoke("detect", image, "--model", tmp_path / "nope.safetensors")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {tmp_path / 'nope.safetensors'}: model file not found"


def test_dataset_of_other_classes(pipeline, xml_dataset, tmp_path):
    result = invoke("detect", "--data", xml_dataset, "--model", pipeline.model, "--out", tmp_path / "d.json")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {xml_dataset}: none of the dataset's classes (cat, dog) is a class of {pipeline.model} (blue, red)"
    assert not (tmp_path / "d.json").exists()

    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["blue", "red"], "images": []}))
    result = invoke("eval", dets, "--data", xml_dataset, "--out", tmp_path / "m.json")
    assert result.exit_code == 1
    assert one_line(result) == (
        f"Error: {xml_dataset}: none of the dataset's classes (cat, dog) is among the detections' classes (blue, red); "
        "was the model trained on another dataset?"
    )
    assert not (tmp_path / "m.json").exists()


def test_non_image_is_skipped_and_the_rest_written(pipeline, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(pipeline.data / "images" / "s00.jpg", folder / "good.jpg")  # cached: no forward pass
    (folder / "notes.jpg").write_text("plain text")
    out = tmp_path / "dets.json"
    before = backbones.FORWARD_CALLS
    result = invoke("detect", folder, "--model", pipeline.model, "--cache", pipeline.cache, "--out", out)
    assert result.exit_code == 1
    assert backbones.FORWARD_CALLS == before
    assert "1 input(s) skipped:" in result.stderr
    assert f"skipped {folder / 'notes.jpg'}: not an image file Pillow can read" in result.stderr
    doc = json.loads(out.read_text())
    assert [im["path"] for im in doc["images"]] == [str(folder / "good.jpg")]
    assert doc["images"][0]["detections"]


def test_missing_image_and_bad_annotation_are_listed(pipeline, tmp_path):
    # With --cache, a missing image must be reported like any unreadable one
    # (not a traceback), and images skipped for their annotations listed too.
    data = tmp_path / "shapes"
    shutil.copytree(pipeline.data, data)
    (data / "images" / "s00.jpg").unlink()
    (data / "annotations" / "s01.xml").write_text("<annotation><object><name>red</name></object></annotation>")
    out = tmp_path / "dets.json"
    result = invoke("detect", "--data", data, "--split", "train", "--model", pipeline.model, "--cache", pipeline.cache, "--props", pipeline.props, "--out", out)
    assert result.exit_code == 1
    assert "2 input(s) skipped:" in result.stderr
    assert f"skipped {data / 'annotations' / 's01.xml'}: object 1 ('red') has no <bndbox>" in result.stderr
    assert f"skipped {data / 'images' / 's00.jpg'}: no such file" in result.stderr
    assert [im["id"] for im in json.loads(out.read_text())["images"]] == ["s02", "s03"]

    result = invoke("eval", out, "--data", data, "--split", "train", "--out", tmp_path / "m.json")
    assert result.exit_code == 1
    assert f"skipped {data / 'annotations' / 's01.xml'}: object 1 ('red') has no <bndbox>" in result.stderr
    assert "VOC07 11-point AP (IoU 0.5): 3 image(s)" in result.stderr
    assert json.loads((tmp_path / "m.json").read_text())["ground_truth"] == {"blue": 3, "red": 3}


def test_eval_of_a_file_that_is_not_json(pipeline, tmp_path):
    dets = tmp_path / "dets.json"
    dets.write_text("{not json")
    result = invoke("eval", dets, "--data", pipeline.data, "--split", "test")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {dets}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"


def test_conf_must_be_a_number(pipeline):
    result = invoke("detect", pipeline.data / "images" / "s04.jpg", "--model", pipeline.model, "--conf", "abc")
    assert result.exit_code == 2
    assert "Invalid value for '--conf': 'abc' is not a valid float." in result.stderr


def test_empty_input_folder(pipeline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    result = invoke("detect", empty, "--model", pipeline.model, "--out", tmp_path / "d.json")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {empty}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)"
    assert not (tmp_path / "d.json").exists()


def test_classes_without_positives_are_left_out_of_the_model(coco_dataset, tmp_path):
    """COCO files name every category; one without usable positives gets no classifier
    (a zero weight vector would score 0 on every window and flood the detections)."""
    from spp_cli.model import Detector

    # Image "one" has a cat and a crowd dog: dogs have no usable positive; no image has a bird.
    doc = json.loads(coco_dataset.read_text())
    coco_dataset.write_text(json.dumps({**doc, "categories": [*doc["categories"], {"id": 9, "name": "bird"}]}))
    split = tmp_path / "one.txt"
    split.write_text("one\n")
    runner = CliRunner()
    props, feats, model = tmp_path / "p.json", tmp_path / "f", tmp_path / "m.safetensors"
    args = ["--data", str(coco_dataset), "--split", str(split)]
    assert runner.invoke(cli, ["propose", *args, "--out", str(props), "--workers", "1"]).exit_code == 0
    assert runner.invoke(cli, ["cache", *args, "--props", str(props), "--cache", str(feats), "--scales", "96"]).exit_code == 0
    result = runner.invoke(cli, ["train-svm", "--cache", str(feats), "--out", str(model)])
    assert result.exit_code == 0, result.output
    assert "warning: 2 classes have no usable positive in the cache; they are left out of the model: dog, bird" in result.stderr
    assert Detector.load(model).classes == ["cat"]
    result = runner.invoke(cli, ["train-svm", "--cache", str(feats), "--out", str(model), "--classes", "cat,dog"])
    assert result.exit_code == 0, result.output
    assert "warning: class dog has no usable positive in the cache; it is left out of the model" in result.stderr


def test_bit_flip_in_model_tensors_is_detected(pipeline, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(pipeline.model.read_bytes())
    raw[-7] ^= 0x04  # inside the last tensor's data, past the JSON header
    damaged.write_bytes(bytes(raw))
    image = pipeline.data / "images" / f"{TEST[0]}.jpg"
    result = CliRunner().invoke(cli, ["detect", str(image), "--model", str(damaged)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {damaged}: damaged spp model (checksum mismatch)"


SHIPPED_LEVELS = "320 channels x levels [1, 2, 3, 6]"


@pytest.mark.parametrize("change, problem", [
    ({"svm_weight": lambda t: t[:, :100]}, f"svm_weight is 100 wide, not 16000: the SVMs read pool5, {SHIPPED_LEVELS}"),
    ({"svm_weight": lambda t: t.half()}, "svm_weight is float16, not float32"),
    ({"bbox_bias": lambda t: t.double()}, "bbox_bias is float64, not float32"),
    ({"bbox_weight": lambda t: t[:, :100]}, f"bbox_weight is [1, 100, 4], not [1, 16000, 4]: the box regressors read pool5, {SHIPPED_LEVELS}"),
    ({"bbox_weight": lambda t: t[:, :, :2]}, f"bbox_weight is [1, 16000, 2], not [1, 16000, 4]: the box regressors read pool5, {SHIPPED_LEVELS}"),
    ({"bbox_bias": lambda t: t[:, :2]}, "box regressor shapes do not match the classifiers"),
    ({"iou_weight": lambda t: t[:, :100]}, f"iou_weight is [1, 100], not [1, 16000]: one row per class, reading pool5, {SHIPPED_LEVELS}"),
    ({"iou_bias": lambda t: t.repeat(2)}, "iou_bias is [2], not [1]: one value per class"),
    ({"iou_weight": lambda t: t.half()}, "iou_weight is float16, not float32"),
    ({"levels": []}, "levels [] are not a non-empty list of positive whole numbers"),
    ({"levels": [0]}, "levels [0] are not a non-empty list of positive whole numbers"),
    ({"levels": [1, 2.5]}, "levels [1, 2.5] are not a non-empty list of positive whole numbers"),
    ({"levels": "1236"}, 'levels "1236" are not a non-empty list of positive whole numbers'),
    ({"levels": [1, 2, 3]}, "bbox_weight is [1, 16000, 4], not [1, 4480, 4]: the box regressors read pool5, 320 channels x levels [1, 2, 3]"),
])
def test_a_model_that_does_not_fit_together_is_refused_on_load(tmp_path, change, problem):
    """The shipped detector re-saved with one thing changed and no digest (as a file from
    elsewhere may be): refused on load with one line, not a traceback at detection."""
    from conftest import REPO

    with safe_open(str(REPO / "weights" / "default.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["spp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del meta["digest"]
    # Localisation tensors the shipped detector may not carry: zeros of the right shapes to change.
    tensors.setdefault("iou_weight", torch.zeros_like(tensors["svm_weight"]))
    tensors.setdefault("iou_bias", torch.zeros_like(tensors["svm_bias"]))
    for key, value in change.items():
        if key in tensors:
            tensors[key] = value(tensors[key]).contiguous()
        else:
            meta[key] = value
    model = tmp_path / "m.safetensors"
    save_file(tensors, str(model), metadata={"spp": json.dumps(meta)})
    expected = f"{model}: damaged spp model ({problem})"
    result = invoke("detect", REPO / "examples" / "raccoon.jpg", "--model", model, "--out", tmp_path / "d.json")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {expected}"
    assert not (tmp_path / "d.json").exists()
    result = invoke("models", model)
    assert result.exit_code == 1
    assert f"  skipped {expected}" in result.stderr.splitlines()


# ---------------------------------------------------------------- learned proposals


def test_learned_proposals_are_read_by_every_command(pipeline, tmp_path):
    props_model = tmp_path / "props-model.safetensors"
    result = invoke("train-proposals", "--cache", pipeline.cache, "--out", props_model, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "on 3 cached image(s) (+1 held out to report recall)" in result.output

    learned = tmp_path / "learned.json"
    result = invoke("propose", "--data", pipeline.data, "--split", "test", "--method", "learned", "--model", props_model, "--out", learned)
    assert result.exit_code == 0, result.output
    assert "2 image(s) through the network on cpu, 0 from the cache" in result.output
    doc = json.loads(learned.read_text())
    assert doc["params"]["strategy"] == "learned" and doc["params"]["top"] == 300
    assert [im["id"] for im in doc["images"]] == TEST
    for im in doc["images"]:
        boxes = np.asarray(im["boxes"])
        assert 0 < len(boxes) <= 300
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()

    # From the cache: no conv pass, the same settings (the training images are cached).
    from_cache = tmp_path / "from-cache.json"
    result = invoke("propose", "--data", pipeline.data, "--split", "train", "--method", "learned", "--model", props_model,
                    "--cache", pipeline.cache, "--top", "50", "--out", from_cache)
    assert result.exit_code == 0, result.output
    assert "0 image(s) through the network on cpu, 4 from the cache" in result.output
    assert all(len(im["boxes"]) <= 50 for im in json.loads(from_cache.read_text())["images"])

    # The file is a props.json like selective search's: cache and detect read it.
    feats = tmp_path / "feats"
    result = invoke("cache", "--data", pipeline.data, "--split", "test", "--props", learned, "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE)
    assert result.exit_code == 0, result.output
    dets = tmp_path / "dets.json"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--props", learned, "--out", dets)
    assert result.exit_code == 0, result.output
    assert [im["id"] for im in json.loads(dets.read_text())["images"]] == TEST


def test_the_learned_flow_by_step_commands_runs_no_selective_search(pipeline, tmp_path):
    feats = tmp_path / "feats"
    result = invoke("cache", "--data", pipeline.data, "--split", "train", "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE,
                    "--no-proposals")
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(feats)
    assert len(cache.keys()) == len(TRAIN) and all(len(cache.read(k).proposals) == 0 for k in cache.keys())
    props_model, model = tmp_path / "props-model.safetensors", tmp_path / "model.safetensors"
    assert invoke("train-proposals", "--cache", feats, "--out", props_model, "--epochs", "2").exit_code == 0
    result = invoke("train-svm", "--cache", feats, "--proposal-model", props_model, "--out", model)
    assert result.exit_code == 0, result.output
    assert Detector.load(model).training["windows"] == "learned"

    result = invoke("cache", "--data", pipeline.data, "--cache", feats, "--props", tmp_path / "p.json", "--no-proposals")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --props gives the proposals; --no-proposals stores none: give one"


def test_learned_proposals_need_a_model_and_matching_maps(pipeline, plain_zf5_cache, tmp_path):
    result = invoke("propose", "--data", pipeline.data, "--method", "learned", "--out", tmp_path / "p.json")
    assert result.exit_code == 2
    assert one_line(result) == "Error: --method learned needs --model FILE (a proposal model from `spp train-proposals`)"
    result = invoke("propose", "--data", pipeline.data, "--method", "learned", "--model", pipeline.model, "--out", tmp_path / "p.json")
    assert result.exit_code == 1
    assert one_line(result) == (f"Error: {pipeline.model}: a detector that carries no proposal network; give a proposal model from "
                                "`spp train-proposals`, or a detector from `spp train` that proposes with one")
    props_model = tmp_path / "props-model.safetensors"
    assert invoke("train-proposals", "--cache", pipeline.cache, "--out", props_model, "--epochs", "1").exit_code == 0
    result = invoke("propose", "--data", pipeline.data, "--method", "learned", "--model", props_model, "--cache", plain_zf5_cache, "--out", tmp_path / "p.json")
    assert result.exit_code == 1
    assert one_line(result).startswith(f"Error: {plain_zf5_cache}: maps of zf5")
    assert not (tmp_path / "p.json").exists()


@pytest.fixture(scope="module")
def carrying(pipeline, tmp_path_factory):
    """A detector trained on its proposal network's windows, carrying the network."""
    root = tmp_path_factory.mktemp("carrying")
    props_model, model = root / "props-model.safetensors", root / "model.safetensors"
    assert invoke("train-proposals", "--cache", pipeline.cache, "--out", props_model, "--epochs", "2").exit_code == 0
    train = invoke("train-svm", "--cache", pipeline.cache, "--proposal-model", props_model, "--out", model)
    return SimpleNamespace(props_model=props_model, model=model, train=train)


def test_a_detector_carries_its_proposal_network_and_detect_uses_it(pipeline, carrying, tmp_path):
    assert carrying.train.exit_code == 0, carrying.train.output
    assert f"; windows: {carrying.props_model}'s top 300 boxes" in carrying.train.output
    assert "proposal network carried (trained on its boxes)" in carrying.train.output
    from spp_cli.model import Detector
    from spp_cli.rpn import ProposalModel

    detector = Detector.load(carrying.model)
    alone = ProposalModel.load(carrying.props_model)
    assert detector.proposal_model is not None and detector.training["windows"] == "learned"
    assert detector.proposal_model.config == alone.config and detector.proposal_model.features == detector.features

    dets = tmp_path / "dets.json"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", carrying.model, "--out", dets)
    assert result.exit_code == 0, result.output
    assert re.search(r"\(2 image\(s\) through the network on cpu, 0 from the cache; proposals from the model's proposal network "
                     r"\(the conv pass is shared\)\); [\d.]+ms per image in all$", result.stderr.strip().splitlines()[-1])
    # From the cache, the same maps give the same proposals: the same detections.
    cached = tmp_path / "cached.json"
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", pipeline.data, "--split", "test", "--props", pipeline.props, "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE).exit_code == 0
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", carrying.model, "--cache", feats, "--out", cached)
    assert result.exit_code == 0, result.output
    assert json.loads(cached.read_text())["images"] == json.loads(dets.read_text())["images"]
    # --proposals selective-search takes the old path (the cache's boxes), another set of windows.
    forced = tmp_path / "forced.json"
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", carrying.model, "--cache", feats, "--proposals", "selective-search", "--out", forced)
    assert result.exit_code == 0, result.output
    assert "proposal network" not in result.stderr


def test_propose_learned_takes_a_detector_that_carries_its_proposal_network(pipeline, carrying, tmp_path):
    assert carrying.train.exit_code == 0, carrying.train.output
    boxes = {}
    for name, model in (("alone", carrying.props_model), ("carried", carrying.model)):
        out = tmp_path / f"{name}.json"
        result = invoke("propose", "--data", pipeline.data, "--split", "train", "--method", "learned", "--model", model,
                        "--cache", pipeline.cache, "--out", out)
        assert result.exit_code == 0, result.output
        boxes[name] = [im["boxes"] for im in json.loads(out.read_text())["images"]]
    assert boxes["carried"] == boxes["alone"]  # the network the detector carries is the one it was trained with
    # (A detector without one is refused: test_learned_proposals_need_a_model_and_matching_maps.)


def test_learned_proposals_need_a_model_that_carries_them(pipeline, carrying, tmp_path):
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", pipeline.model, "--proposals", "learned")
    assert result.exit_code == 1
    assert one_line(result).startswith(f"Error: {pipeline.model}: carries no proposal network (--proposals learned)")
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", carrying.model, "--proposals", "learned", "--props", pipeline.props)
    assert result.exit_code == 2
    assert one_line(result) == "Error: --props gives the proposals; --proposals learned computes them: give one"
    result = invoke("train-svm", "--cache", pipeline.cache, "--windows", "learned", "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 2
    assert one_line(result) == "Error: --windows learned needs --proposal-model FILE"


def test_a_model_with_an_objectness_weight_scores_alike_from_pixels_and_from_the_cache(pipeline, carrying, tmp_path):
    from spp_cli.pipeline import set_objectness_weight

    weighted = tmp_path / "weighted.safetensors"
    shutil.copy(carrying.model, weighted)
    set_objectness_weight(weighted, 0.5)
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", pipeline.data, "--split", "test", "--props", pipeline.props, "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE).exit_code == 0
    found = {}
    for name, model, extra in (("plain", carrying.model, []), ("weighted", weighted, []), ("cached", weighted, ["--cache", feats])):
        out = tmp_path / f"{name}.json"
        result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", model, "--out", out, *extra)
        assert result.exit_code == 0, result.output
        found[name] = json.loads(out.read_text())["images"]
    assert found["weighted"] == found["cached"]  # the cached maps' proposals carry their logits too
    assert found["weighted"] != found["plain"]  # log sigmoid < 0 moves every score
    result = invoke("detect", "--data", pipeline.data, "--split", "test", "--model", weighted, "--proposals", "selective-search", "--out", tmp_path / "ss.json")
    assert result.exit_code == 0, result.output
    assert (f"warning: {weighted}: its scores add its proposal network's objectness (0.5 x log sigmoid); with other proposals they are "
            "the SVM margins alone, higher than its thresholds and probabilities expect") in " ".join(result.stderr.split())


def test_the_python_api_proposes_as_spp_detect_does(pipeline, carrying, tmp_path):
    import spp_cli
    from spp_cli.errors import ModelError

    image = pipeline.data / "images" / f"{TEST[0]}.jpg"
    detector = spp_cli.Detector.load(carrying.model)
    for proposals, extra in ((None, []), ("selective-search", ["--proposals", "selective-search"])):
        out = tmp_path / f"{proposals}.json"
        result = invoke("detect", image, "--model", carrying.model, "--conf", "-1.5", "--out", out, *extra)
        assert result.exit_code == 0, result.output
        cli_dets = json.loads(out.read_text())["images"][0]["detections"]
        api_dets = detector(image, conf=-1.5, proposals=proposals)
        assert [(list(d.box), d.class_name, d.score) for d in api_dets] == [(d["box"], d["class"], d["score"]) for d in cli_dets]
    with pytest.raises(ModelError, match="carries no proposal network"):
        spp_cli.Detector.load(pipeline.model)(image, proposals="learned")


def test_model_and_cache_settings_no_cache_can_have_are_refused(pipeline, tmp_path):
    with safe_open(str(pipeline.model), framework="pt") as f:
        meta = json.loads(f.metadata()["spp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model = tmp_path / "m.safetensors"
    save_file(tensors, str(model), metadata={"spp": json.dumps({**meta, "features": {**meta["features"], "scales": []}})})
    result = invoke("detect", pipeline.data / "images" / "s04.jpg", "--model", model)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {model}: damaged spp model (scales [] are not a list of short sides in pixels)"

    cache = tmp_path / "feats"
    shutil.copytree(pipeline.cache, cache)
    header = json.loads((cache / "cache.json").read_text())
    header["settings"]["scales"] = "96"
    (cache / "cache.json").write_text(json.dumps(header))
    result = invoke("train-svm", "--cache", cache, "--out", tmp_path / "m2.safetensors")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {cache / 'cache.json'}: damaged cache header (scales '96' are not a list of short sides in pixels)"


def test_positive_windows_against_a_loop():
    from spp_cli.train import positive_windows

    rng = np.random.default_rng(0)
    gt = np.array([[10, 10, 40, 40], [50, 20, 90, 60], [12, 12, 38, 42]], np.float32)
    corners = rng.uniform(0, 100, (20, 2))
    jittered = gt[rng.integers(0, 3, 40)] + rng.uniform(-8, 8, (40, 4))
    windows = np.concatenate([jittered, np.concatenate([corners, corners + rng.uniform(5, 40, (20, 2))], axis=1)]).astype(np.float32)
    names = np.array(["red", "blue", "red"])
    got, got_names = positive_windows(windows, gt, names, 0.5)
    expected = []
    for w in windows:
        overlaps = [iou(w.tolist(), g.tolist()) for g in gt]
        if max(overlaps) >= 0.5:
            expected.append((w.tolist(), names[int(np.argmax(overlaps))]))
    assert 3 < len(expected) < len(windows) and {n for _, n in expected} == {"red", "blue"}
    assert [(w.tolist(), n) for w, n in zip(got, got_names)] == expected
    empty, empty_names = positive_windows(windows[:0], gt, names, 0.5)
    assert empty.shape == (0, 4) and len(empty_names) == 0


def test_positive_iou_adds_the_overlapping_windows_as_positives(pipeline, tmp_path):
    from spp_cli.train import positive_windows
    from spp_cli.windows import distinct_windows

    cache = FeatureCache.open(pipeline.cache)
    expected = {"red": 0, "blue": 0}
    for key in cache.keys():
        entry = cache.read(key)
        windows = entry.proposals[distinct_windows(entry, entry.proposals, cache.settings.alignment)]
        names = np.array([entry.classes[int(label)] for label in entry.gt_labels])
        for name in [*names, *positive_windows(windows, entry.gt_boxes, names, 0.7)[1]]:
            expected[name] += 1
    model = tmp_path / "m.safetensors"
    result = invoke("train-svm", "--cache", pipeline.cache, "--out", model, "--positive-iou", "0.7")
    assert result.exit_code == 0, result.output
    fitted = {name: int(p) for name, p in re.findall(r"retrained (\w+): (\d+) positives", result.stderr)}
    assert fitted == expected and expected["red"] > 4
    assert Detector.load(model).training["svm"]["positive_iou"] == 0.7


def test_the_trained_localisation_ranks_a_box_above_a_window_half_off_it(pipeline):
    from spp_cli.windows import window_features

    detector = Detector.load(pipeline.model)
    assert detector.localisation is not None and detector.localisation.weight.shape == (2, detector.svms.weight.shape[1])
    cache = FeatureCache.open(pipeline.cache)
    gaps = []
    for key in cache.keys():
        entry = cache.read(key)
        for box, label in zip(entry.gt_boxes, entry.gt_labels):
            k = detector.classes.index(entry.classes[int(label)])
            shifted = box + np.array([0.5, 0, 0.5, 0], np.float32) * (box[2] - box[0])  # IoU 1/3 with the box
            rows = window_features(entry, np.stack([box, shifted]), detector.alignment, detector.levels)
            iou = detector.localisation.predict_all(rows, scale=detector.pool5_scale)[:, k]
            assert iou[0] > iou[1], (key, box, iou)
            gaps.append(float(iou[0] - iou[1]))
    # A ridge fit on 4 images (lambda 1000) shrinks its predictions: the gaps are 0.03-0.22 here.
    assert len(gaps) == 2 * len(TRAIN) and np.mean(gaps) > 0.1


def test_samples_per_image_holds_the_default_while_the_budget_allows_and_never_drops_below_the_floor():
    from spp_cli.train import MIN_SAMPLES_PER_IMAGE, SAMPLES_PER_IMAGE, samples_per_image

    row = 2 * 16000  # an fp16 pool5 row of blocks.6
    assert samples_per_image(2 << 30, row, 292) == SAMPLES_PER_IMAGE == 64  # bccd's trainval: as before
    assert samples_per_image(2 << 30, row, 0) == SAMPLES_PER_IMAGE
    assert samples_per_image(2 << 30, row, 2000) == (2 << 30) // (row * 2000) == 33
    assert samples_per_image(2 << 30, row, 10**6) == MIN_SAMPLES_PER_IMAGE == 8


def test_a_small_sample_budget_caps_the_regression_and_localisation_rows(pipeline, monkeypatch):
    # Budgets that leave 2 rows per image (the floor, lowered for these small images) on the shapes
    # cache: the fits see at most 2 windows per image (the localisation term: per class, and the
    # class's boxes), where the defaults take more.
    import spp_cli.train as train

    cache = FeatureCache.open(pipeline.cache)
    fitted = []

    def recording_fit(x, y, *args, **kwargs):
        fitted.append((y.shape[1], len(x)))
        return original_fit(x, y, *args, **kwargs)

    original_fit = train.fit_ridge
    monkeypatch.setattr(train, "fit_ridge", recording_fit)
    data = train.training_set(cache)

    def rows(log):
        fitted.clear()
        train.train_detector(data, log=log)
        regression = sum(n for columns, n in fitted if columns == 4)
        localisation = sum(n for columns, n in fitted if columns == 1)
        return regression, localisation

    default_lines = []
    regression, localisation = rows(default_lines.append)
    assert not any("windows per image" in line for line in default_lines)
    boxes = sum(len(cache.read(k).gt_boxes) for k in data.keys)
    cap = 2 * len(data.keys)
    assert regression > cap and localisation > 2 * cap + boxes  # 2 classes in each image

    monkeypatch.setattr(train, "REGRESSION_SAMPLE_BYTES", 1)
    monkeypatch.setattr(train, "LOCALISATION_SAMPLE_BYTES", 1)
    monkeypatch.setattr(train, "MIN_SAMPLES_PER_IMAGE", 2)
    capped_lines = []
    regression, localisation = rows(capped_lines.append)
    assert 0 < regression <= cap and 0 < localisation <= 2 * cap + boxes
    assert ("box regression: at most 2 windows per image, localisation term: 2 per image and class (of 64), "
            f"to hold the samples of {len(data.keys)} images in memory") in capped_lines


def test_each_candidate_is_scored_and_regressed_by_its_class_as_a_slow_reference_does():
    # Windows in more than one scoring chunk; every (window, class) pair kept (no threshold, no
    # suppression). Its score: the SVM's plus the default weight times its predicted IoU.
    from spp_cli.bbox_reg import BoxRegressors, IoURegressors, decode
    from spp_cli.cache import CacheSettings
    from spp_cli.model import SCORE_CHUNK
    from spp_cli.spp import PyramidPooler
    from spp_cli.svm import LinearSVMs

    rng = np.random.default_rng(4)
    spec = backbones.get_spec("efficientnet_lite0")
    settings = CacheSettings(spec.name, "random:0", spec.layer, spec.stride, spec.offset, 2, (96,), 2000, "fp16", spec.preprocess)
    svms = LinearSVMs(["dot", "blob"], rng.standard_normal((2, 2)).astype(np.float32), np.zeros(2, np.float32), 0.5)
    regressors = BoxRegressors(0.2 * rng.standard_normal((2, 2, 4)).astype(np.float32), 0.1 * rng.standard_normal((2, 4)).astype(np.float32))
    localisation = IoURegressors(rng.standard_normal((2, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32))
    detector = Detector(settings, (1,), svms, regressors, localisation)
    maps = [torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(1))]
    corners = rng.uniform(0, 1, (SCORE_CHUNK + 44, 4)) * [128, 96, 128, 96]
    proposals = np.concatenate([corners[:, :2], corners[:, :2] + 16 + corners[:, 2:]], 1).astype(np.float32)
    config = DetectConfig(score_threshold=-100.0, nms_iou=1.0, box_voting=False, max_detections=10_000)
    assert config.iou_weight == 2.0
    pooled = PyramidPooler(maps, [1.0], torch.from_numpy(proposals), detector.alignment, (1,)).vectors() * 0.5

    def expected_detections(iou_weight: float) -> dict:
        expected = {}
        for i in range(len(proposals)):
            for k in range(2):
                deltas = pooled[i] @ torch.from_numpy(regressors.weight[k]) + torch.from_numpy(regressors.bias[k])
                box = decode(torch.from_numpy(proposals[i : i + 1]), deltas[None])[0]
                box = box.clamp(min=0).minimum(torch.tensor([256.0, 192.0, 256.0, 192.0]))
                iou = float(pooled[i] @ torch.from_numpy(localisation.weight[k]) + localisation.bias[k])
                expected[(i, k)] = (box.tolist(), float(pooled[i] @ torch.from_numpy(svms.weight[k])) + iou_weight * iou)
        return expected

    for iou_weight in (2.0, 0.0):
        found = detector.detect_windows(maps, [1.0], proposals, 256, 192, config=replace(config, iou_weight=iou_weight))
        assert len(found) == 2 * len(proposals)
        expected = expected_detections(iou_weight)
        for detection in found:
            match = [key for key, (box, score) in expected.items()
                     if key[1] == detection.class_id and abs(score - detection.score) < 1e-3 and np.allclose(box, detection.box, atol=0.02)]
            assert match, detection
            del expected[match[0]]
        assert not expected


def test_the_objectness_weight_adds_its_share_of_each_windows_log_objectness_to_its_scores():
    from spp_cli.cache import CacheSettings
    from spp_cli.svm import LinearSVMs

    spec = backbones.get_spec("efficientnet_lite0")
    settings = CacheSettings(spec.name, "random:0", spec.layer, spec.stride, spec.offset, 2, (96,), 2000, "fp16", spec.preprocess)
    svms = LinearSVMs(["dot", "blob"], np.array([[1.0, 0.5], [-0.5, 1.0]], np.float32), np.zeros(2, np.float32), 1.0)
    detector = Detector(settings, (1,), svms, None)  # one bin: a window's feature is its max per channel
    maps = [torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(0))]
    proposals = np.array([[0, 0, 64, 64], [32, 0, 128, 96], [96, 64, 256, 192], [0, 96, 160, 192]], np.float32)
    logits = np.array([2.0, -1.0, 0.0, -4.0], np.float32)
    config = DetectConfig(score_threshold=-100.0, nms_iou=1.0, bbox_regression=False, box_voting=False)

    def scores(**kw) -> dict:
        found = detector.detect_windows(maps, [1.0], proposals, 256, 192, **kw)
        return {(tuple(d.box), d.class_id): d.score for d in found}

    plain = scores(config=config)
    assert len(plain) == 8  # every window, both classes: nothing suppressed or dropped
    weighted = scores(config=replace(config, objectness_weight=0.5), objectness=logits)
    for (box, class_id), score in plain.items():
        window = [tuple(float(v) for v in p) for p in proposals].index(box)
        expected = score + 0.5 * float(torch.nn.functional.logsigmoid(torch.tensor(logits[window])))
        assert weighted[(box, class_id)] == pytest.approx(expected, abs=2e-4)
    # No logits (proposals from elsewhere) or no weight: the SVM scores alone.
    assert scores(config=replace(config, objectness_weight=0.5)) == plain
    assert scores(config=config, objectness=logits) == plain


# ---------------------------------------------------------------- mining checkpoints


class _StopAtImage(Exception):
    pass


def _train_stopping(data, config, checkpoint, stop_at=None, log=None):
    """train_detector with a checkpoint written after every image; ``stop_at``: interrupt
    (as Ctrl-C does) once that many images of the mining epoch are done."""
    from spp_cli import train

    def progress(stage, done, total):
        if stage == "mining" and done == stop_at:
            raise KeyboardInterrupt

    return train.train_detector(data, svm_config=config, progress=progress, log=log or (lambda _: None),
                                checkpoint=checkpoint, checkpoint_seconds=0.0)


def _same_detector(a, b) -> None:
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.svms.weight, b.svms.weight)
    np.testing.assert_array_equal(a.svms.bias, b.svms.bias)
    np.testing.assert_array_equal(a.regressors.weight, b.regressors.weight)
    np.testing.assert_array_equal(a.regressors.bias, b.regressors.bias)
    np.testing.assert_array_equal(a.localisation.weight, b.localisation.weight)
    np.testing.assert_array_equal(a.localisation.bias, b.localisation.bias)


def test_mining_stopped_and_resumed_from_its_checkpoint_trains_the_same_svms(pipeline, tmp_path):
    # Retrains every 60 hard negatives (a class's count carried over a checkpoint decides when it
    # retrains next), so the checkpoints hold models, solver scores and the store's rows
    # renumbered; stopped after image 2, then after image 3 of 4.
    from spp_cli import train
    from spp_cli.config import SVMConfig

    data = train.training_set(FeatureCache.open(pipeline.cache))
    config = SVMConfig(retrain_every=60, positive_iou=0.7)
    whole = train.train_detector(data, svm_config=config)
    checkpoint = tmp_path / "model.safetensors.partial"
    lines = []
    for stop in (2, 3):
        with pytest.raises(KeyboardInterrupt):
            _train_stopping(data, config, checkpoint, stop_at=stop, log=lines.append)
        assert checkpoint.is_file()
    with safe_open(str(checkpoint), framework="numpy") as file:
        meta = json.loads(file.metadata()["spp"])
        assert meta["cursor"] == 2  # the stop comes after image 3's mining, before its write
        assert any(c["retrains"] for c in meta["classes"]) and "weight.0" in file.keys() and "scores.0" in file.keys()
    resumed = _train_stopping(data, config, checkpoint, log=lines.append)
    assert lines.count("resuming hard-negative mining after 1 of 4 images (" + str(checkpoint) + ")") == 1
    assert lines.count("resuming hard-negative mining after 2 of 4 images (" + str(checkpoint) + ")") == 1
    _same_detector(resumed, whole)


def test_a_checkpoint_of_other_settings_or_a_damaged_one_is_not_taken(pipeline, tmp_path):
    from spp_cli import train
    from spp_cli.config import SVMConfig

    data = train.training_set(FeatureCache.open(pipeline.cache))
    config = SVMConfig(retrain_every=20)
    checkpoint = tmp_path / "model.safetensors.partial"
    with pytest.raises(KeyboardInterrupt):
        _train_stopping(data, replace(config, C=1.0), checkpoint, stop_at=3)
    lines = []
    other = _train_stopping(data, config, checkpoint, log=lines.append)
    assert f"warning: {checkpoint}: left by a run with other settings, images or cache; hard-negative mining starts over" in lines
    _same_detector(other, train.train_detector(data, svm_config=config))

    checkpoint.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # cut short
    lines.clear()
    again = _train_stopping(data, config, checkpoint, log=lines.append)
    assert any(line.startswith(f"warning: {checkpoint}: not a readable checkpoint (") and line.endswith("); hard-negative mining starts over")
               for line in lines), lines
    _same_detector(again, other)


def test_a_checkpoint_of_a_cache_whose_entries_changed_since_is_not_taken(pipeline, tmp_path):
    # `spp cache` rewrites an entry in place (same key) when its boxes or labels change: a
    # checkpoint of the entries before would resume on mined rows of other ground truth.
    from spp_cli import train
    from spp_cli.config import SVMConfig

    feats = tmp_path / "feats"
    shutil.copytree(pipeline.cache, feats)
    cache = FeatureCache.open(feats)
    data = train.training_set(cache)
    config = SVMConfig(retrain_every=60)
    checkpoint = tmp_path / "model.safetensors.partial"
    with pytest.raises(KeyboardInterrupt):
        _train_stopping(data, config, checkpoint, stop_at=3)
    key = data.keys[0]
    entry = cache.read(key)
    entry.gt_labels = 1 - entry.gt_labels  # red <-> blue
    cache.write(entry)
    lines = []
    again = _train_stopping(data, config, checkpoint, log=lines.append)
    assert f"warning: {checkpoint}: left by a run with other settings, images or cache; hard-negative mining starts over" in lines
    _same_detector(again, train.train_detector(data, svm_config=config))


def test_a_checkpoint_that_cannot_be_written_leaves_the_training_going(pipeline, tmp_path, monkeypatch):
    from spp_cli import train
    from spp_cli.config import SVMConfig
    from spp_cli.errors import SPPError

    data = train.training_set(FeatureCache.open(pipeline.cache))
    config = SVMConfig(retrain_every=60)
    checkpoint = tmp_path / "model.safetensors.partial"

    def full_disk(path, *_, **__):
        raise SPPError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(train, "atomic_write_safetensors", full_disk)
    lines = []
    model = _train_stopping(data, config, checkpoint, log=lines.append)
    assert lines.count(f"warning: {checkpoint}: cannot write (No space left on device); training goes on without saving mining's state") == 1
    _same_detector(model, train.train_detector(data, svm_config=config))


def test_a_checkpoint_that_fails_part_way_through_leaves_nothing_of_it_in_the_run(pipeline, tmp_path):
    # Its store's rows are taken before its per-class counters are found missing: the run
    # must start over from the positives alone, as without the file. A kill's temporary
    # file of a write is removed.
    from safetensors.numpy import load_file, save_file as save_numpy

    from spp_cli import train
    from spp_cli.config import SVMConfig

    data = train.training_set(FeatureCache.open(pipeline.cache))
    config = SVMConfig(retrain_every=60)
    checkpoint = tmp_path / "model.safetensors.partial"
    with pytest.raises(KeyboardInterrupt):
        _train_stopping(data, config, checkpoint, stop_at=3)
    with safe_open(str(checkpoint), framework="numpy") as file:
        meta = json.loads(file.metadata()["spp"])
    assert len(load_file(str(checkpoint))["store"])
    save_numpy(load_file(str(checkpoint)), str(checkpoint), {"spp": json.dumps({**meta, "classes": []})})
    stale = tmp_path / ".model.safetensors.partial.x1y2z3w4.tmp"
    stale.write_bytes(b"half a write")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    lines = []
    again = _train_stopping(data, config, checkpoint, log=lines.append)
    assert any(line.startswith(f"warning: {checkpoint}: not a readable checkpoint (") for line in lines), lines
    assert not stale.exists()
    _same_detector(again, train.train_detector(data, svm_config=config))


def test_train_svm_removes_its_checkpoint_once_the_model_is_written(pipeline, tmp_path):
    out = tmp_path / "model.safetensors"
    checkpoint = tmp_path / "model.safetensors.partial"
    checkpoint.write_bytes(b"not a checkpoint")
    of_ranks = tmp_path / "model.safetensors.rank-1-of-4.partial"  # a stopped torchrun of 4 ranks
    of_ranks.write_bytes(b"mining")
    other = tmp_path / "other.safetensors.rank-1-of-4.partial"
    other.write_bytes(b"mining")
    result = invoke("train-svm", "--cache", pipeline.cache, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"warning: {checkpoint}: not a readable checkpoint (" in result.stderr
    assert out.is_file() and not checkpoint.exists() and not of_ranks.exists() and other.exists()
