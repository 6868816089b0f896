"""PASCAL VOC XML readers: the VOC layout and the XML-beside-images layout.

XML is parsed with defusedxml, so entity declarations (billion laughs,
external entities) are refused rather than expanded.
"""

from __future__ import annotations

from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from spp_cli.boxes import from_voc
from spp_cli.data.records import Dataset, ImageRecord, sanitise
from spp_cli.data.registry import read_id_list, split_file
from spp_cli.errors import DatasetError
from spp_cli.images import IMAGE_SUFFIXES


class AnnotationError(Exception):
    """One annotation file that cannot be used; the image is skipped."""


def read_voc(root: Path, split: str | None) -> Dataset:
    """``root/Annotations/<id>.xml``, ``root/JPEGImages/<id>.jpg``, ``root/ImageSets/Main/<split>.txt``."""
    return _read(root, "voc", root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main", split)


def read_xml_beside_images(root: Path, split: str | None) -> Dataset:
    """``root/annotations/<id>.xml``, ``root/images/<id>.jpg``, ``root/<split>.txt``; or, without
    those two folders, LabelImg's layout: ``root/<id>.xml`` beside ``root/<id>.jpg``."""
    if is_labelimg_folder(root):
        return _read(root, "xml", root, root, root, split)
    return _read(root, "xml", root / "annotations", root / "images", root, split)


def is_labelimg_folder(root: Path) -> bool:
    """LabelImg's layout: no ``annotations/`` or ``images/`` folder, and an ``.xml`` with its
    image beside it (a VOC ``Annotations/`` folder given by mistake holds no image)."""
    if (root / "annotations").is_dir() or (root / "images").is_dir():
        return False
    return any(_image_path(root, xml.stem).exists() for xml in root.glob("*.xml"))


def _read(root: Path, fmt: str, ann_dir: Path, img_dir: Path, split_dir: Path, split: str | None) -> Dataset:
    listed_in = None if split is None else split_file(split, split_dir, root)
    if listed_in is None:  # every image (no split, or all)
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise DatasetError(f"{ann_dir}: no .xml annotation files")
    else:
        ids = read_id_list(listed_in)
    parsed = []
    bad: list[tuple[Path, str]] = []
    unlabelled: list[Path] = []  # listed images without an .xml: images without objects, as LabelImg leaves them
    for image_id in ids:
        xml_path = ann_dir / f"{image_id}.xml"
        if not xml_path.exists() and (image := _image_path(img_dir, image_id)).exists():
            unlabelled.append(image)
            parsed.append((image_id, xml_path, []))
            continue
        try:
            objects = parse_voc_xml(xml_path)
        except AnnotationError as exc:
            bad.append((xml_path, str(exc)))
            continue
        parsed.append((image_id, xml_path, objects))
    classes = sorted({name for _, _, objects in parsed for name, *_ in objects})
    index = {name: i for i, name in enumerate(classes)}
    records, warnings = [], []
    if unlabelled:
        warnings.append(f"{len(unlabelled)} image(s) of the split have no .xml in {ann_dir} (e.g. {unlabelled[0]}): taken as images without objects")
    for image_id, xml_path, objects in parsed:
        record = ImageRecord(image_id=image_id, path=_image_path(img_dir, image_id))
        sanitise(
            record,
            [box for _, box, _ in objects],
            [index[name] for name, _, _ in objects],
            [difficult for _, _, difficult in objects],
            [False] * len(objects),
            xml_path,
            warnings,
        )
        records.append(record)
    return Dataset(root=root, format=fmt, classes=classes, records=records, bad=bad, warnings=warnings)


def _image_path(img_dir: Path, image_id: str) -> Path:
    # The id names the image; the XML's <filename> is sometimes stale.
    for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        candidate = img_dir / f"{image_id}{suffix}"
        if candidate.exists():
            return candidate
    for candidate in img_dir.glob(f"{image_id}.*"):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return img_dir / f"{image_id}.jpg"  # missing: reported when its pixels are read


def parse_voc_xml(path: Path) -> list[tuple[str, list[float], bool]]:
    """Objects of one VOC XML file as ``(name, xyxy box, difficult)``.

    Raises:
        AnnotationError: the file is missing, not well-formed, declares
            entities, or has an object without a name or a complete ``<bndbox>``.
    """
    if not path.is_file():
        raise AnnotationError("annotation file not found")
    try:
        tree = SafeET.parse(path, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise AnnotationError(f"unsafe XML refused ({type(exc).__name__}: entities are not allowed)") from None
    except SafeET.ParseError as exc:
        raise AnnotationError(f"malformed XML ({exc})") from None
    except OSError as exc:  # unreadable: this image is skipped like one with a malformed file
        raise AnnotationError(f"cannot read ({exc.strerror or exc})") from None
    objects = []
    for n, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AnnotationError(f"object {n} has no <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"object {n} ('{name}') has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = bndbox.findtext(tag)
            try:
                coords.append(float(text))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise AnnotationError(f"object {n} ('{name}') has no numeric <{tag}>") from None
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        objects.append((name, from_voc(*coords), difficult))
    return objects
