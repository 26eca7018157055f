"""DPO and its conservative (label-smoothed) form."""

from __future__ import annotations

from typing import ClassVar, FrozenSet

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss


def sigmoid_preference_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair ``-(1-e) logsigmoid(z) - e logsigmoid(-z)``; with ``e = 0`` it is the Bradley–Terry NLL.

    ``-F.logsigmoid`` (a softplus) stays finite and exact for large ``|z|``, unlike ``log(sigmoid(z))``.
    """
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization — Rafailov et al. 2023, "Direct Preference Optimization:
    Your Language Model is Secretly a Reward Model" (arXiv 2305.18290).

    With ``lr(y) = logp_policy(y) - logp_ref(y)`` (sums over completion tokens), ``h = lr(y_w) - lr(y_l)``::

        L = -logsigmoid(beta * h)                                              (label_smoothing = 0)
        L = -(1 - e) * logsigmoid(beta * h) - e * logsigmoid(-beta * h)        (cDPO, e = label_smoothing)

    averaged over pairs. cDPO assumes each label is flipped with probability ``e``; TRL calls the same
    parameter ``label_smoothing``.

    Defaults: ``beta=0.1``, ``label_smoothing=0.0`` (must lie in [0, 0.5)).
    Reads: ``policy_{chosen,rejected}_logps``, ``reference_{chosen,rejected}_logps``.
    Logs: ``rewards/*`` (``beta * lr``), ``logps/*`` (sums).
    """

    name: ClassVar[str] = "dpo"
    needs: ClassVar[FrozenSet[str]] = frozenset({"reference"})
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = (
        "DPO (Rafailov et al. 2023): -logsigmoid(beta*(lr_w - lr_l)); cDPO via label_smoothing"
    )

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.label_smoothing = check_number(
            self.name,
            "label_smoothing",
            label_smoothing,
            low=0.0,
            high=0.5,
            high_open=True,
            hint="It is the probability that a label is flipped; 0.5 would make the loss constant.",
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        logits = self.beta * (chosen_logratios - rejected_logratios)
        loss = sigmoid_preference_loss(logits, self.label_smoothing).mean()
        metrics = pairwise_metrics(
            self.beta * chosen_logratios, self.beta * rejected_logratios, policy_chosen, policy_rejected
        )
        return LossOutput(loss=loss, metrics=metrics)
