import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import coco_document, voc_xml, write_image
from spp_cli.data import open_dataset
from spp_cli.data.coco import read_coco
from spp_cli.data.yolo import read_yolo
from spp_cli.errors import DatasetError


def test_xml_beside_images_all_and_splits(xml_dataset):
    ds = open_dataset(xml_dataset)
    assert ds.format == "xml" and ds.classes == ["cat", "dog"]
    assert [r.image_id for r in ds.records] == ["a", "b", "c"]
    a = ds.records[0]
    np.testing.assert_allclose(a.boxes, [[10, 10, 30, 30], [0, 0, 64, 48]])
    np.testing.assert_array_equal(a.labels, [0, 1])
    np.testing.assert_array_equal(a.difficult, [False, True])
    assert (a.width, a.height) == (64, 48)
    assert [r.image_id for r in open_dataset(xml_dataset, "train").records] == ["a", "b"]
    assert [r.image_id for r in open_dataset(xml_dataset, "test").records] == ["c"]


def test_labelimg_layout_each_xml_beside_its_image_in_one_folder(xml_dataset, tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    for path in [*(xml_dataset / "images").iterdir(), *(xml_dataset / "annotations").iterdir(), xml_dataset / "train.txt"]:
        shutil.copy(path, side / path.name)
    for spec in (side, f"xml:{side}"):
        ds = open_dataset(spec)
        assert ds.format == "xml" and ds.classes == ["cat", "dog"]
        assert [(r.image_id, r.path) for r in ds.records] == [(i, side / f"{i}.jpg") for i in ("a", "b", "c")]
        np.testing.assert_allclose(ds.records[0].boxes, [[10, 10, 30, 30], [0, 0, 64, 48]])
    assert [r.image_id for r in open_dataset(side, "train").records] == ["a", "b"]
    # A VOC Annotations/ folder given by mistake holds no image beside its .xml: not this layout.
    shutil.rmtree(side)
    shutil.copytree(xml_dataset / "annotations", side)
    with pytest.raises(DatasetError, match="dataset layout not recognised"):
        open_dataset(side)

def test_a_listed_image_without_an_xml_is_an_image_without_objects(xml_dataset):
    # LabelImg writes no .xml for an image without objects; an id with neither is still missing.
    write_image(xml_dataset / "images" / "empty.jpg")
    (xml_dataset / "train.txt").write_text("a\nempty\nnowhere\n")
    ds = open_dataset(xml_dataset, "train")
    assert [(r.image_id, len(r.boxes)) for r in ds.records] == [("a", 2), ("empty", 0)]
    assert ds.bad == [(xml_dataset / "annotations" / "nowhere.xml", "annotation file not found")]
    assert ds.warnings == [f"1 image(s) of the split have no .xml in {xml_dataset / 'annotations'} (e.g. {xml_dataset / 'images' / 'empty.jpg'}): "
                           "taken as images without objects"]

def test_split_as_id_file(xml_dataset, tmp_path):
    ids = tmp_path / "mine.txt"
    ids.write_text("c\na\n")
    assert [r.image_id for r in open_dataset(xml_dataset, str(ids)).records] == ["c", "a"]


def test_unknown_split_lists_available(xml_dataset):
    with pytest.raises(DatasetError, match=r"no split 'val' .*available: test, train"):
        open_dataset(xml_dataset, "val")


def test_split_path_that_is_missing_is_named(xml_dataset, tmp_path):
    from conftest import invoke

    missing = tmp_path / "nosuch.txt"
    result = invoke("cache", "--data", xml_dataset, "--split", missing, "--cache", tmp_path / "f", "--no-proposals")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {missing}: split file not found"
    with pytest.raises(DatasetError) as info:
        open_dataset(xml_dataset, str(tmp_path / "lists" / "train"))
    assert str(info.value) == f"{tmp_path / 'lists' / 'train'}: split file not found"


def test_voc_layout(voc_dataset):
    ds = open_dataset(voc_dataset, "val")
    assert ds.format == "voc" and [r.image_id for r in ds.records] == ["000002"]
    assert ds.records[0].difficult.tolist() == [True]
    assert ds.records[0].path.name == "000002.jpg"
    assert len(open_dataset(f"voc:{voc_dataset}")) == 2


def test_a_prefix_that_names_the_wrong_kind_of_path_says_what_it_takes(voc_dataset, coco_dataset):
    cases = [
        (f"coco:{voc_dataset}", f"{voc_dataset}: is a folder; coco: takes a COCO .json file"),
        (f"yolo:{voc_dataset}", f"{voc_dataset}: is a folder; yolo: takes a YOLO data.yaml file"),
        (f"voc:{coco_dataset}", f"{coco_dataset}: is a file; voc: takes a dataset folder"),
        (f"xml:{coco_dataset}", f"{coco_dataset}: is a file; xml: takes a dataset folder"),
    ]
    for spec, message in cases:
        with pytest.raises(DatasetError) as info:
            open_dataset(spec)
        assert str(info.value) == message


def test_coco(coco_dataset):
    ds = open_dataset(coco_dataset)
    assert ds.format == "coco" and ds.classes == ["cat", "dog"]  # sorted by category id
    one, two = ds.records
    assert one.coco_id == 1 and one.path.exists()
    np.testing.assert_allclose(one.boxes, [[10, 5, 30, 15], [0, 0, 64, 48]])
    np.testing.assert_array_equal(one.labels, [0, 1])
    np.testing.assert_array_equal(one.iscrowd, [False, True])
    np.testing.assert_allclose(two.boxes, [[5.5, 6.5, 15.5, 16.5]])
    assert ds.num_boxes == 2  # crowd boxes are not counted


def test_split_all_is_every_image_and_a_coco_file_without_split_lists_says_so(coco_dataset, voc_dataset):
    assert [r.image_id for r in open_dataset(coco_dataset, "all").records] == ["one", "two"]
    assert [r.image_id for r in open_dataset(voc_dataset, "all").records] == ["000001", "000002"]
    # A split file named all is that split.
    (voc_dataset / "ImageSets" / "Main" / "all.txt").write_text("000002\n")
    assert [r.image_id for r in open_dataset(voc_dataset, "all").records] == ["000002"]
    with pytest.raises(DatasetError) as info:
        open_dataset(coco_dataset, "train")
    root = coco_dataset.parent.parent
    assert str(info.value) == (f"{coco_dataset}: no split 'train' (looked for {root / 'train.txt'}); --split all takes every image of the file, "
                               "--split FILE.txt those whose ids it lists")

def test_coco_categories_that_share_a_name_are_one_class(coco_dataset):
    doc = coco_document()
    doc["categories"].append({"id": 99, "name": "dog"})
    doc["annotations"].append({"id": 13, "image_id": 2, "category_id": 99, "bbox": [1, 1, 10, 10], "iscrowd": 0})
    coco_dataset.write_text(json.dumps(doc))
    ds = open_dataset(coco_dataset)
    assert ds.classes == ["cat", "dog"] and ds.category_ids == {"cat": 3, "dog": 7}
    np.testing.assert_array_equal(ds.records[1].labels, [1, 1])
    assert ds.warnings == [f"{coco_dataset}: categories 7, 99 share the name 'dog': one class (its results carry id 7)"]

def test_coco_found_from_its_folder(coco_dataset):
    assert open_dataset(coco_dataset.parent.parent).format == "coco"


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_missing_top_level_key(coco_dataset, key):
    doc = coco_document()
    del doc[key]
    coco_dataset.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=rf"instances_train\.json: missing key '{key}'$"):
        open_dataset(coco_dataset)


def test_coco_annotation_missing_bbox(coco_dataset):
    doc = coco_document()
    del doc["annotations"][1]["bbox"]
    coco_dataset.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"annotations\[1\] missing key 'bbox'$"):
        open_dataset(coco_dataset)


def test_coco_not_json(coco_dataset):
    coco_dataset.write_text("{not json")
    with pytest.raises(DatasetError, match=r"instances_train\.json: not valid JSON"):
        open_dataset(coco_dataset)


def test_yolo(yolo_dataset):
    ds = open_dataset(yolo_dataset)
    assert ds.format == "yolo" and ds.classes == ["bird", "fish"]
    p, q = ds.records
    np.testing.assert_allclose(p.boxes, [[40, 15, 60, 35], [0, 0, 20, 10]], atol=1e-4)
    np.testing.assert_array_equal(p.labels, [0, 1])
    assert [r.image_id for r in open_dataset(yolo_dataset, "val").records] == ["q"]
    assert open_dataset(yolo_dataset.parent).format == "yolo"


def test_yolo_class_id_out_of_range_skips_image(yolo_dataset):
    label = yolo_dataset.parent / "labels" / "train" / "p.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.1 0.1\n")
    ds = open_dataset(yolo_dataset)
    assert [r.image_id for r in ds.records] == ["q"]
    assert ds.bad == [(label, "line 2: class id 5 out of range (data.yaml names 2 classes)")]


def test_yolo_segmentation_lines_are_their_polygons_bounding_boxes(yolo_dataset):
    # p.jpg is 100 x 50; ultralytics' -seg labels: class, then the polygon's x y pairs.
    label = yolo_dataset.parent / "labels" / "train" / "p.txt"
    # The test is per file, as ultralytics makes it: a 2-point line among polygons is a polygon too.
    label.write_text("0 0.4 0.3 0.6 0.3 0.55 0.7\n1 0.1 0.1 0.2 0.1 0.2 0.3 0.1 0.3\n1 0.1 0.1 0.3 0.5\n")
    p = open_dataset(yolo_dataset).records[0]
    np.testing.assert_allclose(p.boxes, [[40, 15, 60, 35], [10, 5, 20, 15], [10, 5, 30, 25]], atol=1e-4)
    np.testing.assert_array_equal(p.labels, [0, 1, 1])
    # Pose labels (kpt_shape in the yaml): the box that leads each line, its keypoints after it.
    label.write_text("0 0.5 0.5 0.2 0.4 0.45 0.4 2 0.55 0.6 2\n")
    yolo_dataset.write_text(yolo_dataset.read_text() + "kpt_shape: [2, 3]\n")
    np.testing.assert_allclose(open_dataset(yolo_dataset).records[0].boxes, [[40, 15, 60, 35]], atol=1e-4)
    label.write_text("0 0.5 0.5 0.2 0.4 0.45 0.4 2\n")
    assert [bad for bad in open_dataset(yolo_dataset).bad if bad[0] == label] == [
        (label, "line 1: expected 'class cx cy w h' and the keypoints of data.yaml's kpt_shape (5 + 6 fields), got 8 fields")]


@pytest.mark.parametrize("lines, message", [
    ("0 0.5 0.5 0.2 0.4 0.9", "line 1: expected 'class cx cy w h', got 6 fields (a confidence column, as `yolo predict save_conf=True` writes?)"),
    ("0 0.1 0.1", "line 1: expected 'class cx cy w h', got 3 fields"),
    ("0 0.1 0.1 0.2 0.1 0.2 0.3 0.1", "line 1: expected a polygon 'class x1 y1 x2 y2 ...' as on the file's other lines, got 8 fields"),
    ("0 0.4 0.3 0.6 0.3 0.55 0.7\n0 0.1 0.1 0.2 0.1 0.2 0.3 0.1", "line 2: expected a polygon 'class x1 y1 x2 y2 ...' as on the file's other lines, got 8 fields"),
])
def test_yolo_line_neither_box_nor_polygon_skips_its_image(yolo_dataset, lines, message):
    label = yolo_dataset.parent / "labels" / "train" / "p.txt"
    label.write_text(lines + "\n")
    ds = open_dataset(yolo_dataset)
    assert [r.image_id for r in ds.records] == ["q"]
    assert ds.bad == [(label, message)]

def test_yolo_unknown_split(yolo_dataset):
    with pytest.raises(DatasetError, match=r"data\.yaml: no split 'test' \(splits: train, val\)"):
        open_dataset(yolo_dataset, "test")


def _one_xml(root, body: str):
    write_image(root / "images" / "x.jpg")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "x.xml"
    path.write_text(body)
    return path


def test_xml_without_bndbox_skips_image(tmp_path):
    path = _one_xml(tmp_path / "d", "<annotation><object><name>cat</name></object></annotation>")
    ds = open_dataset(tmp_path / "d")
    assert ds.records == [] and ds.bad == [(path, "object 1 ('cat') has no <bndbox>")]


@pytest.mark.parametrize(
    "body",
    [
        # external entity (XXE): would read a local file
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<annotation><object><name>&x;</name></object></annotation>",
        # entity expansion (billion laughs)
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;&l;&l;&l;&l;">]>'
        "<annotation><object><name>&l2;</name></object></annotation>",
    ],
)
def test_xml_entities_are_refused(tmp_path, body):
    path = _one_xml(tmp_path / "d", body)
    ds = open_dataset(tmp_path / "d")
    assert ds.records == []
    assert ds.bad[0][0] == path and ds.bad[0][1].startswith("unsafe XML refused")


def test_an_xml_file_that_cannot_be_read_skips_its_image(tmp_path, monkeypatch):
    # As root (CI's container) chmod 000 does not stop a read: the parser raises what a denied read raises.
    from spp_cli.data import voc

    path = _one_xml(tmp_path / "d", voc_xml("x.jpg", 64, 48, [("cat", 1, 1, 30, 30)]))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(voc.SafeET, "parse", denied)
    ds = open_dataset(tmp_path / "d")
    assert ds.records == [] and ds.bad == [(path, "cannot read (Permission denied)")]


def test_split_file_ids_keep_their_spaces_and_lose_a_byte_order_mark(tmp_path):
    from spp_cli.data.registry import read_id_list

    path = tmp_path / "ids.txt"
    path.write_bytes("\ufeffraccoon-31\nwith space\n  # a comment\n\nñandú ü \n".encode("utf-8"))
    assert read_id_list(path) == ["raccoon-31", "with space", "ñandú ü"]
    # VOC's per-class files (ImageSets/Main/<class>_<split>.txt): every line an id and -1, 0 or 1;
    # ImageNet's DET lists: an id and its index.
    path.write_text("000005 -1\n000007  1\n000009 0\n")
    assert read_id_list(path) == ["000005", "000007", "000009"]
    path.write_text("ILSVRC2012_val_00000001 1\nILSVRC2012_val_00000002 2\nILSVRC2012_val_00000003 13\n")
    assert read_id_list(path) == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "ILSVRC2012_val_00000003"]


def test_coco_and_yolo_split_ids_that_match_no_image_are_listed(coco_dataset, yolo_dataset, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("one\ntypo_id\n2\n")
    ds = open_dataset(coco_dataset, str(ids))
    assert [r.image_id for r in ds.records] == ["one", "two"]
    assert ds.bad == [(ids, f"'typo_id' is no image of {coco_dataset} (neither a file name's stem nor an image id)")]
    ids.write_text("p\ntypo_id\n")
    ds = open_dataset(yolo_dataset, str(ids))
    assert [r.image_id for r in ds.records] == ["p"]
    assert ds.bad == [(ids, f"'typo_id' is no image of {yolo_dataset}'s splits")]

def test_a_split_or_list_file_that_cannot_be_read_is_one_line(tmp_path):
    from spp_cli.data.registry import read_id_list
    from spp_cli.errors import SPPError
    from spp_cli.images import _read_list_file

    folder = tmp_path / "ids.txt"
    folder.mkdir()  # reading a folder fails as an unreadable file does, even as root
    with pytest.raises(DatasetError) as info:
        read_id_list(folder)
    assert str(info.value) == f"{folder}: cannot read (Is a directory)"
    with pytest.raises(SPPError) as info:
        _read_list_file(folder)
    assert str(info.value) == f"{folder}: cannot read (Is a directory)"


def test_box_outside_image_is_clipped_with_warning(tmp_path):
    path = _one_xml(tmp_path / "d", voc_xml("x.jpg", 64, 48, [("cat", 1, 1, 100, 30)]))
    ds = open_dataset(tmp_path / "d")
    np.testing.assert_allclose(ds.records[0].boxes, [[0, 0, 64, 30]])
    assert ds.warnings == [f"{path}: box 1 [0, 0, 100, 30] extends beyond the 64x48 image; clipped to [0, 0, 64, 30]"]


def test_box_wholly_outside_image_is_dropped_and_said_so(tmp_path):
    objects = [("cat", 70, 5, 90, 30), ("dog", 1, 1, 20, 20), ("cat", 10, 49, 30, 60)]
    path = _one_xml(tmp_path / "d", voc_xml("x.jpg", 64, 48, objects))
    ds = open_dataset(tmp_path / "d")
    np.testing.assert_allclose(ds.records[0].boxes, [[0, 0, 20, 20]])
    assert ds.records[0].labels.tolist() == [ds.classes.index("dog")]
    assert ds.warnings == [
        f"{path}: box 1 [69, 4, 90, 30] lies wholly outside the 64x48 image; dropped",
        f"{path}: box 3 [9, 48, 30, 60] lies wholly outside the 64x48 image; dropped",
    ]


def test_inverted_box_is_dropped_with_warning(tmp_path):
    path = _one_xml(tmp_path / "d", voc_xml("x.jpg", 64, 48, [("cat", 20, 5, 10, 30), ("dog", 1, 1, 5, 5)]))
    ds = open_dataset(tmp_path / "d")
    assert ds.records[0].labels.tolist() == [1] and ds.classes == ["cat", "dog"]
    assert ds.warnings == [f"{path}: box 1 [19, 4, 10, 30] has no area (x2 <= x1 or y2 <= y1); dropped"]


def test_unrecognised_layout(tmp_path):
    with pytest.raises(DatasetError, match="dataset layout not recognised"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"nowhere: no such file or folder"):
        open_dataset(tmp_path / "nowhere")


def test_paths_with_spaces_and_non_ascii(tmp_path):
    root = tmp_path / "mes données" / "set 1"
    write_image(root / "images" / "chat été.jpg")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "chat été.xml").write_text(voc_xml("chat été.jpg", 64, 48, [("chat", 1, 1, 10, 10)]), encoding="utf-8")
    ds = open_dataset(root)
    assert ds.records[0].image_id == "chat été" and ds.records[0].path.exists()


def test_box_with_a_coordinate_that_is_not_a_number_is_dropped_with_warning(tmp_path):
    objects = [("cat", "nan", 5, 10, 30), ("dog", 1, 1, "1e400", 5), ("dog", 1, 1, 5, 5)]
    path = _one_xml(tmp_path / "d", voc_xml("x.jpg", 64, 48, objects))
    ds = open_dataset(tmp_path / "d")
    np.testing.assert_allclose(ds.records[0].boxes, [[0, 0, 5, 5]])
    assert ds.warnings == [
        f"{path}: box 1 [nan, 4, 10, 30] has a coordinate that is not a usable number; dropped",
        f"{path}: box 2 [0, 0, inf, 5] has a coordinate that is not a usable number; dropped",
    ]


def test_coco_bbox_beyond_float32_is_dropped_without_numpy_noise(coco_dataset, recwarn):
    doc = coco_document()
    doc["annotations"][0]["bbox"] = [1e300, 5, 20, 10]
    coco_dataset.write_text(json.dumps(doc))
    ds = open_dataset(coco_dataset)
    assert ds.warnings == [f"{coco_dataset}: image one.jpg: box 1 [1e+300, 5, 1e+300, 15] has a coordinate that is not a usable number; dropped"]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_coco_bbox_whose_corner_overflows_is_dropped_without_numpy_noise(coco_dataset):
    doc = coco_document()
    doc["annotations"][0]["bbox"] = [1e308, 5, 1e308, 10]  # x + w overflows float64
    coco_dataset.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning would raise
        ds = open_dataset(coco_dataset)
    assert ds.warnings == [f"{coco_dataset}: image one.jpg: box 1 [1e+308, 5, inf, 15] has a coordinate that is not a usable number; dropped"]


@pytest.mark.parametrize(
    ("where", "field", "value", "kind"),
    [
        ("annotations", "category_id", [3], "a number or a string"),
        ("annotations", "image_id", None, "a number or a string"),
        ("categories", "id", True, "a number or a string"),
        ("images", "file_name", 5, "a string"),
        ("images", "file_name", "", "a string"),
    ],
)
def test_coco_field_of_the_wrong_kind(coco_dataset, where, field, value, kind):
    doc = coco_document()
    doc[where][0][field] = value
    coco_dataset.write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as info:
        open_dataset(coco_dataset)
    assert str(info.value) == f"{coco_dataset}: {where}[0] '{field}' is {json.dumps(value)}, not {kind}"


def refusal(coco_dataset, doc: dict) -> str:
    """The DatasetError message of opening ``doc`` written to ``coco_dataset``."""
    coco_dataset.write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as info:
        open_dataset(coco_dataset)
    return str(info.value)


def test_coco_category_ids_of_two_kinds(coco_dataset):
    doc = coco_document()
    doc["categories"][0]["id"] = "7"
    assert refusal(coco_dataset, doc) == f"{coco_dataset}: category ids mix numbers and strings"


def test_yolo_path_that_is_not_a_folder_name(yolo_dataset):
    yolo_dataset.write_text(yolo_dataset.read_text().replace("path: .", "path: 12"))
    with pytest.raises(DatasetError) as info:
        open_dataset(yolo_dataset)
    assert str(info.value) == f"{yolo_dataset}: 'path' is 12, not a folder"


def test_coco_box_warning_names_the_image(coco_dataset):
    doc = coco_document()
    doc["annotations"][2]["bbox"] = [5, 5, 0, 10]
    coco_dataset.write_text(json.dumps(doc))
    ds = open_dataset(coco_dataset)
    assert ds.warnings == [f"{coco_dataset}: image two.jpg: box 1 [5, 5, 5, 15] has no area (x2 <= x1 or y2 <= y1); dropped"]


def test_coco_duplicate_image_id(coco_dataset):
    doc = coco_document()
    doc["images"][1]["id"] = 1
    assert refusal(coco_dataset, doc) == f"{coco_dataset}: image id 1 appears twice (one.jpg, two.jpg)"


def test_coco_annotations_of_no_image_are_counted_in_one_warning(coco_dataset):
    doc = coco_document()
    doc["annotations"] += [
        {"id": 13, "image_id": 99, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 14, "image_id": "1", "category_id": 7, "bbox": [1, 1, 5, 5]},
    ]
    coco_dataset.write_text(json.dumps(doc))
    ds = open_dataset(coco_dataset)
    assert [len(r.boxes) for r in ds.records] == [2, 1]
    assert ds.warnings == [f"{coco_dataset}: 2 annotations have an image_id that is in no image (e.g. 99); ignored"]


NOT_UTF8 = bytes(range(128, 256))


@pytest.mark.parametrize("damage", ["bytes", "folder"])
def test_yolo_unreadable_label_file_skips_image(yolo_dataset, damage):
    label = yolo_dataset.parent / "labels" / "train" / "p.txt"
    if damage == "bytes":
        label.write_bytes(NOT_UTF8)
    else:
        label.unlink()
        label.mkdir()
    ds = open_dataset(yolo_dataset)
    assert [r.image_id for r in ds.records] == ["q"]
    assert ds.bad == [(label, "not UTF-8 text" if damage == "bytes" else "cannot read (Is a directory)")]


def test_yolo_data_yaml_not_utf8(yolo_dataset):
    yolo_dataset.write_bytes(NOT_UTF8)
    with pytest.raises(DatasetError) as info:
        open_dataset(yolo_dataset)
    assert str(info.value) == f"{yolo_dataset}: not UTF-8 text"


@pytest.mark.parametrize("fixture, reader", [("coco_dataset", read_coco), ("yolo_dataset", read_yolo)])
def test_an_annotation_file_that_is_a_folder(request, fixture, reader):
    path = request.getfixturevalue(fixture)
    path.unlink()
    path.mkdir()
    with pytest.raises(DatasetError) as info:
        reader(path, None)
    assert str(info.value) == f"{path}: cannot read (Is a directory)"


def test_yolo_image_list_not_utf8(yolo_dataset):
    listing = yolo_dataset.parent / "train.txt"
    listing.write_bytes(NOT_UTF8)
    yolo_dataset.write_text(yolo_dataset.read_text().replace("train: images/train", "train: train.txt"))
    with pytest.raises(DatasetError) as info:
        open_dataset(yolo_dataset, "train")
    assert str(info.value) == f"{listing}: not UTF-8 text"
