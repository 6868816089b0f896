"""torch.distributed where torchrun started us; nothing at all otherwise.

Only code paths that run under torchrun (``WORLD_SIZE`` > 1 with a
rendezvous address) import this module, so a single process never loads
torch.distributed. The process group uses gloo on the CPU and NCCL when the
command runs on CUDA; rank 0 is the one that merges and writes shared
results.
"""

from __future__ import annotations

import datetime
import os

# Ranks wait for each other at a barrier (the slowest shard of a propose or
# detect run): allow a long day's work rather than gloo's 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def ensure_group(cuda: bool = False):
    """The default process group, created on first use (gloo, or NCCL with ``cuda``)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # The verdicts and sums finetune reduces are CPU tensors: gloo carries
        # those, NCCL the gradients of a model on the GPU.
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            import torch

            torch.cuda.set_device(torch_device_index())  # before NCCL binds the rank to a GPU
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return dist


def rank() -> int:
    return ensure_group().get_rank()


def world_size() -> int:
    return ensure_group().get_world_size()


def barrier() -> None:
    """Wait until every rank gets here."""
    ensure_group().barrier()


def gather_objects(obj):
    """Every rank's ``obj`` on every rank, in rank order (small, picklable-free JSON-able objects)."""
    import json

    dist = ensure_group()
    # Objects travel as JSON text: no pickle of anything a rank received.
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, json.dumps(obj))
    return [json.loads(text) for text in gathered]


def torch_device_index() -> int:
    """The GPU this rank uses (as :func:`spp_cli.backbones.select_device` picks it)."""
    import torch

    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
