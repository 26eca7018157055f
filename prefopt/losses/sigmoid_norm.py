"""sigmoid-norm: DPO on per-token (length-normalised) log-ratios."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from prefopt.losses.reward_difference import LengthNormalizedDifferenceLoss, PairTerms


class SigmoidNormLoss(LengthNormalizedDifferenceLoss):
    """Length-normalised DPO, as in Tulu 3 — Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language
    Model Post-Training" (arXiv 2411.15124), "length-normalized DPO".

    With the per-token log-ratios ``s(lr)/|y|``::

        L = -logsigmoid(beta * (s(lr_w)/|y_w| - s(lr_l)/|y_l|))

    Normalising removes DPO's pull towards longer chosen answers; ``beta`` is then per token, so it is usually
    much larger than DPO's (Tulu 3 used 5).

    Defaults: ``beta=0.1`` (TRL's shared default; raise it), ``divergence="reverse_kl"``, ``alpha=0.5``.
    TRL: ``loss_type="sigmoid_norm"``.
    Reads: the DPO fields plus ``chosen_lengths``/``rejected_lengths`` (zero raises).
    Logs: ``rewards/*`` = ``beta * lr / |y|`` (what the loss compares), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "sigmoid_norm"
    summary: ClassVar[str] = "Length-normalised DPO: -logsigmoid(beta*(lr_w/|y_w| - lr_l/|y_l|))"
    paper: ClassVar[str] = (
        "Lambert et al. 2024, Tulu 3: Pushing Frontiers in Open Language Model "
        "Post-Training (arXiv 2411.15124)"
    )
    formula: ClassVar[str] = "L = -logsigmoid(beta (s(lr_w)/|y_w| - s(lr_l)/|y_l|))"

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
        delta = self.normalized_difference(terms)
        return -F.logsigmoid(self.beta * delta), {}
