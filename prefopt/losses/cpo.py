"""CPO: reference-free DPO on raw log-likelihoods plus a behaviour-cloning term."""

from __future__ import annotations

from typing import ClassVar, Optional

from prefopt.losses._checks import check_number, lengths_as_float, pair_tensors
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.dpo import sigmoid_preference_loss


class CPOLoss(PreferenceLoss):
    """Contrastive Preference Optimization — Xu et al. 2024, "Contrastive Preference Optimization: Pushing the
    Boundaries of LLM Performance in Machine Translation" (arXiv 2401.08417), Eq. 7.

    DPO with the reference dropped (a uniform reference), plus negative log-likelihood on the chosen
    response::

        L = cDPO(beta * (logp(y_w) - logp(y_l)), label_smoothing) + cpo_alpha * NLL(y_w)

    ``logp`` are sums over completion tokens; ``NLL`` is the token mean over every chosen token of the batch
    (TRL's ``cross_entropy`` on the chosen half). ``cpo_alpha=0`` leaves the contrastive term alone.

    ``ld_alpha`` (LD-DPO, :mod:`prefopt.losses.modifiers`; default None = off) runs both terms on the
    length-desensitised sums.

    Defaults: ``beta=0.1``, ``label_smoothing=0.0``, ``cpo_alpha=1.0`` (TRL's defaults; the paper's BC weight
    is 1). TRL: ``trl.experimental.cpo`` with ``loss_type="sigmoid"``.
    Reads: ``policy_{chosen,rejected}_logps``; ``chosen_lengths`` when ``cpo_alpha > 0`` (zero raises).
    Logs: ``rewards/*`` = ``beta * logp`` (sums, TRL's), ``logps/*`` (sums), ``sft/nll`` when ``cpo_alpha > 0``.
    """

    name: ClassVar[str] = "cpo"
    needs: ClassVar[frozenset[str]] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "CPO: reference-free -logsigmoid(beta*(logp_w - logp_l)) + cpo_alpha*NLL(y_w)"
    paper: ClassVar[str] = (
        "Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM "
        "Performance in Machine Translation (arXiv 2401.08417)"
    )
    formula: ClassVar[str] = "L = -logsigmoid(beta (logp_w - logp_l)) + cpo_alpha NLL(y_w)"

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        ld_alpha: Optional[float] = None,
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self._set_ld_alpha(ld_alpha)  # LD-DPO: the preference and NLL terms run on the desensitised sums
        self.label_smoothing = check_number(
            self.name,
            "label_smoothing",
            label_smoothing,
            low=0.0,
            high=0.5,
            high_open=True,
            hint="It is the probability that a label is flipped; 0.5 would make the loss constant.",
        )
        self.cpo_alpha = check_number(self.name, "cpo_alpha", cpo_alpha, low=0.0)

    def implicit_reward(self) -> ImplicitReward:
        """``beta * logp``: reference-free, not length-normalised."""
        return ImplicitReward(scale=self.beta, uses_reference=False)

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, _, _ = pair_tensors(self.name, inputs, reference=False)
        chosen_rewards, rejected_rewards = self.beta * policy_chosen, self.beta * policy_rejected
        loss = sigmoid_preference_loss(chosen_rewards - rejected_rewards, self.label_smoothing).mean()
        extra = {}
        if self.cpo_alpha > 0:
            lengths = lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, policy_chosen)
            nll = -policy_chosen.sum() / lengths.sum()
            loss = loss + self.cpo_alpha * nll
            extra["sft/nll"] = nll
        metrics = pairwise_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, extra)
        return LossOutput(loss=loss, metrics=metrics)
