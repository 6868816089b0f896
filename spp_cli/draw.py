"""Detections drawn on images (the file format is in :mod:`spp_cli.detections`).

Pillow and the standard library only (no torch, no numpy), so drawing works
wherever the image loader does.

Boxes follow the toolkit convention (see ``boxes.py``): ``[x1, y1, x2, y2]``
floats in continuous pixel coordinates of the original image, so a box
``[0, 0, W, H]`` covers every pixel. A box outline is drawn on the pixels the
box covers (from its edges inward), which keeps a whole-image box visible.

Scores are SVM scores, not probabilities: they can be negative and are
printed as they are, with two decimals. A detection from a calibrated model
(`spp train`) also carries a probability: its label shows that instead, as
a percentage.
"""

from __future__ import annotations

import functools
import math
import zlib

from PIL import Image, ImageDraw, ImageFont


# Saturated colours that stay apart from each other and from the greys,
# skies and skins of typical photos. No white, black or grey: a box in those
# disappears on many images.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (170, 110, 40),  # brown
    (128, 0, 0),  # maroon
    (128, 128, 0),  # olive
    (0, 0, 128),  # navy
    (255, 105, 180),  # pink
    (0, 255, 127),  # spring green
    (100, 60, 255),  # violet
    (255, 69, 0),  # orange-red
    (30, 144, 255),  # sky blue
    (0, 90, 40),  # dark green
)

# Line height in pixels of Pillow's built-in bitmap font, used only when no
# scalable font is available (Pillow < 10.1 or built without FreeType).
_BITMAP_FONT_PX = 11


def class_colour(name: str) -> tuple[int, int, int]:
    """The colour of class ``name``: the same in every run and process.

    CRC-32 of the UTF-8 name picks a palette entry; Python's ``hash()`` is
    salted per process and would recolour classes from run to run.
    """
    return PALETTE[zlib.crc32(name.encode("utf-8")) % len(PALETTE)]


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``fill``.

    Uses WCAG relative luminance: black wins above L ~ 0.18, which is
    where the contrast ratios ``(L + 0.05) / 0.05`` and ``1.05 / (L + 0.05)``
    cross (yellow, cyan, lime get black text; blue, purple, maroon white).
    """

    def linear(c: int) -> float:
        s = c / 255.0
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = fill
    lum = 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


def line_width(width: int, height: int) -> int:
    """Box outline width for a ``width`` x ``height`` image: 2 px up to 500 px, then 1 px per 200."""
    return max(2, round(min(width, height) / 200))


def font_size(width: int, height: int) -> int:
    """Label font size in pixels: 12 on small images, 1/40 of the short side on large ones."""
    return max(12, min(width, height) // 40)


def draw_detections(
    image: Image.Image, detections: list[dict], min_score: float | None = None
) -> Image.Image:
    """Return an RGB copy of ``image`` with ``detections`` outlined and labelled.

    Each detection is a dict with ``box`` (xyxy, continuous pixels of this
    image), ``class`` (name) and ``score``. A box gets an outline in its
    class colour and a filled tag ``"class 0.93"`` above it (inside it, at
    the top, when there is no room above). Detections with a score below
    ``min_score`` are left out. Higher scores are drawn later, so they end up
    on top; all tags are drawn after all outlines so that no line crosses
    a label.
    """
    out = image.convert("RGB")  # always a copy, even for an RGB input
    width, height = out.size
    kept = [d for d in detections if min_score is None or (_score(d) is not None and _score(d) >= min_score)]
    # Unscored detections sort first (underneath); ties keep file order.
    kept.sort(key=lambda d: -math.inf if _score(d) is None else _score(d))
    lw = line_width(width, height)
    size = font_size(width, height)

    draw = ImageDraw.Draw(out)
    placed = []
    for det in kept:
        rect = _pixel_rect(det["box"], width, height)
        if rect is None:
            continue
        colour = class_colour(str(det["class"]))
        draw.rectangle(rect, outline=colour, width=lw)
        placed.append((det, rect, colour))

    for det, (left, top, _, _), colour in placed:
        tag = _label_tag(label_text(det), colour, size)
        # Above the box, its bottom on the box's top edge; inside at the top
        # when that would leave the image. Shifted left if it would run off
        # the right edge, but never past the left one.
        y = top - tag.height if top - tag.height >= 0 else top
        x = max(0, min(left, width - tag.width))
        out.paste(tag, (x, y))
    return out


def label_text(det: dict) -> str:
    """``class 87%`` with a probability, ``class -0.25`` with a margin only, ``class`` with neither."""
    if det.get("probability") is not None:
        return f"{det['class']} {float(det['probability']):.0%}"
    score = _score(det)
    return str(det["class"]) if score is None else f"{det['class']} {score:.2f}"


def _score(det: dict) -> float | None:
    score = det.get("score")
    return None if score is None else float(score)


def _pixel_rect(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Inclusive pixel rectangle ``(left, top, right, bottom)`` of a continuous box, clipped.

    Continuous ``[x1, x2)`` covers pixel columns ``round(x1) .. round(x2) - 1``
    (half-up rounding, not Python's round-half-even, so .5 edges do not
    alternate). ``None`` for a box wholly outside the image.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height or x2 < x1 or y2 < y1:
        return None
    left = max(0, math.floor(x1 + 0.5))
    top = max(0, math.floor(y1 + 0.5))
    right = min(width - 1, math.floor(x2 + 0.5) - 1)
    bottom = min(height - 1, math.floor(y2 + 0.5) - 1)
    # A box thinner than a pixel is still shown, as a one-pixel line.
    return left, top, max(left, right), max(top, bottom)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, int]:
    """Pillow's built-in font at ``size`` px, and the factor to upscale its rendering by.

    Pillow >= 10.1 with FreeType scales its bundled font itself (factor 1).
    Older Pillow, or one built without FreeType, only has an 11 px bitmap
    font: the tag is then rendered at that size and enlarged, blocky but
    readable on a 4000 px photo.
    """
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default() takes no size
        font = ImageFont.load_default()
    if isinstance(font, ImageFont.FreeTypeFont):
        return font, 1
    return font, max(1, round(size / _BITMAP_FONT_PX))


# Fonts of wide coverage that Linux (DejaVu, Noto), macOS and Windows install, found by name in
# their font folders. Pillow's bundled font draws ASCII only: "ñandú" came out as "□and□".
_WIDE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arial.ttf")


@functools.lru_cache(maxsize=16)
def _wide_font(size: int) -> ImageFont.FreeTypeFont | None:
    """A system font for text beyond ASCII at ``size`` px, or None where none is installed."""
    for name in _WIDE_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ImportError):  # ImportError: a Pillow built without FreeType
            continue
    return None


def _label_tag(text: str, fill: tuple[int, int, int], size: int) -> Image.Image:
    """A filled rectangle in ``fill`` with ``text`` on it in black or white (a class name
    beyond ASCII in a system font of wide coverage where one is installed)."""
    wide = None if text.isascii() else _wide_font(size)
    font, scale = (wide, 1) if wide is not None else _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # The height spans a reference with an ascender and a descender, so tags
    # are the same height whatever letters a class name happens to have.
    _, ref_top, _, ref_bottom = probe.textbbox((0, 0), "Ag", font=font)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    top, bottom = min(top, ref_top), max(bottom, ref_bottom)
    pad = max(1, (bottom - top) // 5)
    tag = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), fill)
    ImageDraw.Draw(tag).text((pad - left, pad - top), text, font=font, fill=text_colour(fill))
    if scale > 1:
        tag = tag.resize((tag.width * scale, tag.height * scale), Image.Resampling.NEAREST)
    return tag
