"""What a command runs on: image inputs, or a dataset split.

Every command that reads images accepts either ``INPUT...`` (files,
folders, globs, ``.txt`` lists) or ``--data SPEC [--split NAME]``; this
module turns both into one list of :class:`Source` items.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from spp_cli.errors import SPPError, UsageError


@dataclass
class Source:
    """One image to process; ``record`` carries ground truth when known."""

    image_id: str
    path: Path
    record: object | None = None  # spp_cli.data.ImageRecord


@dataclass
class Sources:
    """The images of one command run.

    Attributes:
        items: images in order.
        dataset: the opened dataset when ``--data`` was given, else ``None``.
        bad: ``(file, problem)`` found before any image was read (annotation
            problems, inputs that hold no image); the command lists them at
            the end and exits 1.
        warnings: lines to show the user (clipped or dropped boxes).
    """

    items: list[Source]
    dataset: object | None = None
    bad: list[tuple[Path, str]] | None = None
    warnings: list[str] | None = None


def resolve_sources(inputs: tuple[str, ...] | list[str], data: str | None, split: str | None) -> Sources:
    """Turn ``INPUT...`` or ``--data/--split`` into :class:`Sources`.

    Raises:
        UsageError: both or neither were given (exit code 2 on the command line).
        SPPError: a path does not exist, or the dataset cannot be opened.
    """
    if inputs and data:
        raise UsageError("give image INPUTs or --data, not both")
    if split and not data:
        raise UsageError("--split needs --data")
    if data:
        from spp_cli.data import open_dataset

        dataset = open_dataset(data, split)
        items = [Source(r.image_id, r.path, r) for r in dataset.records]
        if not items and not dataset.bad:
            raise SPPError(f"{data}: no images in split '{split or 'all'}'")
        return Sources(items, dataset, list(dataset.bad), list(dataset.warnings))
    if not inputs:
        raise UsageError("no input: give image files, folders, globs or a .txt list, or --data SPEC")
    from spp_cli.images import expand_inputs

    paths, skipped = expand_inputs(list(inputs))
    # The id is the file stem, unless two inputs share a stem (a/1.jpg,
    # b/1.jpg): then the path itself keeps ids unique.
    stem_counts = Counter(p.stem for p in paths)
    items = [Source(p.stem if stem_counts[p.stem] == 1 else p.as_posix(), p) for p in paths]
    return Sources(items, None, [(Path(item), problem) for item, problem in skipped], [])
