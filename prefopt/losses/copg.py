"""CoPG: contrastive policy gradient on offline pairs with a scalar reward per completion."""

from __future__ import annotations

from typing import ClassVar

import torch

from prefopt.losses._checks import check_number, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss


def external_rewards(loss: str, inputs: LossInputs, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[B]`` scalar rewards of both completions (constants: data or reward-model scores)."""
    inputs.require("chosen_external_rewards", "rejected_external_rewards")
    tensors = []
    for name in ("chosen_external_rewards", "rejected_external_rewards"):
        value = getattr(inputs, name)
        if value.shape != like.shape:
            raise ValueError(f"{loss}: {name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        value = value.detach().to(device=like.device, dtype=like.dtype)
        if not bool(torch.isfinite(value).all()):
            bad = torch.nonzero(~torch.isfinite(value)).flatten().tolist()
            raise ValueError(
                f"{loss}: {name} is not finite at batch position(s) {bad} (a row without a score?)"
            )
        tensors.append(value)
    return tensors[0], tensors[1]


class CoPGLoss(PreferenceLoss):
    """Contrastive Policy Gradient — Flet-Berliac et al. 2024, "Contrastive Policy Gradient: Aligning LLMs on
    sequence-level scores in a supervised-friendly fashion" (EMNLP 2024, arXiv 2406.19185), Eqs. 7-10 and
    17-19.

    For two completions of one prompt with rewards ``r(y)``, ``r(y')`` (any scalar: a reward model, a unit
    test,
    a rating; the pair is unordered) and ``R_b(y) = r(y) - b * lr(y)``, the paper *maximises*::

        l = (R_{beta/2}(y) - R_{beta/2}(y')) * lr(y) + (R_{beta/2}(y') - R_{beta/2}(y)) * lr(y')
          = dr * d - (beta/2) * d^2          with d = lr(y) - lr(y'), dr = r(y) - r(y')

    (Eq. 10; the "minimises" beside Eq. 17 is a sign slip: the updates of Eqs. 18-19 ascend). prefopt
    minimises::

        L = mean[(beta/2) * d^2 - dr * d]

    so ``dL/dlr(y) = -(R_beta(y) - R_beta(y'))`` (the contrastive policy gradient) and the optimum ``d* =
    dr/beta``
    is ``pi ~ pi_ref * exp(r / beta)``. L can be negative; ``L + dr^2/(2 beta)`` = ``(dr - beta d)^2 / (2
    beta)``
    has the same gradients. With rewards +-1/4 it is ``(beta/2) * IPO(tau=beta) - 1/(8 beta)`` (Prop. 3); with
    both
    samples drawn from the policy it is RLOO with k=2 (Prop. 2). The reward scale is tied to beta.

    Defaults: ``beta=0.06`` (the paper's best of {0.01, 0.03, 0.06, 0.1, 0.3, 1}; stable from 0.03 to 0.1).
    Reads: ``policy_*_logps``, ``reference_*_logps``, ``{chosen,rejected}_external_rewards`` (no grad).
    Logs: ``rewards/*`` (``beta * lr``), ``logps/*``, ``copg/reward_margin`` (``dr``), ``copg/objective``
    (``l``).
    """

    name: ClassVar[str] = "copg"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "scores"})
    step: ClassVar[str] = "scored_pairs"
    summary: ClassVar[str] = (
        "CoPG (Flet-Berliac et al. 2024): offline pairs with a reward per completion, (beta/2)d^2 - dr*d"
    )

    paper: ClassVar[str] = (
        "Flet-Berliac et al. 2024, Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in a "
        "supervised-friendly fashion (EMNLP 2024, arXiv 2406.19185)"
    )
    formula: ClassVar[str] = "d = lr(y) - lr(y'), dr = r(y) - r(y'); L = (beta/2) * d^2 - dr * d"

    def __init__(self, beta: float = 0.06) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        chosen_reward, rejected_reward = external_rewards(self.name, inputs, policy_chosen)
        d = chosen_logratios - rejected_logratios
        reward_margin = chosen_reward - rejected_reward
        objective = reward_margin * d - 0.5 * self.beta * d * d
        loss = -objective.mean()
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            {"copg/reward_margin": reward_margin, "copg/objective": objective},
        )
        return LossOutput(loss=loss, metrics=metrics)
