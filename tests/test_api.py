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
    with pytest.raises(ImageError, match=r"^an image array must be uint8, not float64 \(scale to 0-255 and \.astype\(np\.uint8\)\)$"):
        detector(np.zeros((4, 4, 3)))
    with pytest.raises(ImageError, match=r"^an image array must be \(H, W, 3\) RGB, \(H, W\) grey or \(H, W, 4\) RGBA \(got shape \(4, 4, 2\)\)$"):
        detector(np.zeros((4, 4, 2), np.uint8))
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 10, 3), np.uint8), Image.new("RGB", (10, 0))):
        with pytest.raises(ImageError, match=r"^image: empty image \(\d+ x 0 pixels\)$|^image: empty image \(0 x \d+ pixels\)$"):
            detector(empty)
    for thing, named in ((None, "NoneType"), (5, "int"), (b"\xff\xd8", "bytes")):
        with pytest.raises(TypeError, match=rf"^an image is a path, a Pillow image or a uint8 array, not {named}$"):
            detector(thing)
    with pytest.raises(TypeError, match=r"not list \(a list of images: detect_many\)$"):
        detector([PHOTO, PHOTO])
    for one in (str(PHOTO), PHOTO, Image.open(PHOTO), np.zeros((4, 64, 3), np.uint8)):
        with pytest.raises(TypeError, match=r"^detect_many takes a list of images, not one \w+: call the detector on it$"):
            detector.detect_many(one)
    with pytest.raises(ValueError, match=r"^conf and min_prob both set a threshold: give one$"):
        detector.detect_many([tmp_path / "never-read.jpg"], conf=0.0, min_prob=0.5)
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


@pytest.mark.parametrize(("options", "message"), [
    ({"max_det": 0}, r"^max_det must be a whole number of at least 1 \(or None: the model's\), not 0$"),
    ({"max_det": -1}, r"not -1$"),
    ({"max_det": 1.5}, r"not 1\.5$"),
    ({"nms": -1}, r"^nms must be an IoU from 0 to 1, not -1$"),
    ({"nms": 2}, r"not 2$"),
    ({"nms": float("nan")}, r"not nan$"),
    ({"conf": float("nan")}, r"^conf must be a finite number \(a score threshold\), not nan$"),
    ({"conf": "0.5"}, r"not '0\.5'$"),
    ({"min_prob": 1}, r"^min_prob must be a probability strictly between 0 and 1, not 1$"),
])
def test_options_are_checked_as_spp_detect_checks_them(detector, options, message):
    """spp detect refuses these values (exit 2); a call raises rather than return fewer detections."""
    with pytest.raises(ValueError, match=message):
        detector(PHOTO, **options)
    with pytest.raises(ValueError, match=message):
        detector.detect_many([PHOTO], **options)


def test_numbers_may_be_numpy_or_torch_scalars_and_paths_any_pathlike(detector):
    import torch

    class Where:
        def __fspath__(self):
            return str(PHOTO)

    expected = detector(PHOTO, conf=-1.5, max_det=5)
    assert detector(Where(), conf=np.float32(-1.5), max_det=np.int64(5), nms=None) == expected
    assert detector(PHOTO, conf=torch.tensor(-1.5), max_det=torch.tensor(5), nms=torch.tensor(0.3)) == expected


def test_arrays_in_other_layouts_are_the_images_pillow_would_make(detector):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    assert detector(grey[:, :, None], conf=-1.5) == detector(grey, conf=-1.5) == detector(Image.fromarray(grey), conf=-1.5)
    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    assert detector(rgba, conf=-1.5) == detector(Image.fromarray(rgba, "RGBA"), conf=-1.5)


def test_loading_a_file_leaves_pillows_limit_as_it_was(detector, monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv("SPP_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match=r"raccoon\.jpg: image has more than 1,000 pixels"):
        detector(PHOTO)
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(PHOTO).load()  # the caller's own open, under Pillow's own limit


def test_a_truncated_pillow_image_is_an_image_error(detector, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(PHOTO.read_bytes()[:5000])
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated file \(its data ends early\); pass its path to decode what is there$"):
        detector(Image.open(cut))


def test_a_detection_is_a_detections_file_entry(detector, tmp_path):
    assert [d.to_dict() for d in detector(PHOTO, conf=-1.5)] == cli_detections(tmp_path, PHOTO, "--conf", "-1.5")
    json.dumps([d.to_dict() for d in detector(PHOTO)])


def test_classes_by_id_as_ultralytics_takes_them(detector):
    assert detector(PHOTO, conf=-1.5, classes=[0]) == detector(PHOTO, conf=-1.5, classes=["raccoon"]) == detector(PHOTO, conf=-1.5, classes=0)
    with pytest.raises(ModelError, match=r"default\.safetensors: has no class id 3 \(its ids: 0-0\)$"):
        detector(PHOTO, classes=[3])


def test_a_detector_prints_compares_and_pickles_as_an_object(detector):
    import pickle

    import spp_cli

    assert repr(detector) == f"Detector(path={str(detector.path)!r}, classes=[raccoon], device='cpu')"
    assert detector == detector and detector != spp_cli.Detector.load()
    from dataclasses import asdict, replace

    assert asdict(detector)["path"] == detector.path
    assert replace(detector, device="cpu")._extractor is None  # a copy builds its own network
    detector(PHOTO)  # the network built: a pickle leaves it out
    again = pickle.loads(pickle.dumps(detector))
    assert again._extractor is None and again(PHOTO) == detector(PHOTO)
    assert {"Detector", "Detection"} <= set(dir(spp_cli))


def test_scores_that_need_the_models_own_proposals_say_so(detector):
    from dataclasses import replace

    import spp_cli

    mixed = spp_cli.Detector(replace(detector.model, detect=replace(detector.model.detect, objectness_weight=0.5)), detector.path)
    said = []
    mixed(np.zeros((32, 32, 3), np.uint8), proposals="selective-search", warn=said.append)
    assert said == [f"{detector.path}: its scores add its proposal network's objectness (0.5 x log sigmoid); "
                    "with other proposals they are the SVM margins alone, higher than its thresholds and probabilities expect"]
    with pytest.warns(UserWarning, match="its scores add its proposal network's objectness"):
        mixed(np.zeros((32, 32, 3), np.uint8), proposals="selective-search")
    said.clear()
    mixed.detect_many([np.zeros((32, 32, 3), np.uint8)] * 3, proposals="selective-search", warn=said.append)
    assert len(said) == 1  # once per run, as spp detect says it


def test_gpu_without_cuda_names_the_apis_option(monkeypatch):
    import torch

    import spp_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^gpu=True: CUDA is not available on this machine .*; run without gpu=True to use the CPU$"):
        spp_cli.Detector.load(gpu=True)
