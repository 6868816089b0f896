"""The single image loader of the toolkit, and input expansion.

Every command reads pixels through :func:`load_image`, so proposals, features
and drawings see the same image: EXIF orientation applied, any mode
(grayscale, RGBA, palette, 16-bit, CMYK) converted to 8-bit RGB, and a
pixel-count limit that turns decompression bombs into a clear error.
"""

from __future__ import annotations

import functools
import glob
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from spp_cli.errors import ImageError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

# 100 megapixels: far above any photo a detector is run on (a 12 MP phone
# photo is 12e6), far below what exhausts memory when decoded (3 bytes/px).
DEFAULT_MAX_PIXELS = 100_000_000


def max_pixels() -> int:
    """The pixel limit: ``SPP_MAX_PIXELS`` from the environment, else the default.

    Raises:
        UsageError: the variable is set to anything but a positive whole number.
    """
    value = os.environ.get("SPP_MAX_PIXELS")
    return _parse_max_pixels(value) if value is not None and value.strip() else DEFAULT_MAX_PIXELS


@functools.lru_cache(maxsize=8)
def _parse_max_pixels(value: str) -> int:
    """``SPP_MAX_PIXELS``'s value, parsed once per value (not once per image)."""
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        # As shard.py says of WORLD_SIZE and the other launcher variables.
        raise UsageError(f"SPP_MAX_PIXELS={value!r} in the environment is not a positive whole number")
    return limit


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, reading only the header."""
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


# Pillow's MAX_IMAGE_PIXELS and LOAD_TRUNCATED_IMAGES are the process's: held while one is
# changed and restored, so that loads on two threads (selective search ahead of the network,
# the Python API called from threads) neither see the other's value nor restore out of order.
_PILLOW_SETTINGS = threading.RLock()


class TruncatedImageWarning(UserWarning):
    """An image file whose data ends early; what was there was decoded."""


def load_image(path: str | Path, warn: Callable[[str], None] | None = None) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    A file whose data ends early (an interrupted download or copy) is
    decoded as far as it goes, the rest filled the way the decoder fills it
    (grey for JPEG), and ``warn`` is called with one line naming the file and
    how much of the image is missing (without ``warn``: a
    :class:`TruncatedImageWarning`). Every command reads through here, so
    all of them see the same pixels of such a file.

    Raises :class:`ImageError` naming the file for anything unreadable:
    empty files, files cut before any pixel data, non-images, images over
    the pixel limit.
    """
    path = Path(path)
    with _open(path) as im:
        try:
            im.load()
        except OSError as exc:
            if not _is_truncation(exc):
                raise ImageError(f"{path}: cannot decode image ({_reason(exc)})") from None
            return _load_truncated(path, warn)
        except (ValueError, SyntaxError) as exc:
            raise ImageError(f"{path}: cannot decode image ({_reason(exc)})") from None
        return rgb_pixels(im, str(path))


def rgb_pixels(im: Image.Image, name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an open Pillow image as the loader converts files: its EXIF
    orientation applied, any mode converted (a lazily opened image is decoded here).

    Raises:
        ImageError: naming ``name``; a truncated file's says to load it by its path, which
            decodes what is there (:func:`load_image`).
    """
    try:
        return np.asarray(_to_rgb(ImageOps.exif_transpose(im)))
    except OSError as exc:
        if _is_truncation(exc):
            raise ImageError(f"{name}: truncated file (its data ends early); pass its path to decode what is there") from None
        raise ImageError(f"{name}: cannot decode image ({_reason(exc)})") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot decode image ({_reason(exc)})") from None


def rgba_to_rgb(array: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA as the loader converts a transparent file: composited onto white."""
    return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA")))


# What Pillow's decoders say when the data stops before the image is complete.
_TRUNCATION_MESSAGES = ("image file is truncated", "truncated file read")


def _is_truncation(exc: OSError) -> bool:
    return any(m in str(exc).lower() for m in _TRUNCATION_MESSAGES)


def _load_truncated(path: Path, warn: Callable[[str], None] | None) -> np.ndarray:
    """Decode what a truncated file holds (Pillow's ``LOAD_TRUNCATED_IMAGES``)."""
    with _PILLOW_SETTINGS:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with _open(path) as im:
                im.load()
                fill = 128 if im.format == "JPEG" else 0
                missing = _missing_fraction(np.asarray(im), fill)
                pixels = np.asarray(_to_rgb(ImageOps.exif_transpose(im)))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{path}: cannot decode image ({_reason(exc)})") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if missing > 0.999:  # not even a strip of the image: nothing to detect on
        raise ImageError(f"{path}: cannot decode image (the file is truncated before any pixel data)")
    colour = "grey" if fill == 128 else "black"
    if missing > 0:
        what = f"{missing:.1%} of the image is missing (filled {colour})"
    else:
        what = "no whole block is missing (the last ones may be damaged)"
    message = f"{path}: truncated file (its data ends early); decoded what is there: {what}"
    if warn is None:
        warnings.warn(message, TruncatedImageWarning, stacklevel=3)
    else:
        warn(message)
    return pixels


def _missing_fraction(pixels: np.ndarray, fill: int) -> float:
    """Share of an image that a decoder filled in after its data ran out.

    A decoder that runs out of data fills the rest of the image, in raster
    order, with one value; so the fill is the run of ``fill`` pixels ending
    each row, in the rows at the bottom that end in it.
    """
    if pixels.ndim == 3:
        filled = (pixels == fill).all(axis=2)
    else:
        filled = pixels == fill
    height, width = filled.shape
    missing = 0
    for row in filled[::-1]:
        if not row[-1]:
            break
        not_filled = np.flatnonzero(~row)
        missing += width - (not_filled[-1] + 1 if len(not_filled) else 0)
    return missing / float(height * width)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    limit = max_pixels()
    with _PILLOW_SETTINGS:
        previous = Image.MAX_IMAGE_PIXELS  # restored for the caller's own opens
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with warnings.catch_warnings():
                # Pillow warns between 1x and 2x the limit and raises above; we want
                # one rule: over the limit is an error.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{path}: image has more than {limit:,} pixels (set SPP_MAX_PIXELS to allow it)") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file Pillow can read") from None
        except OSError as exc:
            raise ImageError(f"{path}: cannot decode image ({_reason(exc)})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if im.size[0] * im.size[1] > limit:
        im.close()
        raise ImageError(f"{path}: image has more than {limit:,} pixels (set SPP_MAX_PIXELS to allow it)")
    return im


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not make the image unreadable
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the used range to 8 bits, like a viewer does.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency onto white rather than dropping alpha, which
        # would reveal whatever colour the transparent pixels happen to hold.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand command-line inputs to image paths, order kept, no duplicates.

    Each input is an image file, a folder (its images, sorted, not recursive),
    a glob pattern (``"photos/*.jpg"``, ``**`` allowed), or a ``.txt`` file
    listing one path per line (relative paths are relative to the list file).
    A file given explicitly is kept even if it is not an image, so that the
    command reports it as bad instead of silently ignoring it.

    Returns:
        ``(paths, skipped)``: the images, and ``(input, problem)`` for each
        input that yields none (an empty folder, a pattern matching nothing,
        a missing path), which the command lists with the unreadable images.
        A shell glob such as ``photos/*`` that meets an empty subfolder
        therefore costs that one input, not the batch.

    Raises:
        SPPError: no input yields an image (the message says why for each).
    """
    from spp_cli.errors import SPPError

    # A bad SPP_MAX_PIXELS stops the run here, once, before any work: raised while
    # reading each image it would be one "skipped" line per image. (Datasets meet it
    # in image_size, which they call for every record before any work, and pass on.)
    max_pixels()
    paths: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        try:
            paths.extend(_expand_one(item))
        except SPPError as exc:
            skipped.append((item, str(exc)))
    if not paths:
        raise SPPError("; ".join(problem for _, problem in skipped) or "no input")
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, skipped


def _expand_one(item: str) -> list[Path]:
    """The images of one input; raises :class:`SPPError` when it yields none."""
    from spp_cli.errors import SPPError

    p = Path(item)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            deeper = next((q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES), None)
            if deeper is not None:  # a folder's own images only, as ultralytics reads one: say how to reach the rest
                raise SPPError(f"{p}: folder contains no images itself, but its subfolders do (e.g. {deeper}); "
                               f"give \"{p / '**' / ('*' + deeper.suffix)}\" to take those")
            raise SPPError(f"{p}: folder contains no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        return found
    if p.is_file() and p.suffix.lower() == ".txt":
        return _read_list_file(p)
    if p.exists():
        return [p]
    if glob.has_magic(item):
        found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
        if not found:
            raise SPPError(f"{p}: pattern matches no files")
        return found
    raise SPPError(f"{p}: no such file or folder")


def _read_list_file(list_file: Path) -> list[Path]:
    from spp_cli.errors import SPPError

    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SPPError(f"{list_file}: list file is not UTF-8 text") from None
    except OSError as exc:
        raise SPPError(f"{list_file}: cannot read ({exc.strerror or exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        out.append(path if path.is_absolute() else list_file.parent / path)
    if not out:
        raise SPPError(f"{list_file}: list file names no images")
    if not any(path.exists() for path in out):
        # Not a list of images at all (notes, labels, a YOLO split of ids): name the file, not each of its lines.
        first = out[0].relative_to(list_file.parent) if out[0].is_relative_to(list_file.parent) else out[0]
        raise SPPError(f"{list_file}: none of its {len(out)} line(s) names an existing file (the first: '{first}'); "
                       "a .txt input lists image paths, one per line, relative to the list's folder")
    return out
