"""DPO and its conservative (label-smoothed) form."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


def sigmoid_preference_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair ``-(1-e) logsigmoid(z) - e logsigmoid(-z)``; with ``e = 0`` it is the Bradley–Terry NLL.

    ``-F.logsigmoid`` (a softplus) stays finite and exact for large ``|z|``, unlike ``log(sigmoid(z))``.
    """
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


class DPOLoss(RewardDifferenceLoss):
    """Direct Preference Optimization — Rafailov et al. 2023, "Direct Preference Optimization:
    Your Language Model is Secretly a Reward Model" (arXiv 2305.18290).

    With ``lr(y) = logp_policy(y) - logp_ref(y)`` (sums over completion tokens), ``h = lr(y_w) - lr(y_l)``::

        L = -logsigmoid(beta * h)                                              (label_smoothing = 0)
        L = -(1 - e) * logsigmoid(beta * h) - e * logsigmoid(-beta * h)        (cDPO, e = label_smoothing)

    averaged over pairs. cDPO assumes each label is flipped with probability ``e``; TRL calls the same
    parameter ``label_smoothing``. With ``divergence`` other than ``reverse_kl``, ``h = s(lr_w) - s(lr_l)``
    with the divergence's score (:mod:`prefopt.losses.divergence`; ``fdpo`` is the same loss under its own name).

    Two modifiers (:mod:`prefopt.losses.modifiers`), as on every reward-difference loss: ``ld_alpha`` (LD-DPO,
    Liu et al. 2024, arXiv 2409.06411) weights the tokens of the longer completion past the shorter one's length
    by ``ld_alpha`` in every sum; ``wpo_weighting`` (WPO, Zhou et al. 2024, arXiv 2406.11827) multiplies each
    pair's loss by the detached ``w(y_w) * w(y_l)``, ``w(y) = exp(mean_t log(p(y_t) / sum_v p(v)^2))``.

    Defaults: ``beta=0.1``, ``label_smoothing=0.0`` (must lie in [0, 0.5)), ``divergence="reverse_kl"``,
    ``alpha=0.5``, ``ld_alpha=None`` (off), ``wpo_weighting=False``. TRL: ``loss_type="sigmoid"``
    (``ld_alpha``, ``use_weighting``).
    Reads: ``policy_{chosen,rejected}_logps``, ``reference_{chosen,rejected}_logps``.
    Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "dpo"
    summary: ClassVar[str] = "DPO: -logsigmoid(beta*(lr_w - lr_l)); cDPO via label_smoothing"
    paper: ClassVar[str] = (
        "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is "
        "Secretly a Reward Model (arXiv 2305.18290)"
    )
    formula: ClassVar[str] = "L = -(1-e) logsigmoid(beta h) - e logsigmoid(-beta h),  h = s(lr_w) - s(lr_l)"

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
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
            hint="It is the probability that a label is flipped; 0.5 would make the loss constant.",
        )

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sigmoid_preference_loss(self.beta * terms.delta, self.label_smoothing), {}
