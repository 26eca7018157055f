"""DiscoPOP: a log-ratio-modulated blend of the logistic and exponential losses, found by LLM-driven search."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number
from prefopt.losses.divergence import safe_exp
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class DiscoPOPLoss(RewardDifferenceLoss):
    """DiscoPOP (log-ratio modulated loss) — Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models" (arXiv 2406.08414), Eq. 5.

    With ``z = beta * (s(lr_w) - s(lr_l))`` and ``m = sigmoid(z / tau)``::

        L = (1 - m) * (-logsigmoid(z)) + m * exp(-z)

    Where the pair is already well separated (large ``z``) the exponential loss takes over; ``exp(-z)`` is
    continued linearly past an exponent of 40 so that badly wrong pairs (where ``m`` is 0 anyway) stay finite.

    Defaults: ``beta=0.1``, ``tau=0.05`` (the paper's), ``divergence="reverse_kl"``, ``alpha=0.5``.
    TRL: ``loss_type="discopop"`` with ``discopop_tau``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "discopop"
    summary: ClassVar[str] = "DiscoPOP: logistic/exponential blend modulated by sigmoid(z/tau)"
    paper: ClassVar[str] = (
        "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large "
        "Language Models (arXiv 2406.08414)"
    )
    formula: ClassVar[str] = (
        "L = (1-m)(-logsigmoid(z)) + m exp(-z),  m = sigmoid(z/tau),  z = beta (s(lr_w) - s(lr_l))"
    )

    def __init__(
        self,
        beta: float = 0.1,
        tau: float = 0.05,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        ld_alpha: Optional[float] = None,
        wpo_weighting: bool = False,
    ) -> None:
        self._setup(beta, divergence, alpha, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)
        self.tau = check_number(self.name, "tau", tau, low=0.0, low_open=True)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.beta * terms.delta
        modulation = torch.sigmoid(z / self.tau)
        return (1.0 - modulation) * -F.logsigmoid(z) + modulation * safe_exp(-z), {}
