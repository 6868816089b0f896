"""Terminal rendering shared by the commands: progress bars, tables, lists.

Rich output goes to stderr so that stdout stays clean for data a user may
pipe (``spp detect ... --out -``).
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

console = Console(stderr=True, highlight=False, soft_wrap=True)


def progress(description_width: int = 12) -> Progress:
    """A progress bar with count, rate-friendly columns and time left."""
    return Progress(
        TextColumn(f"{{task.description:<{description_width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def print_warnings(lines: list[str], limit: int = 10) -> None:
    """Show warnings one per line, at most ``limit``, then a count of the rest."""
    for line in lines[:limit]:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    if len(lines) > limit:
        console.print(f"[yellow]warning:[/] ... and {len(lines) - limit} more warnings like these")


def print_bad(bad: list[tuple[Path | str, str]]) -> None:
    """List skipped inputs at the end of a batch: one line each, naming the file."""
    if not bad:
        return
    console.print(f"[red]{len(bad)} input(s) skipped:[/]")
    for path, problem in bad:
        text = problem if problem.startswith(str(path)) else f"{path}: {problem}"
        # markup=False: file names may contain [brackets].
        console.print("  skipped " + text, soft_wrap=True, markup=False)
