"""The Python API: `spp_cli.Detector`, the README's example, the same numbers as `spp detect`."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO
from PIL import Image

from spp_cli.cli import cli
from spp_cli.errors import ImageError, ModelError

PHOTO = REPO / "examples" / "raccoon.jpg"


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Python API\n.*?```python\n(.+?)\n```", text, re.M | re.S)
    assert match, "README has no python block under '## Python API'"
    return match.group(1)


def cli_detections(tmp_path, image, *args) -> list[dict]:
    out = tmp_path / "dets.json"
    result = CliRunner().invoke(cli, ["detect", str(image), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["images"][0]["detections"]


@pytest.fixture(scope="module")
def detector():
    import spp_cli

    return spp_cli.Detector.load()


def test_readme_example_prints_what_spp_detect_finds(tmp_path):
    done = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    expected = [f"{d['class']} {d['score']:.3f} {[round(v, 1) for v in d['box']]}" for d in cli_detections(tmp_path, PHOTO)]
    assert expected, "the shipped detector shows nothing on its own example"
    assert done.stdout.strip().splitlines() == expected


def test_a_call_gives_the_numbers_of_spp_detect(detector, tmp_path):
    for conf in (None, -1.5):
        args = [] if conf is None else ["--conf", str(conf)]
        ours = detector(PHOTO, conf=conf)
        theirs = cli_detections(tmp_path, PHOTO, *args)
        assert [(list(d.box), d.class_name, d.class_id, d.score) for d in ours] == [
            (d["box"], d["class"], d["class_id"], d["score"]) for d in theirs
        ]


def test_path_pillow_image_and_array_are_the_same_image(detector):
    by_path = detector(PHOTO, conf=-1.5)
    assert detector(Image.open(PHOTO), conf=-1.5) == by_path
    assert detector(np.asarray(Image.open(PHOTO).convert("RGB")), conf=-1.5) == by_path
    assert detector.classes == ["raccoon"]


def test_bad_inputs_are_clear_errors(detector, tmp_path):
    with pytest.raises(ImageError, match=r"an image array must be \(H, W, 3\) uint8 RGB \(got \(4, 4, 3\) float64\)"):
        detector(np.zeros((4, 4, 3)))
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        detector(tmp_path / "nope.jpg")
    import spp_cli

    with pytest.raises(ModelError, match=r"missing\.safetensors"):
        spp_cli.Detector.load(tmp_path / "missing.safetensors")


def test_import_spp_cli_stays_light():
    code = "import sys, spp_cli; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; spp_cli.Detector"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize(("proposals", "said"), [
    ("selective-search", "selective search ran ahead on a second thread"),
    (None, "proposals from the model's proposal network"),  # the shipped detector's own
])
def test_detect_many_gives_the_numbers_of_spp_detect_on_a_folder(detector, tmp_path, monkeypatch, proposals, said):
    from spp_cli import prefetch

    monkeypatch.setattr(prefetch, "second_core_free", lambda: True)  # the search ahead, whatever this machine's cores
    photos = [REPO / "tests" / "data" / f"{name}.jpg" for name in ("chelsea", "coffee")]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).write_bytes(photo.read_bytes())
    many = detector.detect_many([photos[0], Image.open(photos[1])], conf=-1.5, proposals=proposals)
    out = tmp_path / "dets.json"
    named = ["--proposals", proposals] if proposals else []
    result = CliRunner().invoke(cli, ["detect", str(folder), "--conf", "-1.5", "--out", str(out), *named])
    assert result.exit_code == 0, result.output
    assert said in result.output
    theirs = json.loads(out.read_text())["images"]
    assert len(many) == len(theirs) == 2
    for ours, image in zip(many, theirs):
        assert ours and [(list(d.box), d.class_name, d.score) for d in ours] == [(d["box"], d["class"], d["score"]) for d in image["detections"]]
    # One image at a time (the network on every thread): the same up to float rounding.
    for ours, photo in zip(many, photos):
        alone = detector(photo, conf=-1.5, proposals=proposals)
        assert len(alone) == len(ours) and all(abs(a.score - b.score) < 1e-3 for a, b in zip(alone, ours))
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        detector.detect_many([photos[0], tmp_path / "nope.jpg"])
