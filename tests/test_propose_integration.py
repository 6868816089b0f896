"""`spp propose` end to end on the real raccoon test split."""

import json

import pytest
from click.testing import CliRunner

from conftest import RACCOON
from spp_cli.cli import cli

pytestmark = pytest.mark.integration


def test_raccoon_test_split_recall(shared_data, tmp_path):
    out = tmp_path / "props.json"
    result = CliRunner().invoke(
        cli, ["propose", "--data", str(RACCOON), "--split", "test", "--out", str(out), "--report", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 40
    assert all(0 < len(im["boxes"]) <= 2000 for im in doc["images"])
    # The report's "all" row: recall@0.5 must reach the SPPnet-era figure.
    row = next(line for line in result.stderr.splitlines() if "│ all" in line)
    recall50 = float(row.split("│")[3])
    assert recall50 >= 0.98, row
