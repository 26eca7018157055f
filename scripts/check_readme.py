"""Run every command of README.md's ```bash blocks, in order, on a fresh copy of the repository.

What a new user does: clone, the two set-up commands (`make demo`, `make test`), then the README top to bottom.
This script copies the repository's files (what `git ls-files` lists: no runs/, no caches) to a scratch
directory, gives it a `.venv` that runs *this* Python with the copy's code first on the path (so `make demo`
finds its environment installed, exactly as after `make test`), and runs the commands there, unchanged, in one
bash session (so `source .venv/bin/activate` carries over). It stops at the first command that fails and
names its README line.

A block or a command is left out only where the README says so, in an HTML comment (invisible when rendered)
on the line(s) right above the block:

    <!-- readme-check: skip: REASON -->                 the whole block (e.g. GPU-only commands)
    <!-- readme-check: skip "TEXT": REASON -->          the block's commands that contain TEXT
    <!-- readme-check: fresh: REASON -->                run the block in its own fresh copy (an alternative
                                                        path, e.g. the steps `make demo` replaces)
    <!-- readme-check: exits 2 "TEXT": REASON -->       the block's commands that contain TEXT must end with
                                                        that exit status (an error the README shows on purpose)

    python scripts/check_readme.py            # CI: `make readme-check`
    python scripts/check_readme.py --list     # what would run, and what is left out and why
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r'<!--\s*readme-check:\s*(skip|fresh|exits \d+)(?:\s+"([^"]+)")?\s*:\s*(.*?)\s*-->')


@dataclass
class Command:
    line: int  # 1-based line of README.md where the command starts
    text: str  # as written, continuation lines included, trailing comment removed
    expected_exit: int = 0  # an `exits N` directive: the README shows this command failing on purpose


@dataclass
class Block:
    line: int
    commands: list[Command]
    skip_all: str = ""  # reason, when the whole block is skipped
    skip_matching: dict[str, str] = field(default_factory=dict)  # substring -> reason
    fresh: str = ""  # reason, when the block runs in its own fresh copy
    expected_exits: dict[str, int] = field(default_factory=dict)  # substring -> exit status it must end with

    def skipped(self, command: Command) -> str:
        if self.skip_all:
            return self.skip_all
        return next((reason for text, reason in self.skip_matching.items() if text in command.text), "")


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after whitespace)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def parse_readme(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        block = Block(line=index + 1, commands=[])
        above = index - 1
        while above >= 0 and lines[above].strip().startswith("<!--"):
            if "readme-check:" in lines[above] and not DIRECTIVE.search(lines[above]):
                raise ValueError(
                    f"README.md:{above + 1}: malformed readme-check directive (a reason is required): "
                    f"{lines[above].strip()}"
                )
            for kind, text_match, reason in DIRECTIVE.findall(lines[above]):
                if kind == "fresh":
                    block.fresh = reason
                elif kind.startswith("exits"):
                    if not text_match:
                        raise ValueError(f'README.md:{above + 1}: `exits N` needs the "TEXT" of its command')
                    block.expected_exits[text_match] = int(kind.split()[1])
                elif text_match:
                    block.skip_matching[text_match] = reason
                else:
                    block.skip_all = reason
            above -= 1
        index += 1
        pending: list[str] = []
        start = 0
        while index < len(lines) and lines[index].strip() != "```":
            code = _strip_comment(lines[index])
            if not pending:
                start = index + 1
            if code.endswith("\\"):
                pending.append(code)
            elif code.strip() or pending:
                pending.append(code)
                text = "\n".join(pending).strip()
                expected = next((code for match, code in block.expected_exits.items() if match in text), 0)
                block.commands.append(Command(start, text, expected))
                pending = []
            index += 1
        blocks.append(block)
        index += 1
    return blocks


def copy_repository(destination: Path) -> None:
    """The files a fresh clone has (tracked, plus new files not yet committed and not ignored), times kept."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def make_venv(clone: Path) -> None:
    """``clone/.venv``: wrappers around this interpreter and its console scripts, with the clone's code first.

    Marked installed (``.venv/.installed`` newer than pyproject.toml), as after ``make test``; the Makefile then
    uses it as it is.
    """
    real_bin = Path(sys.executable).parent
    venv_bin = clone / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    path_line = f'export PYTHONPATH="{clone}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
    wrappers = {
        "python": sys.executable,
        "python3": sys.executable,
        "prefopt": f"{sys.executable} -m prefopt",
    }
    for tool in ("accelerate", "torchrun", "pytest", "ruff"):
        if (real_bin / tool).is_file():
            wrappers[tool] = str(real_bin / tool)
    for name, target in wrappers.items():
        script = venv_bin / name
        script.write_text(f'#!/usr/bin/env bash\n{path_line}exec {target} "$@"\n')
        script.chmod(0o755)
    (venv_bin / "activate").write_text(
        f'export VIRTUAL_ENV="{clone / ".venv"}"\nexport PATH="{venv_bin}:$PATH"\n{path_line}'
    )
    (clone / ".venv" / ".installed").touch()


def bash_script(clone: Path, commands: list[Command]) -> str:
    lines = ["set -o pipefail", f"cd {shlex.quote(str(clone))}"]
    for command in commands:
        shown = shlex.quote(f"README.md:{command.line}: {command.text}")
        if command.expected_exit:
            lines += [
                f'echo; echo ">>> "{shown}" (must exit {command.expected_exit})"; _start=$SECONDS',
                f"{{\n{command.text}\n}}; _status=$?",
                f'if [ "$_status" -ne {command.expected_exit} ]; then echo "readme-check: FAILED (exit $_status, '
                f'expected {command.expected_exit}) "{shown} >&2; exit 1; fi',
                'echo "<<< ok (exit $_status as shown) in $((SECONDS - _start)) s"',
            ]
            continue
        lines += [
            f'echo; echo ">>> "{shown}; _start=$SECONDS',
            f'{{\n{command.text}\n}} || {{ _status=$?; echo "readme-check: FAILED (exit $_status) "{shown} >&2; '
            "exit 1; }",
            'echo "<<< ok in $((SECONDS - _start)) s"',
        ]
    return "\n".join(lines) + "\n"


def run_session(commands: list[Command], workdir: Path, label: str) -> bool:
    clone = workdir / label
    clone.mkdir(parents=True)
    copy_repository(clone)
    make_venv(clone)
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"== {label}: {len(commands)} commands in {clone}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", bash_script(clone, commands)], env=env)
    print(
        f"== {label}: {'ok' if result.returncode == 0 else 'FAILED'} in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument(
        "--list", action="store_true", help="print what would run and what is left out, then stop"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory to keep (default: a temporary one, removed afterwards)",
    )
    args = parser.parse_args(argv)

    blocks = parse_readme(args.readme.read_text())
    main_commands: list[Command] = []
    fresh_sessions: list[tuple[Block, list[Command]]] = []
    for block in blocks:
        kept = []
        for command in block.commands:
            reason = block.skipped(command)
            if reason:
                print(f"left out README.md:{command.line}: {command.text.splitlines()[0]}  ({reason})")
            else:
                kept.append(command)
        if block.fresh and kept:
            fresh_sessions.append((block, kept))
        else:
            main_commands += kept
    if args.list:
        for command in main_commands:
            must = f"  (must exit {command.expected_exit})" if command.expected_exit else ""
            print(f"run README.md:{command.line}: {command.text}{must}")
        for block, commands in fresh_sessions:
            for command in commands:
                print(f"run in a fresh copy ({block.fresh}) README.md:{command.line}: {command.text}")
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="readme-check-"))
    try:
        ok = run_session(main_commands, workdir, "readme")
        for number, (block, commands) in enumerate(fresh_sessions, 1):
            ok = ok and run_session(commands, workdir, f"fresh-{number}-line-{block.line}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("readme-check: every command ran" if ok else "readme-check: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
