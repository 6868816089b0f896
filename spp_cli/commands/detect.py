"""`spp detect`: proposals, one conv pass per image per scale (or the cache), SPP, SVMs, NMS, box voting.

A model trained with ``--mode rcnn`` takes R-CNN's path instead: every
proposal is warped and run through the network (``spp_cli.rcnn``); a cache
then supplies proposals only, and the "conv" stage is that network time.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import NamedTuple

from spp_cli import ui
from spp_cli.data.registry import dataset_files
from spp_cli.errors import ModelError, SPPError, UsageError
from spp_cli.fileio import atomic_write_json, check_not_input, check_writable, check_writable_folder, file_sha256, file_stamp
from spp_cli.detections import read_image_entry
from spp_cli.journal import Journaled, journal_path, load_journal, open_journal
from spp_cli.sources import resolve_sources

STAGES = ("proposals", "conv", "pooling", "classify", "nms")
# The timing line run_detect ends with: "Speed: 1.2ms proposals, ... 0.3ms nms per image (...)".
SPEED_LINE = re.compile(r"Speed: " + ", ".join(rf"([\d.]+)ms {stage}" for stage in STAGES) + r" per image")


# ... and its wall-clock figure: "...; 1234.5ms per image in all" (the loop over the images, start to end).
WALL_FIGURE = re.compile(r"Speed: .*; ([\d.]+)ms per image in all")


def parse_speed_line(output: str) -> dict[str, float] | None:
    """The ms per image of each stage in ``spp detect``'s timing line, or None where ``output`` has none."""
    match = SPEED_LINE.search(output)
    return None if match is None else {stage: float(value) for stage, value in zip(STAGES, match.groups())}


def parse_wall_ms(output: str) -> float | None:
    """The timing line's wall-clock ms per image (stages that overlap count once), or None."""
    match = WALL_FIGURE.search(output)
    return None if match is None else float(match.group(1))


def run_detect(inputs, data, split, model_path: Path | None, cache_dir: Path | None, props: Path | None,
               conf: float | None, nms: float, max_det: int | None, out: Path | None, save_dir: Path | None, gpu: bool,
               bbox_reg: bool = True, vote: bool = True, shard: str | None = None, min_prob: float | None = None,
               proposals: str | None = None, prefetch: bool = True, classes: tuple[str, ...] | None = None) -> int:
    from spp_cli.commands.models import default_model_path

    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            raise ModelError("no --model given and no default detector is installed (weights/default.safetensors)")
    if out is not None:
        from spp_cli.detections import coco_results_path

        check_writable(out)
        check_writable(coco_results_path(out))  # written beside it: both, or neither
    if save_dir is not None:
        check_writable_folder(save_dir)
    device = "cpu"
    if gpu:  # no CUDA: say so before any work starts (torch loads here only with --gpu)
        from spp_cli.backbones import select_device

        device = select_device(gpu)
    # Images an interrupted run with the same settings finished: kept, not detected again.
    journal = None
    if out is not None:
        settings = _journal_settings(model_path, cache_dir, props, conf, min_prob, nms, max_det, bbox_reg, vote, proposals, data, device, classes)
        if settings is not None:
            from spp_cli.shard import resolve_shard

            shard_of_job = resolve_shard(shard)
            target = shard_of_job.part_path(out) if shard_of_job.active else out
            journal = Journal(journal_path(target), settings, _load_detected(journal_path(target), settings))
    finished = journal.finished.entries if journal is not None else None
    # Selective search of the first images starts before torch loads (spp_cli.prefetch).
    ahead, resolved = _start_prefetch(inputs, data, split, shard, model_path, cache_dir, props, proposals, finished) if prefetch else (None, None)
    try:
        return _run_detect(inputs, data, split, model_path, cache_dir, props, conf, nms, max_det, out, save_dir, device,
                           bbox_reg, vote, shard, min_prob, proposals, ahead, resolved, journal, classes)
    finally:
        if ahead is not None:
            ahead.close()


def _journal_settings(model_path: Path, cache_dir: Path | None, props: Path | None, conf: float | None, min_prob: float | None,
                      nms: float, max_det: int, bbox_reg: bool, vote: bool, proposals: str | None, data, device: str,
                      classes: tuple[str, ...] | None = None) -> dict | None:
    """What an image's detections depend on besides the image: the model's bytes and the run's
    options (a journal left by a run with others is not resumed); None where the model or the
    props.json cannot be read (the run itself says why)."""
    try:
        model_sha256 = file_sha256(model_path)
        props_file = None if props is None else {"path": str(Path(props).resolve()), "file": file_stamp(props)}
    except OSError:
        return None
    return {
        "model_sha256": model_sha256, "props": props_file, "cache": None if cache_dir is None else str(Path(cache_dir).resolve()),
        "proposals": proposals, "conf": conf, "min_prob": min_prob, "nms": nms, "max_det": max_det, "bbox_reg": bbox_reg,
        # With --data the default threshold is lower. The device's kind, not its index: a relaunched
        # torchrun rank may land on another GPU of the node.
        "vote": vote, "dataset": data is not None, "device": device.split(":")[0],
        **({} if classes is None else {"classes": sorted(classes)}),  # absent without --classes: earlier journals stay valid
    }


def _load_detected(path: Path, settings: dict) -> Journaled[dict]:
    """Image path -> its journaled detections entry (as the detections file holds it), for the
    images an interrupted run with these settings finished whose files are as they were."""
    def parse(line: dict) -> dict:
        entry = line["entry"]
        try:
            checked = read_image_entry(path, 0, entry)  # what a detections file's reader accepts
        except SPPError as exc:
            raise ValueError(str(exc)) from None
        sized = type(entry.get("width")) is int and type(entry.get("height")) is int
        if checked.path != line["path"] or not sized or not all(type(det.get("class_id")) is int for det in entry["detections"]):
            raise ValueError("not this image's detections")
        return entry

    return load_journal(path, settings, "detect", parse, "detected", "detecting")


class Journal(NamedTuple):
    """A run's journal (``<out>.partial``, spp_cli.journal): where, the settings its header
    holds, and the images an interrupted run with them finished (path -> detections entry)."""

    path: Path
    settings: dict
    finished: Journaled[dict]


def _journal_open(journal: Journal | None, resumed: bool):
    """The run's journal open for appending, or a context giving None where it writes no ``--out``."""
    if journal is None:
        return contextlib.nullcontext(None)
    return open_journal(journal.path, "detect", journal.settings, journal.finished.end if resumed else None)


def _start_prefetch(inputs, data, split, shard, model_path: Path, cache_dir: Path | None, props: Path | None, proposals: str | None,
                    finished: dict | None):
    """A :class:`~spp_cli.prefetch.ProposalPrefetch` of the job's images (less the ``finished`` ones
    of a journaled run; ``None``: no journal, so no file stamps either),
    and their sources and share, where every image takes selective search computed here (no cache,
    no props.json, no proposal network) and a second core is free; else ``(None, None)``. Reads the
    model's header only: `Detector.load` checks the rest."""
    from spp_cli.commands import parts
    from spp_cli.fileio import read_safetensors
    from spp_cli.images import load_image
    from spp_cli.prefetch import ProposalPrefetch, second_core_free
    from spp_cli.proposals import ProposalParams

    if cache_dir is not None or props is not None or proposals == "learned" or not second_core_free():
        return None, None
    try:
        meta, _ = read_safetensors(model_path, "spp model", ModelError, tensors=False)
        if not isinstance(meta, dict) or (meta.get("proposal_model") and proposals != "selective-search"):
            return None, None
        params = ProposalParams(**meta.get("proposals", {}))
        sources = resolve_sources(inputs, data, split)
        work = parts.share(sources, shard)
    except (SPPError, TypeError):  # TypeError: unknown proposal settings in a damaged header
        return None, None  # said properly, in order, by the run itself
    todo = [source.path for source in work.items if str(source.path) not in (finished or {})]
    # The stamps a journal records, taken before the search thread reads the first image (_run_detect).
    stamps = None if finished is None else {str(path): file_stamp(path) for path in todo}
    return ProposalPrefetch(todo, params, lambda path: load_image(path, warn=ui.warn)), (sources, work, stamps)


def _run_detect(inputs, data, split, model_path: Path, cache_dir: Path | None, props: Path | None, conf: float | None, nms: float,
                max_det: int, out: Path | None, save_dir: Path | None, device: str, bbox_reg: bool, vote: bool, shard: str | None,
                min_prob: float | None, proposals: str | None, ahead, resolved, journal: Journal | None,
                classes: tuple[str, ...] | None = None) -> int:
    import torch

    from spp_cli import backbones
    from spp_cli.cache import DTYPES, FeatureCache, image_key
    from spp_cli.commands import parts
    from spp_cli.detections import coco_results, coco_results_path, detections_document
    from spp_cli.api import detect_pixels, learned_proposals
    from spp_cli.images import load_image
    from spp_cli.memory import PeriodicTrim
    from spp_cli.model import Detector
    from spp_cli.proposals import ProposalParams, propose, read_proposals

    detector = Detector.load(model_path)
    # Learned proposals where the model carries its proposal network (and no props.json is given).
    if proposals == "learned" and detector.proposal_model is None:
        raise ModelError(f"{model_path}: carries no proposal network (--proposals learned); train one with `spp train-proposals` and embed it with `spp train-svm --proposal-model`")
    learned = props is None and proposals != "selective-search" and detector.proposal_model is not None
    if props is not None and proposals == "learned":
        raise UsageError("--props gives the proposals; --proposals learned computes them: give one")
    if min_prob is not None:
        if conf is not None:
            raise UsageError("--conf and --min-prob both set a threshold: give one")
        conf = detector.margin_at_probability(min_prob, str(model_path))
    if conf is None:
        # With ground truth the run is usually for `spp eval`, which needs the
        # whole ranking; for plain images show confident detections only.
        conf = detector.detect.score_threshold if data else detector.detect.display_threshold
        shown = detector.detect.display_threshold
    else:
        shown = conf
    class_ids = None if classes is None else detector.class_indices(classes, str(model_path))
    if class_ids is not None and len(class_ids) == len(detector.classes):
        class_ids = None  # every class: the run without --classes (its journal too)
    config = detector.detect_config(score_threshold=conf, nms_iou=nms, max_detections=max_det,
                                    bbox_regression=bbox_reg, box_voting=vote, classes=class_ids)
    if config.objectness_weight and not learned:
        ui.warn(detector.foreign_proposals_warning(str(model_path)))
    rcnn = detector.mode == "rcnn"
    cache = None
    if cache_dir is not None:
        cache = FeatureCache.open(cache_dir)
        if rcnn:
            # Cached maps are one pass over the whole image; an R-CNN model
            # needs each window's own pass. Proposals are the same either way.
            use = "is not used (proposals come from --props)" if props is not None else "supplies proposals only"
            ui.console.print(f"R-CNN model: {cache_dir} {use}; every window goes through the network")
        else:
            detector.check_features(cache.settings, str(cache_dir))
    proposal_set = read_proposals(props) if props is not None else None
    if resolved is None:
        sources = resolve_sources(inputs, data, split)
        work = parts.share(sources, shard)
        stamps = None
    else:
        sources, work, stamps = resolved
    inputs_read = [s.path for s in sources.items] + [model_path] + ([props] if props is not None else []) + dataset_files(data, split)
    if out is not None:
        check_not_input([work.output(out)] + ([] if work.shard.active else [coco_results_path(out)]), inputs_read)
    if save_dir is not None:
        from spp_cli.commands.draw import output_paths

        check_not_input(output_paths([s.path for s in sources.items], save_dir)[0], inputs_read, "--save-dir")
    ui.print_warnings(sources.warnings or [])
    if data and sources.dataset is not None:
        missing = [c for c in sources.dataset.classes if c not in detector.classes]
        if len(missing) == len(sources.dataset.classes):
            raise ModelError(f"{data}: none of the dataset's classes ({', '.join(missing[:5])}) is a class of {model_path} ({', '.join(detector.classes[:5])})")
    proposal_params = ProposalParams(**detector.proposals) if detector.proposals else ProposalParams()
    settings = detector.features
    trim = PeriodicTrim(len(settings.scales))  # before each image's pass (spp_cli.memory)

    extractor = None
    if rcnn:
        from spp_cli.rcnn import extractor_for, rcnn_features

        extractor = extractor_for(settings, str(model_path), device)
    windows = 0  # R-CNN: windows run through the network
    bad: list[tuple[Path | str, str]] = list(sources.bad or [])  # images whose annotations cannot be used
    results: list[dict] = []
    orders: list[int] = []  # each result's position in the whole job (for the merge of shards)
    # An interrupted run's finished images (its journal, read before the prefetch started): kept as they are.
    finished = journal.finished.entries if journal is not None else {}
    todo = []
    for order, source in zip(work.orders, work.items):
        if str(source.path) in finished:
            # The detections as journaled; the image's id and COCO id as this run's inputs name it.
            detected, _ = finished[str(source.path)]
            results.append({**_image_entry(source, detected["width"], detected["height"]), "detections": detected["detections"]})
            orders.append(order)
        else:
            todo.append((order, source))
    if results:
        ui.console.print(f"Resuming: {len(results)} of {len(work.items)} images already done.")
    resumed = len(results)
    resumed_paths = {result["path"] for result in results}
    undrawn: list[tuple[Path, str]] = []  # detected, but gone (or changed) before its drawing
    drawing_of: dict[str, Path] = {}
    if save_dir is not None:
        from spp_cli.commands.draw import output_paths

        # File names chosen over all inputs (same-named images get -2, -3, ... in input order),
        # so that every shard names an image as one process does.
        everyone = [s.path for s in sources.items]
        drawing_of = dict(zip(map(str, everyone), output_paths(everyone, save_dir)[0]))
    # Each image's size and mtime before it is read: its journal line records them, and a
    # resumed run takes the line only while the file still has them (spp_cli.journal).
    if journal is not None and stamps is None:
        stamps = {str(source.path): file_stamp(source.path) for _, source in todo}
    timings = {stage: 0.0 for stage in STAGES}
    from_cache = computed = 0
    network_threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        with _journal_open(journal, resumed=bool(resumed)) as written, ui.progress() as bar:
            task = bar.add_task("detect", total=len(work.items), completed=resumed, rate="")
            for done, (order, source) in enumerate(todo, 1):
                try:
                    entry = None
                    objectness = None  # the learned proposals' logits, when they come from a cached map
                    if cache is not None:
                        try:
                            key = image_key(source.path)
                        except OSError:
                            key = None  # missing or unreadable: load_image below says why
                        if key is not None and cache.has(key):
                            entry = cache.read(key)
                    if entry is not None:
                        maps, factors, width, height = entry.maps, entry.factors, entry.width, entry.height
                        if learned:
                            boxes, objectness = learned_proposals(detector, maps, factors, width, height, timings)
                        else:
                            boxes = entry.proposals
                        from_cache += 1
                    # A cache of `spp train`'s learned flow holds no selective-search boxes: compute them.
                    searching = entry is not None and not learned and proposal_set is None and len(entry.proposals) == 0
                    if entry is None or rcnn or searching:
                        if ahead is not None:  # no cache: entry is None
                            # What the search costs here is the wait for it; the rest overlapped the network.
                            t0 = time.perf_counter()
                            image, boxes, _ = ahead.take(done - 1)
                            timings["proposals"] += time.perf_counter() - t0
                            torch.set_num_threads(ahead.network_threads(done - 1, network_threads))  # off the search's core
                        else:
                            image = load_image(source.path, warn=ui.warn)
                            if entry is None or searching:
                                boxes = None  # computed below (an R-CNN model's cached ones are kept)
                        height, width = image.shape[:2]
                        computed += entry is None
                    if proposal_set is not None:
                        found = proposal_set.lookup(source.image_id, source.path)
                        if found is None:
                            raise SPPError(f"{source.path}: not in {props}; run `spp propose` on it first")
                        boxes = found.boxes
                    if boxes is None and not learned:
                        t0 = time.perf_counter()
                        boxes = propose(image, proposal_params)
                        timings["proposals"] += time.perf_counter() - t0
                    stage_times: dict = {}
                    if rcnn:
                        t0 = time.perf_counter()
                        features = rcnn_features(extractor, image, boxes, detector.levels)  # CPU tensors: GPU work is done
                        timings["conv"] += time.perf_counter() - t0
                        windows += len(boxes)
                        # Trained on rows stored at the cache's precision: round the same way.
                        features = features.to(DTYPES[settings.dtype]).float()
                        dets = detector.detect_features(features, torch.as_tensor(boxes, dtype=torch.float32), width, height, config, stage_times)
                    elif entry is None:
                        if extractor is None:
                            extractor = backbones.extractor_for(settings, str(model_path), device, "use --cache with features from the model's settings")
                        trim()
                        # The Python API's function: the same numbers from `spp detect` and `Detector()`.
                        dets = detect_pixels(detector, extractor, image, config, boxes, stage_times, name=str(source.path), warn=ui.warn, learned=learned)
                        timings["conv"] += stage_times["conv"]
                        timings["proposals"] += stage_times.get("proposals", 0.0)
                    else:
                        dets = detector.detect_windows(maps, factors, boxes, width, height, config, stage_times, objectness)
                    timings["pooling"] += stage_times.get("pool", 0.0)
                    timings["classify"] += stage_times["classify"]
                    timings["nms"] += stage_times["nms"]
                except ModelError:
                    raise  # the model or its weights, not this image: stop once
                except SPPError as exc:
                    bad.append((source.path, str(exc)))
                    bar.update(task, advance=1)
                    continue
                entry_json = {**_image_entry(source, width, height), "detections": [_detection_json(detector, d) for d in dets]}
                results.append(entry_json)
                orders.append(order)
                if written is not None:
                    written.append({"path": str(source.path), "file": stamps.get(str(source.path)), "entry": entry_json})
                if save_dir is not None:  # as it goes: an interrupted run keeps the drawings of the images done
                    _save_drawing(entry_json, drawing_of[str(source.path)], shown, undrawn)
                bar.update(task, advance=1, rate=f"{done / (time.perf_counter() - start):.2f} img/s")
    finally:
        torch.set_num_threads(network_threads)  # as it was (set lower while a search ran beside)
    ranked = sorted(range(len(results)), key=orders.__getitem__)  # the job's order, resumed images in place
    results, orders = [results[k] for k in ranked], [orders[k] for k in ranked]

    if not results and bad and not work.shard.active:
        # Every image failed: an earlier, good detections file stays as it was.
        if journal is not None:
            journal.path.unlink(missing_ok=True)
        ui.print_bad(bad)
        if out is not None:
            ui.console.print(f"Nothing written: no image could be read{f' ({out} is unchanged)' if out.exists() else ''}.")
        return 1
    categories = sources.dataset.category_ids if sources.dataset is not None else None  # a COCO JSON's: its results score against it
    filtered = None if config.classes is None else [detector.classes[k] for k in config.classes]
    if out is not None and work.shard.active:
        from spp_cli.merge import part_document

        # The COCO results file numbers images by their place in the whole
        # job: it is written with the merged file.
        atomic_write_json(work.output(out), part_document(detections_document(detector.classes, results, categories, filtered), work.shard, orders,
                                                          work.total, work.run, len(bad)))
    elif out is not None:
        atomic_write_json(out, detections_document(detector.classes, results, categories, filtered))
        atomic_write_json(coco_results_path(out), coco_results(results, categories))
    if save_dir is not None:
        for result in results:  # an interrupted run's images, taken from its journal: drawn again
            if result["path"] in resumed_paths:
                _save_drawing(result, drawing_of[result["path"]], shown, undrawn)
    if journal is not None:
        journal.path.unlink(missing_ok=True)  # the output (and the drawings) hold every finished image now
    threshold = f"score >= {shown:g}" if detector.calibration is None else f"probability >= {detector.probability(shown):.2f} (score >= {shown:.3g})"
    _summary(results, work.output(out) if out is not None else None, save_dir, shown, threshold, coco=not work.shard.active)
    n = max(len(results) - resumed, 1)  # the images detected in this run
    per_stage = ", ".join(f"{1000 * timings[s] / n:.1f}ms {s}" for s in STAGES)
    if rcnn:
        where = f"R-CNN: {windows} warped window(s) of {len(results) - resumed} image(s) through the network on {device}"
        where += f", proposals of {from_cache} from the cache" if cache is not None and proposal_set is None else ""
    else:
        where = f"{computed} image(s) through the network on {device}, {from_cache} from the cache"
        where += "; proposals from the model's proposal network (the conv pass is shared)" if learned else ""
    where += "; selective search ran ahead on a second thread: proposals is the wait for it" if ahead is not None else ""
    wall = f"{1000 * (time.perf_counter() - start) / n:.1f}ms per image in all"
    ui.console.print(f"Speed: {per_stage} per image ({where}); {wall}")
    ui.print_bad(bad)
    ui.print_bad(undrawn, "image(s) detected but not drawn (their detections are in the output)", "not drawn")
    if out is not None:
        return parts.finish("dets", work, out, len(bad) + len(undrawn))
    return parts.exit_code_of_rank(work, len(bad) + len(undrawn))


def _save_drawing(result: dict, target: Path, min_score: float, undrawn: list) -> None:
    """The annotated image of one detections entry at ``target`` (its detections scoring at least
    ``min_score``); an image that cannot be read again, or whose drawing cannot be written (a
    full disk), goes to ``undrawn`` with its problem: the detections go on."""
    from PIL import Image

    from spp_cli.commands.draw import encode
    from spp_cli.draw import draw_detections
    from spp_cli.fileio import atomic_write_bytes
    from spp_cli.images import load_image

    source = Path(result["path"])
    try:
        # A truncated file was warned of when it was read for detection (or caching).
        image = Image.fromarray(load_image(source, warn=lambda _: None))
    except SPPError as exc:
        undrawn.append((source, str(exc)))
        return
    drawn = draw_detections(image, result["detections"], min_score=min_score)
    try:
        atomic_write_bytes(target, encode(drawn, target.suffix))
    except SPPError as exc:
        undrawn.append((source, str(exc)))


def _image_entry(source, width: int, height: int) -> dict:
    """A detections file's fields of an image besides its detections: id, path, size, COCO id."""
    entry = {"id": source.image_id, "path": str(source.path), "width": int(width), "height": int(height)}
    record = source.record
    if record is not None and getattr(record, "coco_id", None) is not None:
        entry["coco_id"] = record.coco_id
    return entry


def _detection_json(detector, detection) -> dict:
    """A detection as the detections file holds it; ``probability`` only from a calibrated model."""
    entry = {"box": detection.box, "class": detector.classes[detection.class_id], "class_id": detection.class_id, "score": detection.score}
    if detector.calibration is not None:
        entry["probability"] = detector.probability(detection.score)
    return entry


def _summary(results: list[dict], out: Path | None, save_dir: Path | None, shown: float, threshold: str, coco: bool = True) -> None:
    counts: dict[str, int] = {}
    for r in results:
        for d in r["detections"]:
            if d["score"] >= shown:
                counts[d["class"]] = counts.get(d["class"], 0) + 1
    found = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "nothing"
    where = []
    if out is not None:
        from spp_cli.detections import coco_results_path

        where.append(f"{out} (+ {coco_results_path(out).name})" if coco else str(out))
    if save_dir is not None:
        where.append(f"annotated images in {save_dir}")
    ui.console.print(f"{len(results)} image(s): {found} at {threshold}" + (f"; wrote {', '.join(where)}" if where else ""))



