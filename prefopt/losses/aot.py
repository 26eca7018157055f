"""AOT: alignment via optimal transport, a distributional (first-order stochastic dominance) DPO."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses._checks import check_number
from prefopt.losses.dpo import sigmoid_preference_loss
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss

_PAPER = (
    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (arXiv 2406.05882)"
)


class _SortedLoss(RewardDifferenceLoss):
    """AOT's shared form: sort two batch quantities, pair them by rank, and apply the cDPO loss per rank."""

    def __init__(
        self, beta: float = 0.1, label_smoothing: float = 0.0, ld_alpha: Optional[float] = None
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha)
        self.label_smoothing = check_number(
            self.name,
            "label_smoothing",
            label_smoothing,
            low=0.0,
            high=0.5,
            high_open=True,
            hint="It is the probability that a label is flipped; 0.5 would make the loss constant.",
        )

    def sorted_pair(self, terms: PairTerms) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        upper, lower = self.sorted_pair(terms)
        delta = torch.sort(upper, dim=0).values - torch.sort(lower, dim=0).values
        return sigmoid_preference_loss(self.beta * delta, self.label_smoothing), {}


class AOTLoss(_SortedLoss):
    """AOT (paired) — Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv 2406.05882).

    Asks the *distribution* of the policy's log-likelihood margins ``m = logp(y_w) - logp(y_l)`` to dominate
    the reference's margins ``m_ref`` in first order. On a batch the 1-D optimal transport plan is the sorted
    order, so with ``q_(i)`` the i-th smallest value over the batch::

        L = mean_i cDPO(beta * (m_(i) - m_ref_(i)), label_smoothing)

    Per rank it is DPO's loss; what differs is that ranks, not pairs, are matched. The loss therefore depends on
    the whole batch (larger batches approximate the distributions better).

    Defaults: ``beta=0.1``, ``label_smoothing=0.0``. TRL: ``loss_type="aot"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``, per pair), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "aot"
    summary: ClassVar[str] = "AOT: DPO on batch-sorted policy vs reference margins (distributional)"
    paper: ClassVar[str] = _PAPER
    formula: ClassVar[str] = "L = mean_i cDPO(beta (sort(logp_w - logp_l)_i - sort(ref_w - ref_l)_i))"

    def sorted_pair(self, terms: PairTerms) -> tuple[torch.Tensor, torch.Tensor]:
        return terms.policy_chosen - terms.policy_rejected, terms.reference_chosen - terms.reference_rejected


class AOTUnpairedLoss(_SortedLoss):
    """AOT (unpaired) — Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv 2406.05882).

    For data where chosen and rejected responses need not come in pairs: the distribution of chosen log-ratios
    ``lr_w`` must dominate that of rejected log-ratios ``lr_l``; sorted over the batch::

        L = mean_i cDPO(beta * (lr_w_(i) - lr_l_(i)), label_smoothing)

    Defaults: ``beta=0.1``, ``label_smoothing=0.0``. TRL: ``loss_type="aot_unpaired"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``, per pair), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "aot_unpaired"
    summary: ClassVar[str] = "AOT-unpaired: DPO on batch-sorted chosen vs rejected log-ratios"
    paper: ClassVar[str] = _PAPER
    formula: ClassVar[str] = "L = mean_i cDPO(beta (sort(lr_w)_i - sort(lr_l)_i))"

    def sorted_pair(self, terms: PairTerms) -> tuple[torch.Tensor, torch.Tensor]:
        return terms.chosen_logratios, terms.rejected_logratios
