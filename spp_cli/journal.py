"""Journals of finished images: how `spp propose` and `spp detect` resume after an interruption.

A journal sits beside the command's output (``<out>.partial``) while it runs: a header line
``{"command": "detect", "params": <the run's settings>}``, then one JSON object per finished image, appended and
flushed as the image finishes, holding its ``"path"`` and the ``"file"`` stamp
(:func:`spp_cli.fileio.file_stamp`: size and mtime) the image had before it was read. The
output itself is written atomically once every image is done, and the journal removed, so an
earlier output stays whole until then.

A rerun with the same settings takes an image's line only while its file still has that
stamp (an image replaced since, even by ``cp -p`` with an older mtime, is done again). A line
without a stamp (a journal of an earlier spp) is taken while the file is no newer than the
journal. The last line of a killed run may be cut short: reading stops there, and the file is
cut back to the lines taken (in place) before new ones are appended.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Generic, TypeVar

from spp_cli import ui
from spp_cli.errors import SPPError
from spp_cli.fileio import file_stamp, recorded_stamp

Entry = TypeVar("Entry")


def journal_path(out: Path) -> Path:
    """Where finished images are appended while a run that writes ``out`` is in progress."""
    return out.with_name(out.name + ".partial")


@dataclass
class Journaled(Generic[Entry]):
    """What a journal holds for a rerun: image path -> (entry, the stamp its line recorded), and
    the byte offset after the last line read (a resumed run appends there, dropping the rest)."""

    entries: dict[str, tuple[Entry, dict | None]] = field(default_factory=dict)
    end: int = 0


def load_journal(path: Path, params: dict, command: str, parse: Callable[[dict], Entry],
                 done_verb: str = "searched", redo_verb: str = "searching") -> Journaled[Entry]:
    """Images finished by an interrupted run of ``spp COMMAND`` with the same ``params`` whose
    files are as they were.

    ``parse`` turns a line into the command's entry and raises KeyError, TypeError, ValueError
    or OverflowError on one it cannot use, which ends the reading there (as a cut-short line
    does): the lines after it are not taken, and a resumed run writes over them. What is not taken is said on the
    console: a file that is not a journal of ``spp COMMAND``, other settings, or images modified
    since they were ``done_verb`` (``redo_verb`` them again).
    """
    if not path.exists():
        return Journaled()
    try:
        written = path.stat().st_mtime_ns
        lines = path.read_bytes().split(b"\n")
        header = json.loads(lines[0])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        header = exc
    if isinstance(header, dict) and len(lines) < 2:  # a header without its newline: cut short too
        header = None
    # A journal without "command" is one of `spp propose` from before detect journaled too.
    if not isinstance(header, dict) or header.get("command", "propose") != command:
        reason = f" ({header.strerror or header})" if isinstance(header, OSError) else ""
        ui.console.print(f"{path}: not a journal of `spp {command}`{reason}; starting afresh.")
        return Journaled()
    if header.get("params") != params:
        ui.console.print(f"{path}: left by a run with other settings; starting afresh.")
        return Journaled()
    latest: dict[str, tuple[Entry, dict | None]] = {}
    end = len(lines[0]) + 1
    for line in lines[1:-1]:  # the last piece is what follows the last newline: a cut-short line, or nothing
        try:
            record = json.loads(line)
            image = record["path"]
            if not isinstance(image, str) or "\0" in image:  # no file has such a name
                raise ValueError(image)
            latest[image] = (parse(record), recorded_stamp(record.get("file")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError):
            break  # the last line of a killed run may be cut short; redo from there
        end += len(line) + 1
    done: dict[str, tuple[Entry, dict | None]] = {}
    changed = 0
    for image, (entry, recorded) in latest.items():
        now = file_stamp(image)
        if now is None:
            continue  # gone: where it is still an input, its own step says so
        if now == recorded if recorded is not None else now["mtime_ns"] <= written:
            done[image] = (entry, recorded)
        else:
            changed += 1
    if changed:
        ui.console.print(f"{path}: {changed} image(s) modified since they were {done_verb}; {redo_verb} them again.")
    return Journaled(done, end)


class open_journal:
    """The journal at ``path`` of ``spp COMMAND``, open for appending finished images' lines.

    ``resume_at``: None for a new journal with a header of ``params``; else the byte offset
    after the last line a rerun took (:attr:`Journaled.end`): the file is cut there, in place,
    and appended to, so a run killed at any moment leaves every line it had taken. A failed
    write raises SPPError naming the file.
    """

    def __init__(self, path: Path, command: str, params: dict, resume_at: int | None):
        self.path, self.command, self.params, self.resume_at = path, command, params, resume_at
        self.file: IO[str] | None = None

    def __enter__(self) -> open_journal:
        with self._said_as_spp_error():
            if self.resume_at is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = self.path.open("w", encoding="utf-8")
                self.file.write(json.dumps({"command": self.command, "params": self.params}) + "\n")
                self.file.flush()
            else:
                os.truncate(self.path, self.resume_at)
                self.file = self.path.open("a", encoding="utf-8")
        return self

    def append(self, record: dict) -> None:
        """One finished image's line, flushed: a run killed after this keeps it."""
        assert self.file is not None
        with self._said_as_spp_error():
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            with self._said_as_spp_error():
                self.file.close()
        return False

    @contextlib.contextmanager
    def _said_as_spp_error(self):
        try:
            yield
        except OSError as exc:  # a full disk or a quota: one line, not a traceback
            raise SPPError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
