"""Hinge (SLiC): a margin loss on the reward difference."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class HingeLoss(RewardDifferenceLoss):
    """Hinge loss of SLiC-HF — Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback" (arXiv 2305.10425), in the reference-normalised form of Liu et al. 2023, "Statistical Rejection
    Sampling Improves Preference Optimization" (RSO, arXiv 2309.06657)::

        L = max(0, 1 - beta * (s(lr_w) - s(lr_l)))

    ``1/beta`` is the margin the log-ratio difference must clear; past it a pair contributes nothing.

    Defaults: ``beta=0.1``, ``divergence="reverse_kl"``, ``alpha=0.5``. TRL: ``loss_type="hinge"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "hinge"
    summary: ClassVar[str] = "SLiC hinge: max(0, 1 - beta*(lr_w - lr_l))"
    paper: ClassVar[str] = (
        "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback "
        "(arXiv 2305.10425); reference form of Liu et al. 2023 (RSO, arXiv 2309.06657)"
    )
    formula: ClassVar[str] = "L = max(0, 1 - beta (s(lr_w) - s(lr_l)))"

    def __init__(
        self,
        beta: float = 0.1,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        ld_alpha: Optional[float] = None,
        wpo_weighting: bool = False,
    ) -> None:
        self._setup(beta, divergence, alpha, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.relu(1.0 - self.beta * terms.delta), {}
