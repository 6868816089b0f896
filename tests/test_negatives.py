"""`--negatives`: background images mined as negatives of every class (train-svm) and sampled as background (finetune)."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import model_tensors, write_image, write_shapes

from spp_cli.cache import FeatureCache, image_key
from spp_cli.cli import cli
from spp_cli.model import Detector

SETTINGS = ["--backbone", "efficientnet_lite0_b4", "--scales", "96"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def background_pixels(seed: int) -> np.ndarray:
    """A light noisy image with a green rectangle: no red or blue shape in it."""
    rng = np.random.default_rng(seed)
    pixels = np.full((120, 160, 3), 245, np.uint8) - rng.integers(0, 12, (120, 160, 3), dtype=np.uint8)
    pixels[30:90, 40:110] = (30, 200, 30)
    return pixels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("negatives")
    data = write_shapes(root / "shapes")
    backgrounds = root / "backgrounds"
    backgrounds.mkdir()
    for k in range(2):
        Image.fromarray(background_pixels(k)).save(backgrounds / f"bg{k}.jpg", quality=95)
    feats = root / "feats"
    invoke("cache", "--data", data, "--split", "train", "--cache", feats, *SETTINGS)
    invoke("cache", backgrounds, "--cache", feats, *SETTINGS)
    plain, with_bg = root / "plain.safetensors", root / "with-bg.safetensors"
    invoke("train-svm", "--cache", feats, "--out", plain)
    output = invoke("train-svm", "--cache", feats, "--negatives", backgrounds, "--out", with_bg).output
    return feats, backgrounds, plain, with_bg, output


def top_background_score(model, feats, backgrounds) -> float:
    detector = Detector.load(model)
    cache = FeatureCache.open(feats)
    scores = []
    for path in sorted(backgrounds.iterdir()):
        entry = cache.read(image_key(path))
        scores += [d.score for d in detector.detect_windows(entry.maps, entry.factors, entry.proposals, entry.width, entry.height)]
    return max(scores, default=-10.0)


def test_background_images_are_mined_and_lower_the_scores_on_them(trained):
    feats, backgrounds, plain, with_bg, output = trained
    assert "Training on pool5 features of 4 cached image(s) and 2 background image(s), 2 class(es): blue, red" in output
    assert Detector.load(with_bg).training["background_images"] == 2
    assert Detector.load(plain).training["background_images"] == 0
    assert not np.array_equal(model_tensors(plain)["svm_weight"], model_tensors(with_bg)["svm_weight"])
    # Their windows were negatives of both classes: the best-scoring one now scores lower.
    assert top_background_score(with_bg, feats, backgrounds) < top_background_score(plain, feats, backgrounds)


def test_negatives_not_in_the_cache_are_refused(trained, tmp_path):
    feats, _, _, _, _ = trained
    stray = write_image(tmp_path / "stray.jpg", 80, 60, seed=5)
    result = CliRunner().invoke(cli, ["train-svm", "--cache", str(feats), "--negatives", str(stray), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1
    assert result.output == f"Error: {stray}: not in the cache {feats}; add the negatives with `spp cache IMAGES --cache {feats}` first\n"


def test_negatives_that_match_nothing(trained, tmp_path):
    feats, _, _, _, _ = trained
    result = CliRunner().invoke(cli, ["train-svm", "--cache", str(feats), "--negatives", str(tmp_path / "none"), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'none'}: no such file or folder\n"


def test_a_background_image_gives_fine_tuning_only_background_windows(trained):
    from spp_cli.finetune import FinetuneConfig, window_table

    feats, backgrounds, _, _, _ = trained
    entry = FeatureCache.open(feats).read(image_key(sorted(backgrounds.iterdir())[0]))
    table = window_table(entry, ["blue", "red"], FinetuneConfig(), background_image=True)
    assert len(table.boxes) == len(entry.proposals) > 0
    assert not table.labels.any() and len(table.foreground) == 0
    assert sorted(table.fallback.tolist()) == list(range(len(entry.proposals)))


def test_finetune_takes_negatives_and_says_so(trained, tmp_path):
    feats, backgrounds, _, _, _ = trained
    head = tmp_path / "head.safetensors"
    output = invoke("finetune", "--cache", feats, "--negatives", backgrounds, "--epochs", "1", "--out", head).output
    assert "Fine-tuning fc6/fc7 (1024 wide) on 5 cached image(s) (+1 held out; 2 background image(s) among them), 2 class(es)" in output
    from spp_cli.head import Head

    assert Head.load(head).training["background_images"] == 2
