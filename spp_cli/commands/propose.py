"""`spp propose`: selective search over a batch, resumable, with a recall report."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from spp_cli import ui
from spp_cli.data.registry import dataset_files
from spp_cli.errors import ModelError, SPPError, UsageError
from spp_cli.fileio import atomic_write_json, check_not_input, check_writable, file_stamp
from spp_cli.journal import Journaled, journal_path, load_journal, open_journal
from spp_cli.proposals import (
    DEFAULT_STRATEGY,
    ImageProposals,
    ProposalParams,
    ProposalTask,
    TaskFailure,
    proposals_document,
    read_proposals,
    run_proposals,
)
from spp_cli.sources import Sources, resolve_sources


def make_params(mode: str, strategy: str | None, max_side: int | None, top: int | None, min_size: int | None) -> ProposalParams:
    """Settings from the command line; unset options take the library defaults."""
    if strategy is not None and mode != "fast":
        raise UsageError("--mode and --strategy both choose the search: give one")
    defaults = ProposalParams()
    name = strategy or (DEFAULT_STRATEGY if mode == "fast" else "opencv-quality")
    try:
        return ProposalParams(
            strategy=name,
            max_side=defaults.max_side if max_side is None else max_side,
            top=defaults.top if top is None else top,
            min_size=defaults.min_size if min_size is None else min_size,
        )
    except SPPError as exc:  # an unknown --strategy: a bad option value
        raise UsageError(str(exc)) from None


def run_propose(inputs, data, split, out: Path, mode, strategy, max_side, top, min_size, workers: int, report: bool,
                shard: str | None = None, sources: Sources | None = None, method: str = "selective-search",
                model_path: Path | None = None, cache_dir: Path | None = None, gpu: bool = False,
                searched: dict[str, ImageProposals] | None = None) -> int:
    """`spp propose`; ``sources`` (instead of inputs/data/split) is how `spp train` hands over its images.

    ``searched`` (image path -> its entry) holds images a caller has searched already with these
    settings (`spp train`'s choice of proposals searches the validation images first): they are
    not searched again.

    ``method`` ``learned`` runs a proposal model (``model_path``, from `spp train-proposals`) on
    each image's conv maps: from ``cache_dir`` where the image is cached, else one conv pass here.
    """
    from spp_cli.commands import parts
    from spp_cli.merge import part_document

    if report and not data:
        raise UsageError("--report needs ground truth: use --data SPEC")
    learned = None
    if method == "learned":
        if model_path is None:
            raise UsageError("--method learned needs --model FILE (a proposal model from `spp train-proposals`)")
        if strategy or max_side is not None or min_size is not None or mode != "fast":
            raise UsageError("--mode, --strategy, --max-side and --min-size set selective search; --method learned takes --model and --top")
        learned = LearnedProposer(model_path, cache_dir, gpu, top)
        params = learned.params
    else:
        if model_path is not None or cache_dir is not None:
            raise UsageError("--model and --cache are for --method learned")
        params = make_params(mode, strategy, max_side, top, min_size)
    check_writable(out)
    sources = sources if sources is not None else resolve_sources(inputs, data, split)
    work = parts.share(sources, shard)
    target = work.output(out)
    items = work.items
    check_not_input(target, [s.path for s in items] + ([model_path] if model_path is not None else []) + dataset_files(data, split))
    ui.print_warnings(sources.warnings or [])
    bad: list[tuple[Path | str, str]] = list(sources.bad or [])

    wanted = {str(s.path) for s in items}
    journal_read = _load_partial(journal_path(target), params)
    journaled = {path: e for path, e in journal_read.entries.items() if path in wanted}
    reused = {path: e for path, e in _unchanged_entries(target, params).items() if path in wanted and path not in journaled}
    handed = {path: e for path, e in (searched or {}).items() if path in wanted and path not in journaled and path not in reused}
    done = {**handed, **reused, **{path: entry for path, (entry, _) in journaled.items()}}
    tasks = [ProposalTask(s.image_id, str(s.path)) for s in items if str(s.path) not in done]
    if reused:
        ui.console.print(f"Reusing {len(reused)} of {len(items)} images' boxes from {target} "
                         "(same settings, image files not modified since it was written; delete it to search again).")
    if handed:
        ui.console.print(f"Searched already: {len(handed)} of {len(items)} images.")
    if journaled:
        ui.console.print(f"Resuming: {len(journaled)} of {len(items)} images already done.")

    results: dict[str, ImageProposals] = dict(done)
    # Each image's size and mtime before it is read: its journal line records them, and a
    # resumed run trusts the line only while the file still has them (see _load_partial).
    stamps = {task.path: file_stamp(task.path) for task in tasks}
    start = time.perf_counter()
    resume_at = journal_read.end if journaled else None
    with open_journal(journal_path(target), "propose", _settings(params), resume_at) as journal, ui.progress() as bar:
        task_id = bar.add_task("propose", total=len(items), completed=len(items) - len(tasks), rate="")
        finished = 0
        for result in (learned.run(tasks) if learned is not None else run_proposals(tasks, params, workers)):
            finished += 1
            if isinstance(result, TaskFailure):
                bad.append((result.path, result.message))
            else:
                for line in result.warnings:
                    ui.warn(line)
                result.file = stamps.get(result.path)
                results[result.path] = result
                journal.append({**result.to_json(), "seconds": round(result.seconds, 4)})
            elapsed = time.perf_counter() - start
            bar.update(task_id, advance=1, rate=f"{finished / elapsed:.2f} img/s")
    wall = time.perf_counter() - start

    kept = [(order, s) for order, s in zip(work.orders, items) if str(s.path) in results]
    # Boxes journaled, reused or handed over keep this run's image ids (its inputs name them).
    ordered = [replace(results[str(s.path)], image_id=s.image_id) for _, s in kept]
    if not ordered and bad and not work.shard.active:
        # Every image failed: an earlier, good file stays as it was.
        journal_path(target).unlink(missing_ok=True)
        ui.print_bad(bad)
        ui.console.print(f"Nothing written: no image could be read{f' ({target} is unchanged)' if target.exists() else ''}.")
        return 1
    document = proposals_document(params, ordered)
    if work.shard.active:
        document = part_document(document, work.shard, [order for order, _ in kept], work.total, work.run, len(bad))
    atomic_write_json(target, document)
    journal_path(target).unlink(missing_ok=True)

    counts = [len(e.boxes) for e in ordered]
    seg_seconds = [e.seconds for e in ordered if e.seconds]
    ui.console.print(
        f"Wrote {target}: {len(ordered)} images, {np.mean(counts) if counts else 0:.0f} boxes/image "
        f"(min {min(counts, default=0)}, max {max(counts, default=0)}), "
        + (f"{np.mean(seg_seconds) if seg_seconds else 0:.2f} s/image per worker, " if learned is None else "")
        + (f"{wall / max(len(tasks), 1):.2f} s/image wall with {workers} worker(s) ({params.strategy}, max side {params.max_side or 'full'}, top {params.top})"
           if learned is None else learned.describe(wall, len(tasks))),
    )
    if report and sources.dataset is not None:
        _print_report(sources, ordered)
    ui.print_bad(bad)
    return parts.finish("props", work, out, len(bad))


def _settings(params) -> dict:
    """The settings a journal and props.json record: a selective-search ProposalParams, or a learned run's dict."""
    return params if isinstance(params, dict) else asdict(params)


class LearnedProposer:
    """`spp propose --method learned`: a proposal model over cached or freshly computed conv maps."""

    def __init__(self, model_path: Path, cache_dir: Path | None, gpu: bool, top: int | None):
        from spp_cli import backbones
        from spp_cli.cache import FeatureCache
        from spp_cli.fileio import file_sha256
        from spp_cli.fileio import read_safetensors
        from spp_cli.model import MODEL_FORMAT, Detector
        from spp_cli.rpn import ProposalModel

        meta, _ = read_safetensors(model_path, "proposal model", ModelError, tensors=False)
        if isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT:
            # A detector from `spp train` carries the proposal network it detects with: propose with it.
            self.model = Detector.load(model_path).proposal_model
            if self.model is None:
                raise ModelError(f"{model_path}: a detector that carries no proposal network; give a proposal model "
                                 "from `spp train-proposals`, or a detector from `spp train` that proposes with one")
        else:
            self.model = ProposalModel.load(model_path)
        self.model_path = model_path
        self.device = backbones.select_device(gpu)
        self.cache = FeatureCache.open(cache_dir) if cache_dir is not None else None
        if self.cache is not None:
            self.model.check_features(self.cache.settings, str(cache_dir))
        self.top = top or self.model.config.top_n
        self.params = {"strategy": "learned", "model": str(model_path), "model_sha256": file_sha256(model_path), "top": self.top}
        self.extractor = None
        self.from_cache = self.computed = 0
        self.conv_seconds = self.head_seconds = 0.0

    def run(self, tasks: list[ProposalTask]):
        """Each task's :class:`ImageProposals` (or :class:`TaskFailure`), in order."""
        from spp_cli import backbones
        from spp_cli.cache import DTYPES, image_key
        from spp_cli.features import feature_pyramid
        from spp_cli.images import load_image

        settings = self.model.features
        for task in tasks:
            warnings: list[str] = []
            try:
                key = image_key(task.path) if self.cache is not None else None
            except OSError:
                key = None  # missing or unreadable: load_image below says why
            try:
                if key is not None and self.cache.has(key):
                    entry = self.cache.read(key)
                    maps, factors, width, height = entry.maps, entry.factors, entry.width, entry.height
                    self.from_cache += 1
                else:
                    image = load_image(task.path, warn=warnings.append)
                    height, width = image.shape[:2]
                    if self.extractor is None:
                        self.extractor = backbones.extractor_for(settings, str(self.model_path), self.device)
                    maps, factors, seconds = feature_pyramid(self.extractor, image, settings.scales, settings.max_side,
                                                             warn=warnings.append, name=task.path)
                    # As cached maps are stored: the model trained on this precision.
                    maps = [m.to(DTYPES[settings.dtype]) for m in maps]
                    self.conv_seconds += sum(seconds)
                    self.computed += 1
            except SPPError as exc:
                yield TaskFailure(task.image_id, task.path, str(exc))
                continue
            start = time.perf_counter()
            boxes, _ = self.model.propose(maps, factors, width, height, self.top)
            seconds = time.perf_counter() - start
            self.head_seconds += seconds
            yield ImageProposals(task.image_id, task.path, width, height, boxes, seconds, warnings)

    def describe(self, wall: float, count: int) -> str:
        images = max(self.from_cache + self.computed, 1)
        conv = f", conv {1000 * self.conv_seconds / max(self.computed, 1):.0f} ms/image" if self.computed else ""
        return (f"{1000 * self.head_seconds / images:.1f} ms/image in the proposal head{conv}, {wall / max(count, 1):.2f} s/image wall "
                f"(learned: {self.model_path}, top {self.top}; {self.computed} image(s) through the network on {self.device}, "
                f"{self.from_cache} from the cache)")


def _unchanged_entries(target: Path, params) -> dict[str, ImageProposals]:
    """The images of an earlier, finished ``target`` with the same settings whose files are as
    they were: an entry that records its file's size and mtime (``"file"``) is trusted only while
    the file still has both (an image replaced since, even by ``cp -p`` or ``rsync -a`` with an
    older mtime, is searched again); one without them under make's rule (an image file newer than
    the output is searched again). A file gone is searched again where it is still an input.
    Nothing from a file that is not a readable props.json."""
    try:
        written = target.stat().st_mtime_ns
        earlier = read_proposals(target)
    except (OSError, SPPError):
        return {}
    if earlier.params != _settings(params):
        return {}
    unchanged = {}
    for entry in earlier.images:
        now = file_stamp(entry.path)
        if now is not None and (now == entry.file if entry.file is not None else now["mtime_ns"] <= written):
            unchanged[entry.path] = entry
    return unchanged


def _load_partial(path: Path, params) -> Journaled[ImageProposals]:
    """Images finished by an interrupted run with the same settings whose files are as they were
    (:func:`spp_cli.journal.load_journal`); each keeps the stamp its line recorded."""
    def parse(line: dict) -> ImageProposals:
        boxes = np.asarray(line["boxes"], np.float32).reshape(-1, 4)
        if not np.isfinite(boxes).all():
            raise ValueError("a box coordinate that is not a finite number")
        return ImageProposals(str(line["id"]), line["path"], int(line["width"]), int(line["height"]), boxes, float(line.get("seconds", 0.0)))

    journaled = load_journal(path, _settings(params), "propose", parse)
    for entry, recorded in journaled.entries.values():
        entry.file = recorded  # kept in the finished file
    return journaled


def _print_report(sources, ordered: list[ImageProposals]) -> None:
    from rich.table import Table

    from spp_cli.evaluate import proposal_recall

    dataset = sources.dataset
    by_path = {e.path: e for e in ordered}
    items = []
    for s in sources.items:
        entry = by_path.get(str(s.path))
        if entry is None:
            continue
        r = s.record
        keep = ~r.iscrowd
        items.append((entry.boxes, r.boxes[keep], r.labels[keep]))
    overall, per_class, mabo = proposal_recall(items, dataset.classes)
    table = Table(title=f"Proposal recall ({overall.count} ground-truth boxes, {len(items)} images)")
    for col in ("class", "boxes", "recall@0.5", "recall@0.7", "MABO"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name in sorted(per_class):
        st = per_class[name]
        table.add_row(name, str(st.count), f"{st.recall(0.5):.3f}", f"{st.recall(0.7):.3f}", f"{st.mabo:.3f}")
    table.add_row("all", str(overall.count), f"{overall.recall(0.5):.3f}", f"{overall.recall(0.7):.3f}", f"{mabo:.3f}", style="bold")
    ui.console.print(table)
