"""Atomic file writes: a file is either its old content or its new content.

Writes go to a temporary file in the same folder, are flushed to disk, then
``os.replace`` d over the target, so an interrupted run never leaves a
half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import numpy as np

from spp_cli.errors import SPPError


def atomic_write_bytes(path: str | Path, data: bytes, sole_writer: bool = False) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders (``sole_writer``: see
    :func:`atomic_write_with`)."""
    atomic_write_with(path, lambda file: file.write(data), sole_writer)


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], object], sole_writer: bool = False) -> None:
    """Call ``write`` with a binary file that replaces ``path`` atomically once it returns
    (creating parent folders); an exception or interrupt in ``write`` leaves ``path`` as it was.

    ``sole_writer``: one process at a time writes ``path`` (a model, a checkpoint), so
    temporary files of earlier writes of it, untouched for a minute, are a killed run's
    (SIGKILL leaves them; a checkpoint's can be GBs) and are removed first. A shared cache's
    entries have their own rule (:meth:`~spp_cli.cache.FeatureCache.remove_stale_temporaries`)."""
    path = Path(path)
    if sole_writer:
        remove_stale_writes(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SPPError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode open() would (0666 - umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SPPError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


# A temporary file of a write untouched this long is a killed run's: a write in flight
# (even of GBs on a slow disk) touches its file every few seconds.
STALE_WRITE_SECONDS = 60


def remove_stale_writes(path: str | Path, older_than: float = STALE_WRITE_SECONDS) -> None:
    """Remove the temporary files (``mkstemp``'s names: ``.NAME.<8 random characters>.tmp``) that interrupted
    atomic writes of ``path`` left beside it, those untouched for ``older_than`` seconds."""
    path = Path(path)
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    with contextlib.suppress(OSError):  # a folder that cannot be listed: the write itself will say why
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: the write goes on
                if ours.fullmatch(stale.name) and now - stale.lstat().st_mtime >= older_than:
                    stale.unlink()


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor written block by block (rows along its first axis): ``blocks()`` yields
    arrays of ``dtype`` whose rows add up to ``shape``. For state too large to copy into
    one array beside itself (the SVMs' store of hard negatives: GBs with many classes)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[np.ndarray]]


_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "uint8": "U8"}


def atomic_write_safetensors(path: str | Path, tensors: dict[str, np.ndarray | StreamedTensor], metadata: dict[str, str],
                             sole_writer: bool = False) -> int:
    """Write ``tensors`` as a safetensors file, atomically, without an in-memory copy of the
    file: the format is a little-endian u64 header length, the JSON header (each tensor's
    dtype, shape and byte range) and the tensors' bytes back to back, which
    ``safetensors.safe_open`` reads (memory-mapped). The file's size in bytes."""
    import numpy as np

    specs = {name: t if isinstance(t, StreamedTensor) else StreamedTensor(t.dtype, t.shape, lambda t=t: [t])
             for name, t in tensors.items()}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, spec in specs.items():
        size = int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(spec.dtype).name], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as safetensors writes them

    def write(file) -> None:
        file.write(struct.pack("<Q", len(text)) + text)
        for name, spec in specs.items():
            written = 0
            for block in spec.blocks():
                if np.dtype(block.dtype) != np.dtype(spec.dtype):  # no silent cast (float32 -> fp16 can overflow)
                    raise ValueError(f"{name}: a block of {block.dtype}, declared {np.dtype(spec.dtype)}")
                block = np.ascontiguousarray(block)
                file.write(block.data)
                written += block.nbytes
            begin, end = header[name]["data_offsets"]  # type: ignore[index]
            if written != end - begin:  # the header would misplace every later tensor
                raise ValueError(f"{name}: {written} bytes written, {end - begin} declared")

    atomic_write_with(path, write, sole_writer)
    return 8 + len(text) + offset


def read_safetensors(path: str | Path, what: str, error: type[SPPError] = SPPError, tensors: bool = True, remedy: str = ""):
    """The JSON metadata under ``"spp"`` (``None`` when absent) and the tensors of a
    safetensors file (``{}`` with ``tensors=False``: the header only).

    Raises:
        error: ``"{path}: not a readable {what} (reason)"``, for anything the
            file format or the JSON rejects.
    """
    from safetensors import safe_open

    try:
        # numpy for the header alone: reading metadata then imports no torch (spp detect starts sooner).
        with safe_open(str(path), framework="pt" if tensors else "numpy") as f:
            text = (f.metadata() or {}).get("spp")
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads(text) if text is not None else None
    except Exception as exc:  # safetensors and json raise several types for damaged files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not a readable {what} ({reason})" + (f"; {remedy}" if remedy else "")) from None
    return meta, loaded


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: object, indent: int | None = None) -> None:
    """Serialise ``obj`` as UTF-8 JSON and write it atomically.

    A file name that is not valid UTF-8 (``b"bad\\xffname.jpg"``) reaches here as
    a ``str`` with a lone surrogate (Python's ``surrogateescape``), which UTF-8
    cannot encode: it is written as a JSON ``\\udcff`` escape, which ``json.loads``
    reads back to the same ``str``, so the same path on disk. Other text stays as
    it is (``é``, not ``\\u00e9``).
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # the rare file with such a name pays for the scan, not every props.json
        # Outside strings json.dumps writes only ASCII, so every surrogate is inside one.
        data = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")
    atomic_write_bytes(path, data)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_writable(path: str | Path) -> None:
    """Fail early, before long work, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise SPPError(f"{path}: is a folder; give a file name")
    _check_folder(path, path.parent if str(path.parent) else Path("."))


def check_writable_folder(path: str | Path) -> None:
    """Fail early, before long work, if files cannot be written into the folder ``path``
    (missing folders are created)."""
    _check_folder(Path(path), Path(path))


def _check_folder(named: Path, folder: Path) -> None:
    """``folder``, or the nearest of its parents that exists (missing ones are created),
    is a writable folder; the error names ``named``."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SPPError(f"{named}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise SPPError(f"{named}: folder {existing} is not writable")


def check_not_in_cache(out: str | Path, cache_dir: str | Path, option: str = "--out") -> None:
    """Fail before any work if ``out`` lies inside the feature cache ``cache_dir`` that the
    command reads: it would replace an entry (or the cache's header) with a file of another kind.

    Raises:
        SPPError: ``"{out}: inside the cache {cache_dir}, which this command reads; choose another {option}"``.
    """
    try:
        inside = Path(out).resolve().is_relative_to(Path(cache_dir).resolve())
    except (OSError, RuntimeError):  # a symlink loop: compare the paths as written (the write will say what is wrong)
        inside = Path(os.path.abspath(out)).is_relative_to(os.path.abspath(cache_dir))
    if inside:
        raise SPPError(f"{out}: inside the cache {cache_dir}, which this command reads; choose another {option}")


def check_not_input(outputs: str | Path | Iterable[str | Path], inputs: Iterable[str | Path], option: str = "--out") -> None:
    """Fail before any work if writing one of ``outputs`` would replace one of the command's input files.

    Raises:
        SPPError: ``"{output}: would overwrite an input of this command; choose another {option}"``.
    """
    outputs = [outputs] if isinstance(outputs, (str, Path)) else list(outputs)
    existing = []
    for out in outputs:
        with contextlib.suppress(OSError):  # not there yet: nothing to lose
            existing.append((Path(out), os.stat(out)))
    if not existing:
        return
    identities = set()
    for path in inputs:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            identities.add((st.st_dev, st.st_ino))
    for out, st in existing:
        if (st.st_dev, st.st_ino) in identities:
            raise SPPError(f"{out}: would overwrite an input of this command; choose another {option}")


def file_stamp(path: str | Path) -> dict | None:
    """A file's size and modification time (ns), what make and rsync go by to call it unchanged:
    a stat, where a hash would read it; ``None`` where it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def recorded_stamp(value: object) -> dict | None:
    """A :func:`file_stamp` as a file recorded it (a props.json entry's or a journal line's
    ``"file"``): ``{"size", "mtime_ns"}``, or ``None`` where ``value`` is not one."""
    if isinstance(value, dict) and all(type(value.get(k)) is int for k in ("size", "mtime_ns")):
        return {"size": value["size"], "mtime_ns": value["mtime_ns"]}
    return None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_versioned_json(
    path: str | Path, fmt: str, version: int, kind: str, missing_hint: str, error: type[SPPError] = SPPError
) -> dict:
    """Load a self-describing JSON document ``{"format": fmt, "version": version, ...}``.

    Raises ``error`` with a one-line message naming the file when it is
    missing (``missing_hint`` says how to make one), not JSON, of another
    format, or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {kind} file not found ({missing_hint})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{path}: not a {kind} file (expected \"format\": \"{fmt}\")")
    if doc.get("version") != version:
        raise error(f"{path}: {kind} format version {doc.get('version')} is not supported (this spp reads version {version})")
    return doc
