"""The README's commands are the ones CI runs."""

import re

import pytest
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


def test_ci_makes_the_integration_tests_mandatory():
    # conftest.require_shared_data fails instead of skipping only when CI=true.
    assert "export CI=true" in (REPO / ".ci" / "run").read_text().splitlines()


def test_setup_asks_for_the_click_the_cli_tests_need():
    # The CLI tests read CliRunner results' .stderr, which click has from 8.2.
    requirement = next(line.strip() for line in (REPO / "setup.cfg").read_text().splitlines() if line.strip().startswith("click"))
    assert requirement == "click>=8.2"


def test_readme_is_a_product_page_under_250_lines():
    # Measurements and investigations live in benchmarks/README.md.
    assert len((REPO / "README.md").read_text().splitlines()) < 250


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", "weights/README.md", "docs/scale-out.md", "docs/formats.md", "docs/proposals.md"])
def test_relative_links_point_at_files_of_the_repository(page):
    path = REPO / page
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
    missing = [link for link in links if not (path.parent / link).exists()]
    assert not missing, missing
