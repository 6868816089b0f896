"""Terminal rendering shared by the commands: progress bars, tables, lists.

Rich output goes to stderr so that stdout stays clean for data a user may
pipe (``spp detect ... --out -``).

Everything printed here may hold a user's text: file names, class names,
messages quoting either. Rich would read ``[bold]`` or ``[/a]`` in a folder
name as markup (and fail, or eat the brackets) and ``:smile:`` as an emoji
code, so the console and every progress column are built with markup and
emoji off: text prints as it is by construction. Colour is added with
:class:`rich.text.Text` styles, never with markup strings.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def progress(description_width: int = 12) -> Progress:
    """A progress bar with count, rate-friendly columns and time left."""
    return Progress(
        TextColumn(f"{{task.description:<{description_width}}}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}", markup=False),
        TimeElapsedColumn(),
        TextColumn("eta", markup=False),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def say(text: str) -> None:
    """Print one line of plain text (user text included) to stderr."""
    console.print(text)


def warn(text: str) -> None:
    """Print ``warning: <text>``, the prefix in yellow, the text as it is."""
    console.print(Text.assemble(("warning:", "yellow"), " ", text))


def print_warnings(lines: list[str], limit: int = 10) -> None:
    """Show warnings one per line, at most ``limit``, then a count of the rest."""
    for line in lines[:limit]:
        warn(line)
    if len(lines) > limit:
        warn(f"... and {len(lines) - limit} more warnings like these")


def print_bad(bad: list[tuple[Path | str, str]], heading: str = "input(s) skipped", verb: str = "skipped") -> None:
    """List skipped inputs at the end of a batch: one line each, naming the file."""
    if not bad:
        return
    console.print(Text(f"{len(bad)} {heading}:", style="red"))
    for path, problem in bad:
        text = problem if problem.startswith(str(path)) else f"{path}: {problem}"
        console.print(f"  {verb} " + text)
