"""RTO / PPO math: token rewards, GAE, whitening and the clipped losses (docs/losses.md, rto)."""

from __future__ import annotations

import pytest
import torch

from prefopt.losses import LossInputs, get_loss
from prefopt.losses.ppo import RolloutTokens
from prefopt.losses.rto import gae, masked_whiten, rto_token_rewards, sequence_mean

F64 = torch.float64


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=F64)


LOGP_OLD = row(-1.2, -0.8, -2.5, -0.3, -3.0, -4.2)
LOGP_REF = row(-1.5, -0.9, -2.0, -0.6, -3.5, -4.5)
LOGP_DPO = row(-1.0, -0.7, -2.8, -0.2, -2.2, -4.9)
RM = torch.tensor([0.8], dtype=F64)
V_OLD = row(0.1, 0.2, 0.15, 0.3, 0.4, 0.6)
MASK = torch.ones(1, 6, dtype=torch.bool)
REWARDS = [0.022, 0.009, -0.035, 0.017, 0.045, 0.777]
ADVANTAGES = [0.623664, 0.528067, 0.599018, 0.509493, 0.413150, 0.177]


def test_token_rewards_worked_example():
    rewards, parts = rto_token_rewards(LOGP_OLD, LOGP_REF, LOGP_DPO, RM, MASK)
    assert rewards[0].tolist() == pytest.approx(REWARDS, abs=1e-12)
    assert parts["dpo"][0, 4].item() == pytest.approx(0.05)  # 0.05 * 1.3 clipped to 0.05
    assert parts["kl"][0].tolist() == pytest.approx([0.3, 0.1, -0.5, 0.3, 0.5, 0.3])
    assert parts["rm"].tolist() == pytest.approx([0.8])


def test_rto_loss_methods_use_its_parameters():
    loss = get_loss("rto")
    rollout = RolloutTokens(
        policy_logps=LOGP_OLD, reference_logps=LOGP_REF, dpo_logps=LOGP_DPO, scores=RM, mask=MASK
    )
    shaped = loss.token_rewards(rollout, loss.initial_kl_coef())
    rewards = shaped.rewards
    assert rewards[0].tolist() == pytest.approx(REWARDS, abs=1e-12)
    assert shaped.kl[0].tolist() == pytest.approx((LOGP_OLD - LOGP_REF)[0].tolist(), abs=1e-12)
    # The coefficient is the step's (adaptive KL), passed in: doubling it doubles the KL part of the reward.
    doubled = loss.token_rewards(rollout, 2 * loss.initial_kl_coef()).rewards
    torch.testing.assert_close(rewards - doubled, 0.01 * (LOGP_OLD - LOGP_REF), rtol=0, atol=1e-12)
    # Plain PPO is RTO without the DPO term.
    ppo = get_loss("ppo").token_rewards(rollout, 0.01).rewards
    no_dpo = get_loss("rto", dpo_reward_scale=0).token_rewards(rollout, 0.01).rewards
    torch.testing.assert_close(ppo, no_dpo, rtol=0, atol=1e-12)
    whitened, returns = loss.advantages(rewards, V_OLD, MASK)
    assert (returns - V_OLD)[0].tolist() == pytest.approx(ADVANTAGES, abs=1e-6)
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert whitened.std().item() == pytest.approx(1.0, abs=1e-6)


def test_rm_score_goes_on_the_last_response_token_and_is_clamped():
    # Right-padded responses of lengths 3, 1 and 0; padding holds garbage (NaN) that must not leak.
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    zeros = torch.zeros(3, 4, dtype=F64)
    garbage = torch.where(mask, zeros, torch.full_like(zeros, float("nan")))
    rewards, _ = rto_token_rewards(garbage, zeros, zeros, torch.tensor([3.0, -25.0, 7.0], dtype=F64), mask)
    assert rewards.tolist() == [[0, 0, 3.0, 0], [-10.0, 0, 0, 0], [0, 0, 0, 0]]


def test_gae_worked_example():
    rewards, _ = rto_token_rewards(LOGP_OLD, LOGP_REF, LOGP_DPO, RM, MASK)
    advantages, returns = gae(rewards, V_OLD, MASK, gamma=1.0, lam=0.95)
    assert advantages[0].tolist() == pytest.approx(ADVANTAGES, abs=1e-6)
    assert torch.allclose(returns, advantages + V_OLD, rtol=0, atol=1e-15)


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE for one unpadded sequence, V past the end = 0."""
    advantages, next_value, next_advantage = [], 0.0, 0.0
    for r, v in zip(reversed(rewards), reversed(values)):
        next_advantage = r + gamma * next_value - v + gamma * lam * next_advantage
        next_value = v
        advantages.append(next_advantage)
    return advantages[::-1]


def test_gae_right_padded_variable_lengths_match_per_sequence_gae():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    rewards = torch.randn(4, 7, generator=g, dtype=F64)
    values = torch.randn(4, 7, generator=g, dtype=F64)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = _gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.8)
        assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
        assert returns[i, :n].tolist() == pytest.approx((advantages[i, :n] + values[i, :n]).tolist())


def test_masked_whiten_statistics_and_options():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    valid = x[mask]
    out = masked_whiten(x, mask)
    assert out[mask].tolist() == pytest.approx(((valid - valid.mean()) / valid.std()).tolist(), abs=1e-6)
    assert out[~mask].abs().sum() == 0
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert kept_mean[mask].mean().item() == pytest.approx(valid.mean().item())
    given = masked_whiten(x, mask, mean=1.0, var=4.0, eps=0.0)
    assert given[mask].tolist() == pytest.approx(((valid - 1.0) / 2.0).tolist())


def test_masked_whiten_reduce_hook_gives_global_statistics():
    # Two "ranks" each holding half of the batch: a reduce that adds the other rank's partial sums must give
    # the same result as whitening the whole batch on one rank.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    full = masked_whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]

    def partials(other_x, other_mask):
        calls = []

        def reduce(tensor):
            other = other_x.masked_fill(~other_mask, 0.0)
            if tensor.ndim == 1:  # (sum, count)
                result = tensor + torch.stack([other.sum(), other_mask.sum().to(F64)])
                calls.append(result)
                return result
            mean = calls[0][0] / calls[0][1]
            return tensor + ((other_x - mean) ** 2).masked_fill(~other_mask, 0.0).sum()

        return reduce

    rank0 = masked_whiten(*halves[0], reduce=partials(*halves[1]))
    rank1 = masked_whiten(*halves[1], reduce=partials(*halves[0]))
    assert torch.allclose(torch.cat([rank0, rank1]), full, rtol=0, atol=1e-12)


def _ppo_inputs() -> tuple[LossInputs, torch.Tensor, torch.Tensor]:
    rewards, _ = rto_token_rewards(LOGP_OLD, LOGP_REF, LOGP_DPO, RM, MASK)
    advantages, returns = gae(rewards, V_OLD, MASK, gamma=1.0, lam=0.95)
    new_logps = (LOGP_OLD + row(0.1, -0.3, 0.25, 0.0, -0.1, 0.05)).requires_grad_()
    new_values = row(0.12, 0.35, 0.05, 0.31, 0.55, 0.70).requires_grad_()
    inputs = LossInputs(
        response_mask=MASK,
        policy_token_logps=new_logps,
        old_token_logps=LOGP_OLD,
        advantages=advantages,  # raw, unwhitened, as in the worked example
        returns=returns,
        values=new_values,
        old_values=V_OLD,
    )
    return inputs, new_logps, new_values


def test_ppo_policy_and_value_loss_worked_example():
    inputs, new_logps, new_values = _ppo_inputs()
    out = get_loss("rto")(inputs)
    assert out.metrics["ppo/policy_loss"] == pytest.approx(-0.478113, abs=1e-6)
    assert out.metrics["ppo/value_loss"] == pytest.approx(0.110053, abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.478113 + 0.110053, abs=2e-6)
    assert out.metrics["ppo/clip_fraction"] == pytest.approx(1 / 6)  # token 3: ratio e^0.25 > 1.2 with A > 0
    assert out.metrics["ppo/value_clip_fraction"] == 0.0
    assert out.metrics["ppo/approx_kl"] > 0
    out.loss.backward()
    assert new_logps.grad[0, 2].item() == 0.0  # the clipped token carries no policy gradient
    assert torch.isfinite(new_values.grad).all()
    scaled = get_loss("rto", value_loss_coef=0.5)(_ppo_inputs()[0])
    assert scaled.loss.item() == pytest.approx(-0.478113 + 0.5 * 0.110053, abs=2e-6)


def test_ppo_without_values_is_policy_loss_only_and_value_clipping_engages():
    inputs, _, _ = _ppo_inputs()
    inputs.values = inputs.old_values = None
    out = get_loss("rto")(inputs)
    assert out.loss.item() == pytest.approx(-0.478113, abs=1e-6) and "ppo/value_loss" not in out.metrics
    inputs, _, new_values = _ppo_inputs()
    inputs.values = V_OLD + 1.0  # every token moves by more than value_clip_eps
    out = get_loss("rto")(inputs)
    assert out.metrics["ppo/value_clip_fraction"] > 0


def test_ppo_losses_average_sequences_not_tokens_and_survive_stale_ratios():
    # Two sequences of lengths 1 and 3: the loss is the mean of the two sequence means.
    x = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 4.0]], dtype=F64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert sequence_mean(x, mask).item() == pytest.approx((2.0 + 2.0) / 2)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert sequence_mean(x, empty).item() == 0.0
    new_logps = torch.tensor([[0.0, 0.0, 0.0], [500.0, -500.0, 0.0]], dtype=F64, requires_grad=True)
    out = get_loss("rto")(
        LossInputs(
            response_mask=mask,
            policy_token_logps=new_logps,
            old_token_logps=torch.zeros(2, 3, dtype=F64),
            advantages=torch.tensor([[1.0, 0, 0], [-1.0, 1.0, 1.0]], dtype=F64),
            returns=torch.zeros(2, 3, dtype=F64),
        )
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(new_logps.grad).all()
