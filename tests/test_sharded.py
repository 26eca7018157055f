"""DeepSpeed ZeRO-2 / ZeRO-3 with two CPU processes (torchrun, gloo) against a one-process run.

Same global batch (4 per process x 2 vs 8), so every step sees the same pairs: the per-step losses must agree, and
``final/`` must hold the full (gathered) trained weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer_helpers import (
    REPO,
    assert_final_matches_one_process,
    losses,
    metrics,
    run,
    sft_that_ends_answers,
    write_pairs,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore")]
deepspeed = pytest.importorskip("deepspeed")

STEPS = 3
COMMON = (f"train.max_steps={STEPS}", "train.save_steps=null")
_PORTS = iter(range(29541, 29600))


def torchrun(model_dir, data, out, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m prefopt train recipes/tiny/dpo.yaml ...`` with no CPU flag set."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(next(_PORTS)),
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
        "train.per_device_batch_size=4",
        *COMMON,
        *overrides,
    ]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_run(result, out, single, stage: int) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, "DistributedType.DEEPSPEED")
    assert losses(out) == pytest.approx(losses(single), abs=1e-4)
    assert len(losses(out)) == STEPS


def test_zero3_dpo_live_reference_matches_one_process(tiny_model_dir, tmp_path):
    """ZeRO-3: policy and reference loaded under zero.Init (empty partitions), the reference wrapped by its own
    DeepSpeed engine; losses equal the one-process run; final/ gathered."""
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    single = tmp_path / "single"
    # The shared-prompt forward (two decoder calls) under ZeRO-3: every rank must agree to take it.
    share = "train.share_prompt=true"
    run(tiny_model_dir, data, single, *COMMON, share)
    out = tmp_path / "zero3"
    result = torchrun(
        tiny_model_dir, data, out, f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero3_cpu.json'}", share
    )
    _check_run(result, out, single, 3)
    assert_final_matches_one_process(out, single, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_precomputed_reference_matches_one_process(tiny_model_dir, tmp_path, stage):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=63)  # odd: the ranks precompute different row counts
    single = tmp_path / "single"
    run(
        tiny_model_dir,
        data,
        single,
        *COMMON,
        "reference.mode=precomputed",
        f"reference.cache_dir={tmp_path / 'cache1'}",
    )
    out = tmp_path / f"zero{stage}"
    result = torchrun(
        tiny_model_dir,
        data,
        out,
        "reference.mode=precomputed",
        f"reference.cache_dir={tmp_path / 'c2'}",
        f"train.deepspeed={REPO / f'recipes/accelerate/ds_zero{stage}_cpu.json'}",
    )
    _check_run(result, out, single, stage)
    assert_final_matches_one_process(out, single, tiny_model_dir)


@pytest.mark.slow
def test_zero2_dpo_live_reference_matches_one_process(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    single = tmp_path / "single"
    run(tiny_model_dir, data, single, *COMMON)
    out = tmp_path / "zero2"
    result = torchrun(
        tiny_model_dir, data, out, f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero2_cpu.json'}"
    )
    _check_run(result, out, single, 2)
    assert_final_matches_one_process(out, single, tiny_model_dir)


LORA = (
    "model.peft.r=8",
    "model.peft.alpha=16",
    "model.peft.target_modules=[q_proj,v_proj]",
    "reference.mode=adapter",
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_adapter_reference_saves_gathered_adapter(tiny_model_dir, tmp_path, stage):
    """LoRA with the adapter-disabled policy as reference; final/ is a PEFT adapter with full, trained tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    single = tmp_path / "single"
    run(tiny_model_dir, data, single, *COMMON, *LORA)
    out = tmp_path / f"zero{stage}"
    result = torchrun(
        tiny_model_dir,
        data,
        out,
        *LORA,
        f"train.deepspeed={REPO / f'recipes/accelerate/ds_zero{stage}_cpu.json'}",
    )
    _check_run(result, out, single, stage)
    adapter = _state(out / "final" / "adapter_model.safetensors")
    expected = _state(single / "final" / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(expected) and adapter
    for name, tensor in adapter.items():
        assert tensor.numel() > 0 and tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, expected[name], atol=2e-3, rtol=0, msg=name)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means trained


@pytest.mark.slow
def test_zero3_online_xpo_with_frozen_implicit_reward_models(tiny_model_dir, gold_task_dir, tmp_path):
    """XPO under ZeRO-3: HF generation on the sharded policy, live reference and the implicit reward's two frozen
    models each in its own engine (their from_pretrained runs under zero.Init). Sampling differs from one
    process, so this checks that it runs and the numbers are sane, not parity."""
    out = tmp_path / "xpo"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(next(_PORTS)),
            "-m",
            "prefopt",
            "train",
            str(REPO / "recipes/tiny/xpo.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
            f"output_dir={out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "train.max_steps=2",
            "train.per_device_batch_size=4",
            "generation.max_new_tokens=16",
            f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero3_cpu.json'}",
            "reward.kind=implicit",
            f"reward.policy={tiny_model_dir}",
            f"reward.reference={tiny_model_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    assert steps[0]["dpo/loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 0


@pytest.mark.slow
def test_zero3_xpo_ranks_decoding_different_lengths(tiny_model_dir, gold_task_dir, tmp_path):
    """A policy that ends its answers (20 SFT steps) and one prompt per generate call: the two ranks decode
    different numbers of tokens, from the policy and from the reference (a frozen engine). Before generation took
    the engines' ZeRO-3 hooks off (generation/hf.py, zero3_hooks_removed), their prefetch all-gathers paired
    mismatched collectives: gloo "Received data size doesn't match expected size" within 3 steps."""
    sft_final = sft_that_ends_answers(tiny_model_dir, gold_task_dir, tmp_path / "sft")
    out = tmp_path / "xpo"
    result = subprocess.run(
        _torchrun_args(
            "-m",
            "prefopt",
            "train",
            str(REPO / "recipes/tiny/xpo.yaml"),
            f"model.name_or_path={sft_final}",
            f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
            "data.eval=null",
            f"output_dir={out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "train.max_steps=3",
            "train.per_device_batch_size=4",
            "generation.max_new_tokens=32",
            "generation.batch_size=1",
            f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero3_cpu.json'}",
        ),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    assert steps[0]["dpo/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert any(0 < m["online/eos_rate"] < 1 for m in steps)  # answers of different lengths


def _torchrun_args(*program: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(next(_PORTS)),
        *program,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _nan_run(model_dir, data, out, nan_from: int, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun_args(
            str(REPO / "tests/nan_loss_launch.py"),
            "train",
            str(REPO / "recipes/tiny/dpo.yaml"),
            f"model.name_or_path={model_dir}",
            f"data.train={data}",
            "data.eval=null",
            f"output_dir={out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "train.per_device_batch_size=4",
            "train.warmup_ratio=0",
            "train.lr_scheduler=constant",  # the same learning rate at every step, whatever max_steps is
            "train.learning_rate=1e-3",
            f"train.max_steps={steps}",
            "train.max_skipped_steps=5",
            f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero2_cpu.json'}",
        ),
        capture_output=True,
        text=True,
        env=_env(PREFOPT_NAN_FROM=str(nan_from)),
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.slow
def test_zero2_skipped_non_finite_steps_change_no_weight(tiny_model_dir, tmp_path):
    """Item 12: DeepSpeed steps inside ``backward``, so prefopt asks the engine whether it applied the update
    (``was_step_applied``) instead of assuming a skip. ZeRO-2's own overflow check skips a non-finite step; the
    skips prefopt counts must then have changed nothing: 2 good steps + 2 NaN steps end with the weights of a run
    of the 2 good steps alone. (Where the engine did apply it -- no ZeRO, or a bf16 optimizer without the check --
    the run stops with "DeepSpeed has already applied the update"; that branch is in trainer/updates.py.)"""
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    skipped, clean = tmp_path / "skipped", tmp_path / "clean"
    result = _nan_run(tiny_model_dir, data, skipped, nan_from=3, steps=4)  # steps 1, 2 finite; 3, 4 NaN
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 4: non-finite loss or gradient; optimizer step skipped (2 in a row)" in result.stderr
    assert metrics(skipped)[-1]["train/skipped_steps"] == 2
    result = _nan_run(tiny_model_dir, data, clean, nan_from=10**6, steps=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(skipped)[:2] == pytest.approx(losses(clean), abs=1e-6)
    after_skips = AutoModelForCausalLM.from_pretrained(skipped / "final").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(clean / "final").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(expected[n], initial[n]) for n in initial)  # the good steps did train
    for name, tensor in after_skips.items():
        assert torch.equal(tensor, expected[name]), name
