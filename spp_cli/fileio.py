"""Atomic file writes: a file is either its old content or its new content.

Writes go to a temporary file in the same folder, are flushed to disk, then
``os.replace`` d over the target, so an interrupted run never leaves a
half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from spp_cli.errors import SPPError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SPPError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SPPError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def atomic_write_json(path: str | Path, obj: object, indent: int | None = None) -> None:
    """Serialise ``obj`` as UTF-8 JSON and write it atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8"))


def check_writable(path: str | Path) -> None:
    """Fail early, before long work, if ``path`` cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SPPError(f"{path}: is a folder; give a file name")
    if folder.exists() and not os.access(folder, os.W_OK):
        raise SPPError(f"{path}: folder {folder} is not writable")
