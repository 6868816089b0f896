"""`spp train`: the recommended flow in one command, with a closing summary."""

from __future__ import annotations

import time
from pathlib import Path

from spp_cli import ui


def run_train_command(data: str, split: str, out: Path, val_split: str | None, val_fraction: float, work: Path | None,
                      cache_dir: Path | None, features: str, scales: str, backbone: str, epochs: int, negatives: tuple[str, ...], gpu: bool,
                      refit: bool = False, proposals: str = "auto", positive_iou: float = 0.7) -> int:
    from rich.table import Table

    from spp_cli.backbones import option_spec
    from spp_cli.config import DetectConfig, parse_scales
    from spp_cli.pipeline import TrainPlan, run_train

    option_spec(backbone)  # an unknown --backbone is said before any work
    for alternative in [] if scales == "auto" else scales.split("/"):
        parse_scales(alternative)  # a bad --scales is said before any work, the dataset's problems included
    plan = TrainPlan(data=data, split=split, val_split=val_split, val_fraction=val_fraction, scales=scales,
                     features=features, finetune_epochs=epochs, backbone=backbone, negatives=tuple(negatives), refit=refit,
                     proposals=proposals, positive_iou=positive_iou)
    start = time.perf_counter()
    code, result = run_train(plan, out, work, cache_dir, gpu)
    this_run = time.perf_counter() - start
    table = Table(title=f"Validation AP (VOC07), {result.split.how}")
    table.add_column("class")
    for kind in result.val_map:
        table.add_column(kind, justify="right")
    classes = list(next(iter(result.val_ap.values()), {}))
    for name in classes:
        table.add_row(name, *["-" if result.val_ap[k].get(name) is None else f"{result.val_ap[k][name]:.3f}" for k in result.val_map])
    table.add_row("mAP", *[f"{result.val_map[k]:.3f}" for k in result.val_map], style="bold")
    ui.console.print(table)
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
    if result.calibration is not None:
        c = result.calibration
        ui.console.print(f"Probabilities: fitted on {c.detections} validation detection(s) ({c.right} right) of {c.images} image(s); "
                         f"shown from probability {c.display_probability:.2f} (score {c.margin_at(c.display_probability):.3f})")
    else:
        ui.console.print(f"Probabilities: too few validation detections to fit them; scores are SVM margins, shown from {DetectConfig().display_threshold:g}")
    ui.console.print(result.scales)
    if result.proposals.startswith("Proposals: "):
        ui.console.print(result.proposals)
    ui.console.print(f"Chose {result.reason}. Wrote {out} ({'trained again on the whole split' if refit else 'the validated candidate'}). Time: {steps}; {sum(result.seconds.values()):.0f} s in all"
                     # The steps' times are those of the runs that did them: a resumed run says its own.
                     + (f" (this run {this_run:.0f} s)" if this_run < sum(result.seconds.values()) - 1 else ""))
    if result.skipped_at:
        # The skip lists scroll away (or were printed by the run this one resumed): say why the exit code is 1.
        ui.warn(f"input(s) were skipped at step(s) {', '.join(result.skipped_at)} (listed there) and the model trained without them; exit code 1")
    return code
