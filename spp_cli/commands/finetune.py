"""`spp finetune`: train the fc head on SPP vectors from a feature cache (conv frozen)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from spp_cli import backbones, ui
from spp_cli.cache import FeatureCache
from spp_cli.errors import UsageError
from spp_cli.fileio import check_not_in_cache, check_not_input, check_writable


def run_finetune(cache_dir: Path, out: Path, data: str | None, split: str | None, classes: str | None, epochs: int, lr: float, batch: int,
                 fg_fraction: float, hidden: int, flip: bool, seed: int, gpu: bool, keys: list[str] | None = None,
                 negatives: tuple[str, ...] = (), proposal_model_path: Path | None = None) -> int:
    """`spp finetune`; `spp train` passes the cache ``keys`` to train on and, in its learned flow,
    the proposal model whose boxes are the training windows (its cache holds no others)."""
    from spp_cli.finetune import (
        FinetuneConfig,
        Finetuner,
        check_checkpoint,
        checkpoint_path,
    )
    from spp_cli.train import negative_images, negative_keys, split_keys, training_set

    check_writable(out)
    check_not_input(out, [proposal_model_path] if proposal_model_path is not None else [])
    device = backbones.select_device(gpu)
    cache = FeatureCache.open(cache_dir)
    check_not_in_cache(out, cache_dir)  # once it is a cache: another folder is named as not one
    if proposal_model_path is not None:
        from spp_cli.rpn import LearnedWindows, ProposalModel

        cache = LearnedWindows(cache, ProposalModel.load(proposal_model_path))
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if split and not data:
        raise UsageError("--split needs --data SPEC (the dataset the split belongs to)")
    if keys is None:
        keys = split_keys(cache, data, split) if data else None
    data = training_set(cache, wanted, keys)
    background = negative_keys(cache, negative_images(negatives)) if negatives else []
    config = FinetuneConfig(epochs=epochs, lr=lr, batch=batch, fg_fraction=fg_fraction, hidden=hidden, flip=flip, seed=seed)
    from spp_cli.shard import under_torchrun

    rank, world = 0, 1
    if under_torchrun():
        from spp_cli import distributed

        distributed.ensure_group(cuda=device.startswith("cuda"))
        rank, world = distributed.rank(), distributed.world_size()
        ui.console.quiet = rank != 0  # one voice: rank 0's
    tuner = Finetuner(cache, data.keys, data.classes, config, device=device, rank=rank, world=world, negative_keys=background)
    if not tuner.my_keys:
        raise UsageError(f"{cache_dir}: {len(tuner.train_keys)} training image(s) for {world} ranks; run with at most {len(tuner.train_keys)} ranks")
    checkpoint = checkpoint_path(out)
    if checkpoint.is_file():
        check_checkpoint(checkpoint, tuner.identity())  # before reading the whole cache
    over = f", {world} ranks (DistributedDataParallel)" if world > 1 else ""
    ui.console.print(
        f"Fine-tuning fc6/fc7 ({hidden} wide) on {len(tuner.train_keys)} cached image(s) "
        f"(+{len(tuner.val_keys)} held out{f'; {len(tuner.negative_keys)} background image(s) among them' if tuner.negative_keys else ''}), "
        f"{len(data.classes)} class(es), on {device}{over}",
    )
    start = time.perf_counter()
    with ui.progress(10) as bar:
        reading = bar.add_task("reading", total=len(data.keys), rate="")
        tuner.prepare(lambda done, total: bar.update(reading, completed=done, total=total))
        if checkpoint.is_file():
            bar.console.print(f"Resuming from {checkpoint}")
        tasks: dict[int, int] = {}

        def progress(epoch: int, step: int, steps: int, loss: float, accuracy: float) -> None:
            if epoch not in tasks:
                tasks[epoch] = bar.add_task(f"epoch {epoch}", total=steps, rate="")
            bar.update(tasks[epoch], completed=step, rate=f"loss {loss:.3f} acc {accuracy:.3f}")

        def on_epoch(report) -> None:
            bar.console.print(
                f"epoch {report.epoch}: train loss {report.train_loss:.3f} acc {report.train_accuracy:.3f}, "
                f"held-out loss {report.val_loss:.3f} acc {report.val_accuracy:.3f}" + (" (best)" if report.best else ""),
            )

        head = tuner.run(checkpoint, progress, on_epoch)
    if rank != 0:
        return 0  # rank 0 writes the head (every rank holds the same weights)
    head.training["cache"] = str(cache_dir)
    head.save(out)
    with contextlib.suppress(OSError):
        checkpoint.unlink()  # the run is complete; the head file holds the result
    ui.console.print(
        f"Wrote {out}: best epoch {head.training['best_epoch']} of {head.training['epochs_run']}, {time.perf_counter() - start:.1f} s",
    )
    return 0

