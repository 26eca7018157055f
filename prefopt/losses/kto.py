"""KTO: alignment from single completions labelled desirable or undesirable, with a KL reference point."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from prefopt.losses._checks import check_choice, check_number, compute_dtype
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss

LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLoss(PreferenceLoss):
    """KTO — Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv 2402.01306), Eq. 7-8; TRL 1.16 ``KTOTrainer`` (``trl/trainer/kto_trainer.py``, ``_compute_loss``).

    Each row is one completion ``y`` of a prompt ``x`` with a label: desirable (``D``) or undesirable (``U``);
    no pairs are needed. With ``lr(x, y) = logp(y|x) - logp_ref(y|x)`` and the implicit reward
    ``r = beta * lr``::

        z0   = max(0, mean_j lr(x_j, y'_j))        (no gradient)
        L(y) = w_D * (1 - sigmoid(r - beta*z0))    y desirable
             = w_U * (1 - sigmoid(beta*z0 - r))    y undesirable
        L    = mean over the batch's rows

    (``w_D``, ``w_U``: ``desirable_weight``, ``undesirable_weight``).

    ``z0`` is the reference point, an estimate of KL(pi || pi_ref): as the paper and TRL do, it is the mean
    log-ratio of *mismatched* pairs -- each prompt ``x_j`` of the batch followed by the completion ``y'_j`` of
    another row (the batch's completions rotated by one) -- detached, averaged over every process of a
    distributed run (TRL gathers the per-process means), then clamped at 0.

    ``loss_type="apo_zero_unpaired"`` (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 unpaired, as TRL
    1.16): no reference point; desirable rows ``1 - sigmoid(r)``, undesirable rows ``sigmoid(r)`` (each times its
    weight). It needs no mismatched pairs.

    Defaults (the paper's and TRL 1.16's): ``beta=0.1``, ``desirable_weight=1.0``, ``undesirable_weight=1.0``,
    ``loss_type="kto"``. With ``n_D`` desirable and ``n_U`` undesirable rows the paper (Eq. 8) recommends
    ``desirable_weight * n_D / (undesirable_weight * n_U)`` in ``[1, 4/3]`` (the trainer warns outside it, as
    TRL does). TRL's ``KTOConfig`` defaults the learning rate to 1e-6. The rotation needs at least 2 rows per
    device (checked before a run starts).

    Reads: ``policy_logps``, ``reference_logps``, ``desirable`` (bool), and for ``kto``
    ``mismatched_policy_logps``, ``mismatched_reference_logps``.
    Logs (TRL's names): ``kl`` (z0), ``rewards/chosen`` / ``rewards/rejected`` (mean ``r`` over the desirable /
    undesirable rows, each only when the batch has such rows), ``rewards/margins`` (their difference, when both),
    ``logps/chosen`` / ``logps/rejected`` (sums), ``kto/desirable_fraction``.
    Implicit reward: ``beta * (logp - logp_ref)``.
    """

    name: ClassVar[str] = "kto"
    needs: frozenset[str] = frozenset({"reference", "mismatched"})
    step: ClassVar[str] = "unpaired"
    summary: ClassVar[str] = (
        "KTO (Ethayarajh et al. 2024): unpaired desirable/undesirable rows against a KL reference point"
    )
    paper: ClassVar[str] = (
        "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306)"
    )
    formula: ClassVar[str] = (
        "L = w_D (1 - sigmoid(r - beta z0)) on desirable rows, w_U (1 - sigmoid(beta z0 - r)) on undesirable "
        "rows,  r = beta lr,  z0 = max(0, mean lr of mismatched prompt/completion pairs)"
    )

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.desirable_weight = check_number(self.name, "desirable_weight", desirable_weight, low=0.0)
        self.undesirable_weight = check_number(self.name, "undesirable_weight", undesirable_weight, low=0.0)
        self.loss_type = check_choice(
            self.name,
            "loss_type",
            loss_type,
            LOSS_TYPES,
            "kto: the paper's loss with the KL reference point; apo_zero_unpaired: APO-zero on unpaired rows "
            "(no reference point).",
        )
        if self.loss_type != "kto":  # no reference point: the step skips the mismatched forward passes
            self.needs = frozenset({"reference"})

    def implicit_reward(self) -> ImplicitReward:
        """``beta * (logp - logp_ref)``: the reward ``r`` the loss compares with the reference point."""
        return ImplicitReward(scale=self.beta)

    def label_balance_warning(self, desirable: int, undesirable: int) -> Optional[str]:
        """The paper's Eq. 8 check (as TRL 1.16 warns): ``desirable_weight * n_D / (undesirable_weight * n_U)``
        should lie in ``[1, 4/3]``; outside it, a message with the weights that would bring it back."""
        if self.loss_type != "kto" or not desirable or not undesirable or not self.undesirable_weight:
            return None
        ratio = self.desirable_weight * desirable / (self.undesirable_weight * undesirable)
        if 1.0 <= ratio <= 4 / 3 + 1e-9:
            return None
        low_d = self.undesirable_weight * undesirable / desirable
        low_u = self.desirable_weight * desirable / undesirable
        return (
            f"loss '{self.name}': the training data has {desirable} desirable and {undesirable} undesirable "
            f"completions, so desirable_weight * n_D / (undesirable_weight * n_U) = {ratio:.3g}, outside the "
            f"KTO paper's recommended [1, 4/3] (Eq. 8); set loss.desirable_weight in [{low_d:.3g}, "
            f"{low_d * 4 / 3:.3g}] or loss.undesirable_weight in [{low_u * 3 / 4:.3g}, {low_u:.3g}]"
        )

    def reference_point(self, inputs: LossInputs) -> Optional[torch.Tensor]:
        """``z0``: the clamped mean log-ratio of the mismatched pairs (no gradient); None for apo_zero_unpaired."""
        if self.loss_type != "kto":
            return None
        inputs.require("mismatched_policy_logps", "mismatched_reference_logps")
        policy = compute_dtype(inputs.mismatched_policy_logps.detach())
        reference = compute_dtype(inputs.mismatched_reference_logps.detach())
        if policy.shape != reference.shape or policy.dim() != 1 or policy.numel() == 0:
            raise ValueError(
                f"{self.name}: mismatched_policy_logps {tuple(policy.shape)} and mismatched_reference_logps "
                f"{tuple(reference.shape)} must be the same non-empty [M]"
            )
        return (policy - reference).mean().clamp(min=0)

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("policy_logps", "reference_logps", "desirable")
        policy = compute_dtype(inputs.policy_logps)
        reference = compute_dtype(inputs.reference_logps.detach())
        desirable = inputs.desirable.to(device=policy.device, dtype=torch.bool)
        if policy.dim() != 1 or reference.shape != policy.shape or desirable.shape != policy.shape:
            raise ValueError(
                f"{self.name}: policy_logps {tuple(policy.shape)}, reference_logps {tuple(reference.shape)} and "
                f"desirable {tuple(desirable.shape)} must all be the same [B]"
            )
        rewards = self.implicit_reward().sequence(policy, reference)
        z0 = self.reference_point(inputs)
        if z0 is None:  # APO-zero, unpaired: anchored at the reference itself
            desirable_losses = 1 - torch.sigmoid(rewards)
            undesirable_losses = torch.sigmoid(rewards)
        else:
            shift = self.beta * z0.to(rewards.dtype)
            desirable_losses = 1 - torch.sigmoid(rewards - shift)
            undesirable_losses = 1 - torch.sigmoid(shift - rewards)
        losses = torch.where(
            desirable,
            self.desirable_weight * desirable_losses,
            self.undesirable_weight * undesirable_losses,
        )
        metrics = _metrics(rewards.detach(), policy.detach(), desirable, z0)
        return LossOutput(loss=losses.mean(), metrics=metrics)


def _metrics(
    rewards: torch.Tensor, policy: torch.Tensor, desirable: torch.Tensor, z0: Optional[torch.Tensor]
) -> dict[str, float]:
    values: dict[str, torch.Tensor] = {
        "kl": z0 if z0 is not None else torch.zeros((), dtype=rewards.dtype, device=rewards.device),
        "kto/desirable_fraction": desirable.to(rewards.dtype),
    }
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        if bool(mask.any()):
            values[f"rewards/{side}"] = rewards[mask]
            values[f"logps/{side}"] = policy[mask]
    metrics = batch_means(values)
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
