"""IPO: a squared loss on the reward difference that does not overfit deterministic preferences."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses.reward_difference import LengthNormalizedDifferenceLoss, PairTerms


class IPOLoss(LengthNormalizedDifferenceLoss):
    """Identity Preference Optimisation — Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences" (arXiv 2310.12036), Eq. 17.

    With the per-token log-ratio difference ``h = s(lr_w)/|y_w| - s(lr_l)/|y_l|`` (``s = lr`` by default)::

        L = (h - 1 / (2 * beta))^2

    ``beta`` is the paper's regulariser tau. The paper writes ``h`` with sequence sums; prefopt, like TRL 1.16
    (which confirmed the normalisation with the authors), divides each log-ratio by its completion length so
    that ``beta`` means the same for short and long answers.

    Defaults: ``beta=0.1`` (TRL's), ``divergence="reverse_kl"``, ``alpha=0.5``. TRL: ``loss_type="ipo"``.
    Reads: the DPO fields plus ``chosen_lengths``/``rejected_lengths`` (zero raises).
    Logs: ``rewards/*`` = ``beta * lr / |y|`` (what the loss compares), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "ipo"
    summary: ClassVar[str] = "IPO: (lr_w/|y_w| - lr_l/|y_l| - 1/(2 beta))^2, no overfitting to the margin"
    paper: ClassVar[str] = (
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human "
        "Preferences (arXiv 2310.12036)"
    )
    formula: ClassVar[str] = "L = (s(lr_w)/|y_w| - s(lr_l)/|y_l| - 1/(2 beta))^2"

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
        return (delta - 1.0 / (2.0 * self.beta)) ** 2, {}
