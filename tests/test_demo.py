"""`prefopt demo` end to end (capped steps): every stage runs offline, the outputs land where the tiny recipes read
them, and the summary ends with next commands that work as printed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefopt.demo import next_commands
from tests.trainer_helpers import REPO

STEPS = 4


def _env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "COLUMNS": "400",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """The demo with 4 steps in a scratch directory, as `--out demo`; returns (working directory, stdout)."""
    cwd = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt",
            "demo",
            "--out",
            "demo",
            "--max-steps",
            str(STEPS),
            "--eval-prompts",
            "16",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stdout


def _printed_next_commands(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = lines.index("next, from this directory:") + 1
    return [line.strip() for line in lines[start:] if line.startswith("  ")]


def test_demo_runs_offline_and_summarises(demo_run):
    cwd, out = demo_run
    for text in (
        "rewards/accuracies",
        "rewards/margins",
        "gold reward: SFT -> DPO",
        "outputs:",
        "finished in",
    ):
        assert text in out
    demo = cwd / "demo"
    # The recipes' own layout: tiny-model, gold-task, tiny-sft, tiny-dpo.
    for path in (
        "tiny-model/config.json",
        "gold-task/pairs_train.jsonl",
        "tiny-sft/final/model.safetensors",
        "tiny-dpo/final/model.safetensors",
        "tiny-dpo/config.yaml",
        f"tiny-dpo/checkpoint-{STEPS}",
    ):
        assert (demo / path).exists(), path
    records = [json.loads(line) for line in (demo / "tiny-dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS
    # The DPO stage is recipes/tiny/dpo.yaml with only the paths and the step cap overridden.
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "dpo.yaml").read_text())
    config = yaml.safe_load((demo / "tiny-dpo" / "config.yaml").read_text())
    assert (
        config["loss"]["name"] == recipe["loss"]["name"] and config["loss"]["beta"] == recipe["loss"]["beta"]
    )
    assert config["train"]["learning_rate"] == recipe["train"]["learning_rate"]
    assert Path(config["model"]["name_or_path"]) == Path("demo/tiny-sft/final")


def test_demo_prints_next_commands_that_point_at_its_outputs(demo_run):
    cwd, out = demo_run
    printed = _printed_next_commands(out)
    assert [c for c in printed if not c.startswith("source ")] == [
        c for c in next_commands(Path("demo"), STEPS) if not c.startswith("source ")
    ]
    for command in printed:
        for word in shlex.split(command):
            value = word.split("=", 1)[1] if "=" in word else word
            if value.startswith("demo/") and "diagnostics" not in value and "tiny-simpo" not in value:
                assert (cwd / value).exists(), (command, value)
    assert "prefopt train recipes/tiny/dpo.yaml" in " ".join(printed)
    assert any("train.resume_from=latest" in c and f"train.max_steps={STEPS}" in c for c in printed)


def test_default_out_next_commands_are_the_readme_tour():
    """With the default --out the printed commands carry no overrides and are lines of the README's tour."""
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("## A 30-second tour") :]
    tour = tour[: tour.index("\n## ", 3)]
    for command in next_commands(Path("runs")):
        if not command.startswith("source "):
            assert command in tour, command


@pytest.mark.slow
def test_demo_next_commands_run_as_printed(demo_run):
    cwd, out = demo_run
    env = _env()
    for command in _printed_next_commands(out):
        if command.startswith("source "):
            continue
        words = shlex.split(command)
        assert words[0] == "prefopt"
        result = subprocess.run(
            [sys.executable, "-m", "prefopt", *words[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            cwd=cwd,
        )
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert (cwd / "demo" / "tiny-simpo" / "final").is_dir()
    assert (cwd / "demo" / "tiny-dpo" / "diagnostics" / "report.html").is_file()
