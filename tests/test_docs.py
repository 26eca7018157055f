"""The documentation the code relies on exists and stays in step with it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prefopt.losses import available_losses

REPO = Path(__file__).resolve().parents[1]
LOSSES_DOC = REPO / "docs" / "losses.md"
# Built from parts so this file does not match its own pattern. The lead's spec file is not in the repository;
# the project's reference is docs/losses.md.
STALE = re.compile(r"(?<![\w/])" + "LOSSES" + r"\.md")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}
    return [REPO / name for name in listed if Path(name).suffix in suffixes and (REPO / name).is_file()]


def test_no_citation_points_to_a_file_outside_the_repository():
    stale = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if STALE.search(line):
                stale.append(f"{path.relative_to(REPO)}:{number}")
    assert not stale, f"cite docs/losses.md instead of the spec file: {stale}"


# A merge conflict left in a file: the three marker lines git writes (built from parts, as above).
CONFLICT = re.compile("^(" + "<" * 7 + " |" + "=" * 7 + "$|" + ">" * 7 + " )")


def test_no_merge_conflict_markers_in_the_repository():
    left = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if CONFLICT.match(line)
    ]
    assert not left, f"merge conflict markers: {left}"


def test_every_registered_loss_has_a_section_in_docs_losses_md():
    headings = set(re.findall(r"^## (\S+)\s*$", LOSSES_DOC.read_text(), flags=re.M))
    missing = [name for name in available_losses() if name not in headings]
    assert not missing, f"docs/losses.md has no '## <name>' section for: {missing}"


def test_docs_losses_md_worked_numbers_are_the_tested_ones():
    # The headline worked values must appear verbatim both in the reference and in the tests that check them.
    text = LOSSES_DOC.read_text()
    tests = (REPO / "tests" / "test_losses.py").read_text()
    for value in [
        "0.598139",
        "0.618139",
        "0.698139",
        "2.12693",
        "2.69494",
        "0.582517",
        "0.644397",
        "0.596783",
        "0.594349",
        "0.590639",
        "0.604139",
        "0.998139",
        "0.633139",
        "0.448139",
    ]:
        assert value in text and value in tests, value
