"""SPPO (hard labels): squared regression of each log-ratio onto +-1/(2 beta)."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class SPPOHardLoss(RewardDifferenceLoss):
    """SPPO with hard win probabilities — Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment" (arXiv 2405.00675), Eq. 4.7 with ``P(y_w > y_l) = 1``.

    Each log-ratio is regressed onto its target, ``+1/(2 beta)`` for the winner and ``-1/(2 beta)`` for the
    loser (``beta`` is the paper's ``1/eta``)::

        L = (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2

    The paper estimates soft win probabilities with a preference model outside the trainer; this is the hard
    version TRL 1.16 ships as ``loss_type="sppo_hard"``.

    Defaults: ``beta=0.1`` (targets +-5 nats of log-ratio; the paper's eta = 1e3 is beta = 1e-3).
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "sppo_hard"
    summary: ClassVar[str] = "SPPO (hard): (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2"
    paper: ClassVar[str] = (
        "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv 2405.00675)"
    )
    formula: ClassVar[str] = "L = (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2"

    def __init__(
        self, beta: float = 0.1, ld_alpha: Optional[float] = None, wpo_weighting: bool = False
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = 0.5 / self.beta
        return (terms.chosen_logratios - target) ** 2 + (terms.rejected_logratios + target) ** 2, {}
