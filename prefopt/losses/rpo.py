"""RPO: DPO plus an SFT (negative log-likelihood) term on the chosen response."""

from __future__ import annotations

from typing import ClassVar, Optional

from prefopt.losses._checks import check_choice, check_number, lengths_as_float, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.dpo import sigmoid_preference_loss

NLL_MODES = ("sum", "mean")


class RPOLoss(PreferenceLoss):
    """Regularized Preference Optimization — Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF:
    Your SFT Loss is Implicitly an Adversarial Regularizer" (arXiv 2405.16436).

    DPO plus an SFT term on the chosen response, in one of two normalisations::

        nll="sum"  (paper, official code):   L = L_DPO + eta * beta * (-logp(y_w))
        nll="mean" (authors' average form):  L = L_DPO + eta * (-logp(y_w) / |y_w|)

    each averaged over pairs (``"mean"`` is a per-sequence token mean, then a mean over pairs). TRL 1.16
    expresses RPO as ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, w]``, whose SFT term is one
    token mean over all chosen tokens of the batch: it equals ``nll="mean"`` with ``eta = w`` (and
    ``nll="sum"`` with ``eta * beta * |y_w| = w``) when every chosen completion has the same length.

    Defaults: ``beta=0.1``, ``eta=0.005``, ``nll="sum"``, ``ld_alpha=None`` (LD-DPO off; with it both terms read
    the length-desensitised sums, :mod:`prefopt.losses.modifiers`).
    Reads: ``policy_{chosen,rejected}_logps``, ``reference_{chosen,rejected}_logps``; ``chosen_lengths`` when
    ``nll="mean"`` (a zero length raises).
    Logs: ``rewards/*``, ``logps/*`` (sums), ``sft/nll`` = the unweighted NLL term (sum or mean per ``nll``).
    """

    name: ClassVar[str] = "rpo"
    needs: ClassVar[frozenset[str]] = frozenset({"reference"})
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "RPO (Liu et al. 2024): DPO + eta * SFT loss on the chosen response"
    paper: ClassVar[str] = (
        "Liu et al. 2024, Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly"
        " an Adversarial Regularizer (arXiv 2405.16436)"
    )
    formula: ClassVar[str] = (
        "L = L_DPO + eta beta (-logp_w)   (nll='sum');   L_DPO + eta (-logp_w/|y_w|)   (nll='mean')"
    )

    def __init__(
        self, beta: float = 0.1, eta: float = 0.005, nll: str = "sum", ld_alpha: Optional[float] = None
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self._set_ld_alpha(ld_alpha)  # LD-DPO: both terms run on the length-desensitised sums
        self.eta = check_number(self.name, "eta", eta, low=0.0)
        self.nll = check_choice(
            self.name,
            "nll",
            nll,
            NLL_MODES,
            "'sum' is the paper's eta*beta*(-logp); 'mean' is eta*(-logp/|y|).",
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        dpo_loss = sigmoid_preference_loss(self.beta * (chosen_logratios - rejected_logratios)).mean()
        if self.nll == "sum":
            nll = -policy_chosen.mean()
            weight = self.eta * self.beta
        else:
            lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_chosen)
            nll = -(policy_chosen / lengths).mean()
            weight = self.eta
        loss = dpo_loss + weight * nll
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            extra={"sft/nll": nll},
        )
        return LossOutput(loss=loss, metrics=metrics)
