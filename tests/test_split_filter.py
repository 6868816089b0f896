"""`--data D --split NAME` on train-svm and finetune: what keeps test images out of training.

One cache holds the whole shapes dataset (train and test images); training
on its train split must give exactly the model that a cache of the train
images alone gives.
"""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TEST, TRAIN, write_shapes
from conftest import model_tensors as tensors

from spp_cli.cache import FeatureCache
from spp_cli.cli import cli
from spp_cli.errors import DatasetError
from spp_cli.train import split_keys

BACKBONE = "efficientnet_lite0_b4"
SCALE = "96"


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    data = write_shapes(root / "shapes")
    props = root / "props.json"
    invoke("propose", "--data", data, "--out", props, "--workers", "1")
    whole, train_only = root / "whole", root / "train-only"
    invoke("cache", "--data", data, "--props", props, "--cache", whole, "--scales", SCALE, "--backbone", BACKBONE)
    invoke("cache", "--data", data, "--split", "train", "--props", props, "--cache", train_only, "--scales", SCALE, "--backbone", BACKBONE)
    return data, whole, train_only, root


def test_split_keys_picks_the_split_by_image_id(caches):
    data, whole, _, _ = caches
    cache = FeatureCache.open(whole)
    assert len(cache.keys()) == len(TRAIN) + len(TEST)
    for split, ids in (("train", TRAIN), ("test", TEST)):
        keys = split_keys(cache, str(data), split)
        assert sorted(cache.metadata(k)["image_id"] for k in keys) == sorted(ids)


def test_split_keys_refuses_a_split_with_no_cached_image(caches, tmp_path):
    data, _, train_only, _ = caches
    with pytest.raises(DatasetError, match=rf"none of the {len(TEST)} images of .+ \(split test\) is in the cache"):
        split_keys(FeatureCache.open(train_only), str(data), "test")


def test_train_svm_on_a_split_of_a_whole_cache_equals_training_on_that_split_alone(caches):
    data, whole, train_only, root = caches
    split_model, alone_model = root / "split.safetensors", root / "alone.safetensors"
    result = invoke("train-svm", "--cache", whole, "--data", data, "--split", "train", "--out", split_model)
    assert f"of {len(TRAIN)} cached image(s)" in result.stderr
    invoke("train-svm", "--cache", train_only, "--out", alone_model)
    a, b = tensors(split_model), tensors(alone_model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # ... and differs from a model that saw the test images too.
    everything = root / "everything.safetensors"
    invoke("train-svm", "--cache", whole, "--out", everything)
    assert not np.array_equal(tensors(everything)["svm_weight"], a["svm_weight"])


def test_finetune_on_a_split_of_a_whole_cache_equals_finetuning_on_that_split_alone(caches):
    data, whole, train_only, root = caches
    split_head, alone_head = root / "split-head.safetensors", root / "alone-head.safetensors"
    args = ["--epochs", "2", "--hidden", "16"]
    invoke("finetune", "--cache", whole, "--data", data, "--split", "train", "--out", split_head, *args)
    invoke("finetune", "--cache", train_only, "--out", alone_head, *args)
    a, b = tensors(split_head), tensors(alone_head)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
