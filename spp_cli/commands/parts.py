"""What a per-image command does differently as one shard of a job.

It keeps the images its shard owns (with their positions in the whole job,
for the merge), writes its output as a part beside ``--out``, and, under
torchrun, rank 0 waits for the other ranks' parts of the same launch and
merges them into ``--out`` itself (the parts are files on the shared folder,
so no process group is needed: a propose run never loads torch for it).
Under a SLURM array or ``--shard`` the parts stay, for ``spp merge``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spp_cli import ui
from spp_cli.shard import Shard, part_path, resolve_shard, under_torchrun
from spp_cli.sources import Source, Sources

# When this process began the command: under a static rendezvous torchrun's
# run id is "none", and a part older than this is an earlier launch's.
STARTED_NS = time.time_ns()


@dataclass
class ShardWork:
    """A shard's share: its images, their positions in the whole job, the job's size."""

    shard: Shard
    items: list[Source]
    orders: list[int]
    total: int

    def output(self, out: Path) -> Path:
        """Where the command writes: ``out`` itself, or this shard's part of it."""
        return self.shard.part_path(out) if self.shard.active else out

    @property
    def run(self) -> str | None:
        """The launch this shard belongs to, when torchrun says (its run id; "none" says nothing)."""
        if self.shard.origin != "torchrun":
            return None
        run = os.environ.get("TORCHELASTIC_RUN_ID")
        return None if run in (None, "", "none") else run

    @property
    def torchrun(self) -> bool:
        """One rank of a torchrun launch, whose rank 0 merges the parts."""
        return self.shard.active and self.shard.origin == "torchrun" and under_torchrun()


def share(sources: Sources, shard_option: str | None) -> ShardWork:
    """This process's images of ``sources``; annotation problems listed by their owner only."""
    shard = resolve_shard(shard_option)
    if not shard.active:
        return ShardWork(shard, list(sources.items), list(range(len(sources.items))), len(sources.items))
    picked = [(k, s) for k, s in enumerate(sources.items) if shard.owns(s.image_id)]
    # A skipped annotation is named by its file (the image id is its stem):
    # one shard lists it, not all of them.
    sources.bad = [(path, problem) for path, problem in (sources.bad or []) if shard.owns(Path(path).stem)]
    ui.say(f"{shard.describe()}: {len(picked)} of {len(sources.items)} image(s)")
    return ShardWork(shard, [s for _, s in picked], [k for k, _ in picked], len(sources.items))


def finish(kind: str, work: ShardWork, out: Path, skipped: int) -> int:
    """After this shard wrote its part (with ``skipped`` inputs): the exit code.

    Under torchrun a rank that exits non-zero makes torchrun stop every rank,
    rank 0's merge with them; so the other ranks exit 0 (their skipped inputs
    are listed in their own output and counted in their parts) and rank 0,
    after merging, exits 1 if any rank skipped an input.
    """
    shard = work.shard
    if not shard.active:
        return 1 if skipped else 0
    if not work.torchrun:
        parts = out.with_name(f"{out.stem}.shard-*-of-{shard.count}{out.suffix}")
        ui.say(f"Wrote part {work.output(out)}; when every shard is done: spp merge {kind} {parts} --out {out}")
        return 1 if skipped else 0
    if shard.index != 0:
        return 0  # rank 0 merges when every part of this launch is written
    from spp_cli.merge import write_merged

    parts = [part_path(out, i, shard.count) for i in range(shard.count)]
    _wait_for_parts(parts, work.run)
    skipped_everywhere = sum(_skipped(part) for part in parts)
    merged = write_merged(kind, parts, out)
    for part in parts:
        part.unlink(missing_ok=True)
    ui.say(f"Merged the {shard.count} parts into {out}: {len(merged['images'])} images"
           + (f"; {skipped_everywhere} input(s) skipped over all ranks (listed in each rank's output)" if skipped_everywhere else ""))
    return 1 if skipped_everywhere else 0


def exit_code_of_rank(work: ShardWork, skipped: int) -> int:
    """For a command without parts (``spp cache``): under torchrun only rank 0's own skips set the code."""
    if work.torchrun and work.shard.index != 0:
        return 0
    return 1 if skipped else 0


def _skipped(part: Path) -> int:
    try:
        return int(json.loads(part.read_text(encoding="utf-8")).get("shard", {}).get("skipped", 0))
    except (OSError, ValueError, TypeError):
        return 0


def _wait_for_parts(parts: list[Path], run: str | None, poll: float = 0.2) -> None:
    """Until each part exists and was written by this launch (torchrun ends
    the whole job if a rank fails, so a part that never comes stops us too).

    A part is read again only when its file changes: an earlier launch's
    part is replaced, atomically, when this launch's rank writes its own.
    """
    checked: dict[Path, float] = {}
    waiting = list(parts)
    while waiting:
        still = []
        for part in waiting:
            try:
                stamp = part.stat().st_mtime_ns
            except OSError:
                still.append(part)
                continue
            if checked.get(part) == stamp or (run is None and stamp < STARTED_NS) or not _written_by(part, run):
                checked[part] = stamp
                still.append(part)
        waiting = still
        if waiting:
            time.sleep(poll)


def _written_by(part: Path, run: str | None) -> bool:
    try:
        return json.loads(part.read_text(encoding="utf-8")).get("shard", {}).get("run") == run
    except (OSError, ValueError):
        return False
