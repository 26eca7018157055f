"""Supervised fine-tuning warm-up: token-mean negative log-likelihood of the completions."""

from __future__ import annotations

from typing import ClassVar

from prefopt.losses._checks import check_choice, compute_dtype, lengths_as_float
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss

REDUCTIONS = ("token_mean", "sequence_mean", "sum")


class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning (maximum likelihood on prompt/completion rows), the usual first stage before
    preference optimisation (and the reference policy of DPO-family methods).

        L = sum_i(-logp(y_i)) / sum_i |y_i|

    one token mean over every completion token of the batch, so long completions weigh by their length
    (the usual causal-LM loss restricted to completion tokens; TRL's ``loss_type="sft"``). Two other
    normalisations exist for use inside a mixture (``loss.mix``), where SFT is the NLL of the chosen responses:

        reduction="sequence_mean":  L = mean_i(-logp(y_i) / |y_i|)     (RPO's nll="mean", SimPO's sft_weight)
        reduction="sum":            L = mean_i(-logp(y_i))             (RPO's nll="sum", weight eta * beta)

    Defaults: ``reduction="token_mean"``. Reads: ``policy_chosen_logps`` ``[B]`` (sums)
    and ``chosen_lengths`` ``[B]`` (zero raises).
    Logs: ``sft/nll`` (the loss), ``logps/chosen`` (mean of the per-sequence sums).
    """

    name: ClassVar[str] = "sft"
    needs: ClassVar[frozenset[str]] = frozenset()
    step: ClassVar[str] = "sft"
    summary: ClassVar[str] = "SFT warm-up: token-mean NLL of the completions (no preference data needed)"

    paper: ClassVar[str] = (
        "maximum-likelihood fine-tuning (the first stage of Ouyang et al. 2022, arXiv 2203.02155)"
    )
    formula: ClassVar[str] = "L = sum_i(-logp(y_i)) / sum_i |y_i|   (reduction='token_mean')"

    def __init__(self, reduction: str = "token_mean") -> None:
        self.reduction = check_choice(
            self.name,
            "reduction",
            reduction,
            REDUCTIONS,
            "token_mean: one mean over all tokens; sequence_mean: per-sequence mean, then over sequences; "
            "sum: per-sequence sum, mean over sequences.",
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("policy_chosen_logps", "chosen_lengths")
        policy_logps = compute_dtype(inputs.policy_chosen_logps)
        lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_logps)
        if self.reduction == "token_mean":
            loss = -policy_logps.sum() / lengths.sum()
        elif self.reduction == "sequence_mean":
            loss = -(policy_logps / lengths).mean()
        else:
            loss = -policy_logps.mean()
        metrics = batch_means({"sft/nll": loss, "logps/chosen": policy_logps})
        return LossOutput(loss=loss, metrics=metrics)
