"""`spp train-svm`: SVMs (and box regressors) from a feature cache into a model file."""

from __future__ import annotations

import time
from pathlib import Path

from spp_cli import ui
from spp_cli.cache import FeatureCache
from spp_cli.config import BBoxRegConfig, SVMConfig
from spp_cli.errors import UsageError
from spp_cli.fileio import check_writable


def run_train_svm(cache_dir: Path, out: Path, data: str | None, split: str | None, classes: str | None, C: float, bbox_reg: bool,
                  features: str = "pool5", head_path: Path | None = None) -> int:
    from spp_cli.head import Head
    from spp_cli.train import check_head, train_detector, split_keys, training_set

    if features == "fc7" and head_path is None:
        raise UsageError("--features fc7 needs --head FILE (a head from `spp finetune`)")
    if features == "pool5" and head_path is not None:
        raise UsageError("--head is used with --features fc7")
    check_writable(out)
    head = Head.load(head_path) if head_path is not None else None
    cache = FeatureCache.open(cache_dir)
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if split and not data:
        raise UsageError("--split needs --data SPEC (the dataset the split belongs to)")
    keys = split_keys(cache, data, split) if data else None
    data = training_set(cache, wanted, keys)
    if head is not None:
        check_head(head, cache)
    ui.console.print(
        f"Training on {features} features of {len(data.keys)} cached image(s), {len(data.classes)} class(es): {', '.join(data.classes)}",
        markup=False,
    )
    start = time.perf_counter()
    with ui.progress(16) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            bar.update(tasks[stage], completed=done)

        detector = train_detector(
            data,
            svm_config=SVMConfig(C=C),
            bbox_config=BBoxRegConfig() if bbox_reg else None,
            progress=progress,
            log=lambda line: bar.console.print(line, markup=False),
            head=head,
        )
    detector.training["cache"] = str(cache_dir)
    if head_path is not None:
        detector.training["head"] = str(head_path)
    detector.save(out)
    ui.console.print(f"Wrote {out}: {len(detector.classes)} class(es), box regression {'on' if bbox_reg else 'off'}, {time.perf_counter() - start:.1f} s", markup=False)
    return 0
