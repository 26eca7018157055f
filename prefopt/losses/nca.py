"""NCA-pair: noise-contrastive alignment, which keeps the chosen response's likelihood from collapsing."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class NCAPairLoss(RewardDifferenceLoss):
    """NCA (pairwise) — Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards" (arXiv 2402.05369).

    With the absolute rewards ``r = beta * lr`` (not their difference)::

        L = -logsigmoid(r_w) - 0.5 * logsigmoid(-r_w) - 0.5 * logsigmoid(-r_l)

    Each response is scored on its own against the reference, so, unlike DPO, the chosen likelihood is pushed
    up rather than only relative to the rejected one.

    Defaults: ``beta=0.1``. TRL: ``loss_type="nca_pair"`` (TRL applies no f-divergence here either).
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "nca_pair"
    summary: ClassVar[str] = "NCA-pair: -logsig(r_w) - 0.5 logsig(-r_w) - 0.5 logsig(-r_l), r = beta*lr"
    paper: ClassVar[str] = (
        "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit "
        "Rewards (arXiv 2402.05369)"
    )
    formula: ClassVar[str] = (
        "L = -logsigmoid(r_w) - 0.5 logsigmoid(-r_w) - 0.5 logsigmoid(-r_l),  r = beta lr"
    )

    def __init__(
        self, beta: float = 0.1, ld_alpha: Optional[float] = None, wpo_weighting: bool = False
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen = self.beta * terms.chosen_logratios
        rejected = self.beta * terms.rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected), {}
