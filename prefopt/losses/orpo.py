"""ORPO: reference-free SFT plus an odds-ratio preference term, in one stage."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number, lengths_as_float, pair_tensors
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (branch at ``-ln 2``, Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLoss(PreferenceLoss):
    """Odds Ratio Preference Optimization — Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model" (arXiv 2403.07691), Eqs. 4-7.

    With ``avg(y) = logp(y)/|y|`` (mean token log-prob, so ``P = exp(avg)`` lies in (0, 1)) and the log odds
    ``log odds(y) = avg(y) - log(1 - exp(avg(y)))``::

        L = NLL(y_w) - beta * logsigmoid(log odds(y_w) - log odds(y_l))

    ``NLL`` is the token-mean negative log-likelihood over every chosen token of the batch (the usual causal-LM
    loss; TRL's ``cross_entropy`` on the chosen half). ``beta`` is the paper's lambda. No reference model.

    Defaults: ``beta=0.1`` (the paper's lambda and TRL's default). TRL: ``trl.experimental.orpo``.
    Reads: ``policy_{chosen,rejected}_logps``, ``chosen_lengths``, ``rejected_lengths`` (zero raises).
    Logs: ``rewards/*`` = ``beta * avg`` (TRL's), ``logps/*`` = averages, ``sft/nll``, ``orpo/log_odds_ratio``
    (mean ``logsigmoid`` term) and ``orpo/log_odds`` (mean log odds difference).
    """

    name: ClassVar[str] = "orpo"
    needs: ClassVar[frozenset[str]] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "ORPO: reference-free, NLL(y_w) - beta*logsigmoid(log odds ratio)"
    paper: ClassVar[str] = (
        "Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model "
        "(arXiv 2403.07691)"
    )
    formula: ClassVar[str] = (
        "L = NLL(y_w) - beta logsigmoid(log odds(y_w) - log odds(y_l)),  "
        "log odds(y) = avg(y) - log(1 - exp(avg(y)))"
    )

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)

    def implicit_reward(self) -> ImplicitReward:
        """``beta * logp / |y|``: reference-free, length-normalised (as TRL's ORPO logs it)."""
        return ImplicitReward(scale=self.beta, uses_reference=False, length_normalized=True)

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, _, _ = pair_tensors(self.name, inputs, reference=False)
        chosen_lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_chosen)
        rejected_lengths = lengths_as_float(
            self.name, "rejected_lengths", inputs.rejected_lengths, policy_rejected
        )
        chosen_avg, rejected_avg = policy_chosen / chosen_lengths, policy_rejected / rejected_lengths
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        ratio = F.logsigmoid(log_odds)
        nll = -policy_chosen.sum() / chosen_lengths.sum()
        loss = nll - self.beta * ratio.mean()
        metrics = pairwise_metrics(
            self.beta * chosen_avg,
            self.beta * rejected_avg,
            chosen_avg,
            rejected_avg,
            extra={"sft/nll": nll, "orpo/log_odds_ratio": ratio, "orpo/log_odds": log_odds},
        )
        return LossOutput(loss=loss, metrics=metrics)
