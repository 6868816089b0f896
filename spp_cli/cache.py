"""The on-disk feature cache: the only module that knows its layout.

::

    DIR/cache.json                      header: format, version, settings
    DIR/entries/ab/<sha256>.safetensors one entry per image

An entry is keyed by the sha256 of the image file's bytes (the same photo
under two names is one entry) and holds, as safetensors tensors:
``map_0 .. map_{S-1}`` (``(C, H_s, W_s)`` conv maps, fp16 by default),
``proposals`` (``(R, 4)`` float32 ``xyxy`` original-image pixels) and, when
known, ``gt_boxes`` ``(N, 4)``, ``gt_labels`` ``(N,)`` (indices into the
entry's ``classes``), ``gt_difficult``, ``gt_iscrowd``. String metadata
carries the image id, path and size, the per-scale resize factors, the class
names, and a sha256 over all tensor bytes that every read checks, so a
damaged entry is reported instead of silently feeding wrong features.

Writes are atomic (temporary file + ``os.replace``): a killed run leaves
only whole entries, and the next run skips them.

Many writers may share one folder (the ranks of a torchrun job, two
`spp cache` runs started by hand): the header is created under a folder
lock, and an entry is made only by the process holding its claim, an
exclusive ``lockf`` lock on ``entries/ab/<key>.claim``. The kernel drops
the lock of a process that dies, so a killed writer blocks nobody; a
claim file left behind is just a file. Locks are POSIX record locks, which
NFS supports through its lock manager.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from spp_cli.errors import CacheError
from spp_cli.fileio import atomic_write_bytes, atomic_write_json, file_sha256, read_versioned_json
from spp_cli.spp import Alignment

CACHE_FORMAT = "spp-feature-cache"
CACHE_VERSION = 1
HEADER = "cache.json"
FOLDER_LOCK = ".spp-cache.lock"
# What every entry's metadata holds (a CacheEntry's fields besides its tensors, and their digest).
ENTRY_FIELDS = frozenset({"image_id", "path", "width", "height", "factors", "digest"})
CLAIM_SUFFIX = ".claim"
# A temporary file this old belongs to no live writer (an entry is written in
# well under a minute); younger ones may be another process's write in flight.
STALE_TEMPORARY_SECONDS = 3600
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CacheSettings:
    """Everything that makes two caches' features comparable.

    Attributes:
        backbone: registry name.
        weights_sha256: digest of the weights file (``random:0`` for tests).
        layer: the feature layer.
        stride, offset: the layer's alignment.
        channels: C.
        scales: short sides the image was resized to, one map each.
        max_side: cap on the resized long side.
        dtype: ``fp16`` or ``fp32`` storage of the maps.
        preprocess: the input normalisation (and anything else that changes
            the maps for the same weights), so that a change is noticed.
    """

    backbone: str
    weights_sha256: str
    layer: str
    stride: int
    offset: float
    channels: int
    scales: tuple[int, ...]
    max_side: int
    dtype: str = "fp16"
    preprocess: str = ""

    def __post_init__(self) -> None:
        """Refuse what no cache can have (no scales, a stride of 0...), whoever builds the settings.

        Raises:
            ValueError: naming the field and its value.
        """
        if isinstance(self.scales, list):
            object.__setattr__(self, "scales", tuple(self.scales))  # the settings are hashable: a tuple
        if not isinstance(self.scales, tuple) or not self.scales or not all(_positive_int(s) for s in self.scales):
            shown = list(self.scales) if isinstance(self.scales, tuple) else self.scales
            raise ValueError(f"scales {shown!r} are not a list of short sides in pixels")
        for name in ("stride", "channels", "max_side"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a positive whole number")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @classmethod
    def from_json(cls, raw: object) -> CacheSettings:
        """The settings as a cache header or a model's metadata stores them.

        Raises:
            TypeError: a field is missing or unknown.
            ValueError: a field holds what no cache can have (see ``__post_init__``).
        """
        if not isinstance(raw, dict):
            raise TypeError("the feature settings are not an object")
        return cls(**raw)

    @property
    def alignment(self) -> Alignment:
        return Alignment(self.stride, self.offset)

    def describe(self) -> str:
        scales = ",".join(str(s) for s in self.scales)
        text = f"backbone {self.backbone} ({self.layer}, weights {self.weights_sha256[:12]}), scales {scales}, max side {self.max_side}, {self.dtype}"
        return text + (f", input {self.preprocess}" if self.preprocess else "")


STRAY_FILE = "not a cache entry (entries are entries/<first 2 of the sha256>/<image sha256>.safetensors)"


def _is_entry_file(path: Path) -> bool:
    """``entries/ab/ab<62 more hex digits>.safetensors``: where :meth:`FeatureCache.entry_path` puts key ``ab...``."""
    key = path.stem
    return len(key) == 64 and all(c in "0123456789abcdef" for c in key) and path.parent.name == key[:2]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class CacheEntry:
    """One image's cached features, proposals and ground truth.

    Attributes:
        maps: ``S`` tensors ``(C, H_s, W_s)``.
        factors: ``(S,)`` resize factors, original -> network input.
        proposals: ``(R, 4)`` float32 ``xyxy`` in original-image pixels.
        gt_boxes, gt_labels, gt_difficult, gt_iscrowd: ``(N, ...)`` ground truth;
            ``None`` when the image came without annotations.
        classes: names that ``gt_labels`` index into.
    """

    key: str
    image_id: str
    path: str
    width: int
    height: int
    maps: list[torch.Tensor]
    factors: list[float]
    proposals: np.ndarray
    gt_boxes: np.ndarray | None = None
    gt_labels: np.ndarray | None = None
    gt_difficult: np.ndarray | None = None
    gt_iscrowd: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def has_gt(self) -> bool:
        return self.gt_boxes is not None


def image_key(path: str | Path) -> str:
    """The entry key of an image: sha256 of its bytes."""
    return file_sha256(path)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors' names, shapes and bytes, in name order (detects any damaged byte)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return digest.hexdigest()


def proposals_digest(proposals: np.ndarray) -> str:
    """Digest of an entry's proposals (to notice a new props.json)."""
    return hashlib.sha256(np.ascontiguousarray(proposals, np.float32).reshape(-1, 4).tobytes()).hexdigest()


def gt_digest(gt: dict[str, np.ndarray] | None, classes: list[str]) -> str | None:
    """Digest of an entry's ground truth and class names (to notice new labels)."""
    if gt is None:
        return None
    digest = hashlib.sha256(json.dumps(classes).encode())
    for name in sorted(gt):
        digest.update(name.encode() + np.ascontiguousarray(gt[name]).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """A cache folder with a fixed :class:`CacheSettings`.

    ``read_only``: opened for writing on a folder that cannot be written (a complete cache on a
    read-only mount): its entries serve as they are, and a write raises :class:`CacheError`.
    """

    def __init__(self, root: Path, settings: CacheSettings, read_only: bool = False):
        self.root = Path(root)
        self.settings = settings
        self.read_only = read_only

    # ---------------------------------------------------------------- opening

    @classmethod
    def create_or_open(cls, root: str | Path, settings: CacheSettings) -> "FeatureCache":
        """Open ``root`` for writing with ``settings``, creating it if new; a cache with
        ``settings`` in a folder that cannot be written opens ``read_only`` (a run that finds
        every entry there writes nothing).

        Raises:
            CacheError: the folder cannot be written and holds no cache, or holds a cache built
                with other settings (the message says how to proceed).
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise CacheError(f"{root}: exists and is not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{root}: cannot create cache folder ({exc.strerror or exc})") from None
        if not os.access(root, os.W_OK | os.X_OK):
            if not (root / HEADER).is_file():
                raise CacheError(f"{root}: cache folder is not writable")
            existing = cls.open(root)
            existing._check_settings(settings)
            return cls(root, settings, read_only=True)
        with _locked(root / FOLDER_LOCK, wait=True):
            return cls._with_header(root, settings, new_folder=True)

    @classmethod
    def _with_header(cls, root: Path, settings: CacheSettings, new_folder: bool) -> "FeatureCache":
        """The cache of ``root``'s header, written if absent (the folder lock held); ``new_folder``:
        only into a folder that holds nothing else."""
        header = root / HEADER
        if header.exists():
            existing = cls.open(root)
            existing._check_settings(settings)
            return existing
        if new_folder and any(p.name != FOLDER_LOCK for p in root.iterdir()):
            inside = f" ({root / 'feats'} is an `spp train` work folder's cache)" if (root / "feats" / HEADER).is_file() else ""
            raise CacheError(f"{root}: folder is not empty and holds no {HEADER}; choose an empty or new --cache folder{inside}")
        atomic_write_json(header, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": asdict(settings)}, indent=2)
        return cls(root, settings)

    def _check_settings(self, settings: CacheSettings) -> None:
        if self.settings != settings:
            raise CacheError(
                f"{self.root}: cache was built with {self.settings.describe()}; this run asks for "
                f"{settings.describe()}. Use another --cache folder, or the same settings"
            )

    def require_writable(self, need: str) -> None:
        """Before work whose result an entry would hold: fail if this cache cannot take it.

        Raises:
            CacheError: ``"{root}: cache folder is not writable, and {need}"``, where ``need``
                says why the run would write (``"photo.jpg is not cached in it"``).
        """
        if self.read_only:
            raise CacheError(f"{self.root}: cache folder is not writable, and {need}")

    @staticmethod
    def discard_if_unused(root: str | Path) -> bool:
        """Remove the header of a cache folder that holds no entry, no claim and no temporary
        (what a first run that wrote no entry made: bad weights, every image refused), so that the
        folder is not held to that run's settings; only the caller knows its run made the header.
        A writer that opened the folder before writes the header again (:meth:`write`). Returns
        whether it was removed."""
        root = Path(root)
        if not (root / HEADER).is_file():
            return False
        with _locked(root / FOLDER_LOCK, wait=True):
            entries = root / "entries"
            if any(p.name not in (HEADER, FOLDER_LOCK, entries.name) for p in root.iterdir()):
                return False
            inside = sorted(entries.rglob("*"), reverse=True) if entries.is_dir() else []
            if any(not p.is_dir() for p in inside):
                return False
            for folder in [*inside, entries]:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            (root / HEADER).unlink(missing_ok=True)
        return True

    @classmethod
    def open(cls, root: str | Path) -> "FeatureCache":
        """Open an existing cache for reading.

        Raises:
            CacheError: no cache there, or a header of another format/version.
        """
        root = Path(root)
        header = root / HEADER
        if not root.exists():
            raise CacheError(f"{root}: no such folder; build a feature cache there with `spp cache ... --cache {root}`")
        if not header.is_file():
            if (root / "feats" / HEADER).is_file():  # an `spp train` work folder given for its cache
                raise CacheError(f"{root}: not a feature cache (no {HEADER}); {root / 'feats'} is one (an `spp train` work folder's)")
            raise CacheError(f"{root}: not a feature cache (no {HEADER}); build one with `spp cache ... --cache {root}`")
        doc = read_versioned_json(header, CACHE_FORMAT, CACHE_VERSION, "cache header", "rebuild the cache", CacheError)
        try:
            settings = CacheSettings.from_json(doc["settings"])
        except (KeyError, TypeError):
            raise CacheError(f"{header}: damaged cache header (settings incomplete)") from None
        except ValueError as exc:
            raise CacheError(f"{header}: damaged cache header ({exc})") from None
        return cls(root, settings)

    # ---------------------------------------------------------------- entries

    def entry_path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.entry_path(key).is_file()

    @contextlib.contextmanager
    def claim(self, key: str, wait: bool) -> Iterator[bool]:
        """Hold the right to make entry ``key``: yields True when this process has it.

        With ``wait`` it blocks until the holder finishes or dies; without, it
        yields False at once when another process holds it. The holder
        removes what a killed writer of the same entry left (its temporary
        files). Where the file system has no locks, every claim is granted
        (atomic writes still keep each entry whole).
        """
        if self.read_only:  # no writer of its own, no lock file to make: entries are read as they are
            yield True
            return
        path = self.entry_path(key)
        with _locked(path.with_name(path.stem + CLAIM_SUFFIX), wait, remove=True) as held:
            if held:
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    with contextlib.suppress(OSError):
                        stale.unlink()
            yield held

    def keys(self) -> list[str]:
        """Keys of all entries, sorted (files elsewhere under ``entries/`` are not entries)."""
        return sorted(p.stem for p in self._entry_files() if _is_entry_file(p))

    def stray_files(self) -> list[Path]:
        """Files under ``entries/`` named like entries but not where an entry would be (copied in by hand)."""
        return [p for p in self._entry_files() if not _is_entry_file(p)]

    def _entry_files(self) -> list[Path]:
        folder = self.root / "entries"
        return sorted(folder.glob("*/*.safetensors")) if folder.is_dir() else []

    def metadata(self, key: str) -> dict:
        """An entry's metadata, read from the file header only (no tensor data)."""
        from safetensors import safe_open

        path = self.entry_path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
            meta = json.loads(meta["spp"])
        except Exception as exc:
            raise CacheError(f"{path}: damaged cache entry ({_reason(exc)}); delete it and run `spp cache` again") from None
        # Another file of spp's in its place (a model, a head: their metadata has a digest too).
        factors = meta.get("factors") if isinstance(meta, dict) else None
        if not isinstance(factors, list) or not ENTRY_FIELDS <= meta.keys() or not {"proposals", *(f"map_{s}" for s in range(len(factors)))} <= names:
            raise CacheError(f"{path}: damaged cache entry (not one that `spp cache` writes); delete it and run `spp cache` again")
        return meta

    def holds_box(self, key: str) -> bool:
        """Whether an entry's ground truth holds a box (of any kind), read without its maps: an
        entry's ``classes`` are its dataset's, not its boxes'. An entry whose boxes cannot be read
        counts as holding one: reading it in full then says what is wrong."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.entry_path(key)), framework="pt") as f:
                return "gt_boxes" in f.keys() and f.get_slice("gt_boxes").get_shape()[0] > 0  # the shape alone: no tensor read
        except Exception:  # cache.read reports it
            return True

    def write(self, entry: CacheEntry) -> None:
        """Store an entry atomically (maps cast to the cache's dtype, on the CPU)."""
        from safetensors.torch import save

        self.require_writable(f"{entry.path} cannot be cached in it")
        dtype = DTYPES[self.settings.dtype]
        tensors: dict[str, torch.Tensor] = {
            f"map_{s}": m.detach().to("cpu", dtype).contiguous() for s, m in enumerate(entry.maps)
        }
        tensors["proposals"] = torch.from_numpy(np.ascontiguousarray(entry.proposals, np.float32).reshape(-1, 4))
        gt = gt_arrays(entry)
        if gt is not None:
            tensors["gt_boxes"] = torch.from_numpy(gt["boxes"])
            tensors["gt_labels"] = torch.from_numpy(gt["labels"])
            tensors["gt_difficult"] = torch.from_numpy(gt["difficult"].astype(np.uint8))
            tensors["gt_iscrowd"] = torch.from_numpy(gt["iscrowd"].astype(np.uint8))
        meta = {
            "image_id": entry.image_id,
            "path": entry.path,
            "width": entry.width,
            "height": entry.height,
            "factors": list(entry.factors),
            "classes": list(entry.classes),
            "has_gt": gt is not None,
            "proposals_sha256": proposals_digest(entry.proposals),
            "gt_sha256": gt_digest(gt, list(entry.classes)),
            "digest": tensor_digest(tensors),
        }
        data = save(tensors, metadata={"spp": json.dumps(meta)})
        if not (self.root / HEADER).is_file():  # removed by a run that wrote nothing (discard_if_unused)
            with _locked(self.root / FOLDER_LOCK, wait=True):
                self._with_header(self.root, self.settings, new_folder=False)
        atomic_write_bytes(self.entry_path(entry.key), data)

    def _load_checked(self, key: str) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load

        path = self.entry_path(key)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CacheError(f"{path}: cannot read cache entry ({exc.strerror or exc})") from None
        try:
            tensors = load(raw)
            meta = self.metadata(key)
        except CacheError:
            raise
        except Exception as exc:
            raise CacheError(f"{path}: damaged cache entry ({_reason(exc)}); delete it and run `spp cache` again") from None
        if tensor_digest(tensors) != meta.get("digest"):
            raise CacheError(f"{path}: damaged cache entry (checksum mismatch); delete it and run `spp cache` again")
        return tensors, meta

    def check(self, key: str) -> dict:
        """An entry's metadata after checking every byte against its digest.

        Raises:
            CacheError: missing, truncated or altered (the message names the file).
        """
        return self._load_checked(key)[1]

    def read(self, key: str, device: str = "cpu") -> CacheEntry:
        """Load and check an entry.

        Raises:
            CacheError: the file is missing, truncated, or its tensor bytes do
                not match the recorded digest (the message names the file).
        """
        tensors, meta = self._load_checked(key)
        maps = [tensors[f"map_{s}"].to(device) for s in range(len(meta["factors"]))]
        has_gt = meta.get("has_gt", False)
        return CacheEntry(
            key=key,
            image_id=meta["image_id"],
            path=meta["path"],
            width=int(meta["width"]),
            height=int(meta["height"]),
            maps=maps,
            factors=[float(f) for f in meta["factors"]],
            proposals=tensors["proposals"].numpy(),
            gt_boxes=tensors["gt_boxes"].numpy() if has_gt else None,
            gt_labels=tensors["gt_labels"].numpy() if has_gt else None,
            gt_difficult=tensors["gt_difficult"].numpy().astype(bool) if has_gt else None,
            gt_iscrowd=tensors["gt_iscrowd"].numpy().astype(bool) if has_gt else None,
            classes=list(meta.get("classes", [])),
        )

    def entries(self, device: str = "cpu") -> Iterator[CacheEntry]:
        """Every entry in key order, read one at a time (streaming)."""
        for key in self.keys():
            yield self.read(key, device)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def remove_stale_temporaries(self, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete temporary files a killed writer left behind; returns how many.

        Only those older than ``older_than`` seconds: a younger one may be a
        write in flight of another process sharing the folder (the claim of
        an entry clears that entry's own temporaries).
        """
        count = 0
        now = time.time()
        if self.read_only:
            return count
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    count += 1
        return count


@contextlib.contextmanager
def _locked(path: Path, wait: bool, remove: bool = False) -> Iterator[bool]:
    """An exclusive ``lockf`` lock on ``path`` (created if needed): yields whether it is held.

    ``remove`` deletes the file before unlocking: a process that was waiting
    on it then holds a lock on a file no longer linked, and must check again
    whether the work it waited for is done (the cache does: ``has(key)``).
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise CacheError(f"{path}: cannot create lock file ({exc.strerror or exc})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                yield False  # another process holds it
                return
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise CacheError(f"{path}: cannot lock ({exc.strerror or exc})") from None
            # No locks on this file system: go ahead unguarded.
            yield True
            return
        # The holder we waited for may have removed the file it locked: then
        # this lock guards nothing, and the path's current file is the claim.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield True
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def gt_arrays(entry: CacheEntry) -> dict[str, np.ndarray] | None:
    if entry.gt_boxes is None:
        return None
    n = len(entry.gt_boxes)
    return {
        "boxes": np.ascontiguousarray(entry.gt_boxes, np.float32).reshape(-1, 4),
        "labels": np.ascontiguousarray(entry.gt_labels, np.int64).reshape(-1),
        "difficult": np.zeros(n, bool) if entry.gt_difficult is None else np.asarray(entry.gt_difficult, bool),
        "iscrowd": np.zeros(n, bool) if entry.gt_iscrowd is None else np.asarray(entry.gt_iscrowd, bool),
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
