"""`spp merge`: the parts of a sharded propose or detect run, as one file."""

from __future__ import annotations

from pathlib import Path

from spp_cli import ui
from spp_cli.fileio import check_not_input, check_writable
from spp_cli.merge import write_merged


def run_merge(kind: str, parts: list[Path], out: Path) -> int:
    check_writable(out)
    check_not_input(out, parts)
    merged = write_merged(kind, parts, out)
    ui.say(f"Wrote {out}: {len(merged['images'])} images from {len(parts)} part(s)")
    return 0
