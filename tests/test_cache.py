"""`spp cache` / `spp cache-info` and the cache format, on small generated images."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, invoke, write_image
from spp_cli import backbones
from spp_cli.cache import FeatureCache
from spp_cli.errors import CacheError


@pytest.fixture
def small_set(xml_dataset, tmp_path):
    props = tmp_path / "p.json"
    assert invoke("propose", "--data", xml_dataset, "--out", props, "--workers", "1").exit_code == 0
    return xml_dataset, props


def test_second_run_does_no_forward_pass(small_set, tmp_path):
    data, props = small_set
    feats = tmp_path / "feats"
    before = backbones.FORWARD_CALLS
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96,128")
    assert result.exit_code == 0, result.output
    assert backbones.FORWARD_CALLS - before == 3 * 2  # one per image per scale
    assert "3 image(s) computed" in result.stderr and "6 forward pass(es)" in result.stderr

    before = backbones.FORWARD_CALLS
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96,128")
    assert result.exit_code == 0
    assert backbones.FORWARD_CALLS == before
    assert "0 image(s) computed, 0 updated, 3 already cached, 0 duplicate(s); 0 forward pass(es)" in result.stderr.replace("\n", " ")


def test_entries_hold_maps_proposals_and_ground_truth(small_set, tmp_path):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    cache = FeatureCache.open(feats)
    assert cache.settings.backbone == "efficientnet_lite0" and cache.settings.scales == (96,)
    entries = {e.image_id: e for e in cache.entries()}
    a = entries["a"]
    assert (a.width, a.height) == (64, 48) and a.classes == ["cat", "dog"]
    assert a.maps[0].dtype == torch.float16 and a.maps[0].shape == (320, 3, 4)  # 96x128 input / 32
    np.testing.assert_allclose(a.gt_boxes, [[10, 10, 30, 30], [0, 0, 64, 48]])
    assert a.gt_difficult.tolist() == [False, True]
    doc = json.loads(props.read_text())
    np.testing.assert_allclose(a.proposals, doc["images"][0]["boxes"], atol=0.01)


def test_new_proposals_update_entries_without_forward_passes(small_set, tmp_path):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    doc = json.loads(props.read_text())
    for im in doc["images"]:
        im["boxes"] = im["boxes"][:3]
    props.write_text(json.dumps(doc))
    before = backbones.FORWARD_CALLS
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 0 and backbones.FORWARD_CALLS == before
    assert "3 updated" in result.stderr
    assert all(len(e.proposals) <= 3 for e in FeatureCache.open(feats).entries())


def test_cache_of_other_settings_is_refused(small_set, tmp_path):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    listing = sorted(p.name for p in feats.rglob("*"))
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96,128")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {feats}: cache was built with backbone efficientnet_lite0")
    assert "scales 96," in result.stderr and "scales 96,128" in result.stderr
    assert "Use another --cache folder, or the same settings" in result.stderr
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96", "--backbone", "zf5", "--weights", "random")
    assert result.exit_code == 1 and "cache was built with backbone efficientnet_lite0" in result.stderr
    assert sorted(p.name for p in feats.rglob("*")) == listing  # nothing lost


def _entry_file(feats):
    return next((feats / "entries").glob("*/*.safetensors"))


def test_a_stray_file_among_the_entries_is_named_not_read_as_one(small_set, tmp_path):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    stray = feats / "entries" / "zz" / "junk.safetensors"
    stray.parent.mkdir()
    shutil.copy(_entry_file(feats), stray)
    assert len(FeatureCache.open(feats).keys()) == 3
    result = invoke("cache-info", feats, "--verify")
    assert result.exit_code == 1
    assert f"damaged: {stray}: not a cache entry (entries are entries/<first 2 of the sha256>/<image sha256>.safetensors)" in result.stdout
    assert "verified: 3 entries, 1 damaged" in result.stdout


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "model"])
def test_damaged_entry_is_reported_and_rebuilt(small_set, tmp_path, damage):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    path = _entry_file(feats)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "bitflip":
        raw[-100] ^= 0x10  # inside the tensor data, past the JSON header
    else:  # another file of spp's in its place: its own digest holds, its metadata is a model's
        raw = (REPO / "weights" / "default.safetensors").read_bytes()
    path.write_bytes(bytes(raw))
    result = invoke("cache-info", feats, "--verify")
    assert result.exit_code == 1
    assert f"damaged: {path}: damaged cache entry" in result.stdout
    if damage == "model":
        assert f"damaged: {path}: damaged cache entry (not one that `spp cache` writes); delete it and run `spp cache` again" in result.stdout
    assert "verified: 3 entries, 1 damaged" in result.stdout
    with pytest.raises(CacheError, match=r"damaged cache entry"):
        FeatureCache.open(feats).read(path.stem)
    # Rebuild: the damaged entry is recomputed, the others kept.
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 0
    assert invoke("cache-info", feats, "--verify").exit_code == 0


def test_missing_props_file(small_set, tmp_path):
    data, _ = small_set
    result = invoke("cache", "--data", data, "--props", tmp_path / "nope.json", "--cache", tmp_path / "f")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {tmp_path / 'nope.json'}: proposals file not found (create it with `spp propose ... --out {tmp_path / 'nope.json'}`)"
    )


def test_image_missing_from_props_is_skipped(small_set, tmp_path):
    data, props = small_set
    doc = json.loads(props.read_text())
    doc["images"] = doc["images"][:2]
    props.write_text(json.dumps(doc))
    result = invoke("cache", "--data", data, "--props", props, "--cache", tmp_path / "f", "--scales", "96")
    assert result.exit_code == 1
    assert f"skipped {data / 'images' / 'c.jpg'}: not in {props}; run `spp propose` on it first" in result.stderr
    assert len(FeatureCache.open(tmp_path / "f").keys()) == 2


def test_twin_of_an_unreadable_file_is_skipped_not_a_duplicate(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    (images / "b.jpg").write_bytes(b"")
    good = write_image(images / "c.jpg")
    (images / "d.jpg").write_bytes(good.read_bytes())  # a good image's twin is still cached once
    result = invoke("cache", images, "--cache", tmp_path / "f", "--backbone", "zf5", "--weights", "random",
                    "--scales", "96", "--no-proposals")
    assert result.exit_code == 1
    err = result.stderr.replace("\n", " ")
    assert f"warning: {images / 'd.jpg'}: same bytes as {images / 'c.jpg'}; cached once" in result.stderr
    assert "1 image(s) computed" in err and "1 duplicate(s)" in err
    assert "same bytes as " + str(images / "a.jpg") not in err
    assert "2 input(s) skipped:" in result.stderr
    assert f"skipped {images / 'a.jpg'}: empty file (0 bytes)" in result.stderr
    assert f"skipped {images / 'b.jpg'}: empty file (0 bytes)" in result.stderr


def test_a_run_that_writes_no_entry_leaves_no_cache_behind(tmp_path):
    image = write_image(tmp_path / "imgs" / "a.jpg")
    bad = tmp_path / "bad.pt"
    bad.write_text("not weights\n")
    feats = tmp_path / "feats"
    result = invoke("cache", image, "--cache", feats, "--weights", bad, "--scales", "96", "--no-proposals")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {bad}: not a torch or safetensors checkpoint (")
    assert not (feats / "cache.json").exists()
    # Not held to the failed run's weights: a run with the default ones builds the cache there.
    result = invoke("cache", image, "--cache", feats, "--scales", "96", "--no-proposals")
    assert result.exit_code == 0, result.output
    assert len(FeatureCache.open(feats).keys()) == 1
    # A cache that was there is kept, whatever a failed run on it does.
    header = (feats / "cache.json").read_bytes()
    result = invoke("cache", write_image(tmp_path / "imgs2" / "b.jpg", seed=1), "--cache", feats, "--scales", "96", "--props", tmp_path / "nope.json")
    assert result.exit_code == 1
    assert (feats / "cache.json").read_bytes() == header and len(FeatureCache.open(feats).keys()) == 1


def test_a_first_run_whose_images_are_all_refused_leaves_no_cache_behind(small_set, tmp_path, monkeypatch):
    data, props = small_set
    feats = tmp_path / "feats"
    monkeypatch.setenv("SPP_MAX_PIXELS", "100")
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 1
    assert not (feats / "cache.json").exists()
    monkeypatch.delenv("SPP_MAX_PIXELS")
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96", "--weights", "random")
    assert result.exit_code == 0, result.output


def test_a_writer_puts_back_the_header_a_run_that_wrote_nothing_removed(tmp_path):
    from spp_cli.cache import CacheEntry, CacheSettings

    settings = CacheSettings("synthetic", "random:0", "map", 16, 7.5, 4, (96,), 2000)
    cache = FeatureCache.create_or_open(tmp_path / "feats", settings)  # open in this writer ...
    assert FeatureCache.discard_if_unused(tmp_path / "feats")  # ... while another run that wrote nothing ends
    assert not (tmp_path / "feats" / "cache.json").exists()
    cache.write(CacheEntry("ab" * 32, "a", "a.jpg", 64, 48, [torch.zeros(4, 3, 4)], [1.0], np.zeros((0, 4), np.float32)))
    assert FeatureCache.open(tmp_path / "feats").settings == settings
    assert FeatureCache.open(tmp_path / "feats").keys() == ["ab" * 32]
    assert not FeatureCache.discard_if_unused(tmp_path / "feats")  # an entry: kept


def test_unknown_backbone(small_set, tmp_path):
    data, props = small_set
    result = invoke("cache", "--data", data, "--props", props, "--cache", tmp_path / "f", "--backbone", "resnet50")
    assert result.exit_code == 2  # a bad option value
    assert result.stderr.strip() == "Error: unknown backbone 'resnet50' (valid: efficientnet_lite0, efficientnet_lite0_b4, efficientnet_lite0_b46, efficientnet_lite1, efficientnet_lite2, alexnet, vgg16, zf5)"


def test_gpu_without_cuda(small_set, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data, props = small_set
    result = invoke("cache", "--data", data, "--props", props, "--cache", tmp_path / "f", "--gpu")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: --gpu: CUDA is not available on this machine")
    assert not (tmp_path / "f").exists()


def mount_read_only(folder, monkeypatch) -> None:
    """Make ``folder`` behave as on a read-only mount for this process: os.access reports it
    unwritable and every open for writing (or creating) under it fails, as root too (root ignores
    permission bits, so a chmod would not do)."""
    real_access, real_open, inside = os.access, os.open, str(folder)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == inside and mode & os.W_OK else real_access(p, mode, **kw))

    def guarded_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and os.path.abspath(path).startswith(inside + os.sep):
            raise OSError(30, "Read-only file system", str(path))  # EROFS
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


def test_a_complete_cache_on_a_read_only_mount_serves_as_it_is(small_set, tmp_path, monkeypatch):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in feats.rglob("*")}
    mount_read_only(feats, monkeypatch)
    forwards = backbones.FORWARD_CALLS
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 0, result.output
    assert f"{feats}: 0 image(s) computed, 0 updated, 3 already cached, 0 duplicate(s); 0 forward pass(es)." in result.stderr
    assert backbones.FORWARD_CALLS == forwards
    assert {p: p.stat().st_mtime_ns for p in feats.rglob("*")} == before


def test_a_read_only_cache_that_lacks_an_image_is_named_before_its_work(small_set, tmp_path, monkeypatch):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--split", "train", "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in feats.rglob("*")}
    mount_read_only(feats, monkeypatch)
    forwards = backbones.FORWARD_CALLS
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: {feats}: cache folder is not writable, and {data / 'images' / 'c.jpg'} is not cached in it"
    assert backbones.FORWARD_CALLS == forwards
    # Other settings are named as in a writable folder; an empty folder that cannot be written as before.
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "128")
    assert result.exit_code == 1 and "cache was built with" in result.stderr and "this run asks for" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in feats.rglob("*")} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    mount_read_only(empty, monkeypatch)
    result = invoke("cache", "--data", data, "--props", props, "--cache", empty, "--scales", "96")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {empty}: cache folder is not writable"
    assert not any(empty.iterdir())


def test_a_read_only_cache_whose_labels_changed_says_so(small_set, tmp_path, monkeypatch):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    xml = data / "annotations" / "c.xml"
    xml.write_text(xml.read_text().replace("<xmin>30</xmin>", "<xmin>31</xmin>"))
    mount_read_only(feats, monkeypatch)
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {feats}: cache folder is not writable, and the labels of {data / 'images' / 'c.jpg'} changed since it was cached")


def test_a_damaged_entry_of_a_read_only_cache_is_named_not_rebuilt(small_set, tmp_path, monkeypatch):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    cache = FeatureCache.open(feats)
    damaged = next(k for k in cache.keys() if cache.metadata(k)["image_id"] == "a")
    raw = bytearray(cache.entry_path(damaged).read_bytes())
    raw[-1] ^= 0xFF
    cache.entry_path(damaged).write_bytes(bytes(raw))
    mount_read_only(feats, monkeypatch)
    result = invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (f"Error: {feats}: cache folder is not writable, and the entry of {data / 'images' / 'a.jpg'} is damaged "
                                     f"(`spp cache-info {feats} --verify` names the problem)")

def test_a_work_folder_given_for_its_cache_names_the_cache_inside(small_set, tmp_path):
    data, props = small_set
    work = tmp_path / "model.work"
    assert invoke("cache", "--data", data, "--props", props, "--cache", work / "feats", "--scales", "96").exit_code == 0
    result = invoke("cache-info", work)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {work}: not a feature cache (no cache.json); {work / 'feats'} is one (an `spp train` work folder's)"

def test_cache_info_on_a_non_cache(tmp_path):
    result = invoke("cache-info", tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {tmp_path}: not a feature cache (no cache.json); build one with `spp cache ... --cache {tmp_path}`"
    result = invoke("cache-info", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such folder; build a feature cache there with `spp cache ... --cache {tmp_path / 'nope'}`"


def test_killed_run_resumes_and_verifies(tmp_path):
    images = tmp_path / "imgs"
    for i in range(16):
        write_image(images / f"{i:02d}.jpg", 200, 150, seed=i)
    props = tmp_path / "p.json"
    assert invoke("propose", images, "--out", props, "--workers", "2").exit_code == 0
    feats = tmp_path / "feats"
    cmd = [sys.executable, "-m", "spp_cli", "cache", str(images), "--props", str(props), "--cache", str(feats), "--scales", "480,688"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(feats.glob("entries/*/*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(feats.glob("entries/*/*.safetensors")))
    assert 3 <= done_before < 16, "the kill should land mid-run"
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = " ".join(result.stderr.split())
    assert f"{16 - done_before} image(s) computed" in summary and f"{done_before} already cached" in summary
    verify = invoke("cache-info", feats, "--verify")
    assert verify.exit_code == 0 and "verified: 16 entries, 0 damaged" in verify.stdout
    assert not list(feats.rglob(".*.tmp"))


def test_the_finer_cut_cached_from_the_same_pass_is_the_one_its_own_pass_makes(small_set, tmp_path):
    """`spp train --scales auto` caches blocks.4 (efficientnet_lite0_b4) from blocks.6's passes:
    the same entries, bit for bit, as a pass of the shorter network; its own run then computes nothing."""
    from spp_cli.commands.cache import run_cache
    from spp_cli.sources import resolve_sources

    data, props = small_set

    def build(feats, backbone, **how):
        return run_cache((), None, None, feats, props, backbone, None, "96,128", 2000, "fp16", False,
                         sources=resolve_sources((), str(data), None), **how)

    before = backbones.FORWARD_CALLS
    assert build(tmp_path / "coarse", "efficientnet_lite0", finer_cache=tmp_path / "shared") == 0
    assert backbones.FORWARD_CALLS - before == 3 * 2  # the finer cut's maps cost no pass of their own
    assert build(tmp_path / "own", "efficientnet_lite0_b4") == 0
    shared, own = FeatureCache.open(tmp_path / "shared"), FeatureCache.open(tmp_path / "own")
    assert shared.settings == own.settings and sorted(shared.keys()) == sorted(own.keys()) and len(own.keys()) == 3
    for key in own.keys():
        a, b = shared.read(key), own.read(key)
        assert [m.shape for m in a.maps] == [m.shape for m in b.maps] and a.maps[0].shape[0] == 112
        assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))
        assert (a.factors, a.width, a.height, a.image_id) == (b.factors, b.width, b.height, b.image_id)
        np.testing.assert_array_equal(a.proposals, b.proposals)
        np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
    before = backbones.FORWARD_CALLS
    assert build(tmp_path / "shared", "efficientnet_lite0_b4") == 0
    assert backbones.FORWARD_CALLS == before


def test_a_backbone_without_a_finer_cut_cannot_cache_one(small_set, tmp_path):
    data, props = small_set
    from spp_cli.commands.cache import run_cache
    from spp_cli.errors import UsageError
    from spp_cli.sources import resolve_sources

    with pytest.raises(UsageError, match="efficientnet_lite0_b4 has no finer cut to cache from the same pass"):
        run_cache((), None, None, tmp_path / "f", props, "efficientnet_lite0_b4", None, "96", 2000, "fp16", False,
                  sources=resolve_sources((), str(data), None), finer_cache=tmp_path / "g")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("scales", (), "scales [] are not a list of short sides in pixels"),
    ("scales", (688, 0), "scales [688, 0] are not a list of short sides in pixels"),
    ("scales", "688", "scales '688' are not a list of short sides in pixels"),
    ("stride", 0, "stride 0 is not a positive whole number"),
    ("channels", 2.5, "channels 2.5 is not a positive whole number"),
    ("max_side", True, "max_side True is not a positive whole number"),
    ("dtype", "bf16", "dtype 'bf16' is not one of fp16, fp32"),
])
def test_settings_refuse_what_no_cache_can_have_however_built(field, value, message):
    from dataclasses import replace

    from spp_cli.cache import CacheSettings

    good = CacheSettings("synthetic", "random:0", "map", 16, 7.5, 4, (688,), 2000)
    with pytest.raises(ValueError) as error:
        replace(good, **{field: value})
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:  # read from a header: the same check, the same words
        CacheSettings.from_json({**good.__dict__, "scales": list(good.scales), field: list(value) if isinstance(value, tuple) else value})
    assert str(error.value) == message


def test_settings_take_scales_as_a_list_and_keep_a_tuple():
    from spp_cli.cache import CacheSettings

    settings = CacheSettings("synthetic", "random:0", "map", 16, 7.5, 4, [480, 688], 2000)
    assert settings.scales == (480, 688)
    assert hash(settings) == hash(CacheSettings("synthetic", "random:0", "map", 16, 7.5, 4, (480, 688), 2000))


@pytest.mark.parametrize("command", [["train-svm"], ["finetune"], ["train-proposals"]])
def test_an_out_inside_the_cache_it_reads_is_refused_before_any_work(small_set, tmp_path, command):
    data, props = small_set
    feats = tmp_path / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96").exit_code == 0
    entry = _entry_file(feats)
    before = entry.read_bytes()
    result = invoke(*command, "--cache", feats, "--out", entry)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {entry}: inside the cache {feats}, which this command reads; choose another --out"
    assert entry.read_bytes() == before
