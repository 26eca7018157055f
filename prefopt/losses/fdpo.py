"""f-DPO: DPO under other f-divergences than the reverse KL (the divergence option under its own name)."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses.divergence import DIVERGENCES, MAX_EXPONENT, divergence_score, safe_exp
from prefopt.losses.reward_difference import PairTerms, RewardDifferenceLoss

__all__ = ["DIVERGENCES", "MAX_EXPONENT", "FDPOLoss", "divergence_score", "safe_exp"]


class FDPOLoss(RewardDifferenceLoss):
    """f-DPO — Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints" (arXiv 2309.16240).

    With ``lr = logp_policy - logp_ref`` and ``s(lr) = f'(exp(lr))`` of the divergence's generator::

        L = -logsigmoid(beta * (s(lr_w) - s(lr_l)))

    ==============  =====================================  ==========================================
    divergence      s(lr)                                  note
    ==============  =====================================  ==========================================
    ``reverse_kl``  ``lr``                                 identical to DPO
    ``forward_kl``  ``1 - exp(-lr)``
    ``js``          ``log 2 + logsigmoid(lr)``             = log(2u/(1+u)), u = exp(lr)
    ``alpha``       ``(1 - exp(-alpha * lr)) / alpha``     paper convention: alpha→0 reverse KL, alpha→1 forward KL
    ==============  =====================================  ==========================================

    The same option exists on every loss built on the reward difference (``dpo``, ``ipo``, ``hinge``, ...:
    ``divergence=...``); ``fdpo`` is DPO plus a divergence, kept under its paper's name. TRL's
    ``f_alpha_divergence_coef`` is ``1 - alpha`` of this convention (they agree only at 0.5), and TRL's
    ``"js_divergence"`` is ``"js"`` here. The exponentials overflow for late-training log-ratios (fp32 ``exp``
    overflows above 88.7), so exponents beyond ``MAX_EXPONENT = 40`` are continued linearly: loss and gradient
    stay finite for log-ratios of ±1000 in fp32 and bf16. Half-precision inputs are computed in fp32.

    Defaults: ``beta=0.1``, ``divergence="reverse_kl"``, ``alpha=0.5`` (in (0, 1); read by ``alpha`` only).
    Reads: ``policy_{chosen,rejected}_logps``, ``reference_{chosen,rejected}_logps``.
    Logs: ``rewards/*`` = ``beta * lr`` for every divergence (so runs compare), ``logps/*`` (sums), and
    ``logits/margin`` = mean of ``beta * (s(lr_w) - s(lr_l))``, the logit inside the loss.
    """

    name: ClassVar[str] = "fdpo"
    summary: ClassVar[str] = "f-DPO: DPO with reverse/forward KL, JS or alpha divergence"
    paper: ClassVar[str] = (
        "Wang et al. 2023, Beyond Reverse KL: Generalizing Direct Preference Optimization "
        "with Diverse Divergence Constraints (arXiv 2309.16240)"
    )
    formula: ClassVar[str] = "L = -logsigmoid(beta (s(lr_w) - s(lr_l))),  s(lr) = f'(exp(lr))"

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
        logits = self.beta * terms.delta
        return -F.logsigmoid(logits), {"logits/margin": logits}
