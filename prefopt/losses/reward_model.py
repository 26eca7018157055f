"""Bradley–Terry reward-model training on preference pairs."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_number, compute_dtype
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss


class RewardModelLoss(PreferenceLoss):
    """Bradley–Terry reward model — Bradley & Terry 1952; as used for RLHF reward models by Ouyang et al. 2022
    ("Training language models to follow instructions with human feedback", arXiv 2203.02155).

    With scalar scores ``s_w``, ``s_l`` of the chosen and rejected sequences from a sequence classifier::

        L = mean(-logsigmoid(s_w - s_l)) + center_rewards_coef * mean((s_w + s_l)^2)

    The optional centring term (Eisenstein et al. 2023, "Helping or Herding?") keeps scores near zero mean,
    which the Bradley–Terry loss alone leaves undetermined.

    Defaults: ``center_rewards_coef=0.0``.
    Reads: ``chosen_scores``, ``rejected_scores`` ``[B]`` (with grad).
    Logs: ``rewards/chosen``, ``rewards/rejected`` (mean scores), ``rewards/margins``, ``rewards/accuracies``
    (strict ``>``).
    """

    name: ClassVar[str] = "reward_model"
    needs: ClassVar[frozenset[str]] = frozenset()
    step: ClassVar[str] = "reward_pairs"
    summary: ClassVar[str] = "Bradley-Terry reward model: -logsigmoid(s_w - s_l), optional reward centring"
    paper: ClassVar[str] = (
        "Bradley & Terry 1952; reward models for RLHF as in Ouyang et al. 2022 (arXiv 2203.02155)"
    )
    formula: ClassVar[str] = "L = -logsigmoid(s_w - s_l) + center_rewards_coef (s_w + s_l)^2"

    def __init__(self, center_rewards_coef: float = 0.0) -> None:
        self.center_rewards_coef = check_number(
            self.name, "center_rewards_coef", center_rewards_coef, low=0.0
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("chosen_scores", "rejected_scores")
        chosen = compute_dtype(inputs.chosen_scores)
        rejected = compute_dtype(inputs.rejected_scores)
        if chosen.shape != rejected.shape:
            raise ValueError(
                f"{self.name}: chosen_scores {tuple(chosen.shape)} and "
                f"rejected_scores {tuple(rejected.shape)} must have the same shape"
            )
        # Sequence classifiers return [B, 1]; treat that as [B].
        chosen, rejected = chosen.reshape(-1), rejected.reshape(-1)
        loss = -F.logsigmoid(chosen - rejected).mean()
        if self.center_rewards_coef > 0:
            loss = loss + self.center_rewards_coef * ((chosen + rejected) ** 2).mean()
        values: dict[str, torch.Tensor] = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
        }
        return LossOutput(loss=loss, metrics=batch_means(values))
