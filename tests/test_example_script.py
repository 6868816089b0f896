"""examples/train_voc.sh end to end on the real raccoon dataset: every command, in order.

It is also the shipped detector's recipe (weights/README.md): the pool5
model it trains must reach the held-out AP recorded there, within 0.01.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import RACCOON, REPO, require_shared_data

pytestmark = pytest.mark.integration


def recorded_ap() -> float:
    text = (REPO / "weights" / "README.md").read_text()
    match = re.search(r"\| held-out AP \(VOC07, IoU 0\.5\) \| raccoon \*\*(\d\.\d+)\*\*", text)
    assert match, "weights/README.md records no held-out AP"
    return float(match.group(1))


def test_example_pipeline_on_raccoon_rebuilds_the_shipped_detector(tmp_path):
    require_shared_data()
    env = {**os.environ, "SPP": f"{sys.executable} -m spp_cli"}
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "train_voc.sh"), str(RACCOON), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, check=False, timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"mAP pool5\+bbox\+vote (\d\.\d{4}), ftfc7\+bbox\+vote (\d\.\d{4}) \(VOC07, .+\)", last)
    assert match, last
    print(last)  # the figures, in the test log
    assert abs(float(match.group(1)) - recorded_ap()) <= 0.01
    assert float(match.group(2)) >= 0.5, "the fine-tuned variant is below the shipping bar: a step is broken"
    assert len(list((tmp_path / "run" / "drawn").glob("*.jpg"))) == 40
