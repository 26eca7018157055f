"""XPO: online DPO with an exploration bonus on reference-policy samples."""

from __future__ import annotations

from typing import ClassVar

import torch

from prefopt.losses._checks import check_number, compute_dtype, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.dpo import sigmoid_preference_loss


class XPOLoss(PreferenceLoss):
    """Exploratory Preference Optimization — Xie et al. 2024, "Exploratory Preference Optimization: Harnessing
    Implicit Q*-Approximation for Sample-Efficient RLHF" (arXiv 2405.21046).

    Per prompt the trainer samples ``y ~ pi`` and ``y_ref ~ pi_ref``, lets the reward layer (raw scores of both
    samples scored in one call) or a pairwise judge order them into (chosen, rejected) — ties go to the policy
    sample — and passes them already ordered. Then::

        L = -logsigmoid(beta * (lr(y_w) - lr(y_l))) + alpha * logp_pi(y_ref)

    averaged over prompts. The bonus is on the **reference sample**, whichever of the two won, with a plus
    sign in the minimised loss: it pushes probability mass off what the reference already covers, which is the
    exploration. With ``alpha=0`` XPO is plain online DPO (policy sample vs reference sample).
    ``reference_sample_policy_logps`` is the same quantity as the chosen or rejected policy logp of each pair
    (whichever is the reference sample); pass the same tensor so both gradient paths reach it.

    Defaults: ``beta=0.1``, ``alpha=1e-5`` (the paper gives no value; 1e-5 is TRL's default).
    Reads: the DPO fields, ``reference_sample_policy_logps`` ``[B]`` (with grad); optionally
    ``policy_sample_scores`` and ``reference_sample_scores`` ``[B]`` (logged only).
    Logs: ``rewards/*``, ``logps/*`` (sums), ``xpo/bonus`` = ``alpha * mean logp_pi(y_ref)``, and when scores
    are given ``online/model_scores``, ``online/ref_scores``, ``online/policy_win_rate`` (ties are wins).
    """

    name: ClassVar[str] = "xpo"
    needs: frozenset[str] = frozenset({"reference", "online", "preference"})
    step: ClassVar[str] = "online_pairs"
    summary: ClassVar[str] = (
        "XPO (Xie et al. 2024): online DPO + alpha * logp(reference sample) exploration bonus"
    )
    paper: ClassVar[str] = "Xie et al. 2024, Exploratory Preference Optimization (arXiv 2405.21046)"
    formula: ClassVar[str] = (
        "L = -logsigmoid(beta (lr_w - lr_l)) + alpha logp_pi(y_ref), pairs ordered by the reward layer"
    )

    def __init__(self, beta: float = 0.1, alpha: float = 1e-5) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.alpha = check_number(self.name, "alpha", alpha, low=0.0, hint="alpha=0 is plain online DPO.")

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        inputs.require("reference_sample_policy_logps")
        reference_sample_logps = compute_dtype(inputs.reference_sample_policy_logps)
        if reference_sample_logps.shape != policy_chosen.shape:
            raise ValueError(
                f"{self.name}: reference_sample_policy_logps has shape "
                f"{tuple(reference_sample_logps.shape)}, expected {tuple(policy_chosen.shape)}"
            )
        dpo_loss = sigmoid_preference_loss(self.beta * (chosen_logratios - rejected_logratios)).mean()
        bonus = self.alpha * reference_sample_logps.mean()
        extra: dict[str, torch.Tensor] = {"xpo/bonus": bonus, "dpo/loss": dpo_loss}
        if inputs.policy_sample_scores is not None:
            extra["online/model_scores"] = inputs.policy_sample_scores
        if inputs.reference_sample_scores is not None:
            extra["online/ref_scores"] = inputs.reference_sample_scores
        if inputs.policy_sample_scores is not None and inputs.reference_sample_scores is not None:
            extra["online/policy_win_rate"] = (
                inputs.policy_sample_scores >= inputs.reference_sample_scores
            ).float()
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            extra,
        )
        return LossOutput(loss=dpo_loss + bonus, metrics=metrics)
