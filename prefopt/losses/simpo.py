"""SimPO: reference-free, length-normalised preference optimisation with a target margin."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch.nn.functional as F

from prefopt.losses._checks import check_number, lengths_as_float, pair_tensors
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss

DEFAULT_GAMMA_BETA_RATIO = 0.5


class SimPOLoss(PreferenceLoss):
    """Simple Preference Optimization — Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward" (arXiv 2405.14734).

    With ``avg(y) = logp_policy(y) / |y|`` (mean log-prob per completion token; no reference model)::

        z = beta * (avg(y_w) - avg(y_l)) - gamma
        L = -logsigmoid(z) + sft_weight * (-avg(y_w))

    averaged over pairs. The margin is given either as ``gamma`` (absolute) or as ``gamma_beta_ratio``
    (``gamma = beta * ratio``, the official code's form); giving both is an error, giving neither means
    ``gamma_beta_ratio = 0.5``. The optional SFT term is the per-sequence token-mean NLL of the chosen
    completion, averaged over pairs (the official SimPO code's form; TRL's CPO ``cpo_alpha`` instead takes one
    token mean over the whole batch — the two agree when chosen lengths are equal).

    Defaults: ``beta=2.0``, ``gamma=None``, ``gamma_beta_ratio=None`` (→ 0.5), ``sft_weight=0.0``.
    Released settings: beta 2.0–10, ratio 0.1–0.8, learning rate 3e-7–1e-6.
    Reads: ``policy_{chosen,rejected}_logps``, ``chosen_lengths``, ``rejected_lengths`` (zero raises).
    Logs: ``rewards/*`` = ``beta * avg``, ``logps/*`` = averages (not sums), ``sft/nll`` if ``sft_weight>0``.
    """

    name: ClassVar[str] = "simpo"
    needs: ClassVar[frozenset[str]] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = (
        "SimPO (Meng et al. 2024): reference-free, -logsigmoid(beta*(avg_w - avg_l) - gamma)"
    )
    paper: ClassVar[str] = (
        "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward "
        "(arXiv 2405.14734)"
    )
    formula: ClassVar[str] = (
        "L = -logsigmoid(beta (avg_w - avg_l) - gamma) + sft_weight (-avg_w),  gamma = beta gamma_beta_ratio"
    )

    def __init__(
        self,
        beta: float = 2.0,
        gamma: Optional[float] = None,
        gamma_beta_ratio: Optional[float] = None,
        sft_weight: float = 0.0,
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        if gamma is not None and gamma_beta_ratio is not None:
            raise ValueError(
                f"{self.name}: give either gamma (absolute margin) or gamma_beta_ratio "
                f"(gamma = beta * ratio), not both "
                f"(got gamma={gamma!r}, gamma_beta_ratio={gamma_beta_ratio!r})"
            )
        self.gamma = None if gamma is None else check_number(self.name, "gamma", gamma)
        self.gamma_beta_ratio = (
            None
            if gamma_beta_ratio is None
            else check_number(self.name, "gamma_beta_ratio", gamma_beta_ratio)
        )
        self.sft_weight = check_number(self.name, "sft_weight", sft_weight, low=0.0)

    def implicit_reward(self) -> ImplicitReward:
        """``beta * logp / |y|``: reference-free, length-normalised (gamma is a margin, not part of r)."""
        return ImplicitReward(scale=self.beta, uses_reference=False, length_normalized=True)

    @property
    def margin(self) -> float:
        """The absolute target margin gamma actually used."""
        if self.gamma is not None:
            return self.gamma
        ratio = DEFAULT_GAMMA_BETA_RATIO if self.gamma_beta_ratio is None else self.gamma_beta_ratio
        return self.beta * ratio

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, _, _ = pair_tensors(self.name, inputs, reference=False)
        chosen_lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_chosen)
        rejected_lengths = lengths_as_float(
            self.name, "rejected_lengths", inputs.rejected_lengths, policy_rejected
        )
        chosen_avg = policy_chosen / chosen_lengths
        rejected_avg = policy_rejected / rejected_lengths
        chosen_rewards = self.beta * chosen_avg
        rejected_rewards = self.beta * rejected_avg
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - self.margin).mean()
        extra = {}
        if self.sft_weight > 0:
            nll = -chosen_avg.mean()
            loss = loss + self.sft_weight * nll
            extra["sft/nll"] = nll
        metrics = pairwise_metrics(chosen_rewards, rejected_rewards, chosen_avg, rejected_avg, extra)
        return LossOutput(loss=loss, metrics=metrics)
