"""The README's commands are the ones CI runs."""

import re

from conftest import REPO


def _block_after(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {heading}\n+```bash\n(.+?)\n```", text, re.M | re.S)
    assert match, f"README has no bash block under '## {heading}'"
    return match.group(1).strip()


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _block_after("Install") in ci
    assert _block_after("Test") in ci
