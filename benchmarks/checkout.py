"""Every benchmark times this checkout's spp_cli, never an installed copy.

Import it before anything from spp_cli: it puts the repository first on
``sys.path``, and :data:`ENV` carries the same into ``python -m spp_cli``
subprocesses through PYTHONPATH. :func:`check` fails loudly if another copy
was imported all the same.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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
# Steps run in this process (svm_step, the scripts' training) do their arithmetic as the
# training commands do; `spp` subprocesses set it themselves where they train (ENV is without it).
from spp_cli.config import hold_reproducible_blas  # noqa: E402 (this checkout's, the path above)

hold_reproducible_blas()


def check() -> None:
    """Stop unless the imported spp_cli is the one in this checkout."""
    import spp_cli

    where = Path(spp_cli.__file__).resolve().parent
    if where != REPO / "spp_cli":
        sys.exit(f"benchmarks: imported spp_cli from {where}, not from this checkout ({REPO / 'spp_cli'})")


@dataclass
class TrainRun:
    """An `spp train` run's split, as that run made it (see :func:`train_run`)."""

    data: str  # the dataset spec
    state: dict  # its train-state.json
    cache: object  # the work folder's FeatureCache
    fit_ids: list[str]
    fit_keys: list[str]  # one cache entry per distinct fit image
    val: list[tuple]  # (record, classes) of the validation images, as validation_results takes them


def train_run(dataset: str, work: Path) -> TrainRun:
    """The fit and validation parts an `spp train` run made, from its work folder (or a
    candidate's folder in it, whose train-state.json is one level up). As spp train does,
    an image is one cache entry under the id the cache recorded: raccoon's 4 byte-identical
    duplicates train and score once."""
    import json

    from spp_cli.cache import FeatureCache
    from spp_cli.data import open_dataset
    from spp_cli.pipeline import split_for_validation

    data, split, _ = DATASETS[dataset]
    state = json.loads(next(p for p in (work / "train-state.json", work.parent / "train-state.json") if p.exists()).read_text())
    opened = open_dataset(data, split)
    parts = split_for_validation([r.image_id for r in opened.records], None, state["plan"]["val_fraction"])
    cache = FeatureCache.open(work / "feats")
    key_of = {cache.metadata(k).get("image_id"): k for k in cache.keys()}
    fit_keys = [key_of[i] for i in parts.fit_ids if i in key_of]
    val_ids = {i for i in parts.val_ids if i in key_of}
    val = [(r, opened.classes) for r in opened.records if r.image_id in val_ids]
    return TrainRun(data, state, cache, parts.fit_ids, fit_keys, val)


def proposal_model(run: TrainRun, work: Path) -> Path | None:
    """The windows the run trained its SVMs on at ``work``'s feature map: that map's proposal
    network where the run kept learned proposals there, else ``None`` (selective search).

    Each map has its own choice, its step "proposals at <label>" (a map's label: its scales, then
    " on <cut>" where the cut is not the run's backbone); the first map's folder is the work folder,
    another's is named by `spp train`'s ``map_folder``."""
    from spp_cli.pipeline import FeatureMap, map_folder

    steps = {name: step for name, step in run.state["steps"].items() if name.startswith("proposals") and "choice" in step}
    if (work / "train-state.json").exists():
        step = next(iter(steps.values()), None)  # the first map's: its steps come first
    else:
        backbone = run.state["plan"]["backbone"]

        def folder(name: str) -> str:
            scales, _, cut = name.removeprefix("proposals at ").partition(" on ")
            return map_folder(FeatureMap(scales, cut or backbone, ""), backbone)

        step = next((step for name, step in steps.items() if folder(name) == work.name), None)
        if step is None:
            sys.exit(f"{work}: no proposals step of this folder's map in {work.parent / 'train-state.json'}")
    network = work / "proposals.safetensors"
    return network if step is not None and step["choice"] == "learned" and network.exists() else None


def svm_step(run: TrainRun, work: Path, out: Path, positive_iou: float, proposal_model: Path | None = None,
             C: float | None = None) -> float:
    """An `spp train` run's SVM step again (pool5, box regression; C: `spp train`'s unless given), in a fresh process of
    this checkout: `run_train_svm` on the work folder's cache with the run's fit keys in the run's
    order (a run's ``--negatives`` are not passed: the benchmarks' runs have none). Seconds.
    Why not `spp train-svm --split FILE`: that takes the cache's keys in the cache's order, and
    the mining order, hence the model, follows the order of the keys."""
    import json
    import subprocess
    import time

    from spp_cli.pipeline import TrainPlan

    call = ("import json, sys; from pathlib import Path; from spp_cli.commands.train_svm import run_train_svm; "
            "a = json.load(sys.stdin); sys.exit(run_train_svm(Path(a['cache']), Path(a['out']), None, None, None, a['C'], True, "
            "keys=a['keys'], proposal_model_path=a['proposals'] and Path(a['proposals']), positive_iou=a['iou']))")
    job = {"cache": str(work / "feats"), "out": str(out), "keys": run.fit_keys, "iou": positive_iou, "C": TrainPlan.svm_c if C is None else C,
           "proposals": str(proposal_model) if proposal_model else None}
    start = time.perf_counter()
    # The job on stdin: one argument is capped at 128 KB (Linux's MAX_ARG_STRLEN), ~1,900 keys.
    done = subprocess.run([sys.executable, "-c", call], input=json.dumps(job), env=ENV, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"the SVM step on {work} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


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
