"""Nothing already written is lost: an output path that is one of the command's inputs is
refused before any work, a run in which every image failed leaves an earlier output as it
was, and values no file can hold (NaN) are refused with one line naming the file."""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import invoke, one_line, write_image

from spp_cli.fileio import check_not_input
from spp_cli.errors import SPPError


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(out: Path, option: str = "--out") -> str:
    return f"Error: {out}: would overwrite an input of this command; choose another {option}"


def test_check_not_input_compares_files_not_names(tmp_path):
    image = write_image(tmp_path / "a.jpg")
    (tmp_path / "link.jpg").symlink_to(image)
    check_not_input(tmp_path / "new.json", [image])  # not there yet: nothing to lose
    check_not_input(write_image(tmp_path / "b.jpg", seed=1), [image])
    for same in (image, tmp_path / "link.jpg", tmp_path / "sub" / ".." / "a.jpg"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(SPPError) as info:
            check_not_input(same, [image], "--save-dir")
        assert str(info.value) == f"{same}: would overwrite an input of this command; choose another --save-dir"


def test_detect_and_propose_refuse_to_write_over_their_input_image(tmp_path):
    image = write_image(tmp_path / "photo.jpg", 80, 60)
    before = digest(image)
    for command, extra in (("detect", []), ("propose", ["--workers", "1"])):
        result = invoke(command, image, "--out", image, *extra)
        assert result.exit_code == 1
        assert one_line(result) == refused(image)
    result = invoke("detect", image, "--save-dir", tmp_path)  # would write tmp_path/photo.jpg
    assert result.exit_code == 1
    assert one_line(result) == refused(image, "--save-dir")
    assert digest(image) == before


def test_eval_and_merge_refuse_to_write_over_their_input_file(tmp_path, voc_dataset):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["cat"], "images": []}))
    before = dets.read_bytes()
    result = invoke("eval", dets, "--data", voc_dataset, "--out", dets)
    assert result.exit_code == 1
    assert one_line(result) == refused(dets)
    part = tmp_path / "props.shard-0-of-2.json"
    part.write_text("{}")
    result = invoke("merge", "props", part, tmp_path / "props.shard-1-of-2.json", "--out", part)
    assert result.exit_code == 1
    assert one_line(result) == refused(part)
    assert dets.read_bytes() == before and part.read_text() == "{}"


def test_detect_propose_and_eval_refuse_to_write_over_the_dataset_s_annotations_or_split(tmp_path, coco_dataset, voc_dataset):
    annotations = coco_dataset  # <root>/annotations/instances_train.json
    before = digest(annotations)
    for data in (annotations, annotations.parent.parent, f"coco:{annotations}"):  # the file, its folder, a prefixed spec
        for command, extra in (("detect", []), ("propose", ["--workers", "1"])):
            result = invoke(command, "--data", data, "--out", annotations, *extra)
            assert result.exit_code == 1
            assert one_line(result) == refused(annotations)
    split = tmp_path / "ids.txt"
    split.write_text("000001\n")
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["person"], "images": []}))
    for out in (split, annotations):
        result = invoke("eval", dets, "--data", voc_dataset if out == split else annotations, "--split", split, "--out", out)
        assert result.exit_code == 1
        assert one_line(result) == refused(out)
    for out in (split, annotations):  # spp train too, before any step
        result = invoke("train", "--data", annotations, "--split", split, "--out", out, "--work", tmp_path / "work")
        assert result.exit_code == 1
        assert one_line(result) == refused(out)
    assert digest(annotations) == before and split.read_text() == "000001\n"


def test_a_run_where_every_image_failed_keeps_the_earlier_output(tmp_path):
    good = write_image(tmp_path / "good.jpg", 80, 60)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for command, extra in (("propose", ["--workers", "1"]), ("detect", [])):
        out = tmp_path / f"{command}.json"
        assert invoke(command, good, "--out", out, *extra).exit_code == 0
        before = out.read_bytes()
        result = invoke(command, empty, "--out", out, *extra)
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-2:] == [
            f"  skipped {empty}: empty file (0 bytes)",
            f"Nothing written: no image could be read ({out} is unchanged).",
        ]
        assert out.read_bytes() == before
        # With no earlier file there is nothing to call unchanged.
        out.unlink()
        result = invoke(command, empty, "--out", out, *extra)
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1] == "Nothing written: no image could be read."
        assert not out.exists()


def test_out_under_a_file_is_one_line(tmp_path):
    image = write_image(tmp_path / "photo.jpg", 80, 60)
    out = tmp_path / "photo.jpg" / "props.json"
    result = invoke("propose", image, "--out", out, "--workers", "1")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {out}: {image} is a file, not a folder"


def test_detect_and_draw_check_their_drawing_folder_and_detect_its_coco_file_before_any_work(tmp_path, monkeypatch):
    # Each refused before an image is read (detection would otherwise run first, then fail to draw or
    # to write the COCO file beside a dets.json it had already replaced).
    import spp_cli.commands.draw  # before the patch: its own name for load_image is patched too, and restored
    import spp_cli.images

    def no_reading(*_, **__):
        raise AssertionError("an image was read")

    image = write_image(tmp_path / "photo.jpg", 80, 60)
    dets = tmp_path / "dets.json"
    (tmp_path / "dets.coco.json").mkdir()
    monkeypatch.setattr(spp_cli.images, "load_image", no_reading)
    monkeypatch.setattr(spp_cli.commands.draw, "load_image", no_reading)
    result = invoke("detect", image, "--out", dets)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {tmp_path / 'dets.coco.json'}: is a folder; give a file name"

    drawings = image / "drawn"
    result = invoke("detect", image, "--save-dir", drawings)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {drawings}: {image} is a file, not a folder"

    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["raccoon"],
                                "images": [{"id": "photo", "path": str(image), "width": 80, "height": 60, "detections": []}]}))
    result = invoke("draw", dets, "--out", drawings)
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {drawings}: {image} is a file, not a folder"


def test_a_sole_writers_write_removes_what_a_killed_write_left(tmp_path):
    import os
    import time

    from spp_cli.fileio import atomic_write_bytes

    model = tmp_path / "model.safetensors"
    left = tmp_path / ".model.safetensors.k3x9_0ab.tmp"  # SIGKILL in a write leaves mkstemp's file
    in_flight = tmp_path / ".model.safetensors.zz91ab2c.tmp"  # touched a moment ago: another write's
    others = [tmp_path / ".model.safetensors.v2.k3x9_0ab.tmp", tmp_path / ".other.safetensors.k3x9_0ab.tmp"]
    for path in (left, in_flight, *others):
        path.write_bytes(b"half")
    for path in (left, *others):
        os.utime(path, (time.time() - 120, time.time() - 120))
    atomic_write_bytes(model, b"new")
    assert left.exists()  # files several processes may write keep theirs
    atomic_write_bytes(model, b"newer", sole_writer=True)
    assert model.read_bytes() == b"newer" and not left.exists()
    assert in_flight.exists() and all(path.exists() for path in others)


@pytest.mark.parametrize("journal", [b"[1]\n", b"\xff\xfe binary", None])
def test_propose_starts_afresh_over_a_journal_it_cannot_use(tmp_path, journal):
    image = write_image(tmp_path / "photo.jpg", 80, 60)
    out = tmp_path / "props.json"
    partial = tmp_path / "props.json.partial"
    if journal is None:
        partial.mkdir()  # a folder where the journal goes: it cannot be written
    else:
        partial.write_bytes(journal)
    result = invoke("propose", image, "--out", out, "--workers", "1")
    if journal is None:
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {partial}: cannot write (")
        return
    assert result.exit_code == 0, result.output
    assert f"{partial}: not a journal of `spp propose`; starting afresh." in result.stderr
    assert len(json.loads(out.read_text())["images"]) == 1 and not partial.exists()


def test_nan_is_not_a_threshold(tmp_path):
    image = write_image(tmp_path / "photo.jpg", 80, 60)
    for args in (("detect", image, "--conf", "nan"), ("detect", image, "--nms", "nan"), ("draw", tmp_path / "d.json", "--out", tmp_path, "--conf", "inf")):
        result = invoke(*args)
        assert result.exit_code == 2
        option, value = args[-2], args[-1]
        assert f"Error: Invalid value for '{option}': '{value}' is not a finite number." in result.stderr


def test_props_with_a_nan_coordinate_are_refused(tmp_path):
    image = write_image(tmp_path / "photo.jpg", 80, 60)
    props = tmp_path / "props.json"
    assert invoke("propose", image, "--out", props, "--workers", "1").exit_code == 0
    doc = json.loads(props.read_text())
    doc["images"][0]["boxes"][0][2] = float("nan")
    props.write_text(json.dumps(doc))
    result = invoke("detect", image, "--props", props, "--out", tmp_path / "d.json")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {props}: images[0] has a box with a coordinate that is not a finite number"


def test_a_file_name_that_is_not_utf8_is_written_and_read_back(tmp_path):
    """Such a name comes from the file system as a str with a lone surrogate
    (surrogateescape): it is written as a JSON escape and read back to the same file."""
    import os

    from spp_cli.detections import read_detections
    from spp_cli.fileio import atomic_write_json
    from spp_cli.proposals import read_proposals

    folder = tmp_path / "images"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"bad\xffname \xc3\xa9.jpg")
    open(raw, "wb").close()
    (image,) = folder.iterdir()
    assert "\udcff" in str(image)
    entry = {"id": image.stem, "path": str(image), "width": 64, "height": 48}
    dets, props = tmp_path / "d.json", tmp_path / "p.json"
    atomic_write_json(dets, {"format": "spp-detections", "version": 1, "classes": ["cat"],
                             "images": [{**entry, "detections": [{"box": [1, 2, 3, 4], "class": "cat", "class_id": 0, "score": 0.5}]}]})
    atomic_write_json(props, {"format": "spp-proposals", "version": 1, "params": {}, "images": [{**entry, "boxes": [[1, 2, 3, 4]]}]}, indent=2)
    for out in (dets, props):
        text = out.read_bytes().decode("utf-8")  # still UTF-8 JSON
        assert '"id": "bad\\udcffname é"' in text  # the undecodable byte escaped, the rest as it was
    (read,) = read_detections(dets).images
    assert (read.id, Path(read.path)) == (image.stem, image)
    assert os.fsencode(read.path) == raw and Path(read.path).is_file()
    (read,) = read_proposals(props).images
    assert (read.image_id, Path(read.path)) == (image.stem, image)
