"""APO: anchored preference optimisation, which says which way each likelihood must move."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss

_PAPER = (
    "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions: Addressing "
    "Underspecification in Alignment (arXiv 2408.06266)"
)


class APOZeroLoss(RewardDifferenceLoss):
    """APO-zero — D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv 2408.06266), Eq. 7.

    For data whose chosen answers are better than what the model writes now: raise the chosen likelihood and
    lower the rejected one, each anchored at the reference (``r = beta * lr``)::

        L = (1 - sigmoid(r_w)) + sigmoid(r_l)

    Defaults: ``beta=0.1``. TRL: ``loss_type="apo_zero"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "apo_zero"
    summary: ClassVar[str] = "APO-zero: 1 - sigmoid(r_w) + sigmoid(r_l); chosen up, rejected down"
    paper: ClassVar[str] = _PAPER
    formula: ClassVar[str] = "L = 1 - sigmoid(r_w) + sigmoid(r_l),  r = beta lr"

    def __init__(
        self, beta: float = 0.1, ld_alpha: Optional[float] = None, wpo_weighting: bool = False
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen = self.beta * terms.chosen_logratios
        rejected = self.beta * terms.rejected_logratios
        return (1.0 - torch.sigmoid(chosen)) + torch.sigmoid(rejected), {}


class APODownLoss(RewardDifferenceLoss):
    """APO-down — D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv 2408.06266), Eq. 8.

    For data whose chosen answers are worse than what the model writes now: lower the chosen likelihood, and
    the rejected one more (``r = beta * lr``)::

        L = sigmoid(r_w) + (1 - sigmoid(r_w - r_l))

    Defaults: ``beta=0.1``. TRL: ``loss_type="apo_down"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "apo_down"
    summary: ClassVar[str] = "APO-down: sigmoid(r_w) + 1 - sigmoid(r_w - r_l); both down, rejected more"
    paper: ClassVar[str] = _PAPER
    formula: ClassVar[str] = "L = sigmoid(r_w) + 1 - sigmoid(r_w - r_l),  r = beta lr"

    def __init__(
        self, beta: float = 0.1, ld_alpha: Optional[float] = None, wpo_weighting: bool = False
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen = self.beta * terms.chosen_logratios
        rejected = self.beta * terms.rejected_logratios
        return torch.sigmoid(chosen) + (1.0 - torch.sigmoid(chosen - rejected)), {}
