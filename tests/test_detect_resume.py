"""`spp detect --out` journals finished images: interrupted, the same command resumes (spp_cli.journal)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, invoke

import spp_cli.api
import spp_cli.commands.detect
from spp_cli.errors import SPPError
from spp_cli.journal import load_journal, open_journal

DETECT_PIXELS = spp_cli.api.detect_pixels  # the real one, whatever a test wraps it in
PHOTOS = [REPO / "tests" / "data" / "chelsea.jpg", REPO / "tests" / "data" / "coffee.jpg", REPO / "examples" / "raccoon.jpg"]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    return folder


def detect(folder: Path, out: Path, *options):
    # The shipped detector proposes with its own network: each image is one detect_pixels call.
    return invoke("--threads", "1", "detect", folder, "--conf", "-1.5", "--out", out, *options)


def interrupt_after(monkeypatch, images: int) -> list[str]:
    """detect_pixels raises KeyboardInterrupt (as Ctrl-C would) once ``images`` images are done;
    returns the list of images it was called on."""
    calls: list[str] = []

    def counting(*args, name=None, **kwargs):
        if len(calls) == images:
            raise KeyboardInterrupt
        calls.append(Path(name).name)
        return DETECT_PIXELS(*args, name=name, **kwargs)

    monkeypatch.setattr(spp_cli.api, "detect_pixels", counting)
    return calls


def test_an_interrupted_detect_resumes_to_the_uninterrupted_runs_files(tmp_path, photos, monkeypatch):
    full = tmp_path / "full.json"
    assert detect(photos, full).exit_code == 0
    out = tmp_path / "dets.json"
    journal = tmp_path / "dets.json.partial"
    calls = interrupt_after(monkeypatch, 2)
    result = detect(photos, out)
    assert result.exit_code == 130
    assert not out.exists()
    assert len(journal.read_text().splitlines()) == 3  # the settings and two images
    calls = interrupt_after(monkeypatch, 99)
    result = detect(photos, out)
    assert result.exit_code == 0
    assert "Resuming: 2 of 3 images already done." in result.output
    assert calls == ["raccoon.jpg"]  # only the image not finished went through the network
    assert "(1 image(s) through the network on cpu" in result.output
    assert json.loads(out.read_text()) == json.loads(full.read_text())
    assert json.loads((tmp_path / "dets.coco.json").read_text()) == json.loads((tmp_path / "full.coco.json").read_text())
    assert not journal.exists()


def test_a_journal_of_other_settings_is_not_resumed(tmp_path, photos, monkeypatch):
    out = tmp_path / "dets.json"
    interrupt_after(monkeypatch, 2)
    assert detect(photos, out).exit_code == 130
    calls = interrupt_after(monkeypatch, 99)
    result = detect(photos, out, "--nms", "0.5")
    assert result.exit_code == 0
    assert f"{tmp_path / 'dets.json.partial'}: left by a run with other settings; starting afresh." in result.output
    assert calls == ["chelsea.jpg", "coffee.jpg", "raccoon.jpg"]


def test_an_image_replaced_since_it_was_journaled_is_detected_again(tmp_path, photos, monkeypatch):
    out = tmp_path / "dets.json"
    interrupt_after(monkeypatch, 2)
    assert detect(photos, out).exit_code == 130
    shutil.copy(photos / "raccoon.jpg", photos / "chelsea.jpg")  # another photo under a finished image's name
    calls = interrupt_after(monkeypatch, 99)
    result = detect(photos, out)
    assert result.exit_code == 0
    assert f"{tmp_path / 'dets.json.partial'}: 1 image(s) modified since they were detected; detecting them again." in result.output
    assert "Resuming: 1 of 3 images already done." in result.output
    assert calls == ["chelsea.jpg", "raccoon.jpg"]
    by_name = {Path(e["path"]).name: e for e in json.loads(out.read_text())["images"]}
    assert by_name["chelsea.jpg"]["detections"] == by_name["raccoon.jpg"]["detections"]


def test_resumed_images_take_this_runs_ids_and_coco_ids(tmp_path, photos, monkeypatch):
    # The journal keeps detections; an image's ids come from the inputs of the run that writes the file.
    def coco_json(first_id: int) -> Path:
        from PIL import Image

        sizes = [(photo.name, Image.open(photo).size) for photo in sorted(PHOTOS)]
        doc = {"images": [{"id": first_id + k, "file_name": name, "width": w, "height": h} for k, (name, (w, h)) in enumerate(sizes)],
               "annotations": [], "categories": [{"id": 1, "name": "raccoon"}]}
        path = photos / "annotations.json"
        path.write_text(json.dumps(doc))
        return path

    out = tmp_path / "dets.json"
    interrupt_after(monkeypatch, 2)
    assert invoke("--threads", "1", "detect", "--data", coco_json(101), "--out", out).exit_code == 130
    interrupt_after(monkeypatch, 99)
    result = invoke("--threads", "1", "detect", "--data", coco_json(201), "--out", out)
    assert result.exit_code == 0, result.output
    assert "Resuming: 2 of 3 images already done." in result.output
    assert [e["coco_id"] for e in json.loads(out.read_text())["images"]] == [201, 202, 203]
    assert {r["image_id"] for r in json.loads((tmp_path / "dets.coco.json").read_text())} == {201, 202, 203}


def test_an_interrupt_while_drawing_keeps_the_journal(tmp_path, photos, monkeypatch):
    out, drawn = tmp_path / "dets.json", tmp_path / "drawn"
    real, drawings = spp_cli.commands.detect._save_drawing, []

    def stopped_at_the_second(*args, **kwargs):
        drawings.append(1)
        if len(drawings) == 2:
            raise KeyboardInterrupt  # as Ctrl-C while the second image is drawn, after its journal line
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(spp_cli.commands.detect, "_save_drawing", stopped_at_the_second)
        assert detect(photos, out, "--save-dir", drawn).exit_code == 130
    assert [p.name for p in drawn.iterdir()] == [PHOTOS[0].name]  # drawn as it went
    calls = interrupt_after(monkeypatch, 99)
    result = detect(photos, out, "--save-dir", drawn)
    assert result.exit_code == 0
    assert "Resuming: 2 of 3 images already done." in result.output
    assert calls == [PHOTOS[2].name]
    assert sorted(p.name for p in drawn.iterdir()) == sorted(p.name for p in PHOTOS)


def test_a_journal_of_spp_propose_is_not_taken_for_one_of_spp_detect(tmp_path, photos):
    out = tmp_path / "dets.json"
    (tmp_path / "dets.json.partial").write_text(json.dumps({"params": {"top": 2000}}) + "\n")
    result = detect(photos, out)
    assert result.exit_code == 0
    assert f"{tmp_path / 'dets.json.partial'}: not a journal of `spp detect`; starting afresh." in result.output


def journal_lines(tmp_path: Path, lines: list) -> Path:
    image = tmp_path / "a.jpg"
    shutil.copy(PHOTOS[0], image)
    path = tmp_path / "out.json.partial"
    text = json.dumps({"command": "detect", "params": {"k": 1}}) + "\n"
    text += "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad", [
    {"path": "a\0.jpg"},  # no file has it: Path.resolve and os.stat raise ValueError
    {"path": 1.5},
    {"path": None},
    "{not json",
])
def test_the_journal_reading_stops_at_a_line_it_cannot_use_and_a_resume_appends_after_the_good_ones(tmp_path, bad):
    good = {"path": str(tmp_path / "a.jpg"), "entry": 1}
    path = journal_lines(tmp_path, [good, bad, good])
    journaled = load_journal(path, {"k": 1}, "detect", lambda line: line["entry"])
    assert list(journaled.entries) == [good["path"]]
    header_and_good = path.read_text().splitlines()[:2]
    with open_journal(path, "detect", {"k": 1}, resume_at=journaled.end) as journal:
        assert path.read_text().splitlines() == header_and_good  # cut back in place: nothing rewritten
        journal.append({"path": "b.jpg", "entry": 2})
    assert path.read_text().splitlines() == [*header_and_good, json.dumps({"path": "b.jpg", "entry": 2})]


def test_a_cut_short_last_line_is_dropped_even_when_its_json_is_whole(tmp_path):
    # A write cut just before its newline: the line is not taken, and the next one starts cleanly.
    good = {"path": str(tmp_path / "a.jpg"), "entry": 1}
    path = journal_lines(tmp_path, [good])
    path.write_text(path.read_text() + json.dumps(good))
    journaled = load_journal(path, {"k": 1}, "detect", lambda line: line["entry"])
    with open_journal(path, "detect", {"k": 1}, resume_at=journaled.end) as journal:
        journal.append(good)
    assert [json.loads(line) for line in path.read_text().splitlines()[1:]] == [good, good]


def test_a_journal_that_cannot_be_written_is_one_line_naming_it():
    with pytest.raises(SPPError, match=r"^/dev/full: cannot write \(No space left on device\)$"):
        with open_journal(Path("/dev/full"), "detect", {}, resume_at=None):
            pass
