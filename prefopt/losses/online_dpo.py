"""Online DPO as TRL's ``OnlineDPOTrainer`` runs it: two policy samples per prompt, ordered by the reward layer."""

from __future__ import annotations

from typing import ClassVar

import torch

from prefopt.losses._checks import check_choice, check_number, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.dpo import sigmoid_preference_loss


class OnlineDPOLoss(PreferenceLoss):
    """Online DPO — Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (arXiv 2402.04792),
    in the form of TRL's ``OnlineDPOTrainer`` (``trl/experimental/online_dpo/online_dpo_trainer.py`` 1.16,
    ``training_step``).

    Per prompt the trainer draws **two samples from the current policy**, scores both with the reward layer (or
    asks a pairwise judge), and passes them ordered: the higher score is chosen, a tie goes to the first sample
    (TRL: ``first_half >= second_half``). Then, with ``lr(y) = logp_pi(y) - logp_ref(y)`` summed over tokens::

        sigmoid:  L = -logsigmoid(beta * (lr(y_w) - lr(y_l)))
        ipo:      L = (lr(y_w) - lr(y_l) - 1 / (2 beta))^2

    averaged over prompts. Unlike XPO the reference only scores (it never samples), and there is no bonus term.

    Defaults: ``beta=0.1``, ``loss_type="sigmoid"`` (TRL's defaults). The missing-EOS penalty TRL applies to the
    rewards is the reward layer's ``reward.missing_eos_penalty`` here.
    Reads: the DPO fields; optionally ``chosen_scores`` / ``rejected_scores`` ``[B]`` (the reward layer's scores of
    the two samples, logged only).
    Logs TRL's metrics under TRL's names: ``rewards/{chosen,rejected,margins,accuracies}``,
    ``logps/{chosen,rejected}``, ``objective/kl`` (mean over both samples of ``sum_t logp_pi - logp_ref``),
    ``objective/entropy`` (mean of ``-sum_t logp_pi``), ``objective/non_score_reward`` (``-beta * kl``), and with
    scores ``objective/rlhf_reward`` (score + non-score reward), ``objective/scores``, ``objective/scores_margin``;
    ``beta``. The step adds ``val/contain_eos_token``.
    """

    name: ClassVar[str] = "online_dpo"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "online", "preference"})
    step: ClassVar[str] = "online_policy_pairs"
    summary: ClassVar[str] = (
        "Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): two policy samples per prompt"
    )
    paper: ClassVar[str] = (
        'Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792'
    )
    formula: ClassVar[str] = (
        "y1, y2 ~ pi(.|x), ordered by the reward; L = -log sigmoid(beta * [(logp(y_w) - logp_ref(y_w)) "
        "- (logp(y_l) - logp_ref(y_l))]) (ipo: (margin - 1/(2 beta))^2)"
    )

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid") -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.loss_type = check_choice(self.name, "loss_type", loss_type, ("sigmoid", "ipo"))

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        margin = chosen_logratios - rejected_logratios
        if self.loss_type == "sigmoid":
            losses = sigmoid_preference_loss(self.beta * margin)
        else:  # IPO (Azar et al. 2023), as TRL's online trainer writes it
            losses = (margin - 1 / (2 * self.beta)) ** 2
        # Both samples of every prompt are policy samples: the KL and entropy estimates average over all 2B.
        kl = torch.cat([chosen_logratios, rejected_logratios]).detach()
        non_score = -self.beta * kl
        extra: dict[str, torch.Tensor] = {
            "objective/kl": kl,
            "objective/entropy": -torch.cat([policy_chosen, policy_rejected]).detach(),
            "objective/non_score_reward": non_score,
            "beta": torch.tensor(self.beta, dtype=kl.dtype, device=kl.device),
        }
        if inputs.chosen_scores is not None and inputs.rejected_scores is not None:
            scores = torch.cat([inputs.chosen_scores, inputs.rejected_scores]).to(kl.device, kl.dtype)
            extra["objective/scores"] = scores
            extra["objective/scores_margin"] = (inputs.chosen_scores - inputs.rejected_scores).to(kl.device)
            extra["objective/rlhf_reward"] = scores + non_score
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            extra,
        )
        return LossOutput(loss=losses.mean(), metrics=metrics)
