"""Parts written by the shards of a job, and the one file they merge into.

A shard's part is an ordinary props.json or dets.json (every command reads
it) with two additions: a top-level ``"shard": {"index", "count",
"images"}`` (``images``: how many images the whole job has) and, on each
image entry, ``"order"``: its position in the whole job's image list. The
merge puts the images back in that order and drops both, so the merged file
is the one a single process would have written, image for image.
"""

from __future__ import annotations

import json
from pathlib import Path

from spp_cli.errors import SPPError
from spp_cli.fileio import atomic_write_json
from spp_cli.shard import Shard

KINDS = {"props": ("spp-proposals", "params"), "dets": ("spp-detections", "classes")}


def part_document(document: dict, shard: Shard, orders: list[int], total: int, run: str | None = None, skipped: int = 0) -> dict:
    """``document`` (its images in job order) marked as ``shard``'s part of a ``total``-image job.

    ``run`` names the launch (torchrun's run id), so that rank 0 merges
    this launch's parts and never one an earlier, killed launch left.
    """
    images = [{**image, "order": order} for image, order in zip(document["images"], orders)]
    record = {"index": shard.index, "count": shard.count, "images": total, "skipped": skipped}
    if run is not None:
        record["run"] = run
    return {**document, "shard": record, "images": images}


def read_part(path: Path, kind: str) -> dict:
    """A part file's document.

    Raises:
        SPPError: unreadable, not JSON, not a ``kind`` file, or not a shard's part.
    """
    fmt, _ = KINDS[kind]
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SPPError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SPPError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise SPPError(f"{path}: not a {fmt} file")
    shard = doc.get("shard")
    if not isinstance(shard, dict) or not all(isinstance(shard.get(k), int) for k in ("index", "count", "images")):
        raise SPPError(f"{path}: not a shard's part (no \"shard\" record); only the parts of a sharded run merge")
    if not all(isinstance(image, dict) and isinstance(image.get("order"), int) for image in doc.get("images", [])):
        raise SPPError(f"{path}: an image entry has no \"order\"; the part is damaged")
    return doc


def merge_parts(kind: str, paths: list[Path]) -> dict:
    """The whole job's document from all of its parts.

    Raises:
        SPPError: a part is missing, given twice, from another job (shard
            count, image count, settings or classes differ), or two parts
            claim the same image position.
    """
    if kind not in KINDS:
        raise SPPError(f"cannot merge {kind!r}: choose one of {', '.join(KINDS)}")
    _, must_agree = KINDS[kind]
    if not paths:
        raise SPPError("no part files to merge")
    docs = [(Path(p), read_part(Path(p), kind)) for p in paths]
    first_path, first = docs[0]
    count, total = first["shard"]["count"], first["shard"]["images"]
    seen: dict[int, Path] = {}
    for path, doc in docs:
        shard = doc["shard"]
        if (shard["count"], shard["images"]) != (count, total):
            raise SPPError(
                f"{path}: part of a {shard['count']}-shard job over {shard['images']} images, "
                f"but {first_path} is of a {count}-shard job over {total}; merge the parts of one run"
            )
        if doc.get(must_agree) != first.get(must_agree):
            raise SPPError(f"{path}: its {must_agree} differ from those of {first_path}; merge the parts of one run")
        if shard["index"] in seen:
            raise SPPError(f"{path}: shard {shard['index']} again (also {seen[shard['index']]})")
        seen[shard["index"]] = path
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing[:8])
        raise SPPError(f"{len(missing)} of the {count} parts missing (shard {names}); run those shards, then merge again")
    images: dict[int, dict] = {}
    for path, doc in docs:
        for image in doc["images"]:
            order = image["order"]
            if order in images:
                raise SPPError(f"{path}: image {image.get('id')!r} at position {order}, which another part also has")
            images[order] = {k: v for k, v in image.items() if k != "order"}
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged["images"] = [images[k] for k in sorted(images)]
    return merged


def write_merged(kind: str, paths: list[Path], out: Path) -> dict:
    """Merge ``paths`` into ``out`` (atomically; dets also get ``out``'s COCO results file)."""
    merged = merge_parts(kind, paths)
    atomic_write_json(out, merged)
    if kind == "dets":
        from spp_cli.detections import coco_results, coco_results_path

        atomic_write_json(coco_results_path(out), coco_results(merged["images"], merged.get("coco_categories")))
    return merged
