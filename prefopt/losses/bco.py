"""BCO-pair: binary classification of chosen (reward > 0) against rejected (reward < 0)."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss


class BCOPairLoss(RewardDifferenceLoss):
    """BCO (paired form) — Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment" (arXiv 2404.04656).

    A logistic classifier on the implicit reward ``r = beta * lr``: chosen responses are the positive class,
    rejected ones the negative::

        L = -logsigmoid(r_w) - logsigmoid(-r_l)

    The paper shifts the rewards by a running mean ``delta`` of all rewards; this paired form, as in TRL 1.16's
    ``loss_type="bco_pair"``, uses ``delta = 0``.

    Defaults: ``beta=0.1``. TRL: ``loss_type="bco_pair"``.
    Reads: the DPO fields. Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "bco_pair"
    summary: ClassVar[str] = "BCO-pair: -logsigmoid(r_w) - logsigmoid(-r_l), r = beta*lr"
    paper: ClassVar[str] = (
        "Jung et al. 2024, Binary Classifier Optimization for Large Language Model "
        "Alignment (arXiv 2404.04656)"
    )
    formula: ClassVar[str] = "L = -logsigmoid(r_w) - logsigmoid(-r_l),  r = beta lr"

    def __init__(
        self, beta: float = 0.1, ld_alpha: Optional[float] = None, wpo_weighting: bool = False
    ) -> None:
        self._setup(beta, ld_alpha=ld_alpha, wpo_weighting=wpo_weighting)

    def pair_losses(self, terms: PairTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen = self.beta * terms.chosen_logratios
        rejected = self.beta * terms.rejected_logratios
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected), {}
