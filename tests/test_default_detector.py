"""The shipped detector and the README's main job: offline, on every example image.

The main-job command runs in a fresh interpreter whose sockets refuse to
connect (a ``sitecustomize`` on PYTHONPATH), with HF_HUB_OFFLINE=1 and no
proxies: anything that tried to download would fail the run and leave a mark.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from spp_cli.boxes import iou
from spp_cli.cli import cli

# Hand-drawn boxes of the objects in examples/ (xyxy, original pixels): the
# whole visible animal, as the raccoon dataset's annotators boxed them. The
# raccoon fills the example photo, so IoU >= 0.5 with it shows the README's
# command runs end to end, not that boxes are tight: the held-out test below
# checks localisation.
EXAMPLE_OBJECTS = {
    "raccoon.jpg": [("raccoon", [0, 0, 945, 665])],
}

BLOCK_SOCKETS = '''
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["SPP_TEST_NETWORK_MARK"], "a") as mark:
        mark.write(f"connect {args[1:]!r}\\n")
    raise OSError("network access is blocked in this test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


def main_job_command() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Run\n+```bash\n(.+?)\n```", text, re.M | re.S)
    assert match, "README has no bash block under '## Run'"
    return match.group(1).strip()


def test_examples_have_licences_and_objects():
    images = sorted(p.name for p in (REPO / "examples").glob("*.jpg"))
    assert images == sorted(EXAMPLE_OBJECTS)
    licences = (REPO / "examples" / "LICENSES.md").read_text()
    for name in images:
        assert f"`{name}`" in licences


def test_main_job_offline_finds_the_object_in_every_example(tmp_path):
    command = main_job_command()
    assert command.startswith("spp detect examples/"), command
    args = shlex.split(command)
    # Every example image, not only the one the README names.
    inputs = [a for a in args[2:] if a.startswith("examples/")]
    assert inputs, command
    rest = [a for a in args[2:] if not a.startswith("examples/")]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    mark = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", SPP_TEST_NETWORK_MARK=str(mark))
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    examples = [f"examples/{name}" for name in sorted(EXAMPLE_OBJECTS)]
    cmd = [sys.executable, "-c", "from spp_cli.cli import main; main()", "detect", *examples, *rest]
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    assert not mark.exists(), mark.read_text()

    out = Path(rest[rest.index("--out") + 1])
    save_dir = Path(rest[rest.index("--save-dir") + 1])
    document = json.loads((work / out).read_text())
    for image in document["images"]:
        name = Path(image["path"]).name
        assert (work / save_dir / name).is_file(), f"no annotated image for {name}"
        for cls, box in EXAMPLE_OBJECTS[name]:
            hits = [d for d in image["detections"] if d["class"] == cls and float(iou([d["box"]], [box])[0, 0]) >= 0.5]
            assert hits, f"{name}: no {cls} at IoU >= 0.5 among {image['detections'][:5]}"


@pytest.mark.integration
def test_shipped_detector_localises_small_raccoons_in_held_out_photos(tmp_path):
    """The example raccoon fills its frame (a whole-image box has IoU 0.80 with
    it), so the main-job test above cannot tell a detector from a box around
    everything. Here it can: the held-out raccoon photos in which the largest
    raccoon covers under 30% of the frame, where a whole-image box never
    reaches IoU 0.25. The top detection must hit a raccoon in most of them."""
    from conftest import RACCOON, require_shared_data

    from spp_cli.data import open_dataset

    require_shared_data()
    test = open_dataset(RACCOON, "test").records
    small = [r for r in test if float(((r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])).max()) < 0.3 * r.width * r.height]
    assert len(small) >= 5, [r.image_id for r in small]
    for r in small:
        assert float(iou([[0, 0, r.width, r.height]], r.boxes).max()) < 0.25
    split = tmp_path / "small.txt"
    split.write_text("\n".join(r.image_id for r in small) + "\n")
    out = tmp_path / "d.json"
    result = CliRunner().invoke(cli, ["detect", "--data", str(RACCOON), "--split", str(split), "--out", str(out)])
    assert result.exit_code == 0, result.output
    by_id = {r.image_id: r for r in small}
    hits = []
    for image in json.loads(out.read_text())["images"]:
        top = max(image["detections"], key=lambda d: d["score"], default=None)
        hits.append(top is not None and float(iou([top["box"]], by_id[image["id"]].boxes).max()) >= 0.5)
    assert sum(hits) > len(small) / 2, f"top detection on a raccoon in {sum(hits)} of {len(small)} photos"


def recorded_ap() -> float:
    text = (REPO / "weights" / "README.md").read_text()
    match = re.search(r"\| held-out AP \(VOC07, IoU 0\.5\) \| raccoon \*\*(\d\.\d+)\*\*", text)
    assert match, "weights/README.md records no held-out AP"
    return float(match.group(1))


# How far a rebuild's held-out AP may fall from weights/README.md's: the most measured between
# CPUs whose kernels round differently (see the test below).
REBUILD_AP_SPREAD = 0.08


@pytest.mark.integration
def test_spp_train_on_raccoon_rebuilds_the_shipped_detector(tmp_path):
    """weights/README.md's recipe, `spp train` on raccoon's training split with
    the defaults, builds a detector like the shipped one: the same settings,
    choices, tensor names and shapes, and a held-out AP within
    REBUILD_AP_SPREAD of the one recorded there.

    Not the same tensors: training is seeded, so on one kind of CPU a rebuild
    gives the same bits, but the proposal network's 2,000 SGD steps carry a float
    rounded otherwise (another CPU's conv or BLAS kernels) into another model. The
    shipped file (held-out AP 0.929) was built on one CPU; on one with AVX-512 the
    same command gave 0.872, and 0.860-0.866 with other kernels (weights/README.md)."""
    from conftest import RACCOON, require_shared_data
    from safetensors import safe_open

    from spp_cli.model import Detector

    require_shared_data()
    rebuilt, shipped = tmp_path / "raccoon.safetensors", REPO / "weights" / "default.safetensors"
    result = CliRunner().invoke(cli, ["train", "--data", str(RACCOON), "--split", "train", "--out", str(rebuilt)])
    assert result.exit_code == 0, result.output
    a, b = Detector.load(rebuilt), Detector.load(shipped)
    assert a.classes == b.classes
    assert (a.features, a.levels, a.proposals, a.mode) == (b.features, b.levels, b.proposals, b.mode)
    # The display threshold is the score calibrated to probability 0.5: it moves with the SVMs.
    assert dataclasses.replace(a.detect, display_threshold=0.0) == dataclasses.replace(b.detect, display_threshold=0.0)
    assert a.proposal_model is not None and b.proposal_model is not None
    assert a.proposal_model.config == b.proposal_model.config
    chose = [(t["choice"]["features"], t["choice"]["proposals"]["choice"], t["windows"], t["images"]) for t in (a.training, b.training)]
    assert chose[0] == chose[1] == ("pool5", "learned", "learned", 142)  # what `spp train` chose on validation
    assert a.calibration is not None and b.calibration is not None
    with safe_open(str(rebuilt), "np") as x, safe_open(str(shipped), "np") as y:
        # The shipped file predates the localisation term (weights/README.md): a rebuild adds its two tensors.
        assert sorted(x.keys()) == sorted([*y.keys(), "iou_bias", "iou_weight"])
        for name in y.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
            new, old = x.get_tensor(name), y.get_tensor(name)
            assert new.shape == old.shape, name
            print(f"{name}: max |rebuilt - shipped| {float(abs(new.astype('float64') - old).max()):.2e} (max |shipped| {float(abs(old).max()):.2e})")
    dets, metrics = tmp_path / "dets.json", tmp_path / "metrics.json"
    result = CliRunner().invoke(cli, ["detect", "--data", str(RACCOON), "--split", "test", "--model", str(rebuilt), "--out", str(dets)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["eval", str(dets), "--data", str(RACCOON), "--split", "test", "--out", str(metrics)])
    assert result.exit_code == 0, result.output
    ap = json.loads(metrics.read_text())["mAP"]
    print(f"rebuilt detector: held-out mAP {ap:.4f} (recorded {recorded_ap():.3f})")
    assert abs(ap - recorded_ap()) <= REBUILD_AP_SPREAD


def test_detect_without_model_uses_the_shipped_detector(tmp_path):
    result = CliRunner().invoke(cli, ["detect", str(REPO / "examples" / "raccoon.jpg"), "--out", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d.json").read_text())["classes"] == ["raccoon"]


def test_models_lists_the_shipped_detector():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith(str(REPO / "weights" / "default.safetensors") + " (default): ")
    assert result.stderr.splitlines()[1:] == [
        "  classes: raccoon",
        "  efficientnet_lite0 blocks.6, scales 688, SVMs on pool5, box regression on",
        "  proposals: its own network on the conv map, 300 per image",
        "  scores: calibrated probabilities, shown from 0.50",
        "  trained on 142 image(s) (see README.md beside the file for data and held-out AP)",
    ]


def test_shipped_detector_is_small():
    size = (REPO / "weights" / "default.safetensors").stat().st_size
    assert size < 20e6, f"{size / 1e6:.1f} MB"


@pytest.mark.parametrize("name", ["default.safetensors", "README.md"])
def test_package_installs_the_shipped_detector(name):
    setup = (REPO / "setup.cfg").read_text()
    assert f"weights/{name}" in setup.split("[options.data_files]")[1].split("[")[0]


def test_installed_package_carries_the_shipped_detector():
    import importlib.metadata

    # The installed distribution's record (the checkout's own egg-info can
    # shadow it on sys.path, so look at every distribution of the name).
    records = [
        json.loads(d.read_text("direct_url.json") or "{}")
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").replace("_", "-").lower() == "spp-cli"
    ]
    if any(r.get("dir_info", {}).get("editable") for r in records):
        pytest.skip("an editable install reads weights/ from the checkout")
    installed = Path(sys.prefix) / "share" / "spp" / "weights" / "default.safetensors"
    assert installed.read_bytes() == (REPO / "weights" / "default.safetensors").read_bytes()
