"""LD-DPO and WPO through the trainer on the tiny model: the logged first-step numbers equal a brute-force
computation from the full logits of the same batch (one batch of 8 pairs, no shuffling, policy == reference)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prefopt.config import load_config
from prefopt.data import PairCollator, build_datasets
from prefopt.trainer.setup import load_run_tokenizer
from tests.trainer_helpers import REPO, metrics, run, write_pairs

ONE_BATCH = ("data.shuffle=false", "train.max_steps=1", "train.per_device_batch_size=8")


def _first_batch(model_dir: Path, data: Path, cache: Path) -> dict:
    config = load_config(
        REPO / "recipes/tiny/dpo.yaml",
        [f"model.name_or_path={model_dir}", f"data.train={data}", "data.eval=null", "data.shuffle=false"],
    )
    tokenizer = load_run_tokenizer(config)
    bundle = build_datasets(config.data, tokenizer, "pairs", seed=config.seed, cache_dir=str(cache))
    return PairCollator(tokenizer.pad_token_id)([bundle.train[i] for i in range(8)])


def _brute_force(model_dir: Path, batch: dict) -> list[dict]:
    """Per sequence: the completion tokens' log-probs and log sum_v p(v)^2, from one full-logits forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_probs = torch.log_softmax(logits, -1)
    out = []
    for row in range(batch["input_ids"].shape[0]):
        positions = [t for t in range(1, batch["input_ids"].shape[1]) if batch["completion_mask"][row, t]]
        tokens = [float(log_probs[row, t - 1, batch["input_ids"][row, t]]) for t in positions]
        squares = [float(torch.log((log_probs[row, t - 1].exp() ** 2).sum())) for t in positions]
        out.append({"tokens": tokens, "squares": squares})
    return out


@pytest.fixture(scope="module")
def pairs_and_truth(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("modifiers")
    data = write_pairs(root / "pairs.jsonl", rows=8)
    batch = _first_batch(tiny_model_dir, data, root / "cache")
    return data, _brute_force(tiny_model_dir, batch)


def test_ld_dpo_first_step_logps_are_the_desensitised_sums(tiny_model_dir, pairs_and_truth, tmp_path):
    data, truth = pairs_and_truth
    run(tiny_model_dir, data, tmp_path / "ld", *ONE_BATCH, "loss.ld_alpha=0.25")
    first = metrics(tmp_path / "ld")[0]
    expected = {"chosen": [], "rejected": []}
    for i in range(8):
        chosen, rejected = truth[i]["tokens"], truth[8 + i]["tokens"]
        shared = min(len(chosen), len(rejected))
        for side, tokens in (("chosen", chosen), ("rejected", rejected)):
            expected[side].append(sum(tokens[:shared]) + 0.25 * sum(tokens[shared:]))
    assert any(len(truth[i]["tokens"]) != len(truth[8 + i]["tokens"]) for i in range(8))  # LD has work to do
    for side in ("chosen", "rejected"):
        assert first[f"logps/{side}"] == pytest.approx(sum(expected[side]) / 8, abs=1e-4)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1


def test_wpo_first_step_weight_and_loss(tiny_model_dir, pairs_and_truth, tmp_path):
    data, truth = pairs_and_truth
    run(tiny_model_dir, data, tmp_path / "wpo", *ONE_BATCH, "loss.wpo_weighting=true")
    first = metrics(tmp_path / "wpo")[0]

    def weight(sequence: dict) -> float:
        aligned = [t - s for t, s in zip(sequence["tokens"], sequence["squares"])]
        return math.exp(sum(aligned) / len(aligned))

    weights = [weight(truth[i]) * weight(truth[8 + i]) for i in range(8)]
    assert first["wpo/weight"] == pytest.approx(sum(weights) / 8, rel=1e-4)
    # every pair's DPO loss is ln 2 at step 1, so the weighted mean is ln 2 times the mean weight
    assert first["loss"] == pytest.approx(math.log(2) * sum(weights) / 8, rel=1e-4)


def test_ld_dpo_precomputed_reference_trains_like_the_live_one(tiny_model_dir, pairs_and_truth, tmp_path):
    data, _ = pairs_and_truth
    common = ("data.shuffle=false", "train.max_steps=3", "train.per_device_batch_size=4", "loss.ld_alpha=0.5")
    run(tiny_model_dir, data, tmp_path / "live", *common, "reference.mode=model")
    run(tiny_model_dir, data, tmp_path / "pre", *common, "reference.mode=precomputed")
    live = [m["loss"] for m in metrics(tmp_path / "live") if "loss" in m]
    pre = [m["loss"] for m in metrics(tmp_path / "pre") if "loss" in m]
    assert len(live) == 3 and live == pytest.approx(pre, abs=1e-6)
    assert live[1] != pytest.approx(math.log(2), abs=1e-4)  # it trained: the reference tails mattered


def test_ld_dpo_and_wpo_packed_batches_train_like_padded_ones(tiny_model_dir, pairs_and_truth, tmp_path):
    # Packed rows number their sequences (sequence_ids): the tails and the aligned sums are scattered by id.
    data, _ = pairs_and_truth
    common = (
        "data.shuffle=false",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        "loss.ld_alpha=0.3",
        "loss.wpo_weighting=true",
    )
    run(tiny_model_dir, data, tmp_path / "padded", *common)
    run(tiny_model_dir, data, tmp_path / "packed", *common, "data.packing=true")
    padded = [
        (m["loss"], m["wpo/weight"], m["logps/rejected"]) for m in metrics(tmp_path / "padded") if "loss" in m
    ]
    packed = [
        (m["loss"], m["wpo/weight"], m["logps/rejected"]) for m in metrics(tmp_path / "packed") if "loss" in m
    ]
    assert len(padded) == 2
    for ours, theirs in zip(packed, padded):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
