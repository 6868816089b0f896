"""Dataset readers behind one entry point, :func:`open_dataset`.

Formats: PASCAL VOC (``Annotations/`` + ``JPEGImages/`` +
``ImageSets/Main/<split>.txt``), VOC XML beside images (``images/`` +
``annotations/`` + ``<split>.txt``), COCO JSON, and YOLO (``data.yaml`` +
``images/`` + ``labels/``). Every reader converts its boxes to the toolkit's
convention (``xyxy`` float, continuous pixels; see :mod:`spp_cli.boxes`)
and passes them through :func:`spp_cli.data.records.sanitise` so that
clipping and dropping happen in one place.
"""

from spp_cli.data.records import Dataset, ImageRecord
from spp_cli.data.registry import FORMATS, open_dataset

__all__ = ["Dataset", "ImageRecord", "FORMATS", "open_dataset"]
