"""Format detection and split selection for :func:`open_dataset`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from spp_cli.data.records import Dataset
from spp_cli.errors import DatasetError, SPPError

FORMATS = ("voc", "xml", "coco", "yolo")

_HELP = (
    "expected a VOC folder (Annotations/, JPEGImages/), an XML-beside-images folder "
    "(images/ and annotations/, or each .xml beside its image), a COCO .json file, or a YOLO data.yaml"
)


ALL_IMAGES = "all"  # --split all: every image of the dataset, where it has no split of that name


def open_dataset(spec: str | Path, split: str | None = None) -> Dataset:
    """Open a dataset, optionally one split of it.

    Args:
        spec: a dataset folder or annotation file; the format is detected, or
            named with a prefix: ``voc:DIR``, ``xml:DIR``, ``coco:FILE.json``,
            ``yolo:data.yaml``.
        split: a split name (``train``, ``test``, ...) looked up the way the
            format keeps its id lists, or the path of a ``.txt`` file of image
            ids (one per line). ``None`` means every image, and so does ``"all"``
            where the dataset has no split of that name (a COCO JSON is one
            split: ``all`` takes the whole file).

    Raises:
        DatasetError: the layout is not recognised, or a split or annotation
            file that the whole dataset depends on is missing or malformed.
    """
    fmt, path = _detect(str(spec))
    if fmt == "voc":
        from spp_cli.data.voc import read_voc

        return read_voc(path, split)
    if fmt == "xml":
        from spp_cli.data.voc import read_xml_beside_images

        return read_xml_beside_images(path, split)
    if fmt == "coco":
        from spp_cli.data.coco import read_coco

        return read_coco(path, split)
    from spp_cli.data.yolo import read_yolo

    return read_yolo(path, split)


def _detect(spec: str) -> tuple[str, Path]:
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in FORMATS and len(prefix) > 1:
        path = Path(rest)
        if not path.exists():
            raise DatasetError(f"{path}: no such file or folder")
        if prefix in ("coco", "yolo") and path.is_dir():
            wanted = "a COCO .json file" if prefix == "coco" else "a YOLO data.yaml file"
            raise DatasetError(f"{path}: is a folder; {prefix}: takes {wanted}")
        if prefix in ("voc", "xml") and not path.is_dir():
            raise DatasetError(f"{path}: is a file; {prefix}: takes a dataset folder")
        return prefix, path
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        if path.suffix.lower() in (".yaml", ".yml"):
            return "yolo", path
        raise DatasetError(f"{path}: not a dataset ({_HELP})")
    if (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir():
        return "voc", path
    if (path / "data.yaml").is_file():
        return "yolo", path / "data.yaml"
    if (path / "annotations").is_dir() and (path / "images").is_dir():
        jsons = sorted((path / "annotations").glob("*.json"))
        if any((path / "annotations").glob("*.xml")):
            return "xml", path
        if len(jsons) == 1:
            return "coco", jsons[0]
        if len(jsons) > 1:
            names = ", ".join(j.name for j in jsons)
            raise DatasetError(f"{path}: several COCO files in annotations/ ({names}); pass one with --data FILE.json")
    from spp_cli.data.voc import is_labelimg_folder

    if is_labelimg_folder(path):
        return "xml", path  # LabelImg's layout: each image's .xml beside it in one folder
    raise DatasetError(f"{path}: dataset layout not recognised ({_HELP})")


def read_id_list(path: Path) -> list[str]:
    """Image ids from a split file: one per line (spaces inside an id kept), blank lines and
    ``#`` comments skipped, a byte-order mark (Windows editors) ignored.

    Files whose every line is an id and a number take the first column: VOC's
    ``ImageSets/Main/<class>_<split>.txt`` (``id  1``), ImageNet's ``ImageSets/DET`` lists
    (``id  index``).
    """
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: split file is not UTF-8 text") from None
    except OSError as exc:  # unreadable (permissions), a folder, gone since it was found
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    numbered = all(len(f := line.split()) == 2 and f[1].lstrip("-").isdigit() for line in listed)
    ids = [line.split()[0] for line in listed] if numbered else listed
    if not ids:
        raise DatasetError(f"{path}: split file lists no image ids")
    return ids


def dataset_files(spec: str | Path | None, split: str | Path | None) -> list[Path]:
    """The files a dataset ``spec`` and ``split`` read that a command's output must not replace:
    the spec as given, the annotation file it names (a COCO ``.json`` or YOLO ``data.yaml``, a
    ``coco:`` prefix or a folder's included) and a split given as a ``.txt`` file. Never raises:
    a spec that names nothing readable protects nothing (opening it says what is wrong)."""
    files = []
    if spec:
        files.append(Path(spec))
        with contextlib.suppress(SPPError, OSError):  # names nothing: open_dataset says so
            files.append(_detect(str(spec))[1])
    if split and Path(split).suffix == ".txt":
        files.append(Path(split))
    return files


def split_file(split: str, default_dir: Path, dataset: Path) -> Path | None:
    """The id-list file for ``split``: an explicit ``.txt`` path, or ``default_dir/<split>.txt``;
    None for ``all`` where no such file exists (every image)."""
    as_path = Path(split)
    if as_path.suffix == ".txt" and as_path.is_file():
        return as_path
    candidate = default_dir / f"{split}.txt"
    if candidate.is_file():
        return candidate
    if split == ALL_IMAGES:
        return None
    if as_path.suffix == ".txt" or "/" in split or os.sep in split:
        # A path, not a split name: say so, not that <path>.txt is missing.
        raise DatasetError(f"{split}: split file not found")
    available = sorted(p.stem for p in default_dir.glob("*.txt")) if default_dir.is_dir() else []
    hint = f"; available: {', '.join(available)}" if available else ""
    if dataset.suffix == ".json":  # a COCO file is one split already
        hint += f"; --split {ALL_IMAGES} takes every image of the file, --split FILE.txt those whose ids it lists"
    raise DatasetError(f"{dataset}: no split '{split}' (looked for {candidate}){hint}")
