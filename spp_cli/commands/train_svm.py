"""`spp train-svm`: SVMs (and box regressors) from a feature cache into a model file."""

from __future__ import annotations

import contextlib
import glob
import tempfile
import time
from pathlib import Path

import numpy as np

from spp_cli import ui
from spp_cli.cache import FeatureCache, proposals_digest
from spp_cli.config import BBoxRegConfig, SVMConfig
from spp_cli.errors import CacheError, DatasetError, UsageError
from spp_cli.fileio import check_not_in_cache, check_not_input, check_writable, file_sha256


def run_train_svm(cache_dir: Path, out: Path, data: str | None, split: str | None, classes: str | None, C: float, bbox_reg: bool,
                  features: str = "pool5", head_path: Path | None = None, mode: str = "spp", gpu: bool = False,
                  keys: list[str] | None = None, training_extra: dict | None = None, negatives: tuple[str, ...] = (),
                  calibration=None, solver: str = "newton", proposal_model_path: Path | None = None, windows: str | None = None,
                  positive_iou: float = 0.0) -> int:
    """`spp train-svm`; `spp train` passes the cache ``keys`` to train on and ``training_extra``
    for the model's training metadata. ``proposal_model_path``: a proposal model the detector
    carries (and, with ``windows`` ``learned``, the default then, whose boxes are the training windows)."""
    from spp_cli.head import Head
    from spp_cli.train import (
        TrainingSet,
        check_head,
        split_keys,
        train_detector,
        training_set,
    )

    if features == "fc7" and head_path is None:
        raise UsageError("--features fc7 needs --head FILE (a head from `spp finetune`)")
    if features == "pool5" and head_path is not None:
        raise UsageError("--head is used with --features fc7")
    check_writable(out)
    check_not_input(out, [path for path in (head_path, proposal_model_path) if path is not None])
    head = Head.load(head_path) if head_path is not None else None
    cache = FeatureCache.open(cache_dir)
    check_not_in_cache(out, cache_dir)  # once it is a cache: another folder is named as not one
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if split and not data:
        raise UsageError("--split needs --data SPEC (the dataset the split belongs to)")
    if mode == "rcnn" and head is not None:
        raise UsageError("--mode rcnn trains on R-CNN pool5 features; a fine-tuned head (--head) is for SPP features")
    if keys is None:
        keys = split_keys(cache, data, split) if data else None
    data = training_set(cache, wanted, keys)
    if negatives:
        from spp_cli.train import negative_images, negative_keys

        data.negative_keys = negative_keys(cache, negative_images(negatives))
    if head is not None:
        check_head(head, cache)
    proposal_model = None
    windows = windows or ("learned" if proposal_model_path is not None else "selective-search")
    if windows == "learned" and proposal_model_path is None:
        raise UsageError("--windows learned needs --proposal-model FILE")
    if windows == "selective-search" and not any(_holds_proposals(cache, key) for key in data.keys + data.negative_keys):
        # Without windows no negative is mined: the SVMs would fire everywhere.
        remedy = "" if mode == "rcnn" else "pass --windows learned or " if proposal_model_path is not None else "pass --proposal-model FILE or "
        raise CacheError(f"{cache_dir}: built with --no-proposals (no windows to mine negatives from); {remedy}rebuild the cache without --no-proposals")
    if proposal_model_path is not None:
        from spp_cli.rpn import LearnedWindows, ProposalModel

        if mode == "rcnn":
            raise UsageError("--proposal-model is for SPP detectors (the R-CNN baseline takes the cache's proposals)")
        proposal_model = ProposalModel.load(proposal_model_path)
        proposal_model.check_features(cache.settings, str(cache_dir))
        if windows == "learned":
            data = TrainingSet(LearnedWindows(cache, proposal_model), data.keys, data.classes, data.negative_keys)
    from spp_cli.shard import under_torchrun

    ranks = None  # (rank, world) under torchrun: the classes are divided over the ranks
    all_classes = list(data.classes)
    if under_torchrun():
        from spp_cli import distributed

        ranks = distributed.rank(), distributed.world_size()
        ui.console.quiet = ranks[0] != 0  # one voice: rank 0's
        data = TrainingSet(data.cache, data.keys, all_classes[ranks[0] :: ranks[1]], data.negative_keys)
    over = f" over {ranks[1]} ranks (rank 0: {', '.join(data.classes) or 'none'})" if ranks else ""
    background = f" and {len(data.negative_keys)} background image(s)" if data.negative_keys else ""
    from_model = f"; windows: {proposal_model_path}'s top {proposal_model.config.top_n} boxes" if windows == "learned" else ""
    ui.console.print(
        f"Training on {features} features of {len(data.keys)} cached image(s){background}, {len(all_classes)} class(es): {', '.join(all_classes)}{over}{from_model}",
    )
    extractor = None
    if gpu and mode != "rcnn":
        ui.console.print("note: --gpu has no effect here: SPP training reads only the cache (no network pass)")
    if mode == "rcnn":
        from spp_cli import backbones
        from spp_cli.rcnn import extractor_for

        extractor = extractor_for(cache.settings, str(cache_dir), backbones.select_device(gpu))
        ui.console.print(
            "R-CNN mode: every ground-truth box and proposal of every image is warped and run through the network "
            "(the cache supplies image paths, proposals and ground truth; its conv maps are not used)",
        )
    start = time.perf_counter()
    with ui.progress(16) as bar, contextlib.ExitStack() as stack:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, rate: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            bar.update(tasks[stage], completed=done, rate=rate)

        featurizer = None
        if extractor is not None:
            from spp_cli.rcnn import RCNNFeaturizer

            # Rows of all images do not fit in memory on large sets: keep them
            # in a temporary folder for the run (removed at the end).
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spp-rcnn-")))
            begun = time.perf_counter()

            def on_image(images: int, windows: int) -> None:
                progress("R-CNN windows", images, len(data.keys), f"{windows / (time.perf_counter() - begun):.0f} win/s")

            featurizer = RCNNFeaturizer(extractor, dtype=cache.settings.dtype, folder=folder, on_image=on_image)

        # Mining's state, written from time to time beside --out (one file per rank): a rerun resumes from it.
        checkpoint = out.with_name(f"{out.name}.rank-{ranks[0]}-of-{ranks[1]}.partial" if ranks else f"{out.name}.partial")
        checkpoint_key = {
            "cache": str(cache_dir), "windows": windows,
            **{name: file_sha256(path) for name, path in (("head", head_path), ("proposal_model", proposal_model_path)) if path is not None},
        }
        detector = None if not data.classes else train_detector(
            data,
            checkpoint=checkpoint,
            checkpoint_key=checkpoint_key,
            svm_config=SVMConfig(C=C, solver=solver, positive_iou=positive_iou),
            bbox_config=BBoxRegConfig() if bbox_reg else None,
            progress=progress,
            log=lambda line: ui.say(line),
            head=head,
            featurizer=featurizer,
        )
    if ranks is not None:
        detector = _assemble_on_rank_0(detector, all_classes, out, *ranks)
        if detector is None:
            return 0  # another rank's model: rank 0 writes it (and removes every rank's checkpoint)
    elif not detector.classes:  # e.g. a COCO file whose categories no annotation uses
        raise DatasetError(f"{cache_dir}: no class has a usable ground-truth box (difficult and crowd boxes are not); nothing to train on")
    detector.training["cache"] = str(cache_dir)
    detector.training.update(training_extra or {})
    if calibration is not None:  # `spp train`: fitted on its validation part (spp_cli.calibration)
        detector.calibrate(calibration)
    if head_path is not None:
        detector.training["head"] = str(head_path)
    how = ""
    if proposal_model is not None:
        detector.proposal_model = proposal_model
        detector.training.update({"proposal_model": str(proposal_model_path), "windows": windows})
        how = f", proposal network carried (trained on its {'boxes' if windows == 'learned' else 'selective-search windows'})"
    if featurizer is not None:
        from spp_cli.rcnn import CONTEXT_PADDING

        detector.training["rcnn"] = {
            "windows": featurizer.windows_computed,
            "window_size": featurizer.extractor.spec.window_size,
            "context_padding": CONTEXT_PADDING,
        }
        how = f", R-CNN features ({featurizer.windows_computed} windows through the network)"
    detector.save(out)
    # Every rank's mining is in the model now; a run of this --out over another number of
    # ranks that stopped left its own files, which nothing would take (GBs perhaps).
    for left in [out.with_name(f"{out.name}.partial"), *out.parent.glob(f"{glob.escape(out.name)}.rank-*-of-*.partial")]:
        left.unlink(missing_ok=True)
    ui.console.print(
        f"Wrote {out}: {len(detector.classes)} class(es), box regression {'on' if bbox_reg else 'off'}{how}, {time.perf_counter() - start:.1f} s",
    )
    return 0


_NO_PROPOSALS = proposals_digest(np.zeros((0, 4), np.float32))


def _holds_proposals(cache: FeatureCache, key: str) -> bool:
    """Whether an entry holds selective-search windows (`spp cache --no-proposals` stores none)."""
    return cache.metadata(key).get("proposals_sha256") != _NO_PROPOSALS


def _assemble_on_rank_0(detector, classes: list[str], out: Path, rank: int, world: int):
    """Each rank's classes into one model on rank 0 (None elsewhere), through part files beside ``out``."""
    from spp_cli import distributed
    from spp_cli.model import Detector
    from spp_cli.train import assemble_detectors

    def part(r: int) -> Path:
        return out.with_name(f"{out.name}.rank-{r}-of-{world}")

    part(rank).unlink(missing_ok=True)  # an earlier run's part of this rank must not join
    if detector is not None:
        detector.save(part(rank))
    distributed.barrier()
    assembled = None
    if rank == 0:
        paths = [part(r) for r in range(world) if part(r).is_file()]
        assembled = assemble_detectors([Detector.load(p) for p in paths], classes)
        for path in paths:
            path.unlink(missing_ok=True)
        ui.say(f"Assembled the classes of {world} ranks")
    distributed.barrier()
    return assembled
