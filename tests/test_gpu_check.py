"""scripts/gpu_check.py: the plan it prints, and its CPU-runnable checks on the tiny model (it is not dead code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.trainer_helpers import REPO

SCRIPT = str(REPO / "scripts" / "gpu_check.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_dry_run_lists_every_check(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    names = [line.split(":", 1)[0] for line in result.stdout.splitlines()]
    assert names == ["dpo-bf16", "zero2", "zero3", "fsdp2", "lora-zero3", "packing", "hypo", "xpo"]
    assert "recipes/accelerate/fsdp2.yaml" in result.stdout and "model.dtype=bfloat16" in result.stdout


def _run(tmp_path, only: str):
    result = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--tiny",
            "--device",
            "cpu",
            "--only",
            only,
            "--max-steps",
            "2",
            "--batch",
            "4",
            "--max-length",
            "96",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {row["check"]: row for row in json.loads((tmp_path / "table.json").read_text())}


def test_cpu_tiny_bf16_dpo_check(tmp_path):
    rows = _run(tmp_path, "dpo-bf16,packing")
    assert rows["dpo-bf16"]["status"] == "ok" and rows["dpo-bf16"]["tokens_per_second"] > 0
    assert rows["packing"]["status"] == "skipped (GPU only)"


@pytest.mark.slow
@pytest.mark.multiproc
def test_cpu_tiny_sharded_and_online_checks(tmp_path):
    rows = _run(tmp_path, "zero2,zero3,fsdp2,lora-zero3,hypo,xpo")
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "ok")
