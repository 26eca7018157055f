"""Robust DPO: an unbiased DPO loss under symmetric label noise."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class RobustDPOLoss(RewardDifferenceLoss):
    """Robust DPO (rDPO) — Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (arXiv 2403.00409), Eq. 8.

    With ``z = beta * (s(lr_w) - s(lr_l))`` and ``e = label_smoothing``, the probability a label is flipped::

        L = ((1 - e) * (-logsigmoid(z)) - e * (-logsigmoid(-z))) / (1 - 2e)

    Unlike cDPO (``dpo`` with ``label_smoothing``), which averages the two labels, rDPO de-biases the loss so
    that its expectation under the noise equals the clean DPO loss. ``e = 0`` is plain DPO.

    Defaults: ``beta=0.1``, ``label_smoothing=0.1`` (prefopt's default: an assumed 10% flip rate; TRL's shared
    ``label_smoothing`` defaults to 0), ``divergence="reverse_kl"``, ``alpha=0.5``. TRL: ``loss_type="robust"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "robust"
    summary: ClassVar[str] = "Robust DPO: DPO de-biased for a label flip rate e (label_smoothing)"
    paper: ClassVar[str] = (
        "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy "
        "Feedback (arXiv 2403.00409)"
    )
    formula: ClassVar[str] = (
        "L = ((1-e)(-logsigmoid(z)) - e(-logsigmoid(-z))) / (1-2e),  z = beta (s(lr_w) - s(lr_l))"
    )

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.1,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        ld_alpha: Optional[float] = None,
        wpo_weighting: bool = False,
    ) -> None:
        self._setup(beta, divergence, alpha, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)
        self.label_smoothing = check_number(
            self.name,
            "label_smoothing",
            label_smoothing,
            low=0.0,
            high=0.5,
            high_open=True,
            hint="It is the probability that a label is flipped; 0.5 divides by zero.",
        )

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.beta * terms.delta
        e = self.label_smoothing
        return ((1.0 - e) * -F.logsigmoid(z) - e * -F.logsigmoid(-z)) / (1.0 - 2.0 * e), {}
