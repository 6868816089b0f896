"""Journals of finished images: how `spp propose` and `spp detect` resume after an interruption.

A journal sits beside the command's output (``<out>.partial``) while it runs: a header line
``{"params": <the run's settings>}``, then one JSON object per finished image, appended and
flushed as the image finishes, holding its ``"path"`` and the ``"file"`` stamp
(:func:`spp_cli.fileio.file_stamp`: size and mtime) the image had before it was read. The
output itself is written atomically once every image is done, and the journal removed, so an
earlier output stays whole until then.

A rerun with the same settings takes an image's line only while its file still has that
stamp (an image replaced since, even by ``cp -p`` with an older mtime, is done again). A line
without a stamp (a journal of an earlier spp) is taken while the file is no newer than the
journal. The last line of a killed run may be cut short: reading stops there, and the journal
is rewritten without it before lines are appended.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from spp_cli import ui
from spp_cli.errors import SPPError
from spp_cli.fileio import file_stamp, recorded_stamp

Entry = TypeVar("Entry")


def journal_path(out: Path) -> Path:
    """Where finished images are appended while a run that writes ``out`` is in progress."""
    return out.with_name(out.name + ".partial")


def load_journal(path: Path, params: dict, command: str, parse: Callable[[dict], Entry],
                 done_verb: str = "searched", redo_verb: str = "searching") -> dict[str, tuple[Entry, dict | None]]:
    """Images finished by an interrupted run with the same ``params`` whose files are as they were.

    Returns image path -> (``parse(line)``, the stamp the line recorded). ``parse`` turns a line
    into the command's entry and raises KeyError, TypeError or ValueError on one it cannot use,
    which ends the reading there (as a cut-short line does). What is not taken is said on the
    console: a file that is not a journal of ``spp COMMAND``, other settings, or images modified
    since they were ``done_verb`` (``redo_verb`` them again).
    """
    if not path.exists():
        return {}
    try:
        written = path.stat().st_mtime_ns
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        header = exc
    if not isinstance(header, dict):
        reason = f" ({header.strerror or header})" if isinstance(header, OSError) else ""
        ui.console.print(f"{path}: not a journal of `spp {command}`{reason}; starting afresh.")
        return {}
    if header.get("params") != params:
        ui.console.print(f"{path}: left by a run with other settings; starting afresh.")
        return {}
    latest: dict[str, tuple[Entry, dict | None]] = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
            latest[record["path"]] = (parse(record), recorded_stamp(record.get("file")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break  # the last line of a killed run may be cut short; redo from there
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
    return done


class open_journal:
    """The journal at ``path``, open for appending finished images' lines.

    ``fresh``: a new journal with a header of ``params``; else the existing one, rewritten
    without a cut-short last line. Raises SPPError (naming the file) where it cannot be written.
    """

    def __init__(self, path: Path, params: dict, fresh: bool):
        self.path, self.params, self.fresh = path, params, fresh
        self.file: IO[str] | None = None

    def __enter__(self) -> open_journal:
        try:
            self._open()
        except OSError as exc:
            raise SPPError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        return self

    def _open(self) -> None:
        if self.fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("w", encoding="utf-8")
            self.file.write(json.dumps({"params": self.params}) + "\n")
        else:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            good = [lines[0]]
            for line in lines[1:]:
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    break
                good.append(line)
            self.file = self.path.open("w", encoding="utf-8")
            self.file.write("\n".join(good) + "\n")
        self.file.flush()

    def append(self, record: dict) -> None:
        """One finished image's line, flushed: a run killed after this keeps it."""
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            self.file.close()
        return False
