"""The image loader and input expansion."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from spp_cli.errors import ImageError, SPPError
from spp_cli.images import expand_inputs, image_size, load_image


def test_rgb_jpeg(tmp_path):
    path = write_image(tmp_path / "a.jpg", 40, 30)
    img = load_image(path)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    # Orientation 6 = rotate 90 degrees clockwise for display: a 40x30 stored
    # image is shown (and must be processed) as 30x40.
    im = Image.new("RGB", (40, 30), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 10))  # stored top-left corner is blue
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=100)
    img = load_image(path)
    assert img.shape == (40, 30, 3)
    assert image_size(path) == (30, 40)
    # After a clockwise turn the stored top-left lands at the top-right.
    assert img[2, -3, 2] > 200 and img[2, -3, 0] < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (8, 6), (10, 200, 30)).convert(mode).save(path)
    img = load_image(path)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert img.shape == (8, 8, 3) and img.min() == 0 and img.max() == 255


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert (load_image(path) == 255).all()


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)$"):
        load_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image file Pillow can read$"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    good = write_image(tmp_path / "good.jpg", 200, 150)
    path = tmp_path / "cut.jpg"
    path.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode image"):
        load_image(path, warn=lambda _: None)


def test_pixel_limit(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", 100, 100)
    monkeypatch.setenv("SPP_MAX_PIXELS", "5000")
    with pytest.raises(ImageError, match=r"big\.png: image has more than 5,000 pixels \(set SPP_MAX_PIXELS to allow it\)"):
        load_image(path)
    # Between 1x and 2x the limit Pillow only warns; we refuse all the same.
    monkeypatch.setenv("SPP_MAX_PIXELS", "9000")
    with pytest.raises(ImageError, match="more than 9,000 pixels"):
        load_image(path)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1.5", "1e6"])
def test_a_bad_pixel_limit_is_one_line_before_any_work(tmp_path, monkeypatch, value):
    from click.testing import CliRunner

    from spp_cli.cli import cli
    from spp_cli.errors import UsageError

    path = write_image(tmp_path / "a.jpg")
    monkeypatch.setenv("SPP_MAX_PIXELS", value)
    message = f"SPP_MAX_PIXELS={value!r} in the environment is not a positive whole number"
    with pytest.raises(UsageError) as info:
        load_image(path)
    assert str(info.value) == message
    # Said once for the run, not once per image ("skipped ...").
    write_image(tmp_path / "b.jpg", seed=1)
    for command in ("detect", "propose"):
        result = CliRunner().invoke(cli, [command, str(tmp_path), "--out", str(tmp_path / "out.json")])
        assert result.exit_code == 2  # a usage error, as a bad option's
        assert result.stderr == f"Error: {message}\n"
        assert not (tmp_path / "out.json").exists()


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file$"):
        load_image(tmp_path / "nope.jpg")


def test_expand_inputs_file_folder_glob_list(tmp_path):
    folder = tmp_path / "my photos ünïcode"
    a = write_image(folder / "a b.jpg")
    b = write_image(folder / "é.png")
    (folder / "notes.md").write_text("not an image")
    c = write_image(tmp_path / "other" / "c.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nother/c.jpg\n\n")
    assert expand_inputs([str(folder)]) == ([a, b], [])
    assert expand_inputs([str(tmp_path / "*" / "*.jpg")]) == ([a, c], [])
    assert expand_inputs([str(listing)]) == ([c], [])
    # duplicates across inputs are dropped, order kept
    assert expand_inputs([str(c), str(folder), str(listing)]) == ([c, a, b], [])


def test_expand_inputs_errors_when_no_input_yields_an_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SPPError, match="folder contains no images"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(SPPError, match="pattern matches no files"):
        expand_inputs([str(tmp_path / "*.jpg")])
    with pytest.raises(SPPError, match=r"missing\.jpg: no such file or folder"):
        expand_inputs([str(tmp_path / "missing.jpg")])


def test_a_text_file_that_is_no_list_of_images_is_named_once(tmp_path):
    from click.testing import CliRunner

    from spp_cli.cli import cli

    notes = tmp_path / "notes.txt"
    notes.write_text("Hello, these are my notes.\nSee you tomorrow\n")
    result = CliRunner().invoke(cli, ["detect", str(notes), "--out", str(tmp_path / "d.json")])
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {notes}: none of its 2 line(s) names an existing file (the first: 'Hello, these are my notes.'); "
                             "a .txt input lists image paths, one per line, relative to the list's folder\n")
    # A list with one missing line among images is a list: the missing one is skipped, the rest read.
    a = write_image(tmp_path / "a.jpg")
    notes.write_text("a.jpg\ngone.jpg\n")
    assert expand_inputs([str(notes)]) == ([a, tmp_path / "gone.jpg"], [])


def test_expand_inputs_reports_each_input_that_yields_no_image(tmp_path):
    a = write_image(tmp_path / "a.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.jpg").mkdir()  # a folder with an image's name, empty
    paths, skipped = expand_inputs([str(a), str(tmp_path / "sub"), str(tmp_path / "x.jpg"), str(tmp_path / "none*.png")])
    assert paths == [a]
    assert skipped == [
        (str(tmp_path / "sub"), f"{tmp_path / 'sub'}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)"),
        (str(tmp_path / "x.jpg"), f"{tmp_path / 'x.jpg'}: folder contains no images (.jpg, .jpeg, .png, .bmp, ...)"),
        (str(tmp_path / "none*.png"), f"{tmp_path / 'none*.png'}: pattern matches no files"),
    ]


def test_a_folder_whose_images_are_in_subfolders_says_how_to_take_them(tmp_path):
    deep, top = write_image(tmp_path / "nested" / "day1" / "a.jpg"), write_image(tmp_path / "b.jpg")
    paths, skipped = expand_inputs([str(tmp_path / "nested"), str(top)])
    assert paths == [top]
    pattern = tmp_path / "nested" / "**" / "*.jpg"
    assert skipped == [(str(tmp_path / "nested"), f"{tmp_path / 'nested'}: folder contains no images itself, but its subfolders do "
                                                  f"(e.g. {deep}); give \"{pattern}\" to take those")]
    assert expand_inputs([str(pattern)]) == ([deep], [])

def cut_jpeg(source: Path, target: Path, keep: int) -> Path:
    """``source``'s first ``keep`` bytes (negative: all but the last ``-keep``)."""
    target.write_bytes(source.read_bytes()[:keep])
    return target


def test_jpeg_cut_after_header_is_refused(tmp_path):
    good = write_image(tmp_path / "good.jpg", 300, 200, seed=3)
    path = cut_jpeg(good, tmp_path / "head.jpg", 400)  # the headers, hardly any scan data
    with pytest.raises(ImageError, match=r"head\.jpg: cannot decode image"):
        load_image(path, warn=lambda _: None)


def test_jpeg_cut_20_bytes_short_decodes_with_a_warning(tmp_path):
    from conftest import REPO

    photo = REPO / "examples" / "raccoon.jpg"
    path = cut_jpeg(photo, tmp_path / "short.jpg", -20)
    warnings: list[str] = []
    pixels = load_image(path, warn=warnings.append)
    full = load_image(photo)
    assert pixels.shape == full.shape
    assert warnings == [
        (f"{path}: truncated file (its data ends early); decoded what is there: "
         "no whole block is missing (the last ones may be damaged)")
    ]
    # Above the last two rows of 16-pixel blocks (chroma upsampling reaches
    # one block up) it is the same picture.
    assert np.array_equal(pixels[:736], full[:736])


def test_jpeg_cut_to_half_decodes_the_top_half_and_says_how_much_is_missing(tmp_path):
    from conftest import REPO

    photo = REPO / "examples" / "raccoon.jpg"
    path = cut_jpeg(photo, tmp_path / "half.jpg", len(photo.read_bytes()) // 2)
    warnings: list[str] = []
    pixels = load_image(path, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: truncated file (its data ends early); decoded what is there: ")
    share = float(re.search(r"([0-9.]+)% of the image is missing \(filled grey\)$", warnings[0]).group(1)) / 100
    grey_rows = int((pixels == 128).all(axis=(1, 2)).sum())
    assert grey_rows / pixels.shape[0] <= share <= grey_rows / pixels.shape[0] + 16 / pixels.shape[0]
    assert 0.3 < share < 0.7
    assert np.array_equal(pixels[:300], load_image(photo)[:300])


def test_truncated_image_without_a_callback_warns_through_python(tmp_path):
    from conftest import REPO

    from spp_cli.images import TruncatedImageWarning

    path = cut_jpeg(REPO / "examples" / "raccoon.jpg", tmp_path / "short.jpg", -20)
    with pytest.warns(TruncatedImageWarning, match="short.jpg: truncated file"):
        load_image(path)


def test_missing_fraction_matches_a_slow_count():
    from spp_cli.images import _missing_fraction

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 128, (40, 24, 3)).astype(np.uint8)
    pixels[30:, 10:] = 128  # the break inside a row of blocks: the rest of each of those rows
    pixels[36:] = 128  # whole rows below
    slow = sum(1 for y in range(30, 40) for x in range(24) if (x >= 10 or y >= 36)) / (40 * 24)
    assert _missing_fraction(pixels, 128) == pytest.approx(slow)
    assert _missing_fraction(rng.integers(0, 128, (8, 8)).astype(np.uint8), 128) == 0.0


