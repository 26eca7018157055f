"""CoPG, TPO and SRPO end to end on the tiny model and the small gold task: the first step's logged loss
equals an
independent computation (a plain Hugging Face forward, not prefopt's data or logps code), and each method
learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer_helpers import metrics, run

BATCH = 8


def completion_logps(
    model_dir, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of log pi(completion + EOS | prompt), one sequence at a time, from the HF model."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    sums, counts = [], []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logps = F.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
        sums.append(logps[len(prompt_ids) - 1 :].sum())
        counts.append(len(completion_ids))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


def first_rows(path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def train(tiny_model_dir, data, out, recipe, *overrides):
    return run(
        tiny_model_dir,
        data,
        out,
        "data.shuffle=false",
        f"train.per_device_batch_size={BATCH}",
        "train.learning_rate=5e-4",
        *overrides,
        recipe=recipe,
    )


def test_copg_starts_at_zero_and_raises_its_objective(tiny_model_dir, gold_task_dir, tmp_path):
    train(
        tiny_model_dir,
        gold_task_dir / "pairs_train.jsonl",
        tmp_path / "run",
        "recipes/tiny/copg.yaml",
        "train.max_steps=8",
        "loss.beta=0.5",
    )
    records = metrics(tmp_path / "run")
    rows = first_rows(gold_task_dir / "pairs_train.jsonl", BATCH)
    # policy == reference at step 0: d = 0, so the loss (and the objective) is exactly 0; dr is the data's.
    assert records[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    margin = sum(r["chosen_score"] - r["rejected_score"] for r in rows) / BATCH
    assert records[0]["copg/reward_margin"] == pytest.approx(margin, abs=1e-6)
    assert records[-1]["loss"] < -0.05  # the objective dr*d - (beta/2) d^2 grew
    assert records[-1]["rewards/margins"] > 0


def test_tpo_first_step_matches_an_independent_computation(tiny_model_dir, gold_task_dir, tmp_path):
    train(
        tiny_model_dir,
        gold_task_dir / "rated_train.jsonl",
        tmp_path / "run",
        "recipes/tiny/tpo.yaml",
        "train.max_steps=8",
    )
    records = metrics(tmp_path / "run")
    gold, chosen, rejected, prompts = [], [], [], []
    for row in first_rows(gold_task_dir / "rated_train.jsonl", BATCH):
        ranked = sorted(row["completions"], key=lambda c: -c["score"])  # gold, second, ..., worst
        prompts.append(row["prompt"])
        gold.append(ranked[0]["text"])
        chosen.append(ranked[1]["text"])
        rejected.append(ranked[-1]["text"])

    def tpo_loss(model_dir):
        w, _ = completion_logps(model_dir, prompts, chosen)
        lose, _ = completion_logps(model_dir, prompts, rejected)
        g, g_len = completion_logps(model_dir, prompts, gold)
        nll = -g.sum() / g_len.sum()
        return -F.logsigmoid(0.1 * (w - lose)).mean() + 1.0 * nll, nll

    expected, nll = tpo_loss(tiny_model_dir)
    assert records[0]["tpo/gold_nll"] == pytest.approx(nll.item(), rel=1e-4)
    assert records[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    after, _ = tpo_loss(tmp_path / "run" / "final")  # the same first batch, scored by the trained model
    assert after.item() < expected.item() - 0.1


def test_srpo_starts_at_its_closed_form_and_learns_to_revise(tiny_model_dir, gold_task_dir, tmp_path):
    train(
        tiny_model_dir,
        gold_task_dir / "pairs_train.jsonl",
        tmp_path / "run",
        "recipes/tiny/srpo.yaml",
        "train.max_steps=8",
        "reference.mode=precomputed",
    )
    records = metrics(tmp_path / "run")
    # All six log-ratios are 0 at step 0: L_imp = 1/4 + 1/4, L_gen = 1, loss = 0.2 * 1 + 0.8 * 0.5 = 0.6.
    assert records[0]["srpo/improve_loss"] == pytest.approx(0.5, abs=1e-6)
    assert records[0]["srpo/generate_loss"] == pytest.approx(1.0, abs=1e-6)
    assert records[0]["loss"] == pytest.approx(0.6, abs=1e-6)
    assert records[-1]["loss"] < 0.6
    assert records[-1]["srpo/revision_margin"] > 0
    assert math.isfinite(records[-1]["rewards/margins"])
