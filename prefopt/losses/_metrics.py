"""Metrics every pairwise loss logs (docs/losses.md, Conventions), computed with one host transfer."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def batch_means(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each tensor as a Python float, with one host sync (``.tolist()`` of one stacked tensor)."""
    if not values:
        return {}
    # float64 when any input is float64 (exact tests); else float32 (half inputs; MPS has no float64).
    dtype = torch.float64 if any(value.dtype == torch.float64 for value in values.values()) else torch.float32
    device = next(iter(values.values())).device  # scores from the reward layer may live on another device
    means = torch.stack([value.detach().to(device=device, dtype=dtype).mean() for value in values.values()])
    return dict(zip(values.keys(), means.tolist()))


def pairwise_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``rewards/{chosen,rejected,margins,accuracies}`` and ``logps/{chosen,rejected}`` as batch means.

    Accuracy uses a strict ``>``, so a pair with equal rewards (every pair at step 0, policy == reference)
    counts as wrong and the accuracy starts at 0. ``extra`` adds more per-pair or scalar tensors to average.
    """
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    values = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    if extra:
        values.update(extra)
    return batch_means(values)
