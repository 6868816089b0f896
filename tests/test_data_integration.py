"""Readers on the real datasets in ../shared/data."""

import pytest

from conftest import COCO128, RACCOON
from spp_cli.data import open_dataset

pytestmark = pytest.mark.integration


def test_raccoon(shared_data):
    ds = open_dataset(RACCOON)
    assert ds.format == "xml" and ds.classes == ["raccoon"] and len(ds) == 200 and not ds.bad
    assert len(open_dataset(RACCOON, "train")) == 160
    test = open_dataset(RACCOON, "test")
    assert len(test) == 40
    # Sizes come from the image files: a few XMLs carry wrong <size> values.
    assert all(r.width and r.height for r in test.records)


def test_coco128_json(shared_data):
    ds = open_dataset(COCO128 / "annotations" / "instances_train2017.json")
    assert ds.format == "coco" and len(ds) == 128 and len(ds.classes) == 80
    assert ds.num_boxes == 929
    assert sum(int(r.iscrowd.sum()) for r in ds.records) == 10


def test_coco128_yolo(shared_data):
    ds = open_dataset(COCO128)
    assert ds.format == "yolo" and len(ds) == 128 and ds.classes[0] == "person"
    assert ds.num_boxes == 929 and not ds.warnings


def test_bccd_as_it_ships(shared_data):
    bccd = shared_data / "bccd"
    ds = open_dataset(bccd)
    assert ds.format == "voc" and len(ds) == 364 and not ds.bad and not ds.warnings
    assert ds.classes == ["Platelets", "RBC", "WBC"]
    assert sum(len(r.boxes) for r in ds.records) == 4888
    trainval, test = open_dataset(bccd, "trainval"), open_dataset(bccd, "test")
    assert (len(trainval), len(test)) == (292, 72)
    assert not {r.image_id for r in trainval.records} & {r.image_id for r in test.records}
