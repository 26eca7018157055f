"""scripts/check_readme.py, the README check CI runs (`make readme-check`): how it reads the README's command
blocks, that it runs them in one shell on a copy of the repository, and that a failing command fails the check
with its README line. (The check of the real README is CI's job: it trains tiny models for minutes.)"""

from __future__ import annotations

import importlib.util
import sys

from tests.trainer_helpers import REPO

spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
sys.modules["check_readme"] = check_readme
spec.loader.exec_module(check_readme)

TOY = """# Toy

```bash
echo one > first.txt        # a trailing comment
echo "a # inside quotes" \\
    > second.txt
```

<!-- readme-check: skip: needs a GPU -->
```bash
nvidia-smi
```

<!-- readme-check: skip "never": not here -->
```bash
echo never > never.txt
cat first.txt second.txt > both.txt
```

Not a bash block:

```python
print("ignored")
```
"""


def test_blocks_commands_continuations_comments_and_directives():
    blocks = check_readme.parse_readme(TOY)
    assert [len(block.commands) for block in blocks] == [2, 1, 2]
    first, second = blocks[0].commands
    assert (first.line, first.text) == (4, "echo one > first.txt")
    assert second.line == 5 and second.text == 'echo "a # inside quotes" \\\n    > second.txt'
    assert blocks[1].skipped(blocks[1].commands[0]) == "needs a GPU"
    never, both = blocks[2].commands
    assert blocks[2].skipped(never) == "not here" and blocks[2].skipped(both) == ""


def test_a_malformed_directive_is_an_error_not_ignored():
    import pytest

    with pytest.raises(ValueError, match="README.md:1: malformed"):
        check_readme.parse_readme("<!-- readme-check: skip -->\n```bash\nfalse\n```\n")


def test_commands_run_in_order_in_one_shell_on_a_copy(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(TOY)
    workdir = tmp_path / "work"
    assert check_readme.main(["--readme", str(readme), "--workdir", str(workdir)]) == 0
    copy = workdir / "readme"
    assert (copy / "pyproject.toml").is_file() and (copy / ".venv" / "bin" / "activate").is_file()
    assert (copy / "both.txt").read_text() == "one\na # inside quotes\n"
    assert not (copy / "never.txt").exists()
    assert not (REPO / "first.txt").exists()  # the repository itself is untouched
    assert "left out README.md:11: nvidia-smi  (needs a GPU)" in capsys.readouterr().out


def test_a_failing_command_fails_the_check_and_names_its_line(tmp_path, capfd):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\necho fine\nfalse\necho not reached > after.txt\n```\n")
    assert check_readme.main(["--readme", str(readme), "--workdir", str(tmp_path / "work")]) == 1
    assert "readme-check: FAILED (exit 1) README.md:3: false" in capfd.readouterr().err
    assert not (tmp_path / "work" / "readme" / "after.txt").exists()


def test_the_real_readme_runs_its_tour_and_says_why_it_leaves_anything_out():
    blocks = check_readme.parse_readme((REPO / "README.md").read_text())
    run = [c.text for block in blocks for c in block.commands if not block.skipped(c)]
    assert run[0] == "make demo"
    for command in (
        "prefopt losses",
        "prefopt train recipes/tiny/simpo.yaml",
        "prefopt train recipes/tiny/dpo.yaml train.resume_from=latest",
    ):
        assert command in run
    skipped = [c.text for block in blocks for c in block.commands if block.skipped(c)]
    assert all(
        text.startswith(
            (
                "make test",
                "accelerate launch --config_file recipes/accelerate/zero",
                ".venv/bin/python -m pytest -m slow",
                "prefopt diagnose --policy runs/tiny-dpo/final --data",
                "python scripts/gold_benchmark.py",
                "make readme-check",
                "make lint",
            )
        )
        for text in skipped
    ), skipped


def test_a_command_shown_failing_on_purpose_must_fail_with_its_status(tmp_path, capfd):
    directive = '<!-- readme-check: exits 2 "exit": shown failing on purpose -->\n'
    good = directive + "```bash\n(exit 2)\necho after > after.txt\n```\n"
    readme = tmp_path / "README.md"
    readme.write_text(good)
    assert check_readme.main(["--readme", str(readme), "--workdir", str(tmp_path / "ok")]) == 0
    assert (
        tmp_path / "ok" / "readme" / "after.txt"
    ).is_file()  # the session goes on after the expected error
    # The same command succeeding (or failing with another status) fails the check.
    for command in ("(exit 0)", "(exit 1)"):
        readme.write_text(directive + f"```bash\n{command}\n```\n")
        work = tmp_path / command.strip("()").replace(" ", "-")
        assert check_readme.main(["--readme", str(readme), "--workdir", str(work)]) == 1
        assert "expected 2" in capfd.readouterr().err
