"""`spp draw`: detections drawn onto their images, one annotated file per image."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from spp_cli import ui
from spp_cli.detections import DetectionsImage, read_detections
from spp_cli.draw import draw_detections
from spp_cli.errors import ImageError, SPPError, UsageError, check_class_names
from spp_cli.fileio import atomic_write_bytes, check_not_input, check_writable_folder
from spp_cli.calibration import DISPLAY_PROBABILITY
from spp_cli.images import load_image


def image_path(entry_path: str, images_root: Path | None) -> Path:
    """Where an entry's image is: under ``images_root`` if given and the path is relative."""
    path = Path(entry_path)
    if images_root is not None and not path.is_absolute():
        return images_root / path
    return path


def output_paths(sources: list[Path], out_dir: Path) -> tuple[list[Path], list[str]]:
    """``out_dir/<stem>.jpg`` (``.png`` for PNG inputs) per source, and warnings.

    Two sources with the same stem (``a/x.jpg``, ``b/x.jpg``) would overwrite
    each other: later ones get ``x-2.jpg``, ``x-3.jpg``, ... and a warning.
    """
    taken: set[str] = set()
    outs, warnings = [], []
    for src in sources:
        suffix = ".png" if src.suffix.lower() == ".png" else ".jpg"
        name, n = src.stem + suffix, 1
        while name.lower() in taken:  # case-insensitive: macOS and Windows folders are
            n += 1
            name = f"{src.stem}-{n}{suffix}"
        if n > 1:
            warnings.append(f"{src}: another image has the same name; writing {out_dir / name}")
        taken.add(name.lower())
        outs.append(out_dir / name)
    return outs, warnings


def encode(image: Image.Image, suffix: str) -> bytes:
    """The image as PNG or JPEG bytes (quality 95)."""
    buf = io.BytesIO()
    if suffix == ".png":
        image.save(buf, "PNG")
    else:
        # subsampling=0 keeps colour at full resolution: the default 4:2:0
        # smears the thin coloured outlines and the edges of label text.
        image.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def run_draw(detections_file: Path, images_root: Path | None, out_dir: Path, conf: float | None, min_prob: float | None = None,
             classes: tuple[str, ...] | None = None) -> int:
    if conf is not None and min_prob is not None:
        raise UsageError("--conf and --min-prob both set a threshold: give one")
    doc = read_detections(detections_file)
    if classes is not None:
        check_class_names(list(classes), doc.classes, str(detections_file))
    asked = (lambda det: True) if classes is None else (lambda det: det["class"] in classes)
    every = [d for entry in doc.images for d in entry.detections if asked(d)]
    calibrated = all(d.get("probability") is not None for d in every)  # (a file without detections: nothing to draw either way)
    if min_prob is not None and not calibrated:
        raise SPPError(f"{detections_file}: not every detection has a probability (a model without calibration); use --conf")
    if conf is None and min_prob is None and calibrated:
        min_prob = DISPLAY_PROBABILITY  # what spp detect shows of a model from spp train
    shown = _threshold(conf, min_prob)
    if images_root is not None and not images_root.is_dir():
        raise SPPError(f"{images_root}: no such folder (--images)")
    sources = [image_path(entry.path, images_root) for entry in doc.images]
    outs, warnings = output_paths(sources, out_dir)
    # `--out` pointed at the image folder must not replace the photos.
    check_not_input(outs, sources + [detections_file])
    check_writable_folder(out_dir)

    bad: list[tuple[Path | str, str]] = []
    written = drawn = 0
    start = time.perf_counter()
    with ui.progress() as bar:
        task_id = bar.add_task("draw", total=len(doc.images), rate="")
        for done, (entry, src, out) in enumerate(zip(doc.images, sources, outs), start=1):
            try:
                image = Image.fromarray(load_image(src, warn=ui.warn))
            except ImageError as exc:
                bad.append((src, str(exc)))
            else:
                warnings.extend(_size_warning(entry, src, image))
                kept = [d for d in entry.detections if asked(d) and shown(d)]
                atomic_write_bytes(out, encode(draw_detections(image, kept), out.suffix))
                written += 1
                drawn += len(kept)
            bar.update(task_id, advance=1, rate=f"{done / (time.perf_counter() - start):.1f} img/s")

    ui.print_warnings(warnings)
    which = (f"all {drawn} detection(s)" if conf is None and min_prob is None
             else f"the {drawn} detection(s) at {f'score >= {conf:g}' if conf is not None else f'probability >= {min_prob:.2f}'} of {len(every)}")
    if classes is not None:
        which += f" (class{'es' if len(classes) > 1 else ''} {', '.join(classes)})"
    ui.console.print(f"Wrote {written} annotated image(s) to {out_dir}: {which}" if written or not bad else "Nothing drawn: no image could be read.")
    ui.print_bad(bad)
    if images_root is None and any(not src.is_absolute() and not src.exists() for src, _ in bad):
        # spp detect writes each path as it was given: relative to the folder it ran in.
        ui.console.print(f"The paths in {detections_file} are relative to the folder `spp detect` ran in: run `spp draw` there, "
                         "or give that folder with --images DIR.")
    return 1 if bad else 0


def _threshold(conf: float | None, min_prob: float | None) -> Callable[[dict], bool]:
    """Whether a detection is drawn: its score at least ``conf``, its probability at least ``min_prob``, or any."""
    if conf is not None:
        return lambda det: det["score"] >= conf
    if min_prob is not None:
        return lambda det: det["probability"] >= min_prob
    return lambda det: True


def _size_warning(entry: DetectionsImage, src: Path, image: Image.Image) -> list[str]:
    """A warning when the image is not the size its boxes were found on (wrong --images?)."""
    if entry.width is None or entry.height is None or (image.width, image.height) == (entry.width, entry.height):
        return []
    return [
        f"{src}: image is {image.width}x{image.height} but the detections are for "
        f"{entry.width}x{entry.height}; boxes may be misplaced"
    ]
