"""Which images this process works on when a job runs as many processes.

A per-image command (``propose``, ``cache``, ``detect``) run as one of N
processes takes the images whose id hashes to its index: a stable
assignment (by image id, never by list position), so a rerun or a resume
picks up exactly the same images, whatever order the inputs come in.

Where the index comes from, first match wins:

- ``--shard I/N`` on the command line;
- torchrun's environment (``RANK``, ``WORLD_SIZE``), combined with a SLURM
  array's when both are set (torchrun inside each array task: shard
  ``task * WORLD_SIZE + RANK`` of ``tasks * WORLD_SIZE``);
- a SLURM job array (``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``,
  of ``SLURM_ARRAY_TASK_COUNT``);
- otherwise one shard of one: the whole job, as without any of this.

A sharded ``propose`` or ``detect`` writes its part beside ``--out``
(``props.shard-2-of-8.json``); :mod:`spp_cli.merge` joins the parts into
the file one process would have written. Nothing here imports
torch.distributed; :mod:`spp_cli.distributed` does, and only under torchrun.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spp_cli.errors import UsageError

_SHARD_OPTION = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based); ``origin`` says where it came from."""

    index: int = 0
    count: int = 1
    origin: str = "single process"

    @property
    def active(self) -> bool:
        """More than one shard: this process does part of the job."""
        return self.count > 1

    def owns(self, image_id: str) -> bool:
        return shard_of(image_id, self.count) == self.index

    def part_path(self, out: str | Path) -> Path:
        """Where this shard writes its part of ``out``: ``props.json`` -> ``props.shard-2-of-8.json``."""
        return part_path(out, self.index, self.count)

    def describe(self) -> str:
        return f"shard {self.index + 1} of {self.count} ({self.origin})"


def shard_of(image_id: str, count: int) -> int:
    """The shard an image belongs to: sha256 of its id, modulo ``count``."""
    if count <= 1:
        return 0
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:16], 16) % count


def part_path(out: str | Path, index: int, count: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def parse_shard_option(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``.

    Raises:
        UsageError: not of that form, or I out of range.
    """
    match = _SHARD_OPTION.match(text)
    if not match:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 0/4 (shard I of N, counting from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: I must be at least 0 and below N (shards 0/{max(count, 1)} to {max(count, 1) - 1}/{max(count, 1)})")
    return index, count


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """This process's shard, from ``--shard`` or the launcher's environment.

    Raises:
        UsageError: ``--shard`` malformed, or a launcher variable that is not
            a number (the message names it).
    """
    env = os.environ if env is None else env
    if option is not None:
        index, count = parse_shard_option(option)
        return Shard(index, count, "--shard")
    torch_rank = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    array_task = _int_var(env, "SLURM_ARRAY_TASK_ID"), _int_var(env, "SLURM_ARRAY_TASK_COUNT")
    shard = Shard()
    if array_task[0] is not None and array_task[1] is not None and array_task[1] > 1:
        first = _int_var(env, "SLURM_ARRAY_TASK_MIN") or 0
        index = array_task[0] - first
        if not 0 <= index < array_task[1]:
            raise UsageError(
                f"SLURM_ARRAY_TASK_ID={array_task[0]} is not among the {array_task[1]} tasks from SLURM_ARRAY_TASK_MIN={first}; "
                "spp shards over a contiguous array (--array=0-N)"
            )
        shard = Shard(index, array_task[1], "SLURM array")
    if torch_rank[0] is not None and torch_rank[1] is not None and torch_rank[1] > 1:
        rank, world = torch_rank
        if not 0 <= rank < world:
            raise UsageError(f"RANK={rank} is not below WORLD_SIZE={world}")
        origin = "torchrun" if shard.count == 1 else "SLURM array x torchrun"
        shard = Shard(shard.index * world + rank, shard.count * world, origin)
    return shard


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Launched by torchrun with more than one rank (a process group can be formed)."""
    env = os.environ if env is None else env
    return (_int_var(env, "WORLD_SIZE") or 1) > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} in the environment is not a whole number") from None
