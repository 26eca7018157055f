"""End-to-end trainer behaviour on the tiny model (every loss learning: test_loss_e2e.py): ln 2 at step 0,
accumulation equals a larger batch, resume is exact, the reference modes agree, non-finite steps are skipped,
LoRA saves an adapter."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from prefopt.trainer import checkpoint as ckpt
from tests.trainer_helpers import losses, metrics, run, write_pairs, write_sft


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows=128)


# Every registered loss (and its parameter variants) is trained end to end in tests/test_loss_e2e.py.


def test_dpo_starts_at_ln2_and_logs_the_contract(tiny_model_dir, pairs, tmp_path):
    run(tiny_model_dir, pairs, tmp_path / "run", "train.max_steps=2")
    first = metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in (
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "tokens_per_second",
        "train/skipped_steps",
    ):
        assert key in first


def test_gradient_accumulation_equals_the_larger_batch(tiny_model_dir, pairs, tmp_path):
    run(tiny_model_dir, pairs, tmp_path / "big", "train.max_steps=4", "train.per_device_batch_size=8")
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "acc",
        "train.max_steps=4",
        "train.per_device_batch_size=4",
        "train.gradient_accumulation_steps=2",
    )
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=2e-5)


def test_resume_continues_exactly(tiny_model_dir, pairs, tmp_path):
    # 16 rows per epoch x 8 batch -> epochs roll over mid-run, so data position and reshuffling are exercised too.
    small = write_pairs(tmp_path / "small.jsonl", rows=24)
    full = tmp_path / "full"
    run(tiny_model_dir, small, full, "train.max_steps=6", "train.save_steps=3", "train.save_total_limit=null")
    assert [p.name for p in ckpt.list_checkpoints(full)] == ["checkpoint-3", "checkpoint-6"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run(
        tiny_model_dir,
        small,
        resumed,
        "train.max_steps=6",
        "train.save_steps=3",
        "train.resume_from=latest",
        "overwrite_output_dir=false",
    )
    assert losses(resumed) == pytest.approx(losses(full)[3:], abs=1e-6)
    state = json.loads((full / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["epoch"] >= 1


def test_partial_checkpoint_is_never_latest(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / ckpt.STATE_FILE).write_text("{}")
    save_file({"w": torch.zeros(2)}, tmp_path / "checkpoint-2" / "model.safetensors")
    torch.save({"state": {}}, tmp_path / "checkpoint-2" / "optimizer.bin")
    (tmp_path / "checkpoint-4.partial").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-6").mkdir()  # no trainer_state.json: incomplete
    assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"


def test_reference_modes_give_the_same_losses(tiny_model_dir, pairs, tmp_path):
    run(tiny_model_dir, pairs, tmp_path / "model", "train.max_steps=4", "reference.mode=model")
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "pre",
        "train.max_steps=4",
        "reference.mode=precomputed",
        f"reference.cache_dir={tmp_path / 'cache'}",
    )
    assert losses(tmp_path / "pre") == pytest.approx(losses(tmp_path / "model"), abs=1e-5)
    cached = list((tmp_path / "cache").glob("reference-*.safetensors"))
    assert len(cached) == 1
    # Second run reuses the cache (same key) and still agrees.
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "pre2",
        "train.max_steps=4",
        "reference.mode=precomputed",
        f"reference.cache_dir={tmp_path / 'cache'}",
    )
    assert len(list((tmp_path / "cache").glob("reference-*.safetensors"))) == 1
    assert losses(tmp_path / "pre2") == pytest.approx(losses(tmp_path / "model"), abs=1e-5)


def test_lora_adapter_reference_matches_a_frozen_base(tiny_model_dir, pairs, tmp_path):
    lora = ["model.peft.r=4", "model.peft.alpha=8", "train.max_steps=4"]
    run(tiny_model_dir, pairs, tmp_path / "adapter", *lora, "reference.mode=adapter")
    run(tiny_model_dir, pairs, tmp_path / "model", *lora, "reference.mode=model")
    assert losses(tmp_path / "adapter") == pytest.approx(losses(tmp_path / "model"), abs=1e-5)
    assert losses(tmp_path / "adapter")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "adapter" / "final" / "adapter_config.json").is_file()


def test_non_finite_steps_are_skipped_then_stop(tiny_model_dir, pairs, tmp_path, monkeypatch):
    from prefopt.losses.dpo import DPOLoss
    from prefopt.trainer import TrainingDiverged

    original = DPOLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, inputs):
        calls["n"] += 1
        output = original(self, inputs)
        if calls["n"] == 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(DPOLoss, "forward", sometimes_nan)
    run(tiny_model_dir, pairs, tmp_path / "skip", "train.max_steps=4")
    last = metrics(tmp_path / "skip")[-1]
    assert last["train/skipped_steps"] == 1
    monkeypatch.setattr(
        DPOLoss,
        "forward",
        lambda self, i: type(original(self, i))(loss=original(self, i).loss * float("nan"), metrics={}),
    )
    with pytest.raises(TrainingDiverged, match="max_skipped_steps"):
        run(tiny_model_dir, pairs, tmp_path / "stop", "train.max_steps=6", "train.max_skipped_steps=2")


def test_sft_and_reward_model_objectives_learn(tiny_model_dir, pairs, tmp_path):
    sft = write_sft(tmp_path / "sft.jsonl")
    run(
        tiny_model_dir,
        sft,
        tmp_path / "sft",
        "loss.name=sft",
        "train.max_steps=15",
        "data.format=sft",
        "train.learning_rate=3e-3",
        recipe="recipes/tiny/sft.yaml",
    )
    sft_losses = losses(tmp_path / "sft")
    assert sft_losses[-1] < sft_losses[0] * 0.8
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "rm",
        "loss.name=reward_model",
        "train.max_steps=10",
        recipe="recipes/tiny/reward_model.yaml",
    )
    records = metrics(tmp_path / "rm")
    assert records[-1]["rewards/accuracies"] >= 0.75 and records[-1]["loss"] < records[0]["loss"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert model.config.num_labels == 1
    assert torch.isfinite(next(model.parameters())).all()


def test_eval_split_logs_the_same_metrics_prefixed(tiny_model_dir, pairs, tmp_path):
    result = run(
        tiny_model_dir,
        pairs,
        tmp_path / "run",
        "train.max_steps=4",
        "train.eval_steps=2",
        f"data.eval={pairs}",
        "data.max_samples=64",
    )
    evals = [m for m in metrics(tmp_path / "run") if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4]  # every eval_steps; the last step is not evaluated twice
    train_keys = {k for k in metrics(tmp_path / "run")[0] if k.startswith(("rewards/", "logps/"))}
    assert {f"eval/{k}" for k in train_keys} <= set(evals[-1])
    assert result.eval_metrics["eval/rewards/accuracies"] == evals[-1]["eval/rewards/accuracies"]


def test_speed_switches_keep_the_losses(tiny_model_dir, pairs, tmp_path):
    """The lm-head implementation and the fused optimizer are speed switches: same losses either way."""
    run(tiny_model_dir, pairs, tmp_path / "fast", "train.max_steps=3")
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "plain",
        "train.max_steps=3",
        "train.logps_head=checkpoint",
        "train.fused_optimizer=false",
        "train.logps_chunk_size=null",
    )
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "plain"), abs=2e-5)
    run(tiny_model_dir, pairs, tmp_path / "grouped", "train.max_steps=3", "data.group_by_length=true")
    assert losses(tmp_path / "grouped")[0] == pytest.approx(math.log(2), abs=1e-6)
