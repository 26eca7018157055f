"""RTO's PPO stage (policy + critic) under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with two CPU processes.

accelerate prepares one model per ``Accelerator`` on those backends, so there the policy and the critic train as
one ``PolicyAndCritic`` module with one optimizer (``prefopt/trainer/joint.py``); one process and DDP keep two
models. Same global rollout batch (4 prompts per process x 2 vs 8, each prompt sampled with its own seed) and one
minibatch per update, so every step sees the same rollouts: the per-step policy and value losses must equal the
one-process run's, and ``final/`` must hold the gathered policy (without the critic).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import REPO, assert_final_matches_one_process, metrics, sft_that_ends_answers

pytestmark = [pytest.mark.filterwarnings("ignore")]

STEPS = 3
PER_STEP = ("loss", "ppo/policy_loss", "ppo/value_loss")
_PORTS = iter(range(29741, 29800))


@pytest.fixture(scope="module")
def dpo_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A stand-in stage-1 DPO model: the tiny model with seeded noise, so RTO's DPO token reward is not zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("dpo-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def rto_overrides(model_dir, dpo_dir, gold_task_dir, out, rollouts: int, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"ppo.dpo_policy={dpo_dir}",
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        f"output_dir={out}",
        "overwrite_output_dir=true",
        "logging.progress=false",
        "logging.logging_steps=1",
        "logging.sample_steps=null",
        "train.save_steps=null",
        "train.learning_rate=1e-3",
        "generation.max_new_tokens=8",
        f"ppo.rollout_batch_size={rollouts}",
        "ppo.epochs=2",
        *extra,
    ]


def run_one_process(model_dir, dpo_dir, gold_task_dir, out, *extra: str) -> Path:
    from prefopt.config import load_config
    from prefopt.trainer import train

    overrides = rto_overrides(model_dir, dpo_dir, gold_task_dir, out, 8, "ppo.minibatch_size=8", *extra)
    train(load_config(REPO / "recipes/tiny/rto.yaml", overrides))
    return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def launch(launcher: list[str], model_dir, dpo_dir, gold_task_dir, out, *extra: str, fresh: bool = True):
    """Two processes, 4 rollouts each, one minibatch of 4 per update (``fresh=False``: keep what ``out`` holds)."""
    overrides = rto_overrides(model_dir, dpo_dir, gold_task_dir, out, 4, "ppo.minibatch_size=4", *extra)
    if not fresh:
        overrides.remove("overwrite_output_dir=true")
    args = [*launcher, "-m", "prefopt", "train", str(REPO / "recipes/tiny/rto.yaml"), *overrides]
    return subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=900, cwd=REPO)


def torchrun() -> list[str]:
    port = str(next(_PORTS))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


def accelerate_fsdp2() -> list[str]:
    config = str(REPO / "recipes/accelerate/fsdp2.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--num_processes",
        "2",
    ] + [
        "--main_process_port",
        str(next(_PORTS)),
    ]


def _steps(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


def assert_same_losses(out: Path, single: Path) -> None:
    got, expected = _steps(out), _steps(single)
    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        for key in PER_STEP:
            assert a[key] == pytest.approx(b[key], abs=1e-4), (step, key)
        # the critic keeps its own learning rate inside the one optimizer (ppo.critic_learning_rate)
        assert a["critic/learning_rate"] == pytest.approx(b["critic/learning_rate"], rel=1e-9), step
    assert got[-1]["ppo/value_loss"] != got[0]["ppo/value_loss"]  # the critic trained


def assert_final_is_the_policy(out: Path, single: Path, model_dir: Path) -> None:
    assert_final_matches_one_process(out, single, model_dir)
    files = {p.name for p in (out / "final").iterdir()}
    assert "model.safetensors" in files and not any("critic" in name for name in files)


# ----------------------------------------------------------------------------------------- one process (default)


def test_policy_and_critic_routes_and_joint_optimizer_equal_separate_ones():
    """The wrapper's two routes are the two modules' forwards, and one AdamW holding both parameter sets (each with
    its own learning rate and weight decay) takes exactly the steps two AdamWs take."""
    from prefopt.trainer.joint import CriticCall, PolicyAndCritic, joint_optimizer

    torch.manual_seed(0)
    policy, critic = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
    twins = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)]
    for twin, original in zip(twins, (policy, critic)):
        twin.load_state_dict(original.state_dict())
    root = PolicyAndCritic(policy, critic)
    x = torch.randn(5, 4)
    assert torch.equal(root(x), policy(x)) and torch.equal(CriticCall(root)(x), critic(x))
    with pytest.raises(ValueError, match="route"):
        root(x, route="reward")

    def adamw(module, lr, decay):
        return torch.optim.AdamW(
            [{"params": [module.weight], "weight_decay": decay}, {"params": [module.bias]}], lr=lr
        )

    joint, starts = joint_optimizer([adamw(policy, 1e-2, 0.1), adamw(critic, 3e-2, 0.0)])
    assert starts == [0, 2] and [g["lr"] for g in joint.param_groups] == [1e-2, 1e-2, 3e-2, 3e-2]
    separate = [adamw(twins[0], 1e-2, 0.1), adamw(twins[1], 3e-2, 0.0)]
    for _ in range(3):
        x = torch.randn(5, 4)
        (root(x).pow(2).sum() + CriticCall(root)(x).sum()).backward()
        (twins[0](x).pow(2).sum() + twins[1](x).sum()).backward()
        joint.step()
        joint.zero_grad()
        for optimizer in separate:
            optimizer.step()
            optimizer.zero_grad()
    for twin, original in zip(twins, (policy, critic)):
        for a, b in zip(twin.parameters(), original.parameters()):
            assert torch.equal(a, b)


# Recorded with main at 8ca7e23 (before PolicyAndCritic existed), same fixtures and settings: one process keeps
# two prepared models and two optimizers, clipped separately, and must reproduce these numbers.
MAIN_ONE_PROCESS = [
    {
        "loss": -0.0772959291934967,
        "ppo/policy_loss": -0.07758008688688278,
        "ppo/value_loss": 0.0002841537479980616,
        "grad_norm": 1.9349238668219186,
        "critic/grad_norm": 0.07682095840573311,
        "critic/learning_rate": 0.0005,
    },
    {
        "loss": -0.043136514723300934,
        "ppo/policy_loss": -0.043412283062934875,
        "ppo/value_loss": 0.0002757787915470544,
        "grad_norm": 2.900461733341217,
        "critic/grad_norm": 0.06504407897591591,
        "critic/learning_rate": 0.0,
    },
]


def test_one_process_rto_is_unchanged(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path):
    """Two minibatches per epoch, two epochs, policy norm above train.max_grad_norm (clipping binds)."""
    from prefopt.config import load_config
    from prefopt.trainer import train

    overrides = rto_overrides(
        tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path, 4, "ppo.minibatch_size=2", "train.max_steps=2"
    )
    train(load_config(REPO / "recipes/tiny/rto.yaml", overrides))
    steps = _steps(tmp_path)
    assert len(steps) == len(MAIN_ONE_PROCESS)
    for step, (got, expected) in enumerate(zip(steps, MAIN_ONE_PROCESS), start=1):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), (step, key)
    assert sorted(p.name for p in (tmp_path / "final").glob("*.safetensors")) == ["model.safetensors"]


# ------------------------------------------------------------------------------------ two processes (slow)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_rto_matches_one_process(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path, stage):
    """One DeepSpeed engine holds policy and critic. The engine clips the joint gradient norm
    (deepspeed/runtime/zero/stage_1_and_2.py, step; stage3.py likewise), where one process clips each part
    separately; so both runs train unclipped here, and the engine's norm must be the joint norm of the one-process
    run's two. ZeRO-3: generation takes the engine's hooks off while it runs (generation/hf.py)."""
    pytest.importorskip("deepspeed")
    no_clip = ("train.max_grad_norm=null", f"train.max_steps={STEPS}")
    single = run_one_process(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path / "single", *no_clip)
    out = tmp_path / f"zero{stage}"
    deepspeed = f"train.deepspeed={REPO / f'recipes/accelerate/ds_zero{stage}_cpu.json'}"
    result = launch(torchrun(), tiny_model_dir, dpo_model_dir, gold_task_dir, out, *no_clip, deepspeed)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, "DistributedType.DEEPSPEED")
    assert_same_losses(out, single)
    for got, expected in zip(_steps(out), _steps(single)):
        joint = math.hypot(expected["grad_norm"], expected["critic/grad_norm"])
        assert got["grad_norm"] == pytest.approx(joint, rel=1e-3) and "critic/grad_norm" not in got
    assert_final_is_the_policy(out, single, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero2_rto_warns_that_clipping_is_joint(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    deepspeed = f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero2_cpu.json'}"
    result = launch(
        torchrun(), tiny_model_dir, dpo_model_dir, gold_task_dir, out, "train.max_steps=1", deepspeed
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "clips their joint gradient norm to train.max_grad_norm=1.0" in result.stderr


@pytest.mark.slow
@pytest.mark.multiproc
def test_fsdp2_rto_matches_one_process(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path):
    """FSDP2 (accelerate launch, as the README says): the one root is sharded per decoder layer of both parts;
    policy and critic are clipped separately as on one process (train.max_grad_norm=1.0 binds for the policy), so
    the gradient norms and losses equal the one-process run's."""
    steps = f"train.max_steps={STEPS}"
    single = run_one_process(tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path / "single", steps)
    out = tmp_path / "fsdp2"
    fp32 = (
        "train.mixed_precision=no"  # the launcher config says bf16; the one-process run compared with is fp32
    )
    result = launch(accelerate_fsdp2(), tiny_model_dir, dpo_model_dir, gold_task_dir, out, steps, fp32)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, "DistributedType.FSDP")
    # root, the policy's embedding, 2 decoder layers and tail (norm + lm-head), the critic's 2 decoder layers
    assert "FSDP2: the policy and the critic are sharded in 8 units over 2 processes" in result.stderr
    assert_same_losses(out, single)
    policy_norms = [m["grad_norm"] for m in _steps(single)]
    assert max(policy_norms) > 1.0  # clipping binds
    for got, expected in zip(_steps(out), _steps(single)):
        for key in ("grad_norm", "critic/grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert_final_is_the_policy(out, single, tiny_model_dir)


BACKENDS = {
    "zero2": (torchrun, (f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero2_cpu.json'}",)),
    "zero3": (torchrun, (f"train.deepspeed={REPO / 'recipes/accelerate/ds_zero3_cpu.json'}",)),
    "fsdp2": (accelerate_fsdp2, ("train.mixed_precision=no",)),
}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_sharded_rto_resume_continues_exactly(
    tiny_model_dir, dpo_model_dir, gold_task_dir, tmp_path, backend
):
    """A checkpoint of the one engine / FSDP root holds policy, critic, their optimizer state and the adaptive KL
    coefficient: resuming from step 2 reproduces the uninterrupted run's step 3."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    launcher, options = BACKENDS[backend]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    settings = (f"train.max_steps={STEPS}", *options)
    result = launch(
        launcher(), tiny_model_dir, dpo_model_dir, gold_task_dir, full, *settings, "train.save_steps=1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(
        launcher(),
        tiny_model_dir,
        dpo_model_dir,
        gold_task_dir,
        resumed,
        *settings,
        "train.resume_from=latest",
        fresh=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (last,) = _steps(resumed)
    expected = _steps(full)[-1]
    assert last["step"] == STEPS
    for key in (*PER_STEP, "ppo/kl_coef", "critic/learning_rate"):
        assert last[key] == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_sharded_rto_ranks_decoding_different_lengths(tiny_model_dir, gold_task_dir, tmp_path, backend):
    """A policy that ends its answers (a few SFT steps) makes the two ranks decode different numbers of tokens;
    nothing in generation may be a collective (under ZeRO-3 the engine's prefetching hooks issued all-gathers
    inside the decode loop and the ranks hung, until generation took the hooks off: generation/hf.py)."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    launcher, options = BACKENDS[backend]
    sft_final = sft_that_ends_answers(tiny_model_dir, gold_task_dir, tmp_path / "sft")
    out = tmp_path / backend
    # One prompt per generate call: a rank decodes the sum of its answers' lengths, so an answer that ends early
    # on one rank makes the ranks' decode-step counts differ.
    settings = ("train.max_steps=2", "generation.max_new_tokens=32", "generation.batch_size=1", *options)
    result = launch(launcher(), sft_final, sft_final, gold_task_dir, out, *settings)
    assert result.returncode == 0, result.stderr[-4000:]
    assert any(m["online/eos_rate"] > 0 for m in _steps(out))  # some answers ended before the limit
