"""Online methods end to end on the tiny model: HyPO logs a finite online KL, XPO orders samples with the reward
layer, RTO's PPO stage runs with its token rewards and lineage checks. The slow tests check that XPO and RTO raise
the gold reward on held-out prompts over the SFT model they start from."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from prefopt.config import load_config
from prefopt.errors import ConfigError
from prefopt.trainer import train
from tests.trainer_helpers import REPO, metrics


def _run(recipe: str, model, out, *overrides):
    return train(
        load_config(
            REPO / recipe,
            [
                f"model.name_or_path={model}",
                f"output_dir={out}",
                "overwrite_output_dir=true",
                "logging.progress=false",
                "logging.logging_steps=1",
                "logging.sample_steps=1",
                "generation.max_new_tokens=24",
                *overrides,
            ],
        )
    )


def _run_loss(out):
    """The loss a finished run used, built from its resolved config.yaml (defaults included)."""
    from prefopt.losses import get_loss

    config = load_config(out / "config.yaml")
    return get_loss(config.loss.name, **config.loss.params())


@pytest.fixture(scope="module")
def quick_sft(tiny_model_dir, gold_task_dir, tmp_path_factory):
    """A few SFT steps: enough for the tiny model to emit the task's words and EOS."""
    out = tmp_path_factory.mktemp("sft")
    _run(
        "recipes/tiny/sft.yaml",
        tiny_model_dir,
        out,
        f"data.train={gold_task_dir / 'sft.jsonl'}",
        "train.max_steps=20",
        "train.per_device_batch_size=16",
    )
    return out / "final"


def test_hypo_logs_finite_online_kl(quick_sft, gold_task_dir, tmp_path):
    _run(
        "recipes/tiny/hypo.yaml",
        quick_sft,
        tmp_path,
        f"data.train={gold_task_dir / 'pairs_train.jsonl'}",
        "data.eval=null",
        "train.max_steps=3",
        "train.per_device_batch_size=4",
    )
    records = metrics(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3]
    kl_coef = _run_loss(tmp_path).kl_coef
    for record in records:
        # The logged loss is the objective L_DPO + kl_coef * KL_hat (not the surrogate), per docs/losses.md.
        assert record["loss"] == pytest.approx(record["dpo/loss"] + kl_coef * record["online/kl"], abs=1e-5)
    # Before the first update the policy is the reference: KL 0 and DPO's ln 2.
    assert records[0]["online/kl"] == pytest.approx(0.0, abs=1e-5)
    assert records[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["online/kl"] != records[0]["online/kl"]  # the samples come from the updated policy
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion"} <= set(samples[0])


def test_xpo_orders_pairs_by_the_reward(quick_sft, gold_task_dir, tmp_path):
    _run(
        "recipes/tiny/xpo.yaml",
        quick_sft,
        tmp_path,
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
    )
    records = metrics(tmp_path)
    for key in ("xpo/bonus", "online/model_scores", "online/ref_scores", "online/policy_win_rate"):
        assert key in records[-1]
    from data_tools.synth import score

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for sample in samples:  # the logged scores are the gold reward of the logged texts
        assert sample["score"] == pytest.approx(score(sample["prompt"], sample["completion"]), abs=1e-5)


def test_online_dpo_orders_two_policy_samples_and_logs_trl_metrics(quick_sft, gold_task_dir, tmp_path):
    """Online DPO (TRL's OnlineDPOTrainer): two policy samples per prompt ordered by the gold reward, TRL's metrics."""
    _run(
        "recipes/tiny/online_dpo.yaml",
        quick_sft,
        tmp_path,
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
    )
    records = metrics(tmp_path)
    assert len(records) == 2
    for key in (
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores_margin",
        "rewards/accuracies",
        "logps/chosen",
        "beta",
        "val/contain_eos_token",
    ):
        assert math.isfinite(records[-1][key]), key
    assert records[0]["objective/kl"] == pytest.approx(
        0.0, abs=1e-4
    )  # policy == reference before the first update
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert records[0]["objective/scores_margin"] >= 0  # the chosen sample never scores below the rejected one
    from data_tools.synth import score

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples
    for sample in samples:  # both samples are scored with the gold reward; the first wins ties
        assert sample["score"] == pytest.approx(score(sample["prompt"], sample["completion"]), abs=1e-5)
        assert sample["second_score"] == pytest.approx(
            score(sample["prompt"], sample["second_completion"]), abs=1e-5
        )
        assert sample["first_won"] == (sample["score"] >= sample["second_score"])


def test_online_dpo_with_a_pairwise_judge(quick_sft, gold_task_dir, tmp_path):
    _run(
        "recipes/tiny/online_dpo.yaml",
        quick_sft,
        tmp_path,
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "reward.kind=judge",
        "reward.function=data_tools.synth:judge",
    )
    record = metrics(tmp_path)[-1]
    assert math.isfinite(record["loss"]) and "objective/scores" not in record and "objective/kl" in record


def test_rto_ppo_stage_runs_with_token_rewards(quick_sft, gold_task_dir, tmp_path, caplog):
    dpo = tmp_path / "dpo"
    _run(
        "recipes/tiny/dpo.yaml",
        quick_sft,
        dpo,
        f"data.train={gold_task_dir / 'pairs_train.jsonl'}",
        "data.eval=null",
        "train.max_steps=3",
        "train.per_device_batch_size=4",
    )
    with caplog.at_level(logging.WARNING):
        _run(
            "recipes/tiny/rto.yaml",
            quick_sft,
            tmp_path / "rto",
            f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
            f"ppo.dpo_policy={dpo / 'final'}",
            "train.max_steps=2",
            "ppo.rollout_batch_size=4",
            "ppo.minibatch_size=2",
        )
    # Same SFT model, and a config.yaml to tell: neither lineage warning.
    assert "but the PPO reference is" not in caplog.text and "cannot verify" not in caplog.text
    records = metrics(tmp_path / "rto")
    first, last = records[0], records[-1]
    for key in (
        "rto/dpo_reward",
        "rto/kl",
        "rto/rm_score",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/clip_fraction",
        "ppo/approx_kl",
        "ppo/returns",
        "online/response_length",
        "online/eos_rate",
    ):
        assert math.isfinite(last[key]), key
    rto = _run_loss(tmp_path / "rto")
    kl_coef, clip = rto.kl_coef, rto.dpo_reward_clip
    assert rto.dpo_reward_scale > 0 and rto.rm_weight == 1.0 and abs(last["rto/dpo_reward"]) > 0
    for record in records:
        # Per sequence: sum_t reward_t = sum_t dpo_t - kl_coef * sum_t kl_t + rm_weight (1) * RM score.
        assert record["rto/total_reward"] == pytest.approx(
            record["rto/dpo_reward"] - kl_coef * record["rto/kl"] + record["rto/rm_score"], abs=1e-5
        )
        # Each token's DPO reward is clipped to +-dpo_reward_clip.
        assert abs(record["rto/dpo_reward"]) <= clip * record["online/response_length"] + 1e-6
        assert record["ppo/approx_kl"] >= 0 and 0 <= record["ppo/clip_fraction"] <= 1
    assert first["rto/kl"] == pytest.approx(
        0.0, abs=1e-4
    )  # the first rollout comes from the reference itself
    assert (tmp_path / "rto" / "final" / "model.safetensors").is_file()


def test_rto_lineage_and_plain_ppo(quick_sft, tiny_model_dir, gold_task_dir, tmp_path, caplog):
    prompts = f"data.train={gold_task_dir / 'prompts_train.jsonl'}"
    small = ["train.max_steps=1", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4", "ppo.dpo_policy=null"]
    with pytest.raises(ConfigError, match="dpo_reward_scale=0"):
        _run("recipes/tiny/rto.yaml", quick_sft, tmp_path / "a", prompts, *small)
    _run("recipes/tiny/rto.yaml", quick_sft, tmp_path / "ppo", prompts, *small, "loss.dpo_reward_scale=0")
    assert metrics(tmp_path / "ppo")[-1]["rto/dpo_reward"] == 0.0  # plain PPO: sparse reward only
    # A "DPO policy" that did not come from the reference SFT model is flagged: the SFT model itself was trained
    # from the tiny model, not from the reference (the SFT model).
    with caplog.at_level(logging.WARNING):
        _run(
            "recipes/tiny/rto.yaml",
            quick_sft,
            tmp_path / "b",
            prompts,
            *small[:-1],
            f"ppo.dpo_policy={quick_sft}",
        )
    assert f"was trained from '{tiny_model_dir}', but the PPO reference is" in caplog.text
    assert "cannot verify" not in caplog.text
    # Without a prefopt config.yaml beside it the lineage cannot be told: a different warning says so.
    caplog.clear()
    bare = tmp_path / "bare" / "dpo-model"  # no config.yaml in it or beside it
    shutil.copytree(quick_sft, bare)
    with caplog.at_level(logging.WARNING):
        _run(
            "recipes/tiny/rto.yaml", quick_sft, tmp_path / "c", prompts, *small[:-1], f"ppo.dpo_policy={bare}"
        )
    # (The "cannot verify" message itself says "was trained from the reference"; the mismatch one says "but".)
    assert (
        "cannot verify that the DPO policy" in caplog.text and "but the PPO reference is" not in caplog.text
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["xpo", "online_dpo", "rto"])
def test_online_methods_raise_the_gold_reward(method, tmp_path):
    """Full-size gold task and SFT (minutes on 2 cores): the method beats its starting SFT model on held-out prompts."""
    from data_tools.synth import score, write_task
    from prefopt.evaluate import sample_policy
    from prefopt.models.tiny import build_tiny_model

    task = tmp_path / "task"
    write_task(task, seed=0)
    model = build_tiny_model(tmp_path / "tiny")
    _run("recipes/tiny/sft.yaml", model, tmp_path / "sft", f"data.train={task / 'sft.jsonl'}")
    sft = tmp_path / "sft" / "final"
    overrides = [f"data.train={task / 'prompts_train.jsonl'}", "generation.max_new_tokens=48"]
    if method == "rto":
        _run(
            "recipes/tiny/dpo.yaml",
            sft,
            tmp_path / "dpo",
            f"data.train={task / 'pairs_train.jsonl'}",
            "data.eval=null",
        )
        overrides.append(f"ppo.dpo_policy={tmp_path / 'dpo' / 'final'}")
    _run(f"recipes/tiny/{method}.yaml", sft, tmp_path / method, *overrides, "logging.sample_steps=null")
    heldout = str(task / "prompts_heldout.jsonl")
    before = sample_policy(sft, heldout, score, max_prompts=100, samples_per_prompt=2)
    after = sample_policy(tmp_path / method / "final", heldout, score, max_prompts=100, samples_per_prompt=2)
    assert after.mean_reward > before.mean_reward + 0.03, (before.summary(), after.summary())


def test_ppo_resume_continues_the_adaptive_kl_coefficient(quick_sft, gold_task_dir, tmp_path):
    """The adaptive KL coefficient is training state: a resumed RTO/PPO run starts from the saved value."""
    out = tmp_path / "ppo"
    common = [
        f"data.train={gold_task_dir / 'prompts_train.jsonl'}",
        "ppo.rollout_batch_size=4",
        "ppo.minibatch_size=4",
        "ppo.dpo_policy=null",
        "loss.dpo_reward_scale=0",
        "loss.kl_coef=0.05",
        "ppo.adaptive_kl_target=0.001",
        "ppo.adaptive_kl_horizon=4",
        "train.save_steps=1",
    ]
    _run("recipes/tiny/rto.yaml", quick_sft, out, *common, "train.max_steps=2")
    logged = [m["ppo/kl_coef"] for m in metrics(out) if "ppo/kl_coef" in m]
    saved = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["step_state"]["kl_coef"]
    assert logged[0] == pytest.approx(0.05)
    assert saved != pytest.approx(0.05)  # adapted after step 1
    assert logged[1] == pytest.approx(saved)  # step 2 ran with it
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    _run(
        "recipes/tiny/rto.yaml",
        quick_sft,
        resumed,
        *common,
        "train.max_steps=2",
        "overwrite_output_dir=false",
        "train.resume_from=latest",
    )
    assert [m["ppo/kl_coef"] for m in metrics(resumed) if "ppo/kl_coef" in m] == [pytest.approx(saved)]
