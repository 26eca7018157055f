"""Supervised fine-tuning warm-up: token-mean negative log-likelihood of the completions."""

from __future__ import annotations

from typing import ClassVar, FrozenSet

from prefopt.losses._checks import compute_dtype, lengths_as_float
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss


class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning (maximum likelihood on prompt/completion rows), the usual first stage before
    preference optimisation (and the reference policy of DPO-family methods).

        L = sum_i(-logp(y_i)) / sum_i |y_i|

    one token mean over every completion token of the batch, so long completions weigh by their length
    (the usual causal-LM loss restricted to completion tokens).

    No parameters. Reads: ``policy_chosen_logps`` ``[B]`` (sums) and ``chosen_lengths`` ``[B]`` (zero raises).
    Logs: ``sft/nll`` (the loss), ``logps/chosen`` (mean of the per-sequence sums).
    """

    name: ClassVar[str] = "sft"
    needs: ClassVar[FrozenSet[str]] = frozenset()
    step: ClassVar[str] = "sft"
    summary: ClassVar[str] = "SFT warm-up: token-mean NLL of the completions (no preference data needed)"

    def __init__(self) -> None:
        pass

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("policy_chosen_logps", "chosen_lengths")
        policy_logps = compute_dtype(inputs.policy_chosen_logps)
        lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_logps)
        loss = -policy_logps.sum() / lengths.sum()
        metrics = batch_means({"sft/nll": loss, "logps/chosen": policy_logps})
        return LossOutput(loss=loss, metrics=metrics)
