"""Online DPO (``prefopt/losses/online_dpo.py``): worked numbers, TRL's formulas and metric names."""

from __future__ import annotations

import pytest
import torch

from prefopt.losses import LossInputs, get_loss


def _inputs(**extra) -> LossInputs:
    # Chosen sample: policy -12, reference -13 (log-ratio +1); rejected: policy -15, reference -15.5 (+0.5).
    policy_chosen = torch.tensor([-12.0], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-15.0], dtype=torch.float64, requires_grad=True)
    return LossInputs(
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=policy_rejected,
        reference_chosen_logps=torch.tensor([-13.0], dtype=torch.float64),
        reference_rejected_logps=torch.tensor([-15.5], dtype=torch.float64),
        **extra,
    )


def test_worked_numbers_sigmoid_and_metrics():
    inputs = _inputs(chosen_scores=torch.tensor([0.8]), rejected_scores=torch.tensor([0.3]))
    out = get_loss("online_dpo", beta=0.1)(inputs)
    assert out.loss.item() == pytest.approx(0.668460, abs=1e-6)  # -logsigmoid(0.1 * (1 - 0.5))
    out.loss.backward()
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(-0.0487503, abs=1e-7)
    assert inputs.policy_rejected_logps.grad.item() == pytest.approx(0.0487503, abs=1e-7)
    m = out.metrics
    assert m["objective/kl"] == pytest.approx(0.75)  # mean of the two samples' summed log-ratios
    assert m["objective/non_score_reward"] == pytest.approx(-0.075)
    assert m["objective/entropy"] == pytest.approx(13.5)
    assert m["objective/scores"] == pytest.approx(0.55)
    assert m["objective/scores_margin"] == pytest.approx(0.5)
    assert m["objective/rlhf_reward"] == pytest.approx(0.55 - 0.075)
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(0.05)
    assert m["rewards/accuracies"] == 1.0 and m["beta"] == pytest.approx(0.1)
    assert m["logps/chosen"] == -12.0 and m["logps/rejected"] == -15.0


def test_worked_numbers_ipo_and_no_scores():
    inputs = _inputs()
    out = get_loss("online_dpo", beta=0.1, loss_type="ipo")(inputs)
    assert out.loss.item() == pytest.approx(20.25)  # (0.5 - 1 / (2 * 0.1))^2
    out.loss.backward()
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(-9.0)
    assert "objective/scores" not in out.metrics and "objective/kl" in out.metrics


def test_matches_trl_training_step_formulas():
    """TRL 1.16 OnlineDPOTrainer.training_step, its loss and logged statistics written out on random sums."""
    g = torch.Generator().manual_seed(0)
    b, beta = 6, 0.3
    logps = -torch.rand(2 * b, 7, generator=g, dtype=torch.float64) * 3  # per-token, both samples
    ref_logps = -torch.rand(2 * b, 7, generator=g, dtype=torch.float64) * 3
    rewards = torch.rand(2 * b, generator=g, dtype=torch.float64)
    # --- TRL (trl/experimental/online_dpo/online_dpo_trainer.py, training_step) ---
    first, second = rewards.split(b)
    mask = first >= second
    rng = torch.arange(b)
    chosen_idx, rejected_idx = rng + (~mask * b), rng + (mask * b)
    cr = torch.cat((chosen_idx, rejected_idx))
    chosen_sum, rejected_sum = logps[cr].sum(1).split(b)
    ref_chosen_sum, ref_rejected_sum = ref_logps[cr].sum(1).split(b)
    logits = (chosen_sum - rejected_sum) - (ref_chosen_sum - ref_rejected_sum)
    trl_loss = -torch.nn.functional.logsigmoid(beta * logits).mean()
    kl = (logps - ref_logps).sum(1)
    trl = {
        "objective/kl": kl.mean(),
        "objective/entropy": -logps.sum(1).mean(),
        "objective/non_score_reward": (-beta * kl).mean(),
        "objective/rlhf_reward": (rewards - beta * kl).mean(),
        "objective/scores": rewards.mean(),
        "objective/scores_margin": (rewards[chosen_idx] - rewards[rejected_idx]).mean(),
        "rewards/chosen": (beta * (chosen_sum - ref_chosen_sum)).mean(),
        "rewards/rejected": (beta * (rejected_sum - ref_rejected_sum)).mean(),
    }
    # --- prefopt: the step hands over the ordered sums and scores ---
    out = get_loss("online_dpo", beta=beta)(
        LossInputs(
            policy_chosen_logps=chosen_sum,
            policy_rejected_logps=rejected_sum,
            reference_chosen_logps=ref_chosen_sum,
            reference_rejected_logps=ref_rejected_sum,
            chosen_scores=rewards[chosen_idx],
            rejected_scores=rewards[rejected_idx],
        )
    )
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-12)
    for key, value in trl.items():
        assert out.metrics[key] == pytest.approx(value.item(), abs=1e-9), key


def test_bad_parameters_name_the_fix():
    with pytest.raises(ValueError, match="loss_type"):
        get_loss("online_dpo", loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        get_loss("online_dpo", beta=0)
