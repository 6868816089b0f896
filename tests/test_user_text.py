"""What a user's data holds prints as it is, and damaged inputs cost only themselves.

One small dataset lives in a folder whose name rich would read as markup
(``[v2]``, ``[/a]``, ``[bold]``), with a backslash and non-ASCII letters; one
class name is markup-like too. Every command runs on it through its summary,
warning, skipped-input and error paths, and each message must name the exact
path, with no traceback. The same module covers inputs that yield no image
and truncated JPEGs.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import TEST, TRAIN, write_shapes

from spp_cli.cli import cli

WEIRD_FOLDER = "ds [v2] [/a] [bold]x\\é ünï"
WEIRD_CLASS = "[b]lue [/a]"
BACKBONE = "efficientnet_lite0_b4"  # the toy images' 6 x 8 map, as in test_pipeline
SCALE = "96"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def weird(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-text") / WEIRD_FOLDER
    data = write_shapes(root / "data")
    for xml in (data / "annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>blue</name>", f"<name>{WEIRD_CLASS}</name>"))
    # A box that reaches beyond its 160 x 120 image (clipped), and an image
    # whose annotation cannot be used (skipped): a warning and a listed input.
    extra = data / "annotations" / f"{TRAIN[0]}.xml"
    extra.write_text(extra.read_text().replace("</annotation>", "<object><name>red</name><bndbox><xmin>150</xmin><ymin>10</ymin><xmax>200</xmax><ymax>50</ymax></bndbox></object></annotation>"))
    shutil.copy(data / "images" / f"{TEST[0]}.jpg", data / "images" / "broken.jpg")
    (data / "annotations" / "broken.xml").write_text("<annotation><object><name>red</name></object></annotation>")
    (data / "test.txt").write_text("\n".join([*TEST, "broken"]) + "\n")
    return SimpleNamespace(root=root, data=data, clipped=extra, broken=data / "annotations" / "broken.xml")


@pytest.fixture(scope="module")
def weird_run(weird):
    """propose -> cache -> train-svm -> finetune -> detect on the weird folder, outputs kept."""
    root, data = weird.root, weird.data
    run = SimpleNamespace(props=root / "props [x].json", feats=root / "feats [/x]", model=root / "model [bold].safetensors")
    run.head, run.dets, run.drawn = root / "head [i].safetensors", root / "dets [v2].json", root / "drawn [/b]"
    run.propose = invoke("propose", "--data", data, "--out", run.props, "--workers", "1")
    run.cache = invoke("cache", "--data", data, "--props", run.props, "--cache", run.feats, "--scales", SCALE, "--backbone", BACKBONE)
    run.train = invoke("train-svm", "--cache", run.feats, "--data", data, "--split", "train", "--out", run.model)
    run.finetune = invoke("finetune", "--cache", run.feats, "--data", data, "--split", "train", "--out", run.head, "--epochs", "1", "--hidden", "16")
    run.detect = invoke("detect", "--data", data, "--split", "test", "--model", run.model, "--cache", run.feats, "--out", run.dets, "--save-dir", run.drawn)
    return run


def test_propose_prints_paths_as_they_are(weird, weird_run):
    result = weird_run.propose
    no_traceback(result)
    assert result.exit_code == 1  # the broken annotation
    assert f"warning: {weird.clipped}: box 3 [149, 9, 200, 50] extends beyond the 160x120 image; clipped to [149, 9, 160, 50]" in result.stderr
    assert f"Wrote {weird_run.props}: 6 images" in result.stderr
    assert "1 input(s) skipped:" in result.stderr
    assert f"  skipped {weird.broken}: object 1 ('red') has no <bndbox>" in result.stderr.splitlines()


def test_cache_and_cache_info_print_paths_as_they_are(weird, weird_run):
    result = weird_run.cache
    no_traceback(result)
    assert result.exit_code == 1
    assert f"warning: {weird.clipped}: box 3" in result.stderr
    assert f"{weird_run.feats}: 6 image(s) computed" in result.stderr
    assert f"  skipped {weird.broken}: object 1 ('red') has no <bndbox>" in result.stderr.splitlines()
    info = invoke("cache-info", weird_run.feats, "--verify")
    no_traceback(info)
    assert info.exit_code == 0
    assert info.stdout.splitlines()[0] == f"cache:    {weird_run.feats}"


def test_training_commands_print_paths_and_class_names_as_they_are(weird_run):
    for result, out in ((weird_run.train, weird_run.model), (weird_run.finetune, weird_run.head)):
        no_traceback(result)
        assert result.exit_code == 0, result.output
        assert f"Wrote {out}: " in result.stderr
    assert f"class(es): red, {WEIRD_CLASS}" in weird_run.train.stderr or f"class(es): {WEIRD_CLASS}, red" in weird_run.train.stderr
    listing = invoke("models", weird_run.model)
    no_traceback(listing)
    assert listing.exit_code == 0
    assert listing.stderr.splitlines()[0].startswith(f"{weird_run.model}: ")
    assert f"  classes: {WEIRD_CLASS}, red" in listing.stderr.splitlines() or f"  classes: red, {WEIRD_CLASS}" in listing.stderr.splitlines()
    # A model of the user's own: how it proposes and scores, and no README to look for beside it.
    assert "  proposals: selective search" in listing.stderr.splitlines()
    assert "  scores: SVM margins + 2 x predicted IoU, shown from -0.3" in listing.stderr.splitlines()
    assert not any("README" in line for line in listing.stderr.splitlines())


def test_detect_draw_eval_print_paths_and_class_names_as_they_are(weird, weird_run, tmp_path):
    result = weird_run.detect
    no_traceback(result)
    assert result.exit_code == 1  # the broken annotation, listed
    assert f"wrote {weird_run.dets} (+ " in result.stderr and f"annotated images in {weird_run.drawn}" in result.stderr
    assert f"  skipped {weird.broken}: object 1 ('red') has no <bndbox>" in result.stderr.splitlines()
    classes = json.loads(weird_run.dets.read_text())["classes"]
    assert WEIRD_CLASS in classes

    drawn = weird.root / "again [/i]"
    draw = invoke("draw", weird_run.dets, "--out", drawn)
    no_traceback(draw)
    assert draw.exit_code == 0
    assert f"Wrote {len(TEST)} annotated image(s) to {drawn}" in draw.stderr

    evaluation = invoke("eval", weird_run.dets, "--data", weird.data, "--split", "test")
    no_traceback(evaluation)
    assert evaluation.exit_code == 1
    assert f"  skipped {weird.broken}: object 1 ('red') has no <bndbox>" in evaluation.stderr.splitlines()
    assert any(line.split("│")[1].strip() == WEIRD_CLASS for line in evaluation.stderr.splitlines() if line.count("│") > 2)


@pytest.mark.parametrize(
    "command",
    [
        ["propose", "{missing}.jpg", "--out", "{root}/p.json"],
        ["cache", "{missing}.jpg", "--cache", "{root}/feats [/x]"],
        ["cache-info", "{missing}"],
        ["train-svm", "--cache", "{missing}", "--out", "{root}/m.safetensors"],
        ["finetune", "--cache", "{missing}", "--out", "{root}/h.safetensors"],
        ["detect", "{missing}.jpg"],
        ["draw", "{missing}.json", "--out", "{root}/d"],
        ["eval", "{missing}.json", "--data", "{root}/data"],
        ["models", "{missing}.safetensors"],
    ],
    ids=lambda c: c[0],
)
def test_every_command_names_a_missing_weird_path_in_one_line(weird, command):
    missing = weird.root / "no [/such] [bold]thing"
    args = [a.format(missing=missing, root=weird.root) for a in command]
    result = invoke(*args)
    no_traceback(result)
    assert result.exit_code in (1, 2)
    # One line says it: an error, or (`spp models`, a batch of files) the skipped file.
    named = next(a for a in args if a.startswith(str(missing)))
    said = [line for line in result.stderr.splitlines() if line.startswith(("Error: ", "  skipped "))]
    assert len(said) == 1, result.stderr
    assert said[0].startswith((f"Error: {named}: ", f"  skipped {named}: ")), said[0]


def test_progress_descriptions_and_warnings_never_read_markup():
    from spp_cli import ui

    with ui.console.capture() as captured:
        ui.warn("a [/a] b [bold]c :smile: d\\e")
        ui.print_bad([(Path("x [/y].jpg"), "x [/y].jpg: broken")])
        ui.say("[red]plain[/red] :thumbs_up:")
        with ui.progress() as bar:
            task = bar.add_task("[/oops] é", total=1, rate="[red]")
            bar.update(task, advance=1)
    text = captured.get()
    assert "warning: a [/a] b [bold]c :smile: d\\e" in text
    assert "  skipped x [/y].jpg: broken" in text
    assert "[red]plain[/red] :thumbs_up:" in text
    assert "[/oops] é" in text and "[red]" in text


# ------------------------------------------------ inputs that yield no image


@pytest.mark.parametrize("command", ["propose", "detect"])
def test_an_input_without_images_is_skipped_and_the_rest_written(tmp_path, command):
    data = write_shapes(tmp_path / "shapes")
    a, b = data / "images" / f"{TEST[0]}.jpg", data / "images" / f"{TEST[1]}.jpg"
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.jpg").mkdir()
    out = tmp_path / "out.json"
    extra = ["--workers", "1"] if command == "propose" else []
    result = invoke(command, a, b, tmp_path / "sub", tmp_path / "x.jpg", "--out", out, *extra)
    no_traceback(result)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert "2 input(s) skipped:" in lines
    assert f"  skipped {tmp_path / 'sub'}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)" in lines
    assert f"  skipped {tmp_path / 'x.jpg'}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)" in lines
    assert [im["path"] for im in json.loads(out.read_text())["images"]] == [str(a), str(b)]


def test_cache_skips_an_input_without_images_and_caches_the_rest(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    a = data / "images" / f"{TEST[0]}.jpg"
    (tmp_path / "sub").mkdir()
    feats = tmp_path / "feats"
    result = invoke("cache", a, tmp_path / "sub", "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE)
    no_traceback(result)
    assert result.exit_code == 1
    assert f"  skipped {tmp_path / 'sub'}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)" in result.stderr.splitlines()
    assert f"{feats}: 1 image(s) computed" in result.stderr


# ------------------------------------------------------------ truncated JPEGs


def test_jpeg_cut_short_gives_proposals_features_and_detections_with_a_warning(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    for image_id in TEST:
        photo = data / "images" / f"{image_id}.jpg"
        raw = photo.read_bytes()
        photo.write_bytes(raw[:-20] if image_id == TEST[0] else raw[: len(raw) // 2])
    short, half = data / "images" / f"{TEST[0]}.jpg", data / "images" / f"{TEST[1]}.jpg"
    props, feats, model, dets = tmp_path / "p.json", tmp_path / "feats", tmp_path / "m.safetensors", tmp_path / "d.json"

    def warned(result, path):
        return any(line.startswith(f"warning: {path}: truncated file (its data ends early); decoded what is there") for line in result.stderr.splitlines())

    result = invoke("propose", "--data", data, "--out", props, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert warned(result, short) and warned(result, half)
    by_path = {im["path"]: im for im in json.loads(props.read_text())["images"]}
    assert len(by_path[str(short)]["boxes"]) > 0 and len(by_path[str(half)]["boxes"]) > 0

    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", SCALE, "--backbone", BACKBONE)
    assert result.exit_code == 0, result.output
    assert warned(result, short) and warned(result, half)
    assert "6 image(s) computed" in result.stderr

    assert invoke("train-svm", "--cache", feats, "--data", data, "--split", "train", "--out", model).exit_code == 0
    result = invoke("detect", short, half, "--model", model, "--props", props, "--out", dets, "--save-dir", tmp_path / "drawn")
    assert result.exit_code == 0, result.output
    assert warned(result, short) and warned(result, half)
    images = json.loads(dets.read_text())["images"]
    assert [im["path"] for im in images] == [str(short), str(half)]
    assert images[0]["detections"], "the photo cut 20 bytes short still shows its objects"
    assert (tmp_path / "drawn" / short.name).is_file()


def test_jpeg_cut_before_its_pixels_is_a_clear_skip(tmp_path):
    data = write_shapes(tmp_path / "shapes")
    cut = data / "images" / f"{TEST[0]}.jpg"
    cut.write_bytes(cut.read_bytes()[:300])
    good = data / "images" / f"{TEST[1]}.jpg"
    out = tmp_path / "p.json"
    result = invoke("propose", cut, good, "--out", out, "--workers", "1")
    assert result.exit_code == 1
    assert any(line.startswith(f"  skipped {cut}: cannot decode image") for line in result.stderr.splitlines()), result.stderr
    assert [im["path"] for im in json.loads(out.read_text())["images"]] == [str(good)]
