"""`spp cache` and `spp cache-info`: build, resume and inspect a feature cache."""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import numpy as np

from spp_cli import backbones, ui
from spp_cli.cache import (
    HEADER,
    STRAY_FILE,
    CacheEntry,
    CacheSettings,
    FeatureCache,
    gt_digest,
    image_key,
    proposals_digest,
)
from spp_cli.config import parse_scales
from spp_cli.errors import SPPError, UsageError
from spp_cli.features import feature_pyramid
from spp_cli.memory import PeriodicTrim, heap_for_scales
from spp_cli.sources import Sources, resolve_sources


def settings_for(backbone: str, weights: str | None, scales: str, max_side: int, dtype: str) -> CacheSettings:
    spec = backbones.option_spec(backbone)
    return CacheSettings(
        backbone=spec.name,
        weights_sha256=backbones.weights_digest(spec, weights),
        layer=spec.layer,
        stride=spec.stride,
        offset=spec.offset,
        channels=spec.channels,
        scales=parse_scales(scales),
        max_side=max_side,
        dtype=dtype,
        preprocess=spec.preprocess,
    )


def run_cache(inputs, data, split, cache_dir: Path, props: Path | None, backbone: str, weights: str | None,
              scales: str, max_side: int, dtype: str, gpu: bool, shard: str | None = None, sources: Sources | None = None,
              selective_search: bool = True, finer_cache: Path | None = None) -> int:
    """`spp cache`; ``sources`` (instead of inputs/data/split) is how `spp train` hands over its images.
    ``selective_search=False`` (without ``props``): entries hold no proposals (learned proposals come
    from the maps later; `spp detect --proposals selective-search` then computes them).
    ``finer_cache``: also the entries of the backbone's finer cut (``BackboneSpec.finer``, a
    shallower cut of the same network) there, its maps taken from the same forward passes;
    `spp train --scales auto` builds both caches so, the finer one's own step then finds its entries."""
    # Multi-scale runs fragment the heap: their RSS is held at the working set while the cache is
    # built, and only then; one scale runs on glibc's own settings (spp_cli.memory: what each costs).
    # A cache this run creates but writes no entry into (bad weights, every image refused) is not
    # left behind: its header would hold the folder to this run's settings.
    new = [Path(d) for d in (cache_dir, finer_cache) if d is not None and not (Path(d) / HEADER).exists()]
    try:
        with heap_for_scales(len(parse_scales(scales))):
            return _build_cache(inputs, data, split, cache_dir, props, backbone, weights, scales, max_side, dtype, gpu, shard,
                                sources, selective_search, finer_cache)
    finally:
        for folder in new:
            with suppress(OSError, SPPError):  # never in place of the run's own error
                FeatureCache.discard_if_unused(folder)


def _build_cache(inputs, data, split, cache_dir: Path, props: Path | None, backbone: str, weights: str | None,
                 scales: str, max_side: int, dtype: str, gpu: bool, shard: str | None, sources: Sources | None,
                 selective_search: bool, finer_cache: Path | None) -> int:
    from spp_cli.commands import parts
    from spp_cli.images import load_image
    from spp_cli.proposals import ProposalParams, propose, read_proposals

    if props is not None and not selective_search:
        raise UsageError("--props gives the proposals; --no-proposals stores none: give one")
    device = backbones.select_device(gpu)
    settings = settings_for(backbone, weights, scales, max_side, dtype)
    proposal_set = read_proposals(props) if props is not None else None
    sources = sources if sources is not None else resolve_sources(inputs, data, split)
    work = parts.share(sources, shard)
    cache = FeatureCache.create_or_open(cache_dir, settings)
    cache.remove_stale_temporaries()
    finer, finer_layer, finer_written = None, "", 0
    trim = PeriodicTrim(len(settings.scales))  # after each image computed (spp_cli.memory)
    if finer_cache is not None:
        finer_name = backbones.get_spec(backbone).finer
        if finer_name is None:
            raise UsageError(f"{backbone} has no finer cut to cache from the same pass")
        finer = FeatureCache.create_or_open(finer_cache, settings_for(finer_name, weights, scales, max_side, dtype))
        finer.remove_stale_temporaries()
        finer_layer = backbones.get_spec(finer_name).layer
    ui.print_warnings(sources.warnings or [])
    bad: list[tuple[Path | str, str]] = list(sources.bad or [])
    classes = list(sources.dataset.classes) if sources.dataset is not None else []
    proposal_params = ProposalParams()

    extractor = None
    seen: dict[str, str] = {}  # key -> first image id with those bytes
    twins: list[tuple[Path, str]] = []  # (path, key) of the later files with the same bytes
    unreadable: dict[str, str] = {}  # key -> why its image could not be decoded
    duplicates: list[str] = []
    forward_before = backbones.FORWARD_CALLS
    counts = {"computed": 0, "updated": 0, "reused": 0, "by_others": 0}
    conv_seconds: list[float] = []

    def cache_one(source, key: str, entry_props) -> str:
        """Make or refresh ``source``'s entry (its claim held); what was done, or ``bad``."""
        nonlocal extractor, finer_written
        gt = _gt(source.record)
        meta = _readable_metadata(cache, key, quiet=cache.read_only)  # read-only: a damaged entry is not rebuilt
        if meta is None and cache.has(key):
            cache.require_writable(f"the entry of {source.path} is damaged (`spp cache-info {cache.root} --verify` names the problem)")
        if meta is not None:
            new_props = entry_props is not None and meta.get("proposals_sha256") != proposals_digest(entry_props)
            new_gt = gt is not None and meta.get("gt_sha256") != gt_digest(gt, classes)
            if not (new_props or new_gt):
                return "reused"
            cache.require_writable(f"the {'proposals' if new_props else 'labels'} of {source.path} changed since it was cached")
            # Same image, new proposals or labels: keep the maps, no forward pass.
            entry = cache.read(key)
            if new_props:
                entry.proposals = entry_props
            if new_gt:
                entry.classes = classes
                _set_gt(entry, gt)
            cache.write(entry)
            return "updated"
        try:
            image = load_image(source.path, warn=ui.warn)
        except SPPError as exc:
            problem = str(exc)
            bad.append((source.path, problem))
            unreadable[key] = problem.removeprefix(f"{source.path}: ")
            return "bad"
        cache.require_writable(f"{source.path} is not cached in it")  # an image that cannot be read is listed, as on any cache
        if entry_props is None:
            entry_props = propose(image, proposal_params) if selective_search else np.zeros((0, 4), np.float32)
        if extractor is None:
            extractor = backbones.FeatureExtractor(backbones.get_spec(backbone), weights, device)
        also = finer is not None and not finer.has(key)
        if also:
            finer.require_writable(f"{source.path} is not cached in it")
        with extractor.tapping(finer_layer) if also else nullcontext([]) as taken:
            maps, factors, seconds = feature_pyramid(extractor, image, settings.scales, settings.max_side, warn=ui.warn, name=str(source.path))
        conv_seconds.append(sum(seconds))
        height, width = image.shape[:2]
        entry = CacheEntry(key, source.image_id, str(source.path), width, height, maps, factors, entry_props, classes=classes)
        _set_gt(entry, gt)
        cache.write(entry)
        if also:
            # One tap per pass; a pass redone on the CPU after a GPU out-of-memory tapped again: the last ones.
            finer.write(dataclasses.replace(entry, maps=[fmap[0] for fmap in taken[-len(maps):]]))
            finer_written += 1
        trim()
        return "computed"

    start = time.perf_counter()
    # An entry another writer holds (a second `spp cache` on the same folder)
    # is left for the end; by then it is usually written, and is then reused.
    deferred = []
    with ui.progress() as bar:
        task = bar.add_task("cache", total=len(work.items), rate="")
        done = 0

        def advance(outcome: str | None = None) -> None:
            nonlocal done
            done += 1
            if outcome in counts:
                counts[outcome] += 1
            bar.update(task, advance=1, rate=_rate(done, start))

        for source in work.items:
            try:
                key = image_key(source.path)
            except OSError as exc:
                bad.append((source.path, f"cannot read file ({exc.strerror or exc})"))
                advance()
                continue
            if key in seen:
                # Byte-identical images share one entry; the first one's
                # proposals and labels are kept so reruns are stable.
                twins.append((source.path, key))
                advance()
                continue
            seen[key] = str(source.path)
            entry_props = None
            if proposal_set is not None:
                found = proposal_set.lookup(source.image_id, source.path)
                if found is None:
                    bad.append((source.path, f"not in {props}; run `spp propose` on it first"))
                    advance()
                    continue
                entry_props = found.boxes
            with cache.claim(key, wait=False) as mine:
                if mine:
                    advance(cache_one(source, key, entry_props))
                else:
                    deferred.append((source, key, entry_props, cache.has(key)))
        for source, key, entry_props, existed in deferred:
            with cache.claim(key, wait=True):
                outcome = cache_one(source, key, entry_props)
                advance("by_others" if outcome == "reused" and not existed else outcome)
    # The twin of a file that could not be decoded is no duplicate: nothing was cached; it is skipped alike.
    for path, key in twins:
        if key in unreadable:
            bad.append((path, unreadable[key]))
        else:
            duplicates.append(f"{path}: same bytes as {seen[key]}; cached once")
    ui.print_warnings(duplicates)
    forwards = backbones.FORWARD_CALLS - forward_before
    per_image = f", conv {np.mean(conv_seconds):.2f} s/image" if conv_seconds else ""
    others = f", {counts['by_others']} written by another process" if counts["by_others"] else ""
    if finer is not None:
        others += f", {finer_written} entr{'y' if finer_written == 1 else 'ies'} of {finer_cache} from the same pass(es)"
    ui.console.print(
        f"{cache_dir}: {counts['computed']} image(s) computed, {counts['updated']} updated, {counts['reused']} already cached{others}, "
        f"{len(duplicates)} duplicate(s); "
        f"{forwards} forward pass(es){per_image}. Settings: {settings.describe()}",
    )
    ui.print_bad(bad)
    return parts.exit_code_of_rank(work, len(bad))


def _readable_metadata(cache: FeatureCache, key: str, quiet: bool = False, full: bool = True) -> dict | None:
    """An existing entry's metadata; ``None`` if absent or damaged (then it is rebuilt, where the cache can be written).

    ``full`` checks every byte against the entry's digest (about 1 ms per MB),
    so that a damaged entry is rebuilt instead of trusted.
    """
    if not cache.has(key):
        return None
    try:
        return cache.check(key) if full else cache.metadata(key)
    except SPPError as exc:
        if not quiet:
            ui.warn(f"{exc}; rebuilding it")
        return None


def _rate(done: int, start: float) -> str:
    return f"{done / max(time.perf_counter() - start, 1e-9):.2f} img/s"


def _gt(record) -> dict[str, np.ndarray] | None:
    if record is None:
        return None
    return {
        "boxes": np.ascontiguousarray(record.boxes, np.float32).reshape(-1, 4),
        "labels": np.ascontiguousarray(record.labels, np.int64),
        "difficult": np.asarray(record.difficult, bool),
        "iscrowd": np.asarray(record.iscrowd, bool),
    }


def _set_gt(entry: CacheEntry, gt: dict[str, np.ndarray] | None) -> None:
    if gt is None:
        entry.gt_boxes = entry.gt_labels = entry.gt_difficult = entry.gt_iscrowd = None
    else:
        entry.gt_boxes, entry.gt_labels = gt["boxes"], gt["labels"]
        entry.gt_difficult, entry.gt_iscrowd = gt["difficult"], gt["iscrowd"]


def run_cache_info(cache_dir: Path, verify: bool) -> int:
    cache = FeatureCache.open(cache_dir)
    keys = cache.keys()
    size = cache.size_bytes()
    with_gt = sum(1 for k in keys if (_readable_metadata(cache, k, quiet=True, full=False) or {}).get("has_gt"))
    print(f"cache:    {cache_dir}")
    print(f"settings: {cache.settings.describe()}")
    print(f"entries:  {len(keys)} ({with_gt} with ground truth)")
    print(f"size:     {size / 1e6:.1f} MB ({size / 1e6 / max(len(keys), 1):.2f} MB per entry)")
    if not verify:
        return 0
    checked, damaged = 0, [f"{path}: {STRAY_FILE}" for path in cache.stray_files()]
    with ui.progress() as bar:
        task = bar.add_task("verify", total=len(keys), rate="")
        for key in keys:
            try:
                cache.check(key)
            except SPPError as exc:
                damaged.append(str(exc))
            checked += 1
            bar.update(task, advance=1)
    for line in damaged:
        print(f"damaged: {line}")
    print(f"verified: {checked} entries, {len(damaged)} damaged")
    return 1 if damaged else 0
