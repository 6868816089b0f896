"""Many processes on one job: shards, their merge, and one cache with many writers.

Every multi-process test runs real `spp` processes (``python -m spp_cli``)
side by side on generated images; the merged results must equal a single
process's, byte for byte where the output is a file.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, write_image

from spp_cli.cache import FeatureCache
from spp_cli.cli import cli
from spp_cli.errors import SPPError, UsageError
from spp_cli.merge import merge_parts
from spp_cli.shard import Shard, parse_shard_option, resolve_shard, shard_of

BACKBONE = "efficientnet_lite0_b4"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def spp_process(*args, env_extra=None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPP_THREADS": "1", **(env_extra or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        if name not in (env_extra or {}):
            env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "spp_cli", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_spp(*args, env_extra=None) -> subprocess.CompletedProcess:
    process = spp_process(*args, env_extra=env_extra)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def torchrun(*args, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPP_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "spp_cli", *map(str, args)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "in"
    for i in range(12):
        write_image(folder / f"p{i:02d}.jpg", 160, 120, seed=i)
    return folder


# ------------------------------------------------------------------ shards


def test_shard_of_is_stable_and_spreads_images():
    ids = [f"img{i}" for i in range(4000)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids]  # the same on every call and process
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 900, counts  # about a quarter each
    # By id, not position: reordering the list moves no image to another shard.
    assert [shard_of(i, 4) for i in reversed(ids)] == list(reversed(shards))
    assert all(shard_of(i, 1) == 0 for i in ids[:10])


def test_resolve_shard_from_option_torchrun_and_slurm():
    assert resolve_shard(None, {}) == Shard()
    assert resolve_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 3, "--shard")
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Shard(1, 2, "torchrun")
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}) == Shard(2, 4, "SLURM array")
    both = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"}
    assert resolve_shard(None, both) == Shard(3, 6, "SLURM array x torchrun")
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) == Shard()


@pytest.mark.parametrize(
    "text, message",
    [
        ("2", "--shard 2: expected I/N, e.g. 0/4 (shard I of N, counting from 0)"),
        ("3/3", "--shard 3/3: I must be at least 0 and below N (shards 0/3 to 2/3)"),
        ("a/b", "--shard a/b: expected I/N, e.g. 0/4 (shard I of N, counting from 0)"),
    ],
)
def test_bad_shard_option(text, message):
    with pytest.raises(UsageError) as info:
        parse_shard_option(text)
    assert str(info.value) == message


def test_bad_launcher_variable_is_one_line_error(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("RANK", "0")
    result = invoke("propose", photos, "--out", tmp_path / "p.json", "--workers", "1")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: WORLD_SIZE='two' in the environment is not a whole number"


def test_propose_shards_merge_into_the_single_process_file(photos, tmp_path):
    single = tmp_path / "single.json"
    assert invoke("propose", photos, "--out", single, "--workers", "1").exit_code == 0
    out = tmp_path / "props.json"
    for index in range(3):
        result = invoke("propose", photos, "--out", out, "--workers", "1", "--shard", f"{index}/3")
        assert result.exit_code == 0, result.output
        assert f"Wrote part {tmp_path / f'props.shard-{index}-of-3.json'}; when every shard is done: spp merge props {tmp_path / 'props.shard-*-of-3.json'} --out {out}" in result.stderr
    parts = sorted(tmp_path.glob("props.shard-*-of-3.json"))
    assert len(parts) == 3 and not out.exists()
    sizes = [len(json.loads(p.read_text())["images"]) for p in parts]
    assert sum(sizes) == 12 and min(sizes) >= 1
    result = invoke("merge", "props", *parts, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"Wrote {out}: 12 images from 3 part(s)"
    assert out.read_bytes() == single.read_bytes()


def test_merge_refuses_a_missing_or_foreign_part(photos, tmp_path):
    out = tmp_path / "props.json"
    for index in range(2):
        assert invoke("propose", photos, "--out", out, "--workers", "1", "--shard", f"{index}/2").exit_code == 0
    parts = sorted(tmp_path.glob("props.shard-*-of-2.json"))
    result = invoke("merge", "props", parts[0], "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: 1 of the 2 parts missing (shard 1/2); run those shards, then merge again"
    other = tmp_path / "other"
    other.mkdir()
    assert invoke("propose", photos, "--out", other / "props.json", "--workers", "1", "--top", "10", "--shard", "1/2").exit_code == 0
    with pytest.raises(SPPError, match=r"props\.shard-1-of-2\.json: its params differ from those of"):
        merge_parts("props", [parts[0], other / "props.shard-1-of-2.json"])
    with pytest.raises(SPPError, match="not a shard's part"):
        merge_parts("props", [_plain_props(photos, tmp_path)])
    assert not out.exists()


def _plain_props(photos: Path, tmp_path: Path) -> Path:
    plain = tmp_path / "plain.json"
    assert invoke("propose", photos / "p00.jpg", "--out", plain, "--workers", "1").exit_code == 0
    return plain


def test_slurm_array_of_three_then_merge_equals_one_process(photos, tmp_path):
    single = tmp_path / "single.json"
    assert run_spp("propose", photos, "--out", single, "--workers", "1").returncode == 0
    out = tmp_path / "props.json"
    runs = [
        spp_process("propose", photos, "--out", out, "--workers", "1",
                    env_extra={"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"})
        for task in range(3)
    ]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert "(SLURM array): " in stderr
    result = run_spp("merge", "props", *sorted(tmp_path.glob("props.shard-*-of-3.json")), "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == single.read_bytes()


def test_torchrun_propose_merges_on_rank_0(photos, tmp_path):
    single = tmp_path / "single.json"
    assert run_spp("propose", photos, "--out", single, "--workers", "1").returncode == 0
    out = tmp_path / "props.json"
    result = torchrun("propose", photos, "--out", out, "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Merged the 2 parts into {out}: 12 images" in result.stderr
    assert out.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("props.shard-*"))


# ------------------------------------------------------ one cache, many writers


def entry_ids(cache_dir: Path) -> list[str]:
    cache = FeatureCache.open(cache_dir)
    return sorted(cache.metadata(k)["image_id"] for k in cache.keys())


def computed_count(stderr: str) -> int:
    line = next(line for line in stderr.splitlines() if " image(s) computed, " in line)
    return int(line.split(": ", 1)[1].split(" image(s) computed")[0])


def test_two_cache_processes_on_one_folder_at_once(photos, tmp_path):
    feats = tmp_path / "feats"
    args = ["cache", photos, "--cache", feats, "--scales", "480,576", "--backbone", BACKBONE]
    first, second = spp_process(*args), spp_process(*args)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    # Every image made once, by one of them; the other reused it.
    assert computed_count(outputs[0][1]) + computed_count(outputs[1][1]) == 12, outputs
    verify = run_spp("cache-info", feats, "--verify")
    assert verify.returncode == 0 and "verified: 12 entries, 0 damaged" in verify.stdout, verify.stdout + verify.stderr
    assert entry_ids(feats) == sorted(f"p{i:02d}" for i in range(12))
    assert not list(feats.rglob("*.tmp"))


def test_a_killed_shard_blocks_nobody_and_a_rerun_finishes_its_share(tmp_path):
    folder = tmp_path / "in"
    for i in range(16):
        write_image(folder / f"q{i:02d}.jpg", 320, 240, seed=100 + i)
    feats = tmp_path / "feats"
    args = ["cache", folder, "--cache", feats, "--scales", "480,576,688", "--backbone", BACKBONE]
    doomed = spp_process(*args, "--shard", "1/2")
    survivor = spp_process(*args, "--shard", "0/2")
    deadline = time.time() + 300
    while time.time() < deadline and not list((feats / "entries").glob("*/*.safetensors")):
        time.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    _, stderr = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, stderr
    mine = {f"q{i:02d}" for i in range(16) if shard_of(f"q{i:02d}", 2) == 0}
    assert mine <= set(entry_ids(feats))
    assert len(entry_ids(feats)) < 16, "the killed shard finished before it was killed: the test proves nothing"
    rerun = run_spp(*args, "--shard", "1/2")
    assert rerun.returncode == 0, rerun.stderr
    assert entry_ids(feats) == sorted(f"q{i:02d}" for i in range(16))
    assert run_spp("cache-info", feats, "--verify").returncode == 0


def test_cache_shards_fill_one_cache_like_one_process(photos, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    args = ["--scales", "96", "--backbone", BACKBONE]
    assert run_spp("cache", photos, "--cache", one, *args).returncode == 0
    runs = [spp_process("cache", photos, "--cache", many, *args, "--shard", f"{i}/2") for i in range(2)]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    a, b = FeatureCache.open(one), FeatureCache.open(many)
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.image_id == y.image_id and all(np.array_equal(m.numpy(), n.numpy()) for m, n in zip(x.maps, y.maps))
        assert np.array_equal(x.proposals, y.proposals)


def test_stale_temporaries_of_a_live_writer_are_kept(tmp_path):
    from spp_cli.cache import STALE_TEMPORARY_SECONDS

    root = tmp_path / "feats"
    (root / "entries" / "ab").mkdir(parents=True)
    young = root / "entries" / "ab" / ".abc.safetensors.x1.tmp"
    old = root / "entries" / "ab" / ".abd.safetensors.x2.tmp"
    young.write_bytes(b"in flight")
    old.write_bytes(b"left by a killed run")
    past = time.time() - STALE_TEMPORARY_SECONDS - 60
    os.utime(old, (past, past))
    cache = FeatureCache(root, None)
    assert cache.remove_stale_temporaries() == 1
    assert young.exists() and not old.exists()


def test_claim_is_exclusive_and_released_when_its_holder_dies(tmp_path):
    cache = FeatureCache(tmp_path / "feats", None)
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from spp_cli.cache import FeatureCache; from pathlib import Path;"
        "c = FeatureCache(Path(sys.argv[2]), None);"
        "cm = c.claim('ab' + '0' * 62, wait=False); assert cm.__enter__();"
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path / "feats")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    key = "ab" + "0" * 62
    with cache.claim(key, wait=False) as mine:
        assert not mine
    holder.kill()
    holder.wait()
    with cache.claim(key, wait=False) as mine:
        assert mine
    shutil.rmtree(tmp_path / "feats")


# ------------------------------------------------------ training over ranks


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    from conftest import write_shapes

    root = tmp_path_factory.mktemp("ranks")
    data = write_shapes(root / "shapes")
    props = root / "props.json"
    assert invoke("propose", "--data", data, "--out", props, "--workers", "1").exit_code == 0
    feats = root / "feats"
    assert invoke("cache", "--data", data, "--props", props, "--cache", feats, "--scales", "96", "--backbone", BACKBONE).exit_code == 0
    return data, feats, root


def test_train_svm_over_two_ranks_gives_the_one_process_model(shapes_cache):
    from safetensors import safe_open

    data, feats, root = shapes_cache
    one, two = root / "one.safetensors", root / "two.safetensors"
    assert invoke("train-svm", "--cache", feats, "--data", data, "--split", "train", "--out", one).exit_code == 0
    result = torchrun("train-svm", "--cache", feats, "--data", data, "--split", "train", "--out", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Assembled the classes of 2 ranks" in result.stderr
    assert not list(root.glob("two.safetensors.rank-*"))
    with safe_open(str(one), "np") as a, safe_open(str(two), "np") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
            np.testing.assert_allclose(b.get_tensor(name), a.get_tensor(name), rtol=1e-5, atol=1e-6, err_msg=name)
    from spp_cli.model import Detector

    assert Detector.load(two).classes == Detector.load(one).classes


def test_finetune_over_two_ranks_with_ddp(shapes_cache):
    from spp_cli.head import Head

    data, feats, root = shapes_cache
    head = root / "head-ddp.safetensors"
    result = torchrun("finetune", "--cache", feats, "--data", data, "--split", "train", "--out", head, "--epochs", "3", "--hidden", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks (DistributedDataParallel)" in result.stderr
    assert result.stderr.count("Wrote ") == 1  # rank 0 alone writes and reports
    loaded = Head.load(head)
    assert loaded.training["ranks"] == 2 and loaded.training["epochs_run"] == 3
    assert not (root / "head-ddp.safetensors.ckpt").exists()
    # It trains: the training loss falls over the epochs.
    losses = [h["train_loss"] for h in loaded.training["history"]]
    assert losses[-1] < losses[0], losses


def test_one_process_never_touches_torch_distributed(shapes_cache, tmp_path):
    # torch itself imports torch.distributed; what must not happen without a
    # launcher is our process-group code loading, let alone a group forming.
    data, feats, root = shapes_cache
    code = (
        "import sys; from click.testing import CliRunner; from spp_cli.cli import cli; import torch.distributed as dist\n"
        f"for args in ({['propose', '--data', str(data), '--out', str(tmp_path / 'p.json'), '--workers', '1']!r},"
        f" {['train-svm', '--cache', str(feats), '--out', str(tmp_path / 'm.safetensors')]!r},"
        f" {['finetune', '--cache', str(feats), '--out', str(tmp_path / 'h.safetensors'), '--epochs', '1', '--hidden', '8']!r}):\n"
        "    r = CliRunner().invoke(cli, args); assert r.exit_code == 0, r.output\n"
        "assert 'spp_cli.distributed' not in sys.modules and not dist.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=600)


def test_rank_0_waits_for_this_launchs_parts_not_a_stale_one(tmp_path):
    import threading

    from spp_cli.commands.parts import _wait_for_parts
    from spp_cli.fileio import atomic_write_json

    part = tmp_path / "props.shard-1-of-2.json"
    atomic_write_json(part, {"format": "spp-proposals", "shard": {"index": 1, "count": 2, "images": 3, "run": "earlier"}, "images": []})
    writer = threading.Timer(0.5, lambda: atomic_write_json(part, {"shard": {"index": 1, "count": 2, "images": 3, "run": "now"}, "images": []}))
    start = time.perf_counter()
    writer.start()
    _wait_for_parts([part], "now", poll=0.05)
    assert time.perf_counter() - start >= 0.45
    assert json.loads(part.read_text())["shard"]["run"] == "now"


def test_detect_shards_merge_into_the_single_process_files(shapes_cache, tmp_path):
    data, feats, root = shapes_cache
    model = root / "detect-model.safetensors"
    assert invoke("train-svm", "--cache", feats, "--out", model).exit_code == 0
    args = ["detect", "--data", data, "--model", model, "--cache", feats]
    single = tmp_path / "single.json"
    assert invoke(*args, "--out", single, "--save-dir", tmp_path / "drawn-1").exit_code == 0
    out = tmp_path / "dets.json"
    for index in range(2):
        result = invoke(*args, "--out", out, "--save-dir", tmp_path / "drawn-2", "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
    assert not out.exists() and not (tmp_path / "dets.shard-0-of-2.coco.json").exists()
    result = invoke("merge", "dets", tmp_path / "dets.shard-0-of-2.json", tmp_path / "dets.shard-1-of-2.json", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == single.read_bytes()
    assert (tmp_path / "dets.coco.json").read_bytes() == (tmp_path / "single.coco.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "drawn-2").iterdir()) == sorted(p.name for p in (tmp_path / "drawn-1").iterdir())


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    import torch

    from spp_cli.backbones import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device(True) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert select_device(True) == "cuda:2"
    monkeypatch.setenv("LOCAL_RANK", "5")  # more ranks than GPUs: they share, round-robin
    assert select_device(True) == "cuda:1"
    assert select_device(False) == "cpu"


def test_torchrun_rank_with_a_bad_image_still_gets_merged_and_the_job_says_so(photos, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_text("not a picture")
    out = tmp_path / "props.json"
    result = torchrun("propose", folder, "--out", out, "--workers", "1")
    assert result.returncode == 1, result.stderr[-3000:]  # the job reports the skip ...
    assert f"skipped {folder / 'broken.jpg'}: not an image file Pillow can read" in result.stderr
    assert "1 input(s) skipped over all ranks" in result.stderr
    assert len(json.loads(out.read_text())["images"]) == 12  # ... and every good image is merged
