"""Calibrated probabilities: the Platt fit, the outcomes it is fitted on, the model file, `spp detect`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from conftest import REPO

from spp_cli.calibration import Calibration, detection_outcomes, fit_calibration, reliability_table
from spp_cli.cli import cli
from spp_cli.commands.models import default_model_path
from spp_cli.evaluate import GroundTruthImage
from spp_cli.model import Detector

PHOTO = REPO / "examples" / "raccoon.jpg"
CURVE = Calibration(slope=2.0, intercept=-1.0, detections=100, right=40, images=10)


def test_fit_recovers_the_curve_the_outcomes_were_drawn_from():
    rng = np.random.default_rng(0)
    margins = rng.uniform(-3, 3, 20000)
    right = rng.random(20000) < CURVE.probability(margins)
    fitted = fit_calibration(margins, right, images=7)
    assert fitted is not None
    assert fitted.slope == pytest.approx(2.0, abs=0.1) and fitted.intercept == pytest.approx(-1.0, abs=0.1)
    assert (fitted.detections, fitted.right, fitted.images) == (20000, int(right.sum()), 7)


def test_no_curve_from_too_few_outcomes_or_a_falling_one():
    assert fit_calibration(np.arange(10.0), np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0]), images=1) is None  # 4 right
    falling = np.array([1] * 6 + [0] * 6)
    assert fit_calibration(np.arange(12.0), falling, images=1) is None  # higher margins less often right


def test_margin_at_inverts_probability():
    for p in (0.05, 0.5, 0.9):
        assert float(CURVE.probability(CURVE.margin_at(p))) == pytest.approx(p)
    assert CURVE.margin_at(0.5) == pytest.approx(0.5)  # 2 m - 1 = 0
    with pytest.raises(ValueError, match="between 0 and 1"):
        CURVE.margin_at(1.0)


def test_outcomes_follow_voc_matching():
    gt = GroundTruthImage(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), ["cat", "cat"],
                          np.array([False, True]), np.array([False, False]))
    dets = [
        {"box": [0, 0, 10, 10], "class": "cat", "score": 2.0},  # right
        {"box": [0, 0, 10, 11], "class": "cat", "score": 1.0},  # the same cat again: wrong
        {"box": [50, 50, 60, 60], "class": "cat", "score": 0.5},  # a difficult cat: not counted
        {"box": [20, 20, 30, 30], "class": "cat", "score": -0.5},  # background: wrong
        {"box": [0, 0, 10, 10], "class": "dog", "score": 3.0},  # another class: not asked for
    ]
    margins, right = detection_outcomes([(gt, dets)], ["cat"])
    assert margins.tolist() == [2.0, 1.0, -0.5]
    assert right.tolist() == [1, 0, 0]


def test_reliability_table_bins_predicted_against_observed():
    rows = reliability_table(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]), bins=10)
    assert rows == [
        {"bin": "0.0-0.1", "detections": 1, "predicted": 0.05, "observed": 0.0},
        {"bin": "0.1-0.2", "detections": 2, "predicted": 0.135, "observed": 0.5},
        {"bin": "0.9-1.0", "detections": 2, "predicted": 0.975, "observed": 1.0},
    ]


def shipped_with(calibration: Calibration | None, folder) -> Path:
    """The shipped detector saved in ``folder`` with ``calibration`` in place of its own."""
    detector = Detector.load(default_model_path())
    detector.calibration = calibration
    detector.save(folder / "model.safetensors")
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The shipped detector with a known calibration."""
    return shipped_with(CURVE, tmp_path_factory.mktemp("calibrated"))


@pytest.fixture(scope="module")
def uncalibrated(tmp_path_factory):
    """The shipped detector without its calibration: a model as `spp train-svm` writes them."""
    return shipped_with(None, tmp_path_factory.mktemp("uncalibrated"))


def test_model_file_keeps_the_calibration_and_uncalibrated_files_have_none(calibrated, uncalibrated):
    assert Detector.load(calibrated).calibration == CURVE
    assert Detector.load(uncalibrated).calibration is None
    with safe_open(str(uncalibrated), "np") as handle:
        assert "calibration" not in json.loads(handle.metadata()["spp"])  # absent, not null
    assert Detector.load(default_model_path()).calibration is not None  # the shipped detector is from spp train


def test_spp_train_gives_its_model_the_curve_and_a_threshold_at_probability_half(uncalibrated, tmp_path):
    path = tmp_path / "model.safetensors"
    detector = Detector.load(uncalibrated)
    detector.calibrate(Calibration.from_json(CURVE.to_json()))
    detector.save(path)
    detector = Detector.load(path)
    assert detector.calibration == CURVE
    assert detector.detect.display_threshold == pytest.approx(CURVE.margin_at(0.5), abs=1e-4)
    assert Detector.load(uncalibrated).calibration is None  # nothing fitted: left as it is


def test_detect_writes_probabilities_and_thresholds_on_them(calibrated, tmp_path):
    runner = CliRunner()
    out = tmp_path / "dets.json"
    # Selective search's windows: more detections above -1.5 on this photo than the network's 300.
    ss = ["--proposals", "selective-search"]
    result = runner.invoke(cli, ["detect", str(PHOTO), "--model", str(calibrated), "--conf", "-1.5", "--out", str(out), *ss])
    assert result.exit_code == 0, result.output
    dets = json.loads(out.read_text())["images"][0]["detections"]
    assert len(dets) > 1
    for d in dets:
        assert d["probability"] == pytest.approx(1 / (1 + math.exp(-(2.0 * d["score"] - 1.0))), abs=1e-4)
    assert "at probability >= 0.02 (score >= -1.5)" in result.output
    # A probability threshold keeps exactly the detections above its margin.
    p = 0.6
    result = runner.invoke(cli, ["detect", str(PHOTO), "--model", str(calibrated), "--min-prob", str(p), "--out", str(out), *ss])
    assert result.exit_code == 0, result.output
    kept = json.loads(out.read_text())["images"][0]["detections"]
    assert [d["score"] for d in kept] == [d["score"] for d in dets if d["score"] > CURVE.margin_at(p)]
    assert "at probability >= 0.60" in result.output


def test_probability_thresholds_need_a_calibrated_model(calibrated, uncalibrated):
    runner = CliRunner()
    result = runner.invoke(cli, ["detect", str(PHOTO), "--model", str(uncalibrated), "--min-prob", "0.5"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: {uncalibrated}: has no calibrated probabilities (`spp train` fits them where its validation part gives enough detections); "
                                     "threshold the SVM margin (--conf) instead")
    result = runner.invoke(cli, ["detect", str(PHOTO), "--model", str(calibrated), "--min-prob", "0.5", "--conf", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --conf and --min-prob both set a threshold: give one"


def test_api_gives_the_probability_beside_the_score(calibrated, uncalibrated):
    import spp_cli

    found = spp_cli.Detector.load(calibrated)(PHOTO, min_prob=0.3)
    assert found and all(d.probability == pytest.approx(float(CURVE.probability(d.score)), abs=1e-4) for d in found)
    assert all(d.probability >= 0.3 for d in found)
    assert spp_cli.Detector.load(uncalibrated)(PHOTO)[0].probability is None
    assert spp_cli.Detector.load()(PHOTO)[0].probability is not None  # the shipped detector's own
