"""CoPG, TPO (and TPO-L) and SRPO: worked numbers (fp64, docs/losses.md), gradients, reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefopt.losses import LossInputs, get_loss

D = torch.float64


def t(*values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=grad)


# --- CoPG ---------------------------------------------------------------------------------------------------


def copg_inputs(policy, reference, rewards) -> LossInputs:
    return LossInputs(
        policy_chosen_logps=policy[0],
        policy_rejected_logps=policy[1],
        reference_chosen_logps=reference[0],
        reference_rejected_logps=reference[1],
        chosen_external_rewards=rewards[0],
        rejected_external_rewards=rewards[1],
    )


def test_copg_worked_number_and_gradients():
    # beta 0.1, r = 1.0 / 0.2, lr = 0.5 / -0.3 (policy -10.5 / -20.3 against reference -11 / -20).
    chosen, rejected = t(-10.5, grad=True), t(-20.3, grad=True)
    out = get_loss("copg", beta=0.1)(copg_inputs((chosen, rejected), (t(-11.0), t(-20.0)), (t(1.0), t(0.2))))
    assert out.loss.item() == pytest.approx(-0.608, abs=1e-9)
    assert out.metrics["copg/objective"] == pytest.approx(0.608, abs=1e-9)
    out.loss.backward()
    # dL/dlr(y) = -(R_beta(y) - R_beta(y')) = -((1.0 - 0.05) - (0.2 + 0.03)) = -0.72
    assert chosen.grad.item() == pytest.approx(-0.72, abs=1e-9)
    assert rejected.grad.item() == pytest.approx(0.72, abs=1e-9)
    # The squared form (dr - beta d)^2 / (2 beta) is the loss plus dr^2 / (2 beta) = 3.2.
    assert pytest.approx(out.loss.item() + 3.2, abs=1e-9) == (0.8 - 0.1 * 0.8) ** 2 / 0.2


def test_copg_is_symmetric_in_the_pair_order():
    g = torch.Generator().manual_seed(0)
    policy, reference, rewards = (torch.randn(2, 5, dtype=D, generator=g) for _ in range(3))
    loss = get_loss("copg", beta=0.3)
    forward = loss(copg_inputs(policy, reference, rewards)).loss
    swapped = loss(copg_inputs(policy.flip(0), reference.flip(0), rewards.flip(0))).loss
    assert forward.item() == pytest.approx(swapped.item(), abs=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0])
def test_copg_reduces_to_ipo_at_quarter_rewards(beta):
    # Prop. 3: with r(y_w) = 1/4 and r(y_l) = -1/4, CoPG = (beta/2) * IPO(tau=beta) - 1/(8 beta), so the
    # gradients are IPO's scaled by beta/2.  IPO: (h - 1/(2 tau))^2 with h = lr_w - lr_l.
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(2, 6, dtype=D, generator=g).requires_grad_()
    reference = torch.randn(2, 6, dtype=D, generator=g)
    quarter = torch.full((6,), 0.25, dtype=D)
    copg = get_loss("copg", beta=beta)(copg_inputs(policy, reference, (quarter, -quarter))).loss
    h = (policy[0] - reference[0]) - (policy[1] - reference[1])
    ipo = ((h - 1 / (2 * beta)) ** 2).mean()
    assert copg.item() == pytest.approx((beta / 2 * ipo - 1 / (8 * beta)).item(), abs=1e-12)
    (grad_copg,) = torch.autograd.grad(copg, policy)
    (grad_ipo,) = torch.autograd.grad(ipo, policy)
    assert torch.allclose(grad_copg, beta / 2 * grad_ipo, atol=1e-12)


def test_copg_optimum_is_reward_over_beta():
    # At d = dr / beta the gradient vanishes: pi ~ pi_ref exp(r / beta).
    chosen = t(0.0 + 0.8 / 0.1, grad=True)
    out = get_loss("copg", beta=0.1)(copg_inputs((chosen, t(0.0)), (t(0.0), t(0.0)), (t(1.0), t(0.2))))
    out.loss.backward()
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_copg_refuses_missing_or_nan_rewards():
    loss = get_loss("copg")
    inputs = copg_inputs((t(-1.0), t(-2.0)), (t(-1.0), t(-2.0)), (t(1.0), t(0.0)))
    inputs.rejected_external_rewards = None
    with pytest.raises(ValueError, match="rejected_external_rewards"):
        loss(inputs)
    inputs.rejected_external_rewards = t(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        loss(inputs)


# --- TPO ----------------------------------------------------------------------------------------------------


def tpo_inputs(chosen, rejected, chosen_len, rejected_len, gold, gold_len) -> LossInputs:
    return LossInputs(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        gold_logps=gold,
        gold_lengths=gold_len,
    )


def test_tpo_worked_number():
    # Gold token logps [-0.5, -1, -0.2, -0.3] and [-2, -0.1]: sums -2.0 and -2.1 over 4 and 2 tokens.
    inputs = tpo_inputs(
        t(-12.0, -20.0), t(-15.0, -18.0), t(10.0, 16.0), t(10.0, 12.0), t(-2.0, -2.1), t(4.0, 2.0)
    )
    out = get_loss("tpo", beta=0.01, alpha=1.0)(inputs)
    assert out.metrics["tpo/gold_nll"] == pytest.approx(4.1 / 6, abs=1e-12)  # 0.683333, a token mean
    preference = (-F.logsigmoid(t(0.03)) - F.logsigmoid(t(-0.02))).item() / 2
    assert preference == pytest.approx((0.678260 + 0.703197) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(1.374062, abs=1e-6)


def test_tpo_l_worked_number():
    # Lengths (10,10), (16,12): average differences 0.3 and 0.25; beta 2, gamma 0.5; terms 0.644397, 0.693147.
    inputs = tpo_inputs(
        t(-12.0, -20.0), t(-15.0, -18.0), t(10.0, 16.0), t(10.0, 12.0), t(-2.0, -2.1), t(4.0, 2.0)
    )
    out = get_loss("tpo_l", beta=2.0, gamma=0.5, alpha=0.0)(inputs)
    assert out.loss.item() == pytest.approx((0.644397 + 0.693147) / 2, abs=1e-6)
    assert get_loss("tpo", loss_type="tpo-l", beta=2.0, gamma=0.5, alpha=0.0)(
        inputs
    ).loss.item() == pytest.approx(out.loss.item(), abs=1e-15)


def test_tpo_without_gold_term_needs_no_gold():
    assert get_loss("tpo").needs == frozenset({"gold"})
    loss = get_loss("tpo", alpha=0.0)
    assert loss.needs == frozenset()
    out = loss(
        LossInputs(
            policy_chosen_logps=t(-1.0),
            policy_rejected_logps=t(-2.0),
            chosen_lengths=t(1.0),
            rejected_lengths=t(1.0),
        )
    )
    assert "tpo/gold_nll" not in out.metrics
    with pytest.raises(ValueError, match="gold_logps"):
        get_loss("tpo")(LossInputs(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-2.0)))


# --- SRPO ---------------------------------------------------------------------------------------------------


def srpo_inputs(a, b, c, e, g, h, grad: bool = False) -> LossInputs:
    revision = torch.tensor([[a, b, c, e]], dtype=D, requires_grad=grad)
    return LossInputs(
        policy_chosen_logps=t(g, grad=grad),
        policy_rejected_logps=t(h, grad=grad),
        reference_chosen_logps=t(0.0),
        reference_rejected_logps=t(0.0),
        policy_revision_logps=revision,
        reference_revision_logps=torch.zeros(1, 4, dtype=D),
    )


def test_srpo_worked_number():
    inputs = srpo_inputs(0.8, -0.4, 0.3, -0.9, 0.6, -0.5, grad=True)
    out = get_loss("srpo", beta=0.1, alpha=0.8)(inputs)
    assert out.metrics["srpo/improve_loss"] == pytest.approx(0.2888, abs=1e-12)
    assert out.metrics["srpo/generate_loss"] == pytest.approx(0.5184, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.33472, abs=1e-12)
    out.loss.backward()
    # d/da = 0.2 * 2(0.28 - 1) * 0.1 + 0.8 * 2(0.5 - 0.12) * (-0.1) = -0.0288 - 0.0608
    assert inputs.policy_revision_logps.grad[0, 0].item() == pytest.approx(-0.0896, abs=1e-12)
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(-0.0288, abs=1e-12)


def test_srpo_fixed_point_has_zero_loss():
    # beta (a - b) = beta (c - e) = 1/2 and beta (a + g - e - h) = 1: the hard-label optimum.
    inputs = srpo_inputs(3.0, -2.0, 2.0, -3.0, 2.0, -2.0)
    assert get_loss("srpo", beta=0.1)(inputs).loss.item() == pytest.approx(0.0, abs=1e-12)


def test_srpo_refuses_wrong_revision_shape():
    inputs = srpo_inputs(0.8, -0.4, 0.3, -0.9, 0.6, -0.5)
    inputs.reference_revision_logps = torch.zeros(1, 3, dtype=D)
    with pytest.raises(ValueError, match="expected \\(1, 4\\)"):
        get_loss("srpo")(inputs)
