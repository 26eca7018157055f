"""No code outside ``prefopt/losses/`` branches on a loss's name (issue 16).

The trainer, diagnostics and the gold benchmark ask the loss (``needs``, ``step``, ``implicit_reward()``)
instead; a new loss must not need edits anywhere else. This test greps the code for the ways a name-based
branch is written: a comparison with a loss name, membership in a literal list of names, and building a loss
by a literal name.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefopt.losses import available_losses

REPO = Path(__file__).resolve().parents[1]
SCANNED = ["prefopt", "scripts", "data_tools"]
# "sft" is also a data kind (prompt/completion rows) and a row format; the data room compares those, not losses.
ALLOWED = {("prefopt/data/", "sft"), ("data_tools/", "sft")}


def _patterns(name: str) -> list[re.Pattern]:
    quoted = rf"""["']{re.escape(name)}["']"""
    return [
        re.compile(rf"(==|!=)\s*{quoted}"),
        re.compile(rf"{quoted}\s*(==|!=)"),
        re.compile(rf"\bin\s*[\(\[\{{][^\)\]\}}]*{quoted}"),
        re.compile(rf"(get_loss|loss_class|loss_parameters)\(\s*{quoted}"),
    ]


def _hits() -> list[str]:
    names = available_losses()
    hits = []
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("prefopt/losses/"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for name in names:
                    if any(rel.startswith(prefix) and name == word for prefix, word in ALLOWED):
                        continue
                    if any(p.search(line) for p in _patterns(name)):
                        hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


def test_no_loss_name_branches_outside_the_losses_package():
    assert _hits() == []


def test_the_grep_would_catch_a_name_branch(tmp_path):
    # the patterns themselves: each form of a name-based branch is found
    lines = ['if loss == "simpo":', "if run_loss in ('dpo', 'rpo'):", 'get_loss("ipo")', "'dpo' != name"]
    for line in lines:
        assert any(p.search(line) for name in ("simpo", "dpo", "ipo") for p in _patterns(name)), line
