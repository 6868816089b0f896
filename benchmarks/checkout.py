"""Every benchmark times this checkout's spp_cli, never an installed copy.

Import it before anything from spp_cli: it puts the repository first on
``sys.path``, and :data:`ENV` carries the same into ``python -m spp_cli``
subprocesses through PYTHONPATH. :func:`check` fails loudly if another copy
was imported all the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
SPLITS = REPO / "benchmarks" / "splits"
# name -> (dataset spec, training split, test split): the benchmarks' datasets
DATASETS = {
    "raccoon": (str(SHARED / "raccoon"), "train", "test"),
    "bccd": (str(SHARED / "bccd"), "trainval", "test"),
    "coco128": (str(SHARED / "coco128" / "annotations" / "instances_train2017.json"),
                str(SPLITS / "coco128-train.txt"), str(SPLITS / "coco128-test.txt")),
}
sys.path.insert(0, str(REPO))

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def check() -> None:
    """Stop unless the imported spp_cli is the one in this checkout."""
    import spp_cli

    where = Path(spp_cli.__file__).resolve().parent
    if where != REPO / "spp_cli":
        sys.exit(f"benchmarks: imported spp_cli from {where}, not from this checkout ({REPO / 'spp_cli'})")


def train_run_split(dataset: str, work: Path) -> tuple[str, object, object, dict]:
    """The split an `spp train` run made: ``(dataset spec, the dataset read, its
    fit/validation parts, the run's train-state.json)``. ``work`` is the run's work
    folder or a candidate's folder in it (whose train-state.json is one level up)."""
    import json

    from spp_cli.data import open_dataset
    from spp_cli.pipeline import split_for_validation

    data, split, _ = DATASETS[dataset]
    state = json.loads(next(p for p in (work / "train-state.json", work.parent / "train-state.json") if p.exists()).read_text())
    records = open_dataset(data, split)
    parts = split_for_validation([r.image_id for r in records.records], None, state["plan"]["val_fraction"])
    return data, records, parts, state


def run_spp(*args, allowed: tuple[int, ...] = (0, 1)) -> tuple[float, str]:
    """Seconds and output (stdout, then stderr: where the summaries go) of ``spp ARGS`` in a
    fresh process of this checkout. Stops the benchmark on an exit code outside ``allowed``
    (1: some inputs were skipped and listed, the rest done)."""
    import subprocess
    import time

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spp_cli", *map(str, args)], env=ENV, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in allowed:
        sys.exit(f"spp {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr
