"""`spp detect --out` journals finished images: interrupted, the same command resumes (spp_cli.journal)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, invoke

import spp_cli.api

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
