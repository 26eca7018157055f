"""Two processes (DDP over gloo on CPU) give the same loss curve as one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.trainer_helpers import REPO, losses, run, write_pairs

pytestmark = pytest.mark.multiproc


def _launch(launcher: list[str], model_dir, data, out, *overrides, use_cpu_flag: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if use_cpu_flag:
        env["ACCELERATE_USE_CPU"] = "1"
    args = [*launcher, "-m", "prefopt", "train", str(REPO / "recipes/tiny/dpo.yaml"),
            f"model.name_or_path={model_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
            "overwrite_output_dir=true", "logging.progress=false", "logging.logging_steps=1", "train.warmup_ratio=0",
            "train.learning_rate=1e-3", *overrides]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)


@pytest.mark.parametrize("launcher", [
    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
    [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
     "--main_process_port", "29533"],
], ids=["torchrun", "accelerate"])
def test_two_processes_match_one(tiny_model_dir, tmp_path, launcher):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    run(tiny_model_dir, data, tmp_path / "single", "train.max_steps=4", "train.per_device_batch_size=8",
        "train.save_steps=2")
    result = _launch(launcher, tiny_model_dir, data, tmp_path / "multi", "train.max_steps=4",
                     "train.per_device_batch_size=4", "train.save_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "multi" / "run_info.json").read_text())
    assert info["world_size"] == 2, "the launcher silently ran one process"
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), abs=2e-5)
    assert (tmp_path / "multi" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "multi" / "checkpoint-4" / "trainer_state.json").is_file()


def test_deepspeed_on_cpu_refuses_instead_of_training_copies(tiny_model_dir, tmp_path):
    """accelerate sets up a one-process DeepSpeed state per rank on CPU; prefopt must stop, not race."""
    # deepspeed is in the test extra: this test runs in CI, it does not skip (README: "(tested)").
    assert importlib.util.find_spec("deepspeed") is not None, "pip install -e '.[test]' installs deepspeed"
    data = write_pairs(tmp_path / "pairs.jsonl", rows=32)
    result = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"],
                     tiny_model_dir, data, tmp_path / "ds", "train.max_steps=2",
                     f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero2_cpu.json'}", use_cpu_flag=False)
    assert result.returncode == 2, result.stderr[-2000:]  # a config error, not a crash
    assert "the launcher started 2 processes but accelerate set up 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ds" / "metrics.jsonl").exists()
