"""`spp draw` and the drawing library: pixels where the boxes are, stable colours, bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from conftest import REPO, invoke, one_line, write_image
from spp_cli import draw as draw_lib
from spp_cli.draw import class_colour, draw_detections, line_width, text_colour

GREY = (128, 128, 128)


def grey(width: int = 200, height: int = 150) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def colours(image: Image.Image) -> set:
    """The distinct pixel values of an image."""
    return {c for _, c in image.getcolors(image.width * image.height)}


def write_grey(path: Path, width: int = 200, height: int = 150) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey(width, height).save(path)
    return path


def det(box, name="raccoon", score=0.93, class_id=0) -> dict:
    return {"box": box, "class": name, "class_id": class_id, "score": score}


def write_detections(path: Path, images: list[dict], **overrides) -> Path:
    doc = {"format": "spp-detections", "version": 1, "classes": ["raccoon", "cat"], "images": images, **overrides}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def entry(image_path, detections, width=200, height=150) -> dict:
    return {"id": Path(image_path).stem, "path": str(image_path), "width": width, "height": height, "detections": detections}


# ---------------------------------------------------------------- library


def test_box_edges_are_drawn_in_the_class_colour_where_the_box_is():
    image = grey()
    out = draw_detections(image, [det([40, 50, 160, 130])])
    colour = class_colour("raccoon")
    assert out.mode == "RGB" and out.size == (200, 150)
    assert image.getpixel((40, 90)) == GREY  # the input is not drawn on
    lw = line_width(200, 150)
    assert lw == 2
    # Continuous [40, 160) covers columns 40..159: the outline lies on them, inward.
    for x in (40, 40 + lw - 1, 159 - lw + 1, 159):
        assert out.getpixel((x, 90)) == colour, x
    assert out.getpixel((100, 50)) == colour  # top edge
    assert out.getpixel((100, 129)) == colour  # bottom edge
    # Just outside the box and just inside the outline: untouched.
    for xy in ((39, 90), (160, 90), (40 + lw, 90), (100, 130)):
        assert out.getpixel(xy) == GREY, xy
    # Well inside the box, away from the label.
    assert out.getpixel((100, 100)) == GREY


def test_label_sits_above_the_box_or_inside_when_there_is_no_room():
    colour = class_colour("raccoon")
    text = text_colour(colour)

    def is_tag(image, box):
        # Mostly the class colour, with text in the contrasting colour on it.
        region = image.crop(box)
        counts = {c: n for n, c in region.getcolors(region.width * region.height)}
        return counts.get(colour, 0) > 0.3 * region.width * region.height and text in counts

    above = draw_detections(grey(), [det([40, 60, 160, 130])])
    assert is_tag(above, (42, 44, 100, 60))  # the rows just above the box's top-left corner
    assert above.crop((42, 62, 100, 80)).getcolors() == [(58 * 18, GREY)]  # below the top edge: nothing
    inside = draw_detections(grey(), [det([40, 0, 160, 130])])
    # No room above: the tag covers the top-left inside of the box instead.
    assert is_tag(inside, (42, 2, 100, 14))
    assert inside.getpixel((60, 40)) == GREY


def test_label_text_is_score_with_two_decimals_in_contrasting_colour():
    yellow, navy = (255, 225, 25), (0, 0, 128)
    assert text_colour(yellow) == (0, 0, 0)
    assert text_colour(navy) == (255, 255, 255)
    # Every palette colour gets the text colour that contrasts more with it.
    for colour in draw_lib.PALETTE:
        assert text_colour(colour) in ((0, 0, 0), (255, 255, 255))
    # A negative SVM score is printed as such: the tag is as wide as its text.
    tag_neg = draw_lib._label_tag("raccoon -1.25", navy, 12)
    tag_pos = draw_lib._label_tag("raccoon 1.25", navy, 12)
    assert tag_neg.width > tag_pos.width and tag_neg.height == tag_pos.height
    assert (255, 255, 255) in colours(tag_neg)  # white text on navy


def test_label_shows_the_probability_where_the_model_gave_one():
    assert draw_lib.label_text({"class": "raccoon", "score": -0.25}) == "raccoon -0.25"
    assert draw_lib.label_text({"class": "raccoon", "score": 1.3, "probability": 0.8731}) == "raccoon 87%"
    assert draw_lib.label_text({"class": "raccoon"}) == "raccoon"


def test_min_score_leaves_out_weak_detections_and_boxes_outside_are_ignored():
    colour_cat = class_colour("cat")
    out = draw_detections(
        grey(),
        [det([40, 50, 160, 130], "cat", score=-0.8), det([300, 300, 400, 400], "cat", score=2.0)],
        min_score=-0.5,
    )
    assert out.getpixel((40, 90)) == GREY
    assert colour_cat not in colours(out)


def test_whole_image_box_is_visible_at_the_borders():
    out = draw_detections(grey(), [det([0, 0, 200, 150])])
    colour = class_colour("raccoon")
    assert out.getpixel((0, 100)) == colour and out.getpixel((199, 100)) == colour
    assert out.getpixel((100, 149)) == colour


def test_big_images_get_thicker_lines_and_bigger_labels():
    small = draw_detections(grey(200, 150), [det([20, 40, 180, 140])])
    big = draw_detections(grey(3000, 2000), [det([300, 600, 2700, 1900])])
    colour = class_colour("raccoon")

    def run_length(image, x0, y):
        n = 0
        while image.getpixel((x0 + n, y)) == colour:
            n += 1
        return n

    assert run_length(small, 20, 100) == 2
    assert run_length(big, 300, 1500) == 10 == line_width(3000, 2000)

    def tag_height(image, x, box_top):
        n = 0
        while image.getpixel((x, box_top - 1 - n)) == colour:
            n += 1
        return n

    assert tag_height(big, 301, 600) > 3 * tag_height(small, 21, 40)


def test_labels_stay_readable_with_only_the_bitmap_font(monkeypatch):
    # Pillow < 10.1 has no load_default(size=...): its 11 px bitmap font is enlarged.
    # load_default_imagefont() is the bitmap font on Pillow >= 10.1; before
    # that, load_default() with no argument returns it.
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes 0 positional arguments")
        return bitmap()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    draw_lib._font.cache_clear()
    try:
        font, scale = draw_lib._font(50)
        assert not isinstance(font, ImageFont.FreeTypeFont) and scale == 5
        tag = draw_lib._label_tag("raccoon 0.93", (0, 0, 128), 50)
        assert tag.height >= 50
        assert (255, 255, 255) in colours(tag)
    finally:
        draw_lib._font.cache_clear()


def test_a_class_name_beyond_ascii_is_drawn_with_its_letters_where_a_wide_font_is_installed():
    if draw_lib._wide_font(30) is None:
        pytest.skip("no font of wide coverage installed (DejaVu, Noto, Arial)")
    # Each letter its own glyph, not the missing-glyph box that the bundled font draws for all four.
    tags = [np.asarray(draw_lib._label_tag(f"mapache {letter}", (0, 0, 128), 30)) for letter in "ñüé中"]
    assert all(a.shape != b.shape or (a != b).any() for i, a in enumerate(tags) for b in tags[i + 1:])

def test_class_colour_is_stable_across_processes_and_tells_classes_apart():
    names = ["raccoon", "cat", "person", "car", "bird"]
    here = [class_colour(n) for n in names]
    assert len(set(here)) == len(names)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in here)
    code = (
        "import sys; from spp_cli.draw import class_colour;"
        f"print([class_colour(n) for n in {names!r}]);"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    for seed in ("1", "2"):  # Python's hash() would differ between these
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
        assert out.stdout.strip() == str(here)


# ---------------------------------------------------------------- command


def test_draw_writes_one_image_per_entry_and_honours_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_grey(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.jpg", 200, 150)
    dets = write_detections(
        tmp_path / "dets.json",
        [
            entry("imgs/a.png", [det([40, 50, 160, 130], score=1.5), det([10, 20, 30, 140], "cat", score=-0.7, class_id=1)]),
            entry("imgs/b.jpg", [det([20, 30, 100, 100])]),
        ],
    )
    out = tmp_path / "annotated"
    result = invoke("draw", dets, "--out", out, "--conf", "0")
    assert result.exit_code == 0, result.output
    assert f"Wrote 2 annotated image(s) to {out}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    a = Image.open(out / "a.png").convert("RGB")
    assert a.getpixel((40, 90)) == class_colour("raccoon")
    assert a.getpixel((100, 100)) == GREY
    assert a.getpixel((10, 80)) == GREY  # the cat box scored -0.7 < 0: not drawn
    b = Image.open(out / "b.jpg")
    assert b.format == "JPEG" and b.size == (200, 150)

    # Without --conf every detection is drawn, the negative one included (these have no probabilities).
    result = invoke("draw", dets, "--out", out)
    assert result.exit_code == 0
    assert f"Wrote 2 annotated image(s) to {out}: all 3 detection(s)" in result.stderr
    assert Image.open(out / "a.png").convert("RGB").getpixel((10, 80)) == class_colour("cat")


def test_draw_shows_what_spp_detect_shows_of_a_calibrated_model_by_default(tmp_path):
    # spp detect --data writes everything above -1.5 for spp eval; drawn, only probability >= 0.5 by default.
    write_grey(tmp_path / "a.png")
    sure, unsure = dict(det([40, 50, 160, 130], score=1.5), probability=0.9), dict(det([10, 20, 30, 140], "cat", score=-0.7, class_id=1), probability=0.2)
    dets = write_detections(tmp_path / "dets.json", [entry(tmp_path / "a.png", [sure, unsure])])
    out = tmp_path / "drawn"
    for options, message, cat_drawn in [
        ([], "the 1 detection(s) at probability >= 0.50 of 2", False),
        (["--min-prob", "0.1"], "the 2 detection(s) at probability >= 0.10 of 2", True),
        (["--conf", "0"], "the 1 detection(s) at score >= 0 of 2", False),
    ]:
        result = invoke("draw", dets, "--out", out, *options)
        assert result.exit_code == 0, result.output
        assert f"Wrote 1 annotated image(s) to {out}: {message}" in result.stderr
        assert (Image.open(out / "a.png").convert("RGB").getpixel((10, 80)) == class_colour("cat")) == cat_drawn
    result = invoke("draw", dets, "--out", out, "--conf", "0", "--min-prob", "0.5")
    assert result.exit_code == 2
    assert one_line(result) == "Error: --conf and --min-prob both set a threshold: give one"


def test_draw_classes_draws_those_classes_only(tmp_path):
    write_grey(tmp_path / "a.png")
    dets = write_detections(tmp_path / "dets.json", [entry(tmp_path / "a.png", [det([40, 50, 160, 130], score=1.5),
                                                                               det([10, 20, 30, 140], "cat", score=-0.7, class_id=1)])])
    out = tmp_path / "drawn"
    result = invoke("draw", dets, "--out", out, "--classes", "cat")
    assert result.exit_code == 0, result.output
    assert f"Wrote 1 annotated image(s) to {out}: all 1 detection(s) (class cat)" in result.stderr
    drawn = Image.open(out / "a.png").convert("RGB")
    assert drawn.getpixel((10, 80)) == class_colour("cat") and drawn.getpixel((40, 90)) == GREY
    result = invoke("draw", dets, "--out", out, "--classes", "cat,dog")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {dets}: has no class 'dog' (its classes: raccoon, cat)"

def test_draw_min_prob_needs_probabilities(tmp_path):
    write_grey(tmp_path / "a.png")
    dets = write_detections(tmp_path / "dets.json", [entry(tmp_path / "a.png", [det([40, 50, 160, 130])])])
    result = invoke("draw", dets, "--out", tmp_path / "drawn", "--min-prob", "0.5")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {dets}: not every detection has a probability (a model without calibration); use --conf"


def test_draw_resolves_relative_paths_under_images_root(tmp_path):
    root = tmp_path / "data root"
    write_grey(root / "sub" / "x.png")
    elsewhere = write_grey(tmp_path / "abs" / "y.png")
    dets = write_detections(
        tmp_path / "dets.json",
        [entry("sub/x.png", [det([40, 50, 160, 130])]), entry(elsewhere, [det([40, 50, 160, 130], "cat")])],
    )
    out = tmp_path / "out"
    result = invoke("draw", dets, "--images", root, "--out", out)
    assert result.exit_code == 0, result.output
    # Relative paths are taken under ROOT; absolute ones as written.
    assert Image.open(out / "x.png").convert("RGB").getpixel((40, 90)) == class_colour("raccoon")
    assert Image.open(out / "y.png").convert("RGB").getpixel((40, 90)) == class_colour("cat")


def test_draw_from_another_folder_says_where_relative_paths_point(tmp_path, monkeypatch):
    write_grey(tmp_path / "run" / "photos" / "x.png")
    dets = write_detections(tmp_path / "run" / "dets.json", [entry("photos/x.png", [det([40, 50, 160, 130])])])
    monkeypatch.chdir(tmp_path)  # not the folder spp detect ran in
    result = invoke("draw", dets, "--out", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-4:] == [
        "Nothing drawn: no image could be read.",
        "1 input(s) skipped:",
        "  skipped photos/x.png: no such file",
        f"The paths in {dets} are relative to the folder `spp detect` ran in: run `spp draw` there, or give that folder with --images DIR.",
    ]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    result = invoke("draw", dets, "--out", tmp_path / "out", "--images", tmp_path / "run")
    assert result.exit_code == 0, result.output

def test_draw_skips_missing_image_lists_it_and_writes_the_others(tmp_path):
    good = write_grey(tmp_path / "good.png")
    missing = tmp_path / "missing.jpg"
    (tmp_path / "empty.jpg").write_bytes(b"")
    dets = write_detections(
        tmp_path / "dets.json",
        [entry(missing, [det([1, 1, 5, 5])]), entry(good, [det([40, 50, 160, 130])]), entry(tmp_path / "empty.jpg", [])],
    )
    out = tmp_path / "out"
    result = invoke("draw", dets, "--out", out)
    assert result.exit_code == 1
    assert "2 input(s) skipped" in result.stderr
    assert f"skipped {missing}: no such file" in result.stderr
    assert f"skipped {tmp_path / 'empty.jpg'}: empty file (0 bytes)" in result.stderr
    assert f"Wrote 1 annotated image(s) to {out}" in result.stderr
    assert [p.name for p in out.iterdir()] == ["good.png"]


def test_draw_rejects_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "dets.json"
    bad.write_text("not json at all")
    result = invoke("draw", bad, "--out", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == f"Error: {bad}: not valid JSON (Expecting value: line 1 column 1 (char 0))"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"format": "spp-proposals", "version": 1, "images": []}, 'not a detections file (expected "format": "spp-detections")'),
        ([1, 2, 3], 'not a detections file (expected "format": "spp-detections")'),
        ({"format": "spp-detections", "version": 2, "images": []}, "detections format version 2 is not supported (this spp reads version 1)"),
        ({"format": "spp-detections", "version": 1, "images": [{"path": "a.jpg"}]}, "images[0] is malformed (needs path and detections [{box, class, score}, ...])"),
        (
            {"format": "spp-detections", "version": 1, "images": [{"path": "a.jpg", "detections": [{"box": [1, 2, 3], "class": "cat", "score": 1}]}]},
            "images[0].detections[0] is malformed (needs box [x1, y1, x2, y2], class, score; a probability must be a number)",
        ),
        (
            {"format": "spp-detections", "version": 1,
             "images": [{"path": "a.jpg", "detections": [{"box": [1, 2, 30, 40], "class": "cat", "score": 1, "probability": "87%"}]}]},
            "images[0].detections[0] is malformed (needs box [x1, y1, x2, y2], class, score; a probability must be a number)",
        ),
        (
            {"format": "spp-detections", "version": 1, "images": [{"path": "a.jpg", "detections": [{"box": [30, 2, 10, 40], "class": "cat", "score": 1}]}]},
            "images[0].detections[0] has box [30, 2, 10, 40] with x2 < x1 or y2 < y1",
        ),
        ({"format": "spp-detections", "version": 1, "images": [{"path": "a\0.jpg", "detections": []}]}, "images[0] has a path with a NUL character"),
    ],
)
def test_draw_rejects_files_that_are_not_detections(tmp_path, doc, message):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(doc))
    result = invoke("draw", path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {path}: {message}"


def test_draw_refuses_to_overwrite_its_input_images(tmp_path):
    photo = write_image(tmp_path / "photos" / "p.jpg", 200, 150)
    before = photo.read_bytes()
    dets = write_detections(tmp_path / "dets.json", [entry(photo, [det([40, 50, 160, 130])])])
    result = invoke("draw", dets, "--out", tmp_path / "photos")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {photo}: would overwrite an input of this command; choose another --out"
    assert photo.read_bytes() == before


def test_draw_keeps_images_with_the_same_name_apart(tmp_path):
    one, two = write_grey(tmp_path / "a" / "x.png"), write_grey(tmp_path / "b" / "x.png")
    dets = write_detections(tmp_path / "dets.json", [entry(one, [det([40, 50, 160, 130])]), entry(two, [det([40, 50, 160, 130], "cat")])])
    result = invoke("draw", dets, "--out", tmp_path / "out")
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-2.png", "x.png"]
    assert f"warning: {two}: another image has the same name; writing {tmp_path / 'out' / 'x-2.png'}" in result.stderr
    assert Image.open(tmp_path / "out" / "x-2.png").convert("RGB").getpixel((40, 90)) == class_colour("cat")


def test_draw_missing_images_root_is_an_error(tmp_path):
    dets = write_detections(tmp_path / "dets.json", [])
    result = invoke("draw", dets, "--images", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such folder (--images)"


def test_detect_names_an_image_that_went_before_its_drawing_as_not_drawn_not_skipped(tmp_path):
    # Its detections are in the output; only the drawing is missing (the image was deleted after detection).
    from spp_cli import ui
    from spp_cli.commands.detect import _save_drawing

    kept, gone = write_image(tmp_path / "kept.jpg", 80, 60), tmp_path / "gone.jpg"
    undrawn = []
    (tmp_path / "drawn").mkdir()
    for path in (kept, gone):
        result = {"path": str(path), "detections": [{"box": [1, 1, 20, 20], "class": "raccoon", "class_id": 0, "score": 1.0}]}
        _save_drawing(result, tmp_path / "drawn" / path.name, 0.0, undrawn)
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["kept.jpg"]
    assert [path for path, _ in undrawn] == [gone]
    with ui.console.capture() as captured:
        ui.print_bad(undrawn, "image(s) detected but not drawn (their detections are in the output)", "not drawn")
    lines = captured.get().strip().splitlines()
    assert lines[0] == "1 image(s) detected but not drawn (their detections are in the output):"
    assert lines[1].startswith(f"  not drawn {gone}: ")


def test_detect_draws_each_image_as_it_goes_so_an_interrupted_run_keeps_them(tmp_path, monkeypatch):
    import spp_cli.api

    for n in range(3):
        write_image(tmp_path / "imgs" / f"{n}.jpg", 80, 60, seed=n)
    real, calls = spp_cli.api.detect_pixels, []

    def stopped_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of an image
        return real(*args, **kwargs)

    monkeypatch.setattr(spp_cli.api, "detect_pixels", stopped_at_the_third)
    result = invoke("detect", tmp_path / "imgs", "--save-dir", tmp_path / "drawn", "--conf", "-1.5")
    assert result.exit_code == 130
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["0.jpg", "1.jpg"]
    assert result.stderr.strip().splitlines()[-1] == ("Interrupted. The images finished are kept beside --out and in --save-dir; run the same "
                                                      "command again to resume (without --out, it starts over).")


def test_a_drawing_that_cannot_be_written_is_listed_and_detection_goes_on(tmp_path, monkeypatch):
    import spp_cli.fileio
    from spp_cli.errors import SPPError

    for n in range(3):
        write_image(tmp_path / "imgs" / f"{n}.jpg", 80, 60, seed=n)
    real = spp_cli.fileio.atomic_write_bytes

    def full_disk_for_the_second(path, data):
        if Path(path).name == "1.jpg":
            raise SPPError(f"{path}: cannot write (No space left on device)")
        return real(path, data)

    monkeypatch.setattr(spp_cli.fileio, "atomic_write_bytes", full_disk_for_the_second)
    result = invoke("detect", tmp_path / "imgs", "--save-dir", tmp_path / "drawn", "--conf", "-1.5")
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["0.jpg", "2.jpg"]
    assert f"  not drawn {tmp_path / 'imgs' / '1.jpg'}: {tmp_path / 'drawn' / '1.jpg'}: cannot write (No space left on device)" in result.stderr
