"""DR-PO: the reset sampler and the PPO loss with forced-prefix tokens left out of the policy term (worked
numbers in docs/losses.md, drpo)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from prefopt.losses import LossInputs
from prefopt.losses.drpo import DRPOLoss, sample_reset_lengths

D = torch.float64


def worked_inputs(reset: bool) -> LossInputs:
    advantages = torch.tensor([[0.5, -0.2, 1.0, -0.5, 0.3]], dtype=D)
    old = torch.zeros(1, 5, dtype=D)
    new = torch.tensor([[0.1, 0.0, 0.3, -0.1, -0.25]], dtype=D, requires_grad=True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    reset_mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool) if reset else None
    return LossInputs(
        response_mask=mask,
        policy_token_logps=new,
        old_token_logps=old,
        advantages=advantages,
        reset_mask=reset_mask,
    )


def test_policy_loss_skips_the_forced_prefix():
    # T=5, k=2 forced; per-token max(-A r, -A clip(r)) = [-0.552585, 0.2, -1.2, 0.452419, -0.233640]
    masked = DRPOLoss()(worked_inputs(reset=True))
    assert masked.loss.item() == pytest.approx(-0.327074, abs=1e-6)
    assert masked.metrics["drpo/reset_tokens"] == pytest.approx(0.4)
    plain = DRPOLoss()(worked_inputs(reset=False))
    assert plain.loss.item() == pytest.approx(-0.266761, abs=1e-6)
    inputs = worked_inputs(reset=True)
    DRPOLoss()(inputs).loss.backward()
    assert (
        inputs.policy_token_logps.grad[0, :2].abs().max().item() == 0.0
    )  # no gradient through forced tokens


def test_token_rewards_are_the_kl_penalty_plus_the_final_score():
    from prefopt.losses.ppo import RolloutTokens

    old = torch.tensor([[0.2, 0.1, 0.05, -0.1, 0.3]], dtype=D)  # KL = old - ref with ref = 0
    loss = DRPOLoss(kl_coef=0.05)
    rollout = RolloutTokens(
        policy_logps=old,
        reference_logps=torch.zeros_like(old),
        scores=torch.tensor([1.3], dtype=D),
        mask=torch.ones(1, 5, dtype=torch.bool),
    )
    rewards = loss.token_rewards(rollout, loss.initial_kl_coef()).rewards
    assert rewards[0].tolist() == pytest.approx([-0.01, -0.005, -0.0025, 0.005, 1.285], abs=1e-12)
    assert loss.reset_lengths([1, 5], random.Random(0))[0] == 0 and loss.prefix_in_response()


def test_reset_lengths_are_uniform_on_1_to_l_minus_1():
    rng = random.Random(0)
    draws = sample_reset_lengths([5] * 8000, 1.0, rng)
    counts = Counter(draws)
    assert set(counts) == {1, 2, 3, 4} and all(abs(c / 8000 - 0.25) < 0.02 for c in counts.values())
    half = sample_reset_lengths([5] * 8000, 0.5, random.Random(1))
    assert abs(half.count(0) / 8000 - 0.5) < 0.02
    assert sample_reset_lengths([1, 0], 1.0, rng) == [0, 0]  # nothing to reset to


def test_value_loss_still_covers_the_prefix():
    inputs = worked_inputs(reset=True)
    inputs.values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=D, requires_grad=True)
    inputs.old_values = inputs.values.detach().clone()
    inputs.returns = torch.zeros(1, 5, dtype=D)
    out = DRPOLoss(value_loss_coef=0.1)(inputs)
    # 0.5 * mean(v^2) over all 5 tokens = 0.5 * 0.11 = 0.055
    assert out.metrics["ppo/value_loss"] == pytest.approx(0.055)
    assert out.loss.item() == pytest.approx(-0.327074 + 0.1 * 0.055, abs=1e-6)


class EchoGenerator:
    """Continues every context with the tokens 7, 8, 9, ... then EOS (3): a deterministic backend stand-in."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def generate(self, prompt_ids, sampling):
        from prefopt.generation import build_rollouts

        self.seen = [list(p) for p in prompt_ids]
        completions = [[7, 8, 9, 10, 11, 3][: sampling.max_new_tokens] for _ in prompt_ids]
        return build_rollouts(prompt_ids, completions, 1, eos_ids=[3], pad_id=0, tokenizer=self.tokenizer)


@pytest.mark.parametrize("prefix_in_response", [True, False])
def test_rollouts_continue_from_the_dataset_prefix(tiny_tokenizer, prefix_in_response):
    from prefopt.generation import SamplingParams
    from prefopt.generation.resets import generate_with_resets

    generator = EchoGenerator(tiny_tokenizer)
    out = generate_with_resets(
        generator,
        [[1, 2], [1, 5]],
        [[20, 21], []],
        SamplingParams(max_new_tokens=5),
        eos_ids=[3],
        pad_id=0,
        tokenizer=tiny_tokenizer,
        prefix_in_response=prefix_in_response,
    )
    assert generator.seen == [[1, 2, 20, 21], [1, 5]]  # the backend continues prompt + prefix
    lengths = out.rollouts.completion_lengths.tolist()
    if prefix_in_response:
        # budget 5: 2 forced + 3 sampled (unfinished); the unreset row samples 5
        assert out.rollouts.completion_ids[0, :5].tolist() == [20, 21, 7, 8, 9] and lengths == [5, 5]
        assert out.reset_mask.tolist()[0][:5] == [1, 1, 0, 0, 0] and out.reset_mask[1].sum() == 0
        assert out.rollouts.prompt_ids[0] == [1, 2]
    else:
        assert out.rollouts.prompt_ids[0] == [1, 2, 20, 21] and lengths == [3, 5]
        assert out.reset_mask.sum() == 0
    assert not out.rollouts.finished.any()
    assert out.texts[0] == tiny_tokenizer.decode(
        [20, 21, 7, 8, 9], skip_special_tokens=True
    )  # the RM sees both
    assert out.reset_lengths == [2, 0]


def _sft_rows(path, rows):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _drpo(tmp_path, tiny_model_dir, data, *overrides):
    from prefopt.cli import main
    from tests.trainer_helpers import REPO

    return main(
        [
            "train",
            str(REPO / "recipes/tiny/drpo.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "ppo.rollout_batch_size=4",
            "ppo.minibatch_size=4",
            "ppo.epochs=1",
            "generation.max_new_tokens=10",
            "logging.logging_steps=1",
            "logging.sample_steps=1",
            "logging.progress=false",
            *overrides,
        ]
    )


@pytest.mark.parametrize("prefix", ["response", "context"])
def test_drpo_rollouts_restart_from_dataset_prefixes(tmp_path, tiny_model_dir, prefix):
    import json

    completion = " the film was great and the music was lovely and the cast was superb."
    rows = [{"prompt": f"Notes on the film {i}:", "completion": completion} for i in range(8)]
    data = _sft_rows(tmp_path / "sft.jsonl", rows)
    assert _drpo(tmp_path, tiny_model_dir, data, f"loss.reset_prefix={prefix}") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "drpo/reset_share" in r]
    assert train and all(
        r["drpo/reset_share"] == 1.0 for r in train
    )  # reset_prob 1, every response >= 2 tokens
    if prefix == "response":
        assert all(
            0 < r["drpo/reset_tokens"] < 1 for r in train
        )  # forced tokens: in the response, not in the loss
    else:
        assert all(r["drpo/reset_tokens"] == 0 for r in train)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    texts = [s["completion"] for s in samples]
    # what the reward scored starts with the dataset's first word: each rollout continued a dataset prefix
    assert texts and all(text.lstrip().startswith("the") for text in texts)


def test_drpo_row_without_a_completion_exits_2(tmp_path, tiny_model_dir, capsys):
    data = _sft_rows(tmp_path / "sft.jsonl", [{"prompt": "p:", "completion": " the film."}, {"prompt": "q:"}])
    assert _drpo(tmp_path, tiny_model_dir, data) == 2
    err = capsys.readouterr().err
    assert 'sft.jsonl line 2: field "completion" is missing' in err and "Traceback" not in err
