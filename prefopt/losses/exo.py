"""EXO-pair: preference optimisation as reverse-KL minimisation between two-point distributions."""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class EXOPairLoss(RewardDifferenceLoss):
    """EXO (pairwise) — Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    (arXiv 2402.00856), Eq. 16 with K = 2.

    ``p_theta = softmax(beta * s(lr))`` over {chosen, rejected} is pulled towards the label distribution
    ``p = (1 - e, e)`` in reverse KL, ``KL(p_theta || p)``. With ``z = beta * (s(lr_w) - s(lr_l))``::

        L = sigmoid(z) * (logsigmoid(z) - log(1 - e)) + sigmoid(-z) * (logsigmoid(-z) - log(e))

    ``e`` must be positive (``log e``): it is the small probability mass the target gives the rejected response.

    Defaults: ``beta=0.1``, ``label_smoothing=1e-3`` (the paper's epsilon; TRL's shared default 0 would give an
    infinite loss), ``divergence="reverse_kl"``, ``alpha=0.5``. TRL: ``loss_type="exo_pair"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "exo_pair"
    summary: ClassVar[str] = "EXO-pair: KL(softmax(beta*lr) || (1-e, e)) over the pair"
    paper: ClassVar[str] = (
        "Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (arXiv 2402.00856)"
    )
    formula: ClassVar[str] = (
        "L = sigmoid(z)(logsigmoid(z) - log(1-e)) + sigmoid(-z)(logsigmoid(-z) - log e),  "
        "z = beta (s(lr_w) - s(lr_l))"
    )

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 1e-3,
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
            low_open=True,
            high_open=True,
            hint="EXO's target gives the rejected response probability e; e = 0 makes the loss infinite.",
        )

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.beta * terms.delta
        e = self.label_smoothing
        chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
        rejected = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e))
        return chosen + rejected, {}
