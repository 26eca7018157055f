"""Preference-optimisation losses: one small module per method, chosen by name.

Usage::

    from prefopt.losses import LossInputs, get_loss
    loss = get_loss("fdpo", beta=0.1, divergence="js")  # unknown name/parameter/value -> ValueError
    out = loss(LossInputs(policy_chosen_logps=..., policy_rejected_logps=..., ...))
    out.loss.backward(); log(out.metrics)                # metrics: dict[str, float]

The formulas, conventions and worked numbers each module is tested against are in docs/losses.md.
"""

from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.registry import DEFAULT_LOSS, available_losses, get_loss, loss_class, loss_parameters

__all__ = [
    "DEFAULT_LOSS",
    "ImplicitReward",
    "LossInputs",
    "LossOutput",
    "PreferenceLoss",
    "available_losses",
    "get_loss",
    "loss_class",
    "loss_parameters",
]
