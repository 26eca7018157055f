"""Two processes (DDP over gloo on CPU) give the same loss curve as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import REPO, losses, metrics, run, write_pairs

pytestmark = pytest.mark.multiproc


def _launch(launcher: list[str], model_dir, data, out, *overrides, use_cpu_flag: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if use_cpu_flag:
        env["ACCELERATE_USE_CPU"] = "1"
    args = [
        *launcher,
        "-m",
        "prefopt",
        "train",
        str(REPO / "recipes/tiny/dpo.yaml"),
        f"model.name_or_path={model_dir}",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={out}",
        "overwrite_output_dir=true",
        "logging.progress=false",
        "logging.logging_steps=1",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        *overrides,
    ]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)


@pytest.mark.parametrize(
    "launcher",
    [
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "29533",
        ],
    ],
    ids=["torchrun", "accelerate"],
)
def test_two_processes_match_one(tiny_model_dir, tmp_path, launcher):
    # torchrun runs without ACCELERATE_USE_CPU: prefopt builds the CPU (gloo) state itself when there is no GPU.
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    run(
        tiny_model_dir,
        data,
        tmp_path / "single",
        "train.max_steps=4",
        "train.per_device_batch_size=8",
        "train.save_steps=2",
    )
    result = _launch(
        launcher,
        tiny_model_dir,
        data,
        tmp_path / "multi",
        "train.max_steps=4",
        "train.per_device_batch_size=4",
        "train.save_steps=2",
        use_cpu_flag="accelerate.commands.launch" in launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "multi" / "run_info.json").read_text())
    assert info["world_size"] == 2, "the launcher silently ran one process"
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), abs=2e-5)
    assert (tmp_path / "multi" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "multi" / "checkpoint-4" / "trainer_state.json").is_file()


def test_readme_torchrun_command_runs_two_processes_on_cpu(tiny_model_dir, gold_task_dir, tmp_path):
    """The README's command, typed as written, on a machine without GPUs and without ACCELERATE_USE_CPU."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "runs" / "tiny-sft").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-sft" / "final").symlink_to(tiny_model_dir)
    (tmp_path / "runs" / "gold-task").symlink_to(gold_task_dir)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PET_MASTER_PORT="29537",  # torchrun reads PET_<flag>
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    # The command exactly as README.md's multi-process section writes it (its first torchrun line).
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("## Multi-process training and hardware support")
    command = next(line.split("#")[0].strip() for line in lines[start:] if line.startswith("torchrun "))
    assert command.startswith("torchrun --nproc_per_node 2 -m prefopt train recipes/tiny/dpo.yaml"), command
    result = subprocess.run(
        command, shell=True, capture_output=True, text=True, env=env, timeout=500, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = next(
        (arg.split("=", 1)[1] for arg in command.split() if arg.startswith("output_dir=")), "runs/tiny-dpo"
    )
    out = tmp_path / output_dir
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, "DistributedType.MULTI_CPU")
    # 128 pairs / (16 per process x 2 processes) = 4 optimizer steps, one epoch.
    assert [m["step"] for m in metrics(out) if "loss" in m] == [4]
    assert (out / "final" / "model.safetensors").is_file()
