"""The online step kinds on the shared run scaffold (issue 14): each silent error of the online methods has a test
here that failed before, and the numbers the steps log are checked against independent computations."""

from __future__ import annotations

import json
import math
import shutil
import types

import pytest
import torch

from prefopt.config import PPOConfig, RewardConfig, load_config
from prefopt.errors import ConfigError
from prefopt.trainer import TrainingDiverged, train
from tests.trainer_helpers import REPO, metrics


def _config(recipe: str, model, out, *overrides):
    return load_config(
        REPO / recipe,
        [
            f"model.name_or_path={model}",
            f"output_dir={out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "logging.sample_steps=1",
            "generation.max_new_tokens=8",
            "data.eval=null",
            "train.save_steps=null",
            *overrides,
        ],
    )


def _run(recipe: str, model, out, *overrides):
    return train(_config(recipe, model, out, *overrides))


PPO_SMALL = [
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "train.learning_rate=1e-3",
    "train.lr_scheduler=constant",
]
RTO_AS_PPO = [*PPO_SMALL, "ppo.dpo_policy=null", "loss.dpo_reward_scale=0"]


# ----------------------------------------------------------------------------------------- sampling seeds


def test_seeded_sampler_draws_from_the_tempered_filtered_distribution():
    from prefopt.generation import SamplingParams
    from prefopt.generation.hf import SeededSampler

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 20000
    sampler = SeededSampler(list(range(rows)), SamplingParams(temperature=0.7, top_k=4))
    picks = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone()).argmax(-1)
    frequencies = torch.bincount(picks, minlength=5).double() / rows
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -1.0]) / 0.7, -1).double()
    assert frequencies[4] == 0  # top_k=4 removes the last token
    torch.testing.assert_close(
        frequencies[:4], expected, atol=0.012, rtol=0
    )  # 4 sd of a 20000-draw frequency


def test_seeded_samples_do_not_depend_on_the_batch(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.generation import HFGenerator, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [
        tokenizer("Review 1 of the film:")["input_ids"],
        tokenizer("A much longer prompt here: ok")["input_ids"],
    ]
    params = dict(n=2, max_new_tokens=6)
    both = HFGenerator(model, tokenizer, batch_size=4).generate(
        prompts, SamplingParams(**params, prompt_seeds=[7, 9])
    )
    alone = HFGenerator(model, tokenizer, batch_size=1).generate(
        prompts[1:], SamplingParams(**params, prompt_seeds=[9])
    )
    torch.manual_seed(123)  # the global RNG plays no part
    again = HFGenerator(model, tokenizer, batch_size=3).generate(
        prompts[1:], SamplingParams(**params, prompt_seeds=[9])
    )
    assert both.texts[2:] == alone.texts == again.texts
    assert both.texts[:2] != both.texts[2:]


# ----------------------------------------------------------------------------------------- config refusals


def test_losses_that_need_an_orderer_refuse_reward_kind_none_and_ppo_refuses_a_judge(tmp_path):
    with pytest.raises(ConfigError, match="reward.kind: loss 'xpo' orders"):
        _config("recipes/tiny/xpo.yaml", tmp_path, tmp_path / "x", "reward.kind=none")
    with pytest.raises(ConfigError, match="reward.kind: loss 'rto' needs a scalar reward"):
        _config(
            "recipes/tiny/rto.yaml",
            tmp_path,
            tmp_path / "r",
            "reward.kind=judge",
            "reward.function=tests.online_helpers:longer_wins",
        )


def test_hypo_refuses_sampling_that_biases_its_kl_gradient(tiny_model_dir, gold_task_dir, tmp_path):
    out = tmp_path / "hypo"
    with pytest.raises(ConfigError, match="generation.temperature=1 top_p=1 top_k=0"):
        _run(
            "recipes/tiny/hypo.yaml",
            tiny_model_dir,
            out,
            f"data.train={gold_task_dir / 'pairs_train.jsonl'}",
            "generation.temperature=0.7",
        )
    assert not out.exists()  # refused before anything was written


def test_rto_refuses_a_critic_with_another_tokenizer(tiny_model_dir, gold_task_dir, tmp_path):
    from prefopt.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=512)
    out = tmp_path / "rto"
    with pytest.raises(ConfigError, match="reward.name_or_path: the critic .* tokenizer differs"):
        _run(
            "recipes/tiny/rto.yaml",
            tiny_model_dir,
            out,
            f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
            *RTO_AS_PPO,
            "reward.kind=model",
            f"reward.name_or_path={other}",
        )
    assert not out.exists()


def test_ppo_defaults_follow_the_rto_release():
    assert PPOConfig().epochs == 1  # the authors' released script: one PPO epoch per rollout
    assert (
        PPOConfig().critic_learning_rate is None
    )  # None: the actor's rate (the release used 18x; see README)


# ----------------------------------------------------------------------------------------- XPO ordering


def test_xpo_orders_on_raw_scores_when_the_reward_is_normalised():
    """The issue's numbers: policy [5, 6, 10] vs reference [1, 2, 3]; each normalised on its own, prompt 2 would
    flip to a reference win ([-.93, -.46, 1.39] vs [-1.22, 0, 1.22])."""
    from prefopt.models.reward import build_reward
    from prefopt.trainer.online import OnlinePairStep

    reward = build_reward(
        RewardConfig(kind="function", function="tests.online_helpers:number_in_text", normalize="batch"),
        device="cpu",
    )
    ctx = types.SimpleNamespace(
        reward=reward, config=types.SimpleNamespace(reward=types.SimpleNamespace(kind="function"))
    )
    stub = types.SimpleNamespace(ctx=ctx)

    def rollouts(texts):
        return types.SimpleNamespace(
            prompt_index=torch.arange(3), texts=texts, finished=torch.ones(3, dtype=torch.bool)
        )

    batch = {"prompt_text": ["a", "b", "c"], "prompt_messages": ["", "", ""]}
    policy, reference, wins = OnlinePairStep._order(
        stub, batch, rollouts(["5", "6", "10"]), rollouts(["1", "2", "3"])
    )
    assert wins.tolist() == [True, True, True]
    assert policy.tolist() > reference.tolist()


def test_xpo_pairs_follow_the_raw_scores_and_a_pairwise_judge(tiny_model_dir, gold_task_dir, tmp_path):
    from data_tools.synth import score

    prompts = f"data.train={gold_task_dir / 'prompts_train.jsonl'}"
    _run(
        "recipes/tiny/xpo.yaml",
        tiny_model_dir,
        tmp_path / "norm",
        prompts,
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        "reward.normalize=batch",
        "logging.sample_steps=1",
    )
    logged = [json.loads(line) for line in (tmp_path / "norm" / "samples.jsonl").read_text().splitlines()]
    assert len(logged) == 8
    for row in logged:  # chosen/rejected follow the raw gold reward of the logged texts
        raw_policy, raw_reference = (
            score(row["prompt"], row["completion"]),
            score(row["prompt"], row["reference_completion"]),
        )
        assert row["policy_won"] == (raw_policy >= raw_reference)
    _run(
        "recipes/tiny/xpo.yaml",
        tiny_model_dir,
        tmp_path / "judge",
        prompts,
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "reward.kind=judge",
        "reward.function=tests.online_helpers:longer_wins",
    )
    logged = [json.loads(line) for line in (tmp_path / "judge" / "samples.jsonl").read_text().splitlines()]
    assert [row["policy_won"] for row in logged] == [
        len(r["completion"]) >= len(r["reference_completion"]) for r in logged
    ]
    record = metrics(tmp_path / "judge")[-1]
    assert record["online/policy_win_rate"] == pytest.approx(
        sum(r["policy_won"] for r in logged) / len(logged)
    )


# ----------------------------------------------------------------------------------------- PPO on the scaffold


def test_ppo_loss_is_rto_without_its_dpo_reward_and_the_critic_has_its_own_rate(
    tiny_model_dir, gold_task_dir, tmp_path
):
    prompts = f"data.train={gold_task_dir / 'prompts_train.jsonl'}"
    common = [prompts, "train.max_steps=2", "ppo.critic_learning_rate=3e-3"]
    _run("recipes/tiny/rto.yaml", tiny_model_dir, tmp_path / "rto", *common, *RTO_AS_PPO)
    _run("recipes/tiny/ppo.yaml", tiny_model_dir, tmp_path / "ppo", *common, *PPO_SMALL)
    rto, ppo = metrics(tmp_path / "rto"), metrics(tmp_path / "ppo")
    assert len(rto) == len(ppo) == 2
    for a, b in zip(rto, ppo):
        for key in (
            "loss",
            "ppo/policy_loss",
            "ppo/value_loss",
            "ppo/returns",
            "grad_norm",
            "critic/grad_norm",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["rto/total_reward"] == pytest.approx(b["ppo/total_reward"], abs=1e-6)
        assert (a["learning_rate"], a["critic/learning_rate"]) == (pytest.approx(1e-3), pytest.approx(3e-3))


def test_ppo_stops_on_non_finite_updates_with_the_offline_message(tiny_model_dir, gold_task_dir, tmp_path):
    with pytest.raises(
        TrainingDiverged,
        match=r"2 consecutive optimizer steps had a non-finite loss or gradient "
        r"\(train.max_skipped_steps=1\); stopping",
    ):
        _run(
            "recipes/tiny/ppo.yaml",
            tiny_model_dir,
            tmp_path / "nan",
            f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
            *PPO_SMALL,
            "train.max_steps=4",
            "train.max_skipped_steps=1",
            "reward.function=tests.online_helpers:nan_reward",
        )


def test_ppo_gradient_accumulation_equals_a_bigger_minibatch(tiny_model_dir, gold_task_dir, tmp_path):
    prompts = f"data.train={gold_task_dir / 'prompts_train.jsonl'}"
    _run("recipes/tiny/ppo.yaml", tiny_model_dir, tmp_path / "one", prompts, *PPO_SMALL, "train.max_steps=2")
    _run(
        "recipes/tiny/ppo.yaml",
        tiny_model_dir,
        tmp_path / "acc",
        prompts,
        *PPO_SMALL,
        "train.max_steps=2",
        "ppo.minibatch_size=2",
        "train.gradient_accumulation_steps=2",
    )
    one, acc = metrics(tmp_path / "one"), metrics(tmp_path / "acc")
    for a, b in zip(
        one, acc
    ):  # step 2 samples from the updated policy: equal only if the update was the same
        for key in ("loss", "ppo/policy_loss", "ppo/value_loss", "ppo/total_reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_ppo_resumes_exactly_across_a_rollout_boundary(tiny_model_dir, gold_task_dir, tmp_path):
    common = [
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        *PPO_SMALL,
        "ppo.minibatch_size=2",
        "loss.kl_coef=0.05",
        "ppo.adaptive_kl_target=0.001",
        "ppo.adaptive_kl_horizon=4",
        "train.save_steps=1",
        "train.max_steps=3",
        "train.save_total_limit=null",
    ]
    _run("recipes/tiny/ppo.yaml", tiny_model_dir, tmp_path / "full", *common)
    full = metrics(tmp_path / "full")
    assert full[0]["ppo/kl_coef"] == pytest.approx(0.05) and full[1]["ppo/kl_coef"] != pytest.approx(0.05)
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    _run(
        "recipes/tiny/ppo.yaml",
        tiny_model_dir,
        tmp_path / "resumed",
        *common,
        "overwrite_output_dir=false",
        "train.resume_from=latest",
    )
    resumed = metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed):
        for key, value in a.items():
            if isinstance(value, float) and key != "tokens_per_second":
                assert b[key] == pytest.approx(value, abs=1e-6), key


def test_ppo_evaluates_reward_and_kl_on_eval_prompts(tiny_model_dir, gold_task_dir, tmp_path):
    result = _run(
        "recipes/tiny/ppo.yaml",
        tiny_model_dir,
        tmp_path / "eval",
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        *PPO_SMALL,
        "train.max_steps=1",
        "train.learning_rate=0",
        f"data.eval={gold_task_dir / 'prompts_heldout.jsonl'}",
        "data.max_samples=16",
    )
    record = result.eval_metrics
    assert record["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # learning rate 0: the policy is the reference
    assert -1.0 <= record["eval/reward"] <= 1.0 and record["eval/response_length"] > 0
    assert [m for m in metrics(tmp_path / "eval") if "eval/reward" in m][-1]["eval/kl"] == record["eval/kl"]


# ----------------------------------------------------------------------------------------- numbers on rollouts


@pytest.fixture(scope="module")
def dpo_policy(tiny_model_dir, gold_task_dir, tmp_path_factory):
    """A policy that differs from the tiny model (its reference): a few large DPO steps."""
    out = tmp_path_factory.mktemp("dpo")
    _run(
        "recipes/tiny/dpo.yaml",
        tiny_model_dir,
        out,
        f"data.train={gold_task_dir / 'pairs_train.jsonl'}",
        "train.max_steps=3",
        "train.per_device_batch_size=8",
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0",
    )
    return out / "final"


def _completion_logps(model_dir, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed completion log-probs, computed from scratch with a plain transformers forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def test_rto_token_rewards_sum_to_the_dpo_log_ratio_on_rollouts(
    tiny_model_dir, dpo_policy, gold_task_dir, tmp_path
):
    from prefopt.trainer.loop import Trainer

    config = _config(
        "recipes/tiny/rto.yaml",
        tiny_model_dir,
        tmp_path / "rto",
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        *PPO_SMALL,
        f"ppo.dpo_policy={dpo_policy}",
        "loss.dpo_reward_scale=0.05",
        "loss.dpo_reward_clip=1e6",
        "loss.kl_coef=0",
        "loss.rm_weight=0",
    )
    trainer = Trainer(config)
    data = trainer.step_fn.rollout(next(iter(trainer.epoch_loader(0))))
    args = (data["input_ids"].cpu(), data["attention_mask"].cpu(), data["completion_mask"].cpu())
    expected = 0.05 * (_completion_logps(dpo_policy, *args) - _completion_logps(tiny_model_dir, *args))
    assert expected.abs().max() > 1e-3  # the two models differ, so the check has teeth
    torch.testing.assert_close(data["rewards"].sum(-1).float().cpu(), expected, atol=2e-5, rtol=0)
    assert data["metrics"]["rto/total_reward"] == pytest.approx(float(expected.mean()), abs=2e-5)
    trainer.accelerator.end_training()


def test_hypo_logged_kl_matches_the_exact_kl_on_one_token_completions(
    tiny_model_dir, dpo_policy, gold_task_dir, tmp_path
):
    """With one-token completions KL(pi || ref) of a prompt is a sum over the vocabulary: the logged estimate from
    ``samples_per_prompt`` policy samples must agree within 4 standard errors."""
    from transformers import AutoModelForCausalLM

    from prefopt.trainer.loop import Trainer

    samples = 256
    config = _config(
        "recipes/tiny/hypo.yaml",
        dpo_policy,
        tmp_path / "hypo",
        f"data.train={gold_task_dir / 'pairs_train.jsonl'}",
        f"reference.name_or_path={tiny_model_dir}",
        "generation.max_new_tokens=1",
        f"loss.samples_per_prompt={samples}",
        "train.max_steps=1",
        "train.per_device_batch_size=1",
        "generation.batch_size=256",
    )
    trainer = Trainer(config)
    prompt = torch.tensor([next(iter(trainer.epoch_loader(0)))["prompt_input_ids"][0]])
    with torch.no_grad():
        policy, reference = (
            torch.log_softmax(
                AutoModelForCausalLM.from_pretrained(path).eval()(prompt).logits[0, -1].double(), -1
            )
            for path in (dpo_policy, tiny_model_dir)
        )
    p = policy.exp()
    exact = float((p * (policy - reference)).sum())
    spread = math.sqrt(float((p * (policy - reference) ** 2).sum()) - exact**2)
    trainer.run()
    logged = metrics(tmp_path / "hypo")[0]["online/kl"]
    assert exact > 1e-3
    assert abs(logged - exact) < 4 * spread / math.sqrt(samples), (logged, exact, spread)


# ----------------------------------------------------------------------------------------- 2 processes = 1


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("method", ["hypo", "xpo", "rto"])
def test_two_processes_sample_and_train_like_one(method, tiny_model_dir, dpo_policy, gold_task_dir, tmp_path):
    """Per-prompt sampling seeds: the same prompts get the same samples on 1 or 2 ranks, so losses agree. RTO runs
    one minibatch per rollout (the minibatch is then the same rows on 1 and 2 ranks) with adaptive KL, whose
    controller reads the KL of all ranks."""
    import os
    import subprocess
    import sys

    data = gold_task_dir / ("pairs_train.jsonl" if method == "hypo" else "prompts_train.jsonl")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.train={data}",
        "data.eval=null",
        "overwrite_output_dir=true",
        "logging.progress=false",
        "logging.logging_steps=1",
        "logging.sample_steps=null",
        "generation.max_new_tokens=8",
        "train.max_steps=2",
        "train.learning_rate=1e-3",
        "train.warmup_ratio=0",
    ]
    if method == "rto":
        overrides += [
            f"ppo.dpo_policy={dpo_policy}",
            "ppo.epochs=2",
            "ppo.adaptive_kl_target=0.001",
            "ppo.adaptive_kl_horizon=4",
            "loss.kl_coef=0.05",
        ]
        single, per_rank = (
            ["ppo.rollout_batch_size=8", "ppo.minibatch_size=8"],
            ["ppo.rollout_batch_size=4", "ppo.minibatch_size=4"],
        )
    else:
        single, per_rank = ["train.per_device_batch_size=8"], ["train.per_device_batch_size=4"]
    recipe = REPO / f"recipes/tiny/{method}.yaml"
    train(load_config(recipe, [*overrides, f"output_dir={tmp_path / 'one'}", *single]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29513",  # a port of its own: test_sharded.py counts up from 29541
    ]
    done = subprocess.run(
        [
            *launcher,
            "-m",
            "prefopt",
            "train",
            str(recipe),
            *overrides,
            f"output_dir={tmp_path / 'two'}",
            *per_rank,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["world_size"] == 2
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    # Token-weighted means (clip fractions, approx KL, returns/values per token) are averaged per rank and then over
    # ranks, which weighs each rank's tokens by 1/its token count: they differ from one process's token mean by
    # design, not because training differs. Everything else -- losses, gradient norms, rewards, KL, kl_coef -- must
    # agree.
    token_means = {
        "ppo/clip_fraction",
        "ppo/value_clip_fraction",
        "ppo/approx_kl",
        "ppo/returns",
        "ppo/values",
    }
    keys = [
        k
        for k in one[0]
        if isinstance(one[0][k], float) and k not in {"tokens_per_second", "epoch", *token_means}
    ]
    assert {"loss", "grad_norm"} <= set(keys)
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-4), (method, key)
