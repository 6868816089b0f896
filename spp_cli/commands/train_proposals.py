"""`spp train-proposals`: a region proposal network trained on cached conv maps (no conv pass)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from spp_cli import backbones, ui
from spp_cli.errors import DatasetError
from spp_cli.fileio import check_not_in_cache, check_writable


def run_train_proposals(cache_dir: Path, out: Path, data: str | None, split: str | None, epochs: int, top: int, gpu: bool,
                        keys: list[str] | None = None) -> int:
    """`spp train-proposals`; `spp train` passes the cache ``keys`` to train on."""
    from spp_cli.cache import FeatureCache
    from spp_cli.errors import UsageError
    from spp_cli.finetune import checkpoint_path, check_checkpoint
    from spp_cli.rpn import CHECKPOINT_KIND, ProposalConfig, ProposalTrainer
    from spp_cli.train import split_keys

    check_writable(out)
    device = backbones.select_device(gpu)
    cache = FeatureCache.open(cache_dir)
    check_not_in_cache(out, cache_dir)  # once it is a cache: another folder is named as not one
    if split and not data:
        raise UsageError("--split needs --data SPEC (the dataset the split belongs to)")
    if keys is None:
        keys = split_keys(cache, data, split) if data else cache.keys()
    keys = [k for k in keys if cache.metadata(k).get("has_gt")]
    if not keys:
        raise DatasetError(f"{cache_dir}: no cached image has ground truth; build the cache with --data SPEC")
    if not any(cache.holds_box(key) for key in keys):
        raise DatasetError(f"{cache_dir}: the ground truth of its {len(keys)} image(s) holds no box; nothing to train on")
    trainer = ProposalTrainer(cache, keys, ProposalConfig(epochs=epochs, top_n=top), device=device)
    checkpoint = checkpoint_path(out)
    if checkpoint.is_file():
        check_checkpoint(checkpoint, trainer.identity(), CHECKPOINT_KIND, "proposal-training checkpoint")
    ui.console.print(
        f"Training proposals ({len(trainer.config.anchor_sizes) * len(trainer.config.aspect_ratios)} anchors per cell) on "
        f"{len(trainer.train_keys)} cached image(s) (+{len(trainer.val_keys)} held out to report recall), on {device}",
    )
    def held_out_recall(at_05: float, at_07: float) -> str:
        if math.isnan(at_05):  # no held-out image (one training image), or none of them holds a box
            return f"no held-out recall ({len(trainer.val_keys)} held-out image(s), no box among them)"
        return f"held-out recall at {top} boxes {at_05:.3f} (IoU 0.5) / {at_07:.3f} (IoU 0.7)"

    start = time.perf_counter()
    with ui.progress(10) as bar:
        reading = bar.add_task("reading", total=len(keys), rate="")
        trainer.prepare(lambda done, total: bar.update(reading, completed=done, total=total))
        if checkpoint.is_file():
            bar.console.print(f"Resuming from {checkpoint}")
        tasks: dict[int, int] = {}

        def progress(epoch: int, step: int, steps: int, loss: float) -> None:
            if epoch not in tasks:
                tasks[epoch] = bar.add_task(f"epoch {epoch}", total=steps, rate="")
            bar.update(tasks[epoch], completed=step, rate=f"loss {loss:.3f}")

        def on_epoch(state) -> None:
            last = state.history[-1]
            bar.console.print(f"epoch {last['epoch']}: loss {last['loss']:.3f}, {held_out_recall(last['recall@0.5'], last['recall@0.7'])}")

        model = trainer.run(checkpoint, progress, on_epoch)
    model.training["cache"] = str(cache_dir)
    model.save(out)
    with contextlib.suppress(OSError):
        checkpoint.unlink()  # the run is complete; the model file holds the result
    record = model.training
    ui.console.print(
        f"Wrote {out}: {record['epochs_run']} epochs, {held_out_recall(record['held_out_recall@0.5'], record['held_out_recall@0.7'])}, "
        f"{time.perf_counter() - start:.1f} s",
    )
    return 0
