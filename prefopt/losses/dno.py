"""DNO's general (soft-target) loss: DPO towards the preference probability the scores give, not towards 1."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.copg import external_rewards


class DNOSoftLoss(PreferenceLoss):
    """Direct Nash Optimization, general form — Rosset et al. 2024, "Direct Nash Optimization: Teaching Language
    Models to Self-Improve with General Preferences" (arXiv 2404.03715), Alg. 1, Eq. 8/12.

    For two completions ``y1``, ``y2`` of one prompt with scores ``r(y1)``, ``r(y2)`` — in the paper
    ``r_t(x, y) = E_{y' ~ pi_t} P(y > y' | x)``, the win-rate the DNO iterations compute when
    ``reward.kind=judge`` — the target probability that ``y1`` is preferred is ``sigma(s * (r(y1) - r(y2)))``
    and the policy's is ``sigma(beta * d)``; the loss is their cross-entropy::

        d  = lr(y1) - lr(y2)                       (lr = log pi - log pi_ref; DNO's reference is pi_t)
        dr = s * (r(y1) - r(y2))
        L  = mean[ -sigma(dr) * log sigma(beta * d) - sigma(-dr) * log sigma(-beta * d) ]

    Unlike DPO (the hard target 1, which DNO-Prct / Alg. 2 uses on large-margin pairs), a pair of nearly equal
    scores pulls ``d`` only towards ``dr / beta``'s sign weakly: the optimum is ``beta * d = dr``. ``s`` is
    ``reward_scale`` (1 for win-rates in [0, 1]; set it for reward-model scores, whose scale is arbitrary).

    Worked number (SEED_METHODS.md): beta 0.1, d = 2.5, dr = 0.5 gives L = 0.670325 (hard target: 0.575939).

    Defaults: ``beta=0.1`` (the paper's eta: 0.1 or 0.05), ``reward_scale=1.0``. Reads ``policy_*_logps``,
    ``reference_*_logps`` and ``{chosen,rejected}_external_rewards`` (the pair's ``chosen_score`` /
    ``rejected_score``, which every DNO iteration writes into its ``pairs.jsonl``). Logs ``rewards/*``
    (``beta * lr``), ``logps/*`` and ``dno/target`` (``sigma(dr)``, the mean target probability).
    """

    name: ClassVar[str] = "dno_soft"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "scores"})
    step: ClassVar[str] = "scored_pairs"
    summary: ClassVar[str] = (
        "DNO general form (Rosset et al. 2024, Alg. 1): DPO towards the soft target sigma(r1 - r2) of the scores"
    )
    paper: ClassVar[str] = (
        "Rosset et al. 2024, Direct Nash Optimization: Teaching Language Models to Self-Improve with General "
        "Preferences (arXiv 2404.03715)"
    )
    formula: ClassVar[str] = (
        "d = lr(y1) - lr(y2), dr = s*(r(y1) - r(y2)); "
        "L = -sigma(dr) log sigma(beta d) - sigma(-dr) log sigma(-beta d)"
    )

    def __init__(self, beta: float = 0.1, reward_scale: float = 1.0) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.reward_scale = check_number(self.name, "reward_scale", reward_scale, low=0.0, low_open=True)

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        chosen_score, rejected_score = external_rewards(self.name, inputs, policy_chosen)
        logits = self.beta * (chosen_logratios - rejected_logratios)
        target = torch.sigmoid(self.reward_scale * (chosen_score - rejected_score))
        losses = -target * F.logsigmoid(logits) - (1.0 - target) * F.logsigmoid(-logits)
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            {"dno/target": target},
        )
        return LossOutput(loss=losses.mean(), metrics=metrics)
