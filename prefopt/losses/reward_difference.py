"""Shared machinery of the reference-based pairwise losses (DPO and its relatives from TRL's catalogue).

Each such loss is a per-pair function of the log-ratios ``lr = logp_policy - logp_ref`` of the chosen and the
rejected response. The ones built on the reward difference ``s(lr_w) - s(lr_l)`` also take the f-divergence
option (:mod:`prefopt.losses.divergence`): ``divergence="reverse_kl"`` (``s = lr``, the default) or another
divergence's score, exactly as TRL 1.16 applies ``f_divergence_type`` to every loss type built on ``delta_score``.
All of them take the LD-DPO option ``ld_alpha`` and (except AOT, which sorts the batch) WPO's ``wpo_weighting``
(:mod:`prefopt.losses.modifiers`).

A subclass sets ``name``/``summary``/``paper``/``formula``, takes its hyperparameters in ``__init__`` (calling
:meth:`RewardDifferenceLoss._setup`) and implements :meth:`pair_losses`. ``rewards/*`` are the loss's
:meth:`implicit_reward` (``beta * lr`` for every divergence, so runs compare), ``logps/*`` the sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from prefopt.losses._checks import check_number, lengths_as_float, pair_tensors
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.divergence import check_divergence, divergence_score
from prefopt.losses.modifiers import ALIGNED_LOGPS, check_wpo_weighting, wpo_pair_weights


@dataclass
class PairTerms:
    """The per-pair tensors ``[B]`` a reward-difference loss is written in (compute dtype, with grad)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor  # no grad
    reference_rejected: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor  # s(lr_w): the divergence's score; lr_w for reverse_kl
    rejected_scores: torch.Tensor
    chosen_lengths: Optional[torch.Tensor] = None  # float token counts, when the loss normalises by length
    rejected_lengths: Optional[torch.Tensor] = None

    @property
    def delta(self) -> torch.Tensor:
        """``s(lr_w) - s(lr_l)``: the reward difference (``h`` of DPO under the reverse KL)."""
        return self.chosen_scores - self.rejected_scores


class RewardDifferenceLoss(PreferenceLoss):
    """Base of the reference-based pairwise losses; see the module docstring."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference"})
    step: ClassVar[str] = "pairs"
    uses_lengths: ClassVar[bool] = False  # IPO, sigmoid-norm: read chosen/rejected lengths

    beta: float
    divergence: str = "reverse_kl"
    alpha: float = 0.5

    wpo_weighting: bool = False

    def _setup(
        self,
        beta: float,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        ld_alpha: Optional[float] = None,
        wpo_weighting: bool = False,
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.divergence, self.alpha = check_divergence(self.name, divergence, alpha)
        self._set_ld_alpha(ld_alpha)
        self.wpo_weighting = check_wpo_weighting(self.name, wpo_weighting)
        if self.wpo_weighting:
            self.needs = frozenset(self.needs | {ALIGNED_LOGPS})

    def implicit_reward(self) -> ImplicitReward:
        """``beta * (logp - logp_ref)`` whatever the divergence (the logged reward stays comparable)."""
        return ImplicitReward(scale=self.beta)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses ``[B]`` and extra tensors to log (means); implemented by each loss."""
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected = pair_tensors(
            self.name, inputs, reference=True
        )
        chosen_logratios = policy_chosen - reference_chosen
        rejected_logratios = policy_rejected - reference_rejected
        terms = PairTerms(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_logratios,
            rejected_logratios,
            divergence_score(chosen_logratios, self.divergence, self.alpha),
            divergence_score(rejected_logratios, self.divergence, self.alpha),
        )
        if self.uses_lengths:
            terms.chosen_lengths = lengths_as_float(
                self.name, "chosen_lengths", inputs.chosen_lengths, policy_chosen
            )
            terms.rejected_lengths = lengths_as_float(
                self.name, "rejected_lengths", inputs.rejected_lengths, policy_rejected
            )
        losses, extra = self.pair_losses(terms)
        if self.wpo_weighting:
            weights = wpo_pair_weights(self.name, inputs, losses)
            losses = losses * weights
            extra = {**extra, "wpo/weight": weights}
        reward = self.implicit_reward()
        chosen_rewards = reward.sequence(policy_chosen, terms.reference_chosen, terms.chosen_lengths)
        rejected_rewards = reward.sequence(policy_rejected, terms.reference_rejected, terms.rejected_lengths)
        metrics = pairwise_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, extra)
        return LossOutput(loss=losses.mean(), metrics=metrics)


class LengthNormalizedDifferenceLoss(RewardDifferenceLoss):
    """A reward-difference loss that compares per-token log-ratios, ``s(lr_w)/|y_w| - s(lr_l)/|y_l|`` (IPO as
    TRL normalises it, sigmoid_norm); its implicit reward is the same per-token quantity."""

    uses_lengths: ClassVar[bool] = True

    def implicit_reward(self) -> ImplicitReward:
        """``beta * (logp - logp_ref) / |y|``: the per-token log-ratio the objective compares (TRL logs the
        un-normalised ``beta * lr`` instead)."""
        return ImplicitReward(scale=self.beta, length_normalized=True)

    @staticmethod
    def normalized_difference(terms: PairTerms) -> torch.Tensor:
        return terms.chosen_scores / terms.chosen_lengths - terms.rejected_scores / terms.rejected_lengths
