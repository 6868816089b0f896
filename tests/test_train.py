"""`spp train`: the recommended flow in one command, on the shapes dataset.

One uninterrupted run is shared by the module; the other tests check that
the test split is never read, that a run killed (SIGKILL) at a random step
and rerun ends with the same model, and the validation split's rules.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import RACCOON, SHARED_DATA, TEST, TRAIN, require_shared_data, write_image, write_shapes
from conftest import model_tensors as tensors

from spp_cli import backbones, pipeline
from spp_cli.cache import FeatureCache
from spp_cli.cli import cli
from spp_cli.errors import DatasetError, SPPError, UsageError
from spp_cli.fileio import file_stamp
from spp_cli.model import Detector
from spp_cli.data import open_dataset
from spp_cli.data.records import ImageRecord
from spp_cli.pipeline import (FeatureMap, ScalePlan, TrainPlan, choose_features, map_folder, scale_alternatives, scale_note, split_backgrounds,
                              split_for_validation)

# The pipeline tests' small setting: the stride-16 cut at one 96-pixel scale.
OPTIONS = ["--backbone", "efficientnet_lite0_b4", "--scales", "96", "--epochs", "3", "--val-fraction", "0.25"]
# The whole flow: pool5 and a fine-tuned fc7, the better on validation (the default is pool5 alone).
AUTO = ("--features", "auto")
STEPS = ["cache", "proposal network", "proposals", "SVMs on pool5", "fine-tuning", "SVMs on fc7", "final model"]

LITE0, LITE0_B4, LITE2 = "efficientnet_lite0", "efficientnet_lite0_b4", "efficientnet_lite2"


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--data", str(data), "--split", "train", "--out", str(out), *OPTIONS, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_shapes(root / "shapes")
    out = root / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, *AUTO))
    assert result.exit_code == 0, result.output
    return data, out, result.output


def test_one_command_trains_a_detector_and_says_what_it_chose(trained):
    data, out, output = trained
    detector = Detector.load(out)
    choice = detector.training["choice"]
    # 4 training images, a quarter held out: one validation image, the same on every run.
    assert choice["split"].startswith("validation: 1 of the split's 4 image(s)")
    assert set(choice["validation_mAP"]) == {"pool5", "fc7"}
    best = max(choice["validation_mAP"], key=lambda k: (choice["validation_mAP"][k], k == "pool5"))
    assert choice["features"] == best == detector.feature_kind
    # The final model is the validated candidate: fitted on the 3 other images, its tensors as validated.
    assert detector.training["images"] == len(TRAIN) - 1
    # Its SVMs at spp train's C and positives, not the step command's (SVMConfig's) defaults.
    assert (detector.training["svm"]["C"], detector.training["svm"]["positive_iou"]) == (TrainPlan.svm_c, 0.7) == (0.03, 0.7)
    candidate = tensors(out.with_name("model.work") / f"val-{choice['features']}.safetensors")
    assert candidate.keys() == tensors(out).keys()
    assert all(np.array_equal(candidate[name], tensors(out)[name]) for name in candidate)
    for n, step in enumerate(STEPS, 1):
        assert f"[{n}/{len(STEPS)}] {step}" in output
    assert f"Chose {choice['reason']}. Wrote {out}" in output
    assert choice["scales"].startswith("Scale: 96 (the smallest class's median box, ") and choice["scales"] in output
    # One validation image holds 2 shapes: too few right detections to fit probabilities on.
    assert detector.calibration is None
    assert "Probabilities: too few validation detections to fit them; scores are SVM margins, shown from -0.3" in output
    state = json.loads((out.with_name("model.work") / "train-state.json").read_text())
    assert set(state["steps"]) == set(STEPS) - {"final model"}
    # A model that proposes with its own network is validated with and without its objectness in the score.
    weights = {kind: state["steps"][f"SVMs on {kind}"]["objectness_weight"] for kind in ("pool5", "fc7")}
    if detector.proposal_model is not None:
        assert set(weights.values()) <= {0.0, 0.5}
        assert re.search(r"validation mAP \(pool5\): [0-9.]+ on 1 image\(s\); with 0.5 x log objectness [0-9.]+, (not )?kept\n", output)
    else:
        assert weights == {"pool5": 0.0, "fc7": 0.0} and "log objectness" not in output
    assert detector.detect.objectness_weight == weights[choice["features"]]
    # The trained model finds the shapes of the held-out test split.
    dets = out.with_name("dets.json")
    runner = CliRunner()
    assert runner.invoke(cli, ["detect", "--data", str(data), "--split", "test", "--model", str(out), "--out", str(dets)]).exit_code == 0
    result = runner.invoke(cli, ["eval", str(dets), "--data", str(data), "--split", "test", "--out", str(out.with_name("m.json"))])
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_name("m.json").read_text())["mAP"] > 0.5


def test_a_finished_run_run_again_does_no_step_twice(trained, tmp_path):
    data, out, _ = trained
    # A state file from an spp that did not calibrate: the validation part is scored again, nothing retrained.
    state_path = out.with_name("model.work") / "train-state.json"
    state = json.loads(state_path.read_text())
    for step in ("SVMs on pool5", "SVMs on fc7"):
        del state["steps"][step]["calibration"]
    state_path.write_text(json.dumps(state))
    again = CliRunner().invoke(cli, train_args(data, out, *AUTO))
    assert again.exit_code == 0, again.output
    assert all("calibration" in json.loads(state_path.read_text())["steps"][step] for step in ("SVMs on pool5", "SVMs on fc7"))
    assert "Wrote " not in again.output.replace(f"Wrote {out}", "")  # no step command ran its summary
    assert "Fine-tuning fc6/fc7" not in again.output
    assert "Training on" not in again.output  # no SVM is trained again: the model is the validated candidate
    # The steps' times are the first run's; this run says its own.
    assert re.search(r"; \d+ s in all \(this run \d+ s\)$", again.output.strip().splitlines()[-1]), again.output


def test_refit_trains_the_chosen_kind_again_on_the_whole_split(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--features", "pool5", "--refit"))
    assert result.exit_code == 0, result.output
    assert "Training on pool5 features of 4 cached image(s)" in result.output
    assert "(trained again on the whole split)" in result.output
    assert Detector.load(out).training["images"] == len(TRAIN)
    # The refitted model keeps the objectness weight validation chose for its kind.
    state = json.loads((tmp_path / "model.work" / "train-state.json").read_text())
    assert Detector.load(out).detect.objectness_weight == state["steps"]["SVMs on pool5"]["objectness_weight"]


def test_train_never_reads_the_test_split(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    # Any read of a test image or annotation would now be an error or a warning.
    for image_id in TEST:
        (data / "images" / f"{image_id}.jpg").write_bytes(b"not an image")
        (data / "annotations" / f"{image_id}.xml").write_text("<annotation><object>")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out))
    assert result.exit_code == 0, result.output
    for image_id in TEST:
        assert image_id not in result.output
    # The default flow: SVMs on pool5, no fine-tuning.
    assert "[4/5] SVMs on pool5" in result.output and "fine-tuning" not in result.output
    assert "Chose pool5 (validation mAP " in result.output
    assert not (tmp_path / "model.work" / "head.safetensors").exists()
    cache = FeatureCache.open(tmp_path / "model.work" / "feats")
    assert sorted(cache.metadata(k)["image_id"] for k in cache.keys()) == sorted(TRAIN)


def test_each_alternative_scale_is_trained_and_the_better_one_kept(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--scales", "96/128"))
    assert result.exit_code == 0, result.output
    steps = [f"{name} at {scales}" for scales in ("96", "128") for name in ("cache", "proposal network", "proposals", "SVMs on pool5")]
    for n, name in enumerate(steps + ["final model"], 1):
        assert f"[{n}/9] {name}" in result.output
    detector = Detector.load(out)
    choice = detector.training["choice"]
    scores = choice["validation_mAP"]
    assert set(scores) == {"pool5 at 96", "pool5 at 128"}
    best = "128" if scores["pool5 at 128"] > scores["pool5 at 96"] else "96"  # the first on a tie
    assert detector.features.scales == (int(best),)
    assert "Scale: 96 and 128, the one of higher validation mAP (the smallest class's median box, blue, is 42 px at 96: 2.6 cells of the stride-16 map)\n" in result.output
    assert choice["scales"] == (f"Scale: {best} (validation mAP 96: {scores['pool5 at 96']:.3f}, 128: {scores['pool5 at 128']:.3f}; "
                                "the smallest class's median box, blue, is 42 px at 96: 2.6 cells of the stride-16 map)")
    assert choice["scales"] in result.output
    # The model is the chosen scale's validated candidate; the other scale's files are in a folder of their own.
    work = tmp_path / "model.work"
    candidate = tensors(work / ("scale-128" if best == "128" else ".") / "val-pool5.safetensors")
    assert all(np.array_equal(candidate[name], tensors(out)[name]) for name in candidate)
    assert FeatureCache.open(work / "feats").settings.scales == (96,)
    assert FeatureCache.open(work / "scale-128" / "feats").settings.scales == (128,)


def test_auto_fine_tunes_the_head_on_the_chosen_map_only(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--scales", "96/128", *AUTO))
    assert result.exit_code == 0, result.output
    detector = Detector.load(out)
    choice = detector.training["choice"]
    scores = choice["validation_mAP"]
    best = "128" if scores["pool5 at 128"] > scores["pool5 at 96"] else "96"  # by pool5; the first on a tie
    other = "96" if best == "128" else "128"
    assert set(scores) == {"pool5 at 96", "pool5 at 128", f"fc7 at {best}"}
    steps = [f"{name} at {scales}" for scales in ("96", "128") for name in ("cache", "proposal network", "proposals", "SVMs on pool5")]
    for n, name in enumerate([*steps, f"fine-tuning at {best}", f"SVMs on fc7 at {best}", "final model"], 1):
        assert f"[{n}/11] {name}" in result.output
    assert f"fine-tuning at {other}" not in result.output
    work = tmp_path / "model.work"
    folder = {"96": work, "128": work / "scale-128"}
    assert (folder[best] / "head.safetensors").exists() and not (folder[other] / "head.safetensors").exists()
    assert detector.features.scales == (int(best),)
    assert choice["features"] == max(("pool5", "fc7"), key=lambda kind: (scores[f"{kind} at {best}"], kind == "pool5"))
    candidate = tensors(folder[best] / f"val-{choice['features']}.safetensors")
    assert all(np.array_equal(candidate[name], tensors(out)[name]) for name in candidate)


def test_where_objects_are_small_auto_also_trains_on_the_finer_cut(tmp_path, monkeypatch):
    # At the real base scale (688) this path needs a dataset of small objects and minutes; the
    # shapes at a base of 128 pixels, with every object counted as small, take it in seconds.
    monkeypatch.setattr(pipeline, "BASE_SCALE", 128)
    monkeypatch.setattr(pipeline, "SMALL_OBJECT_CELLS", 100.0)
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    before = backbones.FORWARD_CALLS
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--split", "train", "--out", str(out),
                                      "--epochs", "3", "--val-fraction", "0.25"])  # the default backbone and --scales auto
    assert result.exit_code == 0, result.output
    # One pass per image for both caches: the finer cut's maps are taken from the first cache's passes.
    assert backbones.FORWARD_CALLS - before == len(FeatureCache.open(tmp_path / "model.work" / "feats").keys())
    finer = "128 on efficientnet_lite0_b4"
    steps = [f"{name} at {label}" for label in ("128", finer) for name in ("cache", "proposal network", "proposals", "SVMs on pool5")]
    for n, name in enumerate(steps + ["final model"], 1):
        assert f"[{n}/9] {name}" in result.output
    assert "Scale: 128 on efficientnet_lite0 and on its stride-16 cut efficientnet_lite0_b4, the one of higher validation mAP" in result.output
    work = tmp_path / "model.work"
    assert FeatureCache.open(work / "feats").settings.backbone == LITE0
    finer_cache = FeatureCache.open(work / "efficientnet_lite0_b4-scale-128" / "feats").settings
    assert (finer_cache.backbone, finer_cache.scales) == (LITE0_B4, (128,))
    detector = Detector.load(out)
    scores = detector.training["choice"]["validation_mAP"]
    best = LITE0_B4 if scores[f"pool5 at {finer}"] > scores["pool5 at 128"] else LITE0  # the first on a tie
    assert detector.features.backbone == best
    candidate = tensors(work / ("efficientnet_lite0_b4-scale-128" if best == LITE0_B4 else ".") / "val-pool5.safetensors")
    assert all(np.array_equal(candidate[name], tensors(out)[name]) for name in candidate)


def test_killed_at_a_random_step_and_rerun_gives_the_same_model(trained, tmp_path):
    data, uninterrupted, _ = trained
    out = tmp_path / "model.safetensors"
    step = random.choice(STEPS)
    delay = random.uniform(0.0, 1.0)
    argv = [sys.executable, "-m", "spp_cli", *train_args(data, out, *AUTO)]
    env = {**os.environ, "COLUMNS": "200"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    banner = f"] {step}"
    seen = []
    for line in process.stdout:
        seen.append(line)
        if banner in line:
            break
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert rerun.returncode == 0, f"killed in '{step}' after {delay:.2f} s:\n{''.join(seen)}\n{rerun.stdout}\n{rerun.stderr}"
    one, two = tensors(uninterrupted), tensors(out)
    assert one.keys() == two.keys()
    for name in one:
        assert np.array_equal(one[name], two[name]), f"killed in '{step}' after {delay:.2f} s: {name} differs"


def test_a_split_whose_contents_changed_is_trained_again_not_resumed(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    fast = ("--features", "pool5", "--proposals", "learned")
    first = CliRunner().invoke(cli, train_args(data, out, *fast))
    assert first.exit_code == 0, first.output
    assert Detector.load(out).training["images"] == len(split_for_validation(TRAIN, None, 0.25).fit_ids)
    # The same command on a split of two more images: its state is set aside, not resumed (same paths, other contents).
    (data / "train.txt").write_text("\n".join(TRAIN + TEST) + "\n")
    again = CliRunner().invoke(cli, train_args(data, out, *fast))
    assert again.exit_code == 0, again.output
    assert Detector.load(out).training["images"] == len(split_for_validation(TRAIN + TEST, None, 0.25).fit_ids)
    assert "left by a run on other contents of the data" in again.output
    assert "[2/4] proposal network" in again.output and "Training on pool5 features" in again.output
    # What the state records: the same on an unchanged split, other after a ground-truth edit (same ids and images).
    state = json.loads((tmp_path / "model.work" / "train-state.json").read_text())
    assert state["plan"]["contents"] == pipeline.contents_fingerprint(open_dataset(str(data), "train"))
    assert state["plan"]["contents"]["images"] == len(TRAIN + TEST)
    xml = data / "annotations" / f"{TRAIN[0]}.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    assert state["plan"]["contents"] != pipeline.contents_fingerprint(open_dataset(str(data), "train"))


def test_a_run_interrupted_in_a_step_then_run_with_other_settings_starts_afresh(tmp_path, monkeypatch):
    from spp_cli import finetune

    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    fast = ("--features", "pool5", "--proposals", "learned")
    write = finetune.write_checkpoint

    def write_then_interrupt(*args, **kwargs):  # Ctrl-C once the proposal network's first epoch is saved
        write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "write_checkpoint", write_then_interrupt)
    interrupted = CliRunner().invoke(cli, train_args(data, out, *fast))
    assert interrupted.exit_code == 130, interrupted.output
    checkpoint = tmp_path / "model.work" / "proposals.safetensors.ckpt"
    assert checkpoint.is_file() and "[2/4] proposal network" in interrupted.output
    monkeypatch.setattr(finetune, "write_checkpoint", write)
    # Another validation fraction: other images for the network, so the old checkpoint goes with the old state.
    again = CliRunner().invoke(cli, train_args(data, out, *fast, "--val-fraction", "0.5"))
    assert again.exit_code == 0, again.output
    assert "left by a run with other settings" in again.output and f"{checkpoint}: a checkpoint of that run; deleted" in again.output
    assert not checkpoint.exists() and "Resuming from" not in again.output
    assert Detector.load(out).training["images"] == len(split_for_validation(TRAIN, None, 0.5).fit_ids)
    assert FeatureCache.open(tmp_path / "model.work" / "feats").keys()  # the cache is kept


def test_validation_part_is_stable_and_never_empty():
    ids = [f"img{k:03d}" for k in range(40)]
    split = split_for_validation(ids, None, 0.1)
    assert len(split.val_ids) == 4 and len(split.fit_ids) == 36
    assert split_for_validation(list(reversed(ids)), None, 0.1).val_ids == sorted(split.val_ids, key=ids[::-1].index)
    assert len(split_for_validation(ids[:3], None, 0.1).val_ids) == 1
    named = split_for_validation(ids[:30], ids[30:], 0.1)
    assert named.fit_ids == ids[:30] and named.val_ids == ids[30:]
    with pytest.raises(DatasetError, match="at least 2 are needed"):
        split_for_validation(ids[:1], None, 0.1)


def test_choice_prefers_pool5_on_a_tie():
    assert choose_features({"pool5": 0.5, "fc7": 0.5})[0] == "pool5"
    assert choose_features({"pool5": 0.5, "fc7": 0.6}) == ("fc7", "fc7 (validation mAP 0.600) over pool5 (0.500)")
    assert choose_features({"pool5": 0.7})[0] == "pool5"


def scale_records(small_boxes: int, small_side: float, crowd: bool = False) -> list[ImageRecord]:
    """480 x 640 images: one with ``small_boxes`` class-0 squares of ``small_side`` px, one with big class-1 boxes."""
    small = np.array([[10 + 60 * i, 10, 10 + 60 * i + small_side, 10 + small_side] for i in range(small_boxes)], np.float32)
    big = np.array([[0, 0, 300, 300], [100, 100, 420, 400], [200, 50, 600, 470]], np.float32)
    return [ImageRecord("a", Path("a.jpg"), 640, 480, small, np.zeros(small_boxes, np.int64), np.zeros(small_boxes, bool),
                        np.full(small_boxes, crowd)),
            ImageRecord("b", Path("b.jpg"), 640, 480, big, np.ones(3, np.int64), np.zeros(3, bool), np.zeros(3, bool))]


def test_the_scale_line_says_how_small_the_smallest_class_is():
    # 40 px boxes in a 480-px-short image are 57 px at 688: 1.8 cells at stride 32, 3.6 at stride 16.
    hint = "; small objects may be found better on the stride-16 cut, --backbone efficientnet_lite0_b4 (--scales auto tries it where they are this small)"
    size = "Scale: 688 (the smallest class's median box, dot, is 57 px: {} cells of the stride-{} map)"
    assert scale_note(scale_records(3, 40), ["dot", "blob"], (688,), LITE0) == size.format(1.8, 32) + hint
    assert scale_note(scale_records(3, 40), ["dot", "blob"], (688,), LITE0_B4) == size.format(3.6, 16)
    # A stride-32 backbone without a finer cut points to the larger scale.
    assert scale_note(scale_records(3, 40), ["dot", "blob"], (688,), LITE2) == (
        size.format(1.8, 32) + "; small objects may be found better at --scales 1024 (--scales auto tries it where they are this small)")
    assert scale_note(scale_records(3, 48), ["dot", "blob"], (688,), LITE0).endswith("69 px: 2.2 cells of the stride-32 map)")
    assert scale_note(scale_records(3, 40), ["dot", "blob"], (480, 1024), LITE0).startswith("Scale: 480,1024 (the smallest class's median box, dot, is 85 px: 2.7 cells")
    # Already at the larger scale, a backbone without a finer cut has nothing to point to.
    assert scale_note(scale_records(3, 20), ["dot", "blob"], (1024,), LITE2) == "Scale: 1024 (the smallest class's median box, dot, is 43 px: 1.3 cells of the stride-32 map)"
    assert scale_note(scale_records(3, 20), ["dot", "blob"], (1024,), LITE0).endswith(hint)
    assert "dot" not in scale_note(scale_records(2, 40), ["dot", "blob"], (688,), LITE0)  # too few boxes for a median
    assert "dot" not in scale_note(scale_records(3, 40, crowd=True), ["dot", "blob"], (688,), LITE0)  # crowd boxes do not count
    assert scale_note([], ["dot"], (688,), LITE0) == "Scale: 688"


def test_the_scale_line_on_the_shared_datasets():
    require_shared_data()
    raccoon = open_dataset(str(RACCOON), "train")
    bccd = open_dataset(str(SHARED_DATA / "bccd"), "trainval")
    assert not scale_note(raccoon.records, raccoon.classes, (688,), LITE0).endswith("this small)")
    assert scale_note(bccd.records, bccd.classes, (688,), LITE0).startswith("Scale: 688 (the smallest class's median box, Platelets, is 58 px: 1.8 cells")
    assert scale_note(bccd.records, bccd.classes, (688,), LITE0).endswith("this small)")
    # The default, --scales auto: raccoon at 688 alone, bccd at 688 on the default cut and on its stride-16 cut.
    assert scale_alternatives("auto", raccoon.records, raccoon.classes, LITE0) == ScalePlan(
        [FeatureMap("688", LITE0, "688")], scale_note(raccoon.records, raccoon.classes, (688,), LITE0))
    bccd_plan = scale_alternatives("auto", bccd.records, bccd.classes, LITE0)
    assert bccd_plan.alternatives == [FeatureMap("688", LITE0, "688"), FeatureMap("688", LITE0_B4, "688 on efficientnet_lite0_b4")]
    assert bccd_plan.line == ("Scale: 688 on efficientnet_lite0 and on its stride-16 cut efficientnet_lite0_b4, the one of higher validation mAP "
                              "(the smallest class's median box, Platelets, is 58 px at 688: 1.8 cells of the stride-32 map, under 2)")
    assert bccd_plan.chosen({"688": 0.7, "688 on efficientnet_lite0_b4": 0.8}, "688 on efficientnet_lite0_b4") == (
        "Scale: 688 on efficientnet_lite0_b4 (validation mAP 688: 0.700, 688 on efficientnet_lite0_b4: 0.800; the smallest class's "
        "median box, Platelets, is 58 px at 688: 1.8 cells of the stride-32 map)")


def test_scale_alternatives():
    records, names = scale_records(3, 40), ["dot", "blob"]  # dot: 57 px at 688
    def on(scales: str, backbone: str = LITE0) -> FeatureMap:
        return FeatureMap(scales, backbone, scales)

    assert scale_alternatives("auto", records, names, LITE0).alternatives == [on("688"), FeatureMap("688", LITE0_B4, "688 on efficientnet_lite0_b4")]  # 1.8 cells
    assert scale_alternatives("auto", records, names, LITE2).alternatives == [on("688", LITE2), on("1024", LITE2)]  # no finer cut: a larger scale
    assert scale_alternatives("auto", records, names, LITE0_B4) == ScalePlan([on("688", LITE0_B4)], scale_note(records, names, (688,), LITE0_B4))  # 3.6 cells
    assert scale_alternatives("auto", [], names, LITE0) == ScalePlan([on("688")], "Scale: 688")
    assert scale_alternatives("688", records, names, LITE0) == ScalePlan([on("688")], scale_note(records, names, (688,), LITE0))
    assert scale_alternatives("688", records, names, LITE0).chosen({"688": 0.5}, "688") == scale_note(records, names, (688,), LITE0)
    two = scale_alternatives("1024/ 480,688", records, names, LITE0)
    assert two.alternatives == [on("1024"), on("480,688")]
    assert two.line == ("Scale: 1024 and 480,688, the one of higher validation mAP (the smallest class's median box, dot, is 85 px at 1024: "
                        "2.7 cells of the stride-32 map)")
    assert scale_alternatives("96/128", [], names, LITE0).chosen({"96": 0.25, "128": 0.5}, "128") == "Scale: 128 (validation mAP 96: 0.250, 128: 0.500)"
    with pytest.raises(UsageError, match="^--scales 688/688: each alternative must differ from the others$"):
        scale_alternatives("688/688", records, names, LITE0)
    with pytest.raises(SPPError, match="^--scales: 'big' is not a comma-separated list of pixel sizes"):
        scale_alternatives("688/big", records, names, LITE0)


def test_map_folder():
    assert map_folder(FeatureMap("1024", LITE0, "1024"), LITE0) == "scale-1024"
    assert map_folder(FeatureMap("480,688", LITE0, "480,688"), LITE0) == "scale-480-688"
    assert map_folder(FeatureMap("688", LITE0_B4, "688 on efficientnet_lite0_b4"), LITE0) == "efficientnet_lite0_b4-scale-688"


def test_under_torchrun_it_says_to_run_the_steps(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors")],
                                env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert result.exit_code == 2
    assert result.output == ("Error: spp train runs as one process; under torchrun run its steps (propose, cache, finetune, "
                             "train-svm) as in docs/scale-out.md\n")


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "resnet"], "Error: unknown backbone 'resnet' (valid: efficientnet_lite0, efficientnet_lite0_b4, efficientnet_lite0_b46, "
                               "efficientnet_lite1, efficientnet_lite2, alexnet, vgg16, zf5)"),
    (["--scales", "big"], "Error: --scales: 'big' is not a comma-separated list of pixel sizes (e.g. 688 or 480,576,688,864,1200)"),
    (["--val-split", "val", "--val-fraction", "0.2"], "Error: --val-split names the validation images; --val-fraction draws them from --split: give one"),
])
def test_a_bad_option_value_is_a_usage_error_before_any_step(tmp_path, extra, message):
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--split", "train", "--out", str(out), *extra])
    assert result.exit_code == 2  # as click's own usage errors
    assert result.output == message + "\n"
    assert not out.exists() and not (tmp_path / "m.work").exists()


def test_a_work_folder_that_cannot_be_created_is_one_line(tmp_path, xml_dataset):
    # A regular file in the way: no folder can be made there, root or not (a mode would not stop root).
    (tmp_path / "m.work").write_text("not a folder")  # where --out m.safetensors puts its work folder
    out = tmp_path / "m.safetensors"
    for extra, work, reason in (([], tmp_path / "m.work", "File exists"),
                                (["--work", str(tmp_path / "m.work" / "w")], tmp_path / "m.work" / "w", "Not a directory")):
        result = CliRunner().invoke(cli, ["train", "--data", str(xml_dataset), "--out", str(out), *extra])
        assert result.exit_code == 1
        assert result.output == f"Error: {work}: cannot create work folder ({reason})\n"
    assert (tmp_path / "m.work").read_text() == "not a folder" and not out.exists()


def test_a_dataset_without_boxes_is_refused_before_any_step(tmp_path):
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    for name in ("a", "b"):
        write_image(data / "images" / f"{name}.jpg", seed=len(name))
        (data / "annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size></annotation>")
    (data / "train.txt").write_text("a\nb\n")
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output == f"Error: {data}: the 2 image(s) of split 'train' hold no ground-truth box; nothing to train on\n"
    assert not out.exists() and not (tmp_path / "m.work").exists()  # no empty work folder left either


def test_a_skipped_input_is_named_at_its_step_and_again_beside_the_exit_code(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    (data / "annotations" / "broken.xml").write_text("<annotation><object>")
    write_image(data / "images" / "broken.jpg", seed=5)
    (data / "train.txt").write_text((data / "train.txt").read_text() + "broken\n")
    # A box beyond its image: clipped, with a warning said once, not again at each step.
    first = data / "annotations" / f"{TRAIN[0]}.xml"
    first.write_text(first.read_text().replace("</annotation>", "<object><name>red</name><bndbox><xmin>150</xmin><ymin>100</ymin>"
                                                                "<xmax>170</xmax><ymax>119</ymax></bndbox></object></annotation>"))
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--features", "pool5"))
    assert result.exit_code == 1, result.output
    assert f"skipped {data / 'annotations' / 'broken.xml'}: " in result.output
    assert result.output.count(f"warning: {first}: box") == 1, result.output
    # Where selective search is chosen, its step skips the input too (and the cache still takes the others' boxes).
    closing = re.search(r"\nwarning: input\(s\) were skipped at step\(s\) cache(, proposals)? \(listed there\) and the model "
                        r"trained without them; exit code 1\n$", result.output)
    assert closing and Detector.load(out).training["images"] == len(TRAIN) - 1
    # Run again, every step done: nothing is listed this time, and the closing line still says why the code is 1.
    again = CliRunner().invoke(cli, train_args(data, out, "--features", "pool5"))
    assert again.exit_code == 1 and again.output.endswith(closing.group(0)) and "input(s) skipped:" not in again.output


def test_background_images_join_the_svms_as_negatives(tmp_path):
    from PIL import Image

    data = write_shapes(tmp_path / "shapes")
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(backgrounds / "grey.jpg")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--features", "pool5", "--negatives", str(backgrounds)))
    assert result.exit_code == 0, result.output
    assert "3 cached image(s) and 1 background image(s)" in result.output  # the fit part; one image is not split
    assert Detector.load(out).training["background_images"] == 1


def test_part_of_the_background_images_is_held_out_for_validation(tmp_path):
    from PIL import Image

    data = write_shapes(tmp_path / "shapes")
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    for k in range(10):
        Image.fromarray(np.full((120, 160, 3), 20 * k, np.uint8)).save(backgrounds / f"plain{k}.png")
    fit, held = split_backgrounds(sorted(backgrounds.iterdir()), 0.1)
    assert len(held) == 1 and len(fit) == 9 and held[0] not in fit
    assert split_backgrounds(sorted(backgrounds.iterdir(), reverse=True), 0.1)[1] == held  # by content, not by order
    assert split_backgrounds([held[0]], 0.1) == ([held[0]], [])
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--features", "pool5", "--negatives", str(backgrounds)))  # --val-fraction 0.25
    assert result.exit_code == 0, result.output
    assert "3 cached image(s) and 8 background image(s)" in result.output
    assert "on 1 image(s) and 2 background image(s)" in result.output
    training = Detector.load(out).training
    assert training["background_images"] == 8
    assert training["choice"]["split"].endswith(", with 2 of the 10 background image(s)")


def test_the_proposal_choice_is_made_on_validation_and_recorded(trained):
    _, out, output = trained
    choice = Detector.load(out).training["choice"]["proposals"]
    assert choice["choice"] in ("learned", "selective-search")
    learned, searched = choice["learned_recall@0.5"], choice["selective_search_recall@0.5"]
    assert (choice["choice"] == "learned") == (learned >= searched)
    assert f"Proposals: {choice['choice']} (validation recall@0.5: learned {learned:.3f} at 300 boxes, selective search {searched:.3f} at " in output
    assert (Detector.load(out).proposal_model is not None) == (choice["choice"] == "learned")


def test_the_choice_searches_the_validation_images_as_a_serial_run_does(trained):
    from spp_cli.commands.propose import make_params
    from spp_cli.images import load_image
    from spp_cli.proposals import ProposalParams, propose

    # The search of every image takes these boxes as its own: it runs with the same settings.
    assert make_params("fast", None, None, None, None) == ProposalParams()
    data, out, _ = trained
    work = out.with_name("model.work")
    dataset = open_dataset(str(data), "train")
    val_records = [(r, dataset.classes) for r in dataset.records]  # all 4 cached images: more than one task, so worker processes
    searched: dict = {}
    pipeline.choose_proposals(FeatureCache.open(work / "feats"), work / "proposals.safetensors", val_records, searched)
    assert set(searched) == {str(r.path) for r, _ in val_records}
    for record, _ in val_records:  # worker processes, one per core, give the boxes one process gives
        np.testing.assert_array_equal(searched[str(record.path)].boxes, propose(load_image(record.path), ProposalParams()))
        assert searched[str(record.path)].file == file_stamp(record.path)  # what props.json records of them


def test_the_learned_flow_runs_no_selective_search_and_detect_can_still(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, train_args(data, out, "--proposals", "learned"))
    assert result.exit_code == 0, result.output
    assert "[2/4] proposal network" in result.output and "[3/4] SVMs on pool5" in result.output
    work = out.with_name("model.work")
    assert not (work / "props.json").exists()
    cache = FeatureCache.open(work / "feats")
    assert all(len(cache.read(k).proposals) == 0 for k in cache.keys())
    detector = Detector.load(out)
    assert detector.proposal_model is not None and detector.training["windows"] == "learned"
    # Forced back to selective search on that cache: its boxes are computed from the images.
    dets = tmp_path / "d.json"
    result = CliRunner().invoke(cli, ["detect", "--data", str(data), "--split", "train", "--model", str(out), "--cache", str(work / "feats"),
                                      "--proposals", "selective-search", "--out", str(dets)])
    assert result.exit_code == 0, result.output
    speed = result.output.strip().splitlines()[-1]
    assert "0 image(s) through the network on cpu, 4 from the cache" in speed and "proposal network" not in speed
    assert float(speed.split("Speed: ")[1].split("ms proposals")[0]) > 0
    assert all(image["detections"] for image in json.loads(dets.read_text())["images"])


@pytest.mark.parametrize("content", [b'{"format": "spp-train-st', b"[1, 2]", b'{"format": "spp-cache"}'])
def test_a_state_file_that_cannot_be_read_is_named_as_such_and_its_steps_redone(tmp_path, content):
    from spp_cli import ui
    from spp_cli.pipeline import TrainState

    path = tmp_path / "train-state.json"
    path.write_bytes(content)
    with ui.console.capture() as captured:
        state = TrainState.load_or_new(path, {"data": "d"})
    assert state.replaced and state.steps == {}
    assert captured.get().strip() == f"warning: {path}: not a readable spp train state (damaged, or another file); its finished steps are redone"


def test_a_class_whose_every_box_is_held_out_for_validation_is_named():
    from types import SimpleNamespace

    from spp_cli.pipeline import classes_held_out

    def record(labels, difficult=None):
        return SimpleNamespace(labels=labels, difficult=difficult or [False] * len(labels), iscrowd=[False] * len(labels))

    classes = ["RBC", "WBC", "Platelets"]
    fit = [record([0, 1]), record([0, 2], difficult=[False, True])]  # a difficult platelet gives no positive
    assert classes_held_out(classes, fit, [record([2]), record([1])]) == ["Platelets"]
    assert classes_held_out(classes, fit + [record([2])], [record([2])]) == []


def test_a_class_of_the_validation_split_that_no_training_image_holds_is_named(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    held = data / "annotations" / f"{TEST[0]}.xml"
    held.write_text(held.read_text().replace("</annotation>", "<object><name>green</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
                                                              "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>"))
    args = ["train", "--data", str(data), "--split", "train", "--out", str(tmp_path / "m.safetensors"), *OPTIONS[:-2], "--features", "pool5",
            "--val-split", "test"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "warning: class(es) green of --val-split test are in no training image: not trained, not validated" in result.output
