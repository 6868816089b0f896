"""`spp train-svm`: SVMs (and box regressors) from a feature cache into a model file."""

from __future__ import annotations

import time
from pathlib import Path

from spp_cli import ui
from spp_cli.cache import FeatureCache
from spp_cli.config import BBoxRegConfig, SVMConfig
from spp_cli.fileio import check_writable


def run_train_svm(cache_dir: Path, out: Path, classes: str | None, C: float, bbox_reg: bool) -> int:
    from spp_cli.train import train_detector, training_set

    check_writable(out)
    cache = FeatureCache.open(cache_dir)
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    data = training_set(cache, wanted)
    ui.console.print(f"Training on {len(data.keys)} cached image(s), {len(data.classes)} class(es): {', '.join(data.classes)}", markup=False)
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
        )
    detector.training["cache"] = str(cache_dir)
    detector.save(out)
    ui.console.print(f"Wrote {out}: {len(detector.classes)} class(es), box regression {'on' if bbox_reg else 'off'}, {time.perf_counter() - start:.1f} s", markup=False)
    return 0
