"""examples/train_voc.sh end to end on the real raccoon dataset, in order.

It is also the shipped detector's recipe (weights/README.md): the pool5
model it trains must be the shipped file again (same classes and settings,
the same weights up to float rounding) and reach the held-out AP recorded
there within 0.01. The script runs with ``FINETUNE=0``: the fine-tuned fc7
variant (``spp finetune`` and fc7 SVMs, tested on fixtures in test_finetune
and test_train) is half the script's time and the suite has 20 minutes.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RACCOON, REPO, require_shared_data

pytestmark = pytest.mark.integration


def recorded_ap(row: str) -> float:
    text = (REPO / "weights" / "README.md").read_text()
    match = re.search(rf"\| {re.escape(row)} \| raccoon \*\*(\d\.\d+)\*\*", text)
    assert match, f"weights/README.md records no '{row}'"
    return float(match.group(1))


def assert_same_detector(rebuilt: Path, shipped: Path) -> None:
    from safetensors import safe_open

    from spp_cli.model import Detector

    a, b = Detector.load(rebuilt), Detector.load(shipped)
    assert a.classes == b.classes
    assert (a.features, a.levels, a.detect, a.proposals, a.mode) == (b.features, b.levels, b.detect, b.proposals, b.mode)
    with safe_open(str(rebuilt), "np") as x, safe_open(str(shipped), "np") as y:
        assert sorted(x.keys()) == sorted(y.keys())
        for name in x.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
            new, old = x.get_tensor(name), y.get_tensor(name)
            assert new.shape == old.shape, name
            scale = float(np.abs(old).max()) or 1.0
            diff = float(np.abs(new.astype(np.float64) - old).max())
            print(f"{name}: max |rebuilt - shipped| {diff:.2e} (max |shipped| {scale:.2e})")
            assert diff <= 1e-3 * scale, f"{name}: the rebuilt detector differs from the shipped one ({diff:.2e})"


def test_example_pipeline_on_raccoon_rebuilds_the_shipped_detector(tmp_path):
    require_shared_data()
    env = {**os.environ, "SPP": f"{sys.executable} -m spp_cli", "FINETUNE": "0"}
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "train_voc.sh"), str(RACCOON), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, check=False, timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"mAP pool5\+bbox\+vote (\d\.\d{4}) \(VOC07, .+\)", last)
    assert match, last
    print(last)  # the figure, in the test log
    assert abs(float(match.group(1)) - recorded_ap("held-out AP (VOC07, IoU 0.5)")) <= 0.01
    assert not (tmp_path / "run" / "head.safetensors").exists()  # FINETUNE=0 skipped the fine-tuning
    assert_same_detector(tmp_path / "run" / "model-pool5.safetensors", REPO / "weights" / "default.safetensors")
    assert len(list((tmp_path / "run" / "drawn").glob("*.jpg"))) == 40
