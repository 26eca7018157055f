"""FSDP2 with two CPU processes against a one-process run, launched exactly as the README says:

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 -m prefopt train RECIPE ...

accelerate 1.15 builds no FSDP state on CPU; prefopt builds it (``prefopt/trainer/distributed.py``,
``build_cpu_fsdp_state``) and everything after that is accelerate's FSDP2 code, the one a GPU run uses. Same
global batch (4 per process x 2 vs 8): the per-step losses must agree and ``final/`` must hold the gathered weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.test_vllm_contract import tied_model_dir  # noqa: F401 (a fixture, used by name)
from tests.trainer_helpers import REPO, assert_final_matches_one_process, losses, metrics, run, write_pairs

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore")]

STEPS = 3
COMMON = (f"train.max_steps={STEPS}", "train.save_steps=null")
LORA = (
    "model.peft.r=8",
    "model.peft.alpha=16",
    "model.peft.target_modules=[q_proj,v_proj]",
    "reference.mode=adapter",
)
_PORTS = iter(range(29641, 29700))


def accelerate_fsdp2(recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate/fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(next(_PORTS)),
        "-m",
        "prefopt",
        "train",
        str(REPO / recipe),
        "overwrite_output_dir=true",
        "logging.progress=false",
        "logging.logging_steps=1",
        *overrides,
    ]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def fsdp_dpo(model_dir, data, out, *overrides: str) -> subprocess.CompletedProcess:
    return accelerate_fsdp2(
        "recipes/tiny/dpo.yaml",
        f"model.name_or_path={model_dir}",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={out}",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        "train.per_device_batch_size=4",
        "train.mixed_precision=no",  # the launcher config says bf16; the one-process run compared with is fp32
        *COMMON,
        *overrides,
    )


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_run(result, out, single) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, "DistributedType.FSDP")
    # accelerate's fsdp2_prepare_model: the root, one unit per decoder layer (2), the embedding and the tail
    # (final norm + lm-head: two modules in one unit) -- not the root alone: the logps wrapper exposes the model's
    # _no_split_modules, embeddings and final norm.
    assert "FSDP2: the policy is sharded in 6 units over 2 processes" in result.stderr
    assert losses(out) == pytest.approx(losses(single), abs=1e-4)
    assert len(losses(out)) == STEPS


def test_fsdp2_dpo_live_reference_matches_one_process(tiny_model_dir, tmp_path):
    """Also the eval split: 33 rows in batches of 16 give rank 0 two batches and rank 1 one; every rank must still
    run the same number of (collective) forwards, and the eval metrics equal the one-process run's."""
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("".join(data.read_text().splitlines(keepends=True)[:33]))
    # With the shared-prompt forward (two decoder calls), which every rank must agree to take.
    evaluation = (f"data.eval={eval_rows}", "train.eval_batch_size=16", "train.share_prompt=true")
    single = tmp_path / "single"
    run(tiny_model_dir, data, single, *COMMON, *evaluation)
    out = tmp_path / "fsdp2"
    result = fsdp_dpo(tiny_model_dir, data, out, *evaluation)
    _check_run(result, out, single)
    # The frozen reference is sharded like the policy (prepare_frozen -> shard_frozen_fsdp2), not copied whole to
    # every process: the same 6 units as the policy.
    assert "FSDP2: the reference is sharded in 6 units over 2 processes" in result.stderr, result.stderr[
        -3000:
    ]
    assert_final_matches_one_process(out, single, tiny_model_dir)
    evaluated = [m for m in metrics(out) if "eval/loss" in m]
    expected = [m for m in metrics(single) if "eval/loss" in m]
    assert len(evaluated) == len(expected) == 1
    assert evaluated[0]["eval/loss"] == pytest.approx(expected[0]["eval/loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp2_precomputed_reference_matches_one_process(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=63)  # odd: the ranks precompute different row counts
    single = tmp_path / "single"
    cache = ("reference.mode=precomputed",)
    run(tiny_model_dir, data, single, *COMMON, *cache, f"reference.cache_dir={tmp_path / 'c1'}")
    out = tmp_path / "fsdp2"
    result = fsdp_dpo(tiny_model_dir, data, out, *cache, f"reference.cache_dir={tmp_path / 'c2'}")
    _check_run(result, out, single)
    assert_final_matches_one_process(out, single, tiny_model_dir)


@pytest.mark.slow
def test_fsdp2_lora_adapter_reference_saves_gathered_adapter(tiny_model_dir, tmp_path):
    """LoRA with the adapter-disabled policy as reference (run through the FSDP root, item 5); final/ is a PEFT
    adapter with full, trained tensors equal to the one-process run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    single = tmp_path / "single"
    run(tiny_model_dir, data, single, *COMMON, *LORA)
    out = tmp_path / "fsdp2"
    result = fsdp_dpo(tiny_model_dir, data, out, *LORA)
    _check_run(result, out, single)
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
@pytest.mark.parametrize(
    "lora, reward_model", [(False, False), (True, False), (False, True)], ids=["full", "lora", "reward-model"]
)
def test_fsdp2_online_xpo_generation_matches_one_process(
    tiny_model_dir, gold_task_dir, tmp_path, lora, reward_model
):
    """XPO under FSDP2: HF generate on the policy and on the reference (the adapter-disabled policy with LoRA)
    runs on the inner model, outside the FSDP root (item 5). Per-prompt seeds make the samples independent of the
    process count, so the rewards of the samples and the losses equal a one-process run's. ``reward-model``: the
    samples are scored by a sequence-classification reward model, which FSDP2 shards like the frozen reference
    (a generating frozen model, and a scoring one)."""
    scorer = ()
    if reward_model:
        from prefopt.models.tiny import build_tiny_reward_model

        rm = build_tiny_reward_model(tmp_path / "rm", tiny_model_dir, init_from=str(tiny_model_dir))
        scorer = ("reward.kind=model", f"reward.name_or_path={rm}", "reward.function=null")
    common = (
        f"model.name_or_path={tiny_model_dir}",
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        "train.max_steps=2",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        "generation.max_new_tokens=16",
        "train.mixed_precision=no",
        *(LORA if lora else ()),
        *scorer,
    )
    single = tmp_path / "single"
    run(
        tiny_model_dir,
        gold_task_dir / "prompts_train.jsonl",
        single,
        *common,
        recipe="recipes/tiny/xpo.yaml",
    )
    out = tmp_path / "fsdp2"
    result = accelerate_fsdp2(
        "recipes/tiny/xpo.yaml", *common, f"output_dir={out}", "train.per_device_batch_size=4"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    if not lora:
        assert "FSDP2: the reference is sharded in 6 units" in result.stderr
    if reward_model:
        assert "FSDP2: a reward model is sharded in" in result.stderr
    keys = ("loss", "online/model_scores", "online/policy_win_rate", "logps/chosen", "logps/rejected")
    ours, theirs = metrics(out), metrics(single)
    assert len(ours) == len(theirs) == 2
    for mine, expected in zip(ours, theirs):
        for key in keys:
            assert mine[key] == pytest.approx(expected[key], abs=1e-4), key


@pytest.mark.slow
def test_fsdp2_bf16_final_is_saved_in_the_training_dtype(tiny_model_dir, tmp_path):
    """Item 22: accelerate upcasts the trainable bf16 weights to fp32 under FSDP (master weights); final/ is written
    in bf16, the dtype the model was loaded in, and equals the one-process bf16 run's final/."""
    data = write_pairs(tmp_path / "pairs.jsonl", rows=64)
    bf16 = ("model.dtype=bfloat16", "train.mixed_precision=bf16")
    single = tmp_path / "single"
    run(tiny_model_dir, data, single, *COMMON, *bf16)
    out = tmp_path / "fsdp2"
    result = fsdp_dpo(tiny_model_dir, data, out, *bf16)
    assert result.returncode == 0, result.stderr[-4000:]
    saved, expected = (
        _state(out / "final" / "model.safetensors"),
        _state(single / "final" / "model.safetensors"),
    )
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert {t.dtype for t in expected.values()} == {torch.bfloat16}
    # Policy (bf16 compute parameters under autocast) and live reference (bf16 weights under autocast) agree at
    # step 0, and the run follows the one-process run (fp32 masters under autocast) within bf16 rounding.
    assert losses(out)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(out) == pytest.approx(losses(single), abs=1e-3)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), atol=4e-3, rtol=1e-2, msg=name)


@pytest.mark.slow
def test_fsdp2_vllm_push_gathers_shards_in_the_training_dtype(request, gold_task_dir, tmp_path):
    """Item 4: XPO with generation.backend=vllm under FSDP2 (2 CPU processes, the stand-in engine of
    test_vllm_contract.py in each). Every rank's engine receives full tensors (DTensor shards gathered with
    full_tensor(); the stand-in rejects a wrong shape), in bf16 -- the dtype the model was loaded in, not the fp32
    master copy accelerate keeps under FSDP -- with the tied lm-head left to the embedding (R1). The weights the
    engine generates with at step 2 are the step-1 weights of the checkpoint, rounded to bf16."""
    model_dir = request.getfixturevalue("tied_model_dir")  # test_vllm_contract.py's tied Llama
    engines, out = tmp_path / "engines", tmp_path / "xpo"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PREFOPT_STAND_IN_OUT=str(engines))
    args = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate/fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(next(_PORTS)),
        str(REPO / "tests/vllm_stand_in_launch.py"),
        "train",
        str(REPO / "recipes/tiny/xpo.yaml"),
        f"model.name_or_path={model_dir}",
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        f"output_dir={out}",
        "logging.progress=false",
        "train.max_steps=2",
        "train.save_steps=1",
        "train.per_device_batch_size=4",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        "generation.backend=vllm",
        "generation.max_new_tokens=8",
        "model.dtype=bfloat16",
        "train.mixed_precision=bf16",
    ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    masters = torch.load(out / "checkpoint-1" / "pytorch_model_fsdp.bin", weights_only=True)
    masters = {k.removeprefix("model."): v for k, v in masters.items()}
    assert {t.dtype for t in masters.values()} == {torch.float32}  # accelerate's fp32 upcast under FSDP
    initial = _state(model_dir / "model.safetensors")
    for rank in (0, 1):
        report = json.loads((engines / f"engine-rank{rank}.json").read_text())
        assert report["engine_dtype"] == "bfloat16" and report["pushed_dtypes"] == ["torch.bfloat16"]
        pushed = _state(engines / f"engine-rank{rank}.safetensors")
        assert "lm_head.weight" not in pushed and sorted(pushed) == sorted(initial)
        for name, tensor in pushed.items():
            assert tensor.shape == initial[name].shape, name
            assert torch.equal(tensor, masters[name].to(torch.bfloat16)), name
        moved = sum(not torch.equal(t, initial[n].to(torch.bfloat16)) for n, t in pushed.items())
        assert moved >= len(pushed) // 2
