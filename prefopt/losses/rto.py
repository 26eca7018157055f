"""RTO: PPO with a dense token-level reward from a DPO policy.

:func:`rto_token_rewards` is the rollout-side reward math; :class:`RTOLoss` is :class:`~prefopt.losses.ppo.PPOLoss`
with that reward. GAE, whitening and the clipped objective live in ``prefopt/losses/ppo.py`` (re-exported here).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prefopt.losses._checks import check_number, compute_dtype
from prefopt.losses.ppo import (
    MAX_LOG_RATIO,
    RM_SCORE_CLIP,
    PPOLoss,
    RolloutTokens,
    TokenRewards,
    _masked,
    gae,
    masked_whiten,
    sequence_mean,
)

__all__ = [
    "MAX_LOG_RATIO",
    "RM_SCORE_CLIP",
    "RTOLoss",
    "gae",
    "masked_whiten",
    "rto_token_rewards",
    "sequence_mean",
]


def rto_token_rewards(
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    dpo_logps: torch.Tensor,
    rm_scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    dpo_reward_scale: float = 0.05,
    dpo_reward_clip: float = 0.05,
    kl_coef: float = 0.01,
    rm_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RTO's dense per-token reward (docs/losses.md, rto), ``[N, T]``, zero outside ``mask``::

        dpo_t    = clamp(dpo_reward_scale * (logp_dpo_t - logp_ref_t), -dpo_reward_clip, dpo_reward_clip)
        kl_t     = logp_old_t - logp_ref_t
        reward_t = dpo_t - kl_coef * kl_t + [t == last] * rm_weight * clamp(RM, -10, 10)

    ``old_logps``/``ref_logps``/``dpo_logps``: per-token logps ``[N, T]`` of the rollout policy, the SFT
    reference and the DPO policy; ``rm_scores``: ``[N]`` sequence scores, added at the last position where
    ``mask`` is 1. Returns ``(rewards, parts)``; ``parts`` = ``{"dpo": dpo_t, "kl": kl_t, "rm": rm}``
    (unweighted; ``rm`` is the clamped ``[N]`` score) for logging. Inputs are constants (detached).
    """
    mask = mask.bool()
    old_logps, ref_logps, dpo_logps = (compute_dtype(t.detach()) for t in (old_logps, ref_logps, dpo_logps))
    dpo = (dpo_reward_scale * (dpo_logps - ref_logps)).clamp(-dpo_reward_clip, dpo_reward_clip)
    kl = old_logps - ref_logps
    rm = compute_dtype(rm_scores.detach()).reshape(-1).to(dpo.dtype).clamp(-RM_SCORE_CLIP, RM_SCORE_CLIP)
    # The last response token of a row is the mask position whose running count equals the row's total.
    is_last = mask & (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True))
    rewards = dpo - kl_coef * kl + is_last.to(dpo.dtype) * (rm_weight * rm)[:, None]
    parts = {"dpo": _masked(dpo, mask), "kl": _masked(kl, mask), "rm": rm}
    return _masked(rewards, mask), parts


class RTOLoss(PPOLoss):
    """Reinforced Token Optimization — Zhong et al. 2024, "DPO Meets PPO: Reinforced Token Optimization for
    RLHF" (arXiv 2404.18922).

    Stage 1 trains a DPO policy from the SFT model; stage 2 runs PPO from the SFT model (``pi_ref`` = SFT)
    with the dense reward of :func:`rto_token_rewards`, GAE (:func:`gae`) and advantages whitened over the
    rollout batch (:func:`masked_whiten`). This class is the per-minibatch PPO objective (clipped policy loss,
    Schulman et al. 2017, and clipped value loss)::

        ratio        = exp(logp_new - logp_old)
        policy_loss  = mean_seq( token_mean( -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) ) )
        V_clip       = V_old + clip(V - V_old, -value_clip_eps, value_clip_eps)
        value_loss   = mean_seq( token_mean( 0.5 * max((V_clip - R)^2, (V - R)^2) ) )
        loss         = policy_loss + value_loss_coef * value_loss

    Defaults (released RTO code): ``dpo_reward_scale=0.05``, ``dpo_reward_clip=0.05``, ``kl_coef=0.01``,
    ``rm_weight=1.0``, ``clip_eps=0.2``, ``value_clip_eps=0.2``, ``gamma=1.0``, ``lam=0.95``;
    ``value_loss_coef=1.0`` weighs the value loss, which already carries its 0.5. The reward parameters and
    ``gamma``/``lam`` are used by :meth:`token_rewards` and :meth:`advantages`, which the trainer calls at
    rollout time. The DPO policy must come from the same SFT model that is the PPO reference (the trainer
    checks this).

    Reads: ``response_mask``, ``policy_token_logps`` (with grad), ``old_token_logps``, ``advantages``, all
    ``[N, T]``; ``values`` (with grad), ``old_values`` and ``returns`` for the value loss (values and
    old_values both None: policy loss only).
    Logs: ``ppo/policy_loss``, ``ppo/value_loss``, ``ppo/clip_fraction`` and ``ppo/value_clip_fraction``
    (share of response tokens where the clipped branch is the one used), ``ppo/approx_kl`` (token mean of
    ``(ratio - 1) - log ratio``, Schulman's non-negative k3 estimator of KL(old || new)).
    """

    name: ClassVar[str] = "rto"
    needs: frozenset[str] = frozenset({"reference", "online", "reward", "dpo_policy"})
    step: ClassVar[str] = "ppo"
    summary: ClassVar[str] = (
        "RTO (Zhong et al. 2024): PPO with dense DPO token rewards + sparse reward-model score"
    )
    paper: ClassVar[str] = (
        "Zhong et al. 2024, DPO Meets PPO: Reinforced Token Optimization for RLHF (arXiv 2404.18922)"
    )
    formula: ClassVar[str] = (
        "PPO with token reward clamp(scale (logp_dpo_t - logp_ref_t)) - kl_coef kl_t + [last] "
        "rm_weight RM(x, y)"
    )

    def __init__(
        self,
        dpo_reward_scale: float = 0.05,
        dpo_reward_clip: float = 0.05,
        kl_coef: float = 0.01,
        rm_weight: float = 1.0,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_loss_coef: float = 1.0,
    ) -> None:
        name = self.name
        self.dpo_reward_scale = check_number(name, "dpo_reward_scale", dpo_reward_scale, low=0.0)
        self.dpo_reward_clip = check_number(name, "dpo_reward_clip", dpo_reward_clip, low=0.0, low_open=True)
        self.rm_weight = check_number(name, "rm_weight", rm_weight, low=0.0)
        self._init_ppo(kl_coef, clip_eps, value_clip_eps, gamma, lam, value_loss_coef)
        if self.dpo_reward_scale == 0.0:  # plain PPO with the sparse reward: no DPO policy to load
            self.needs = self.needs - {"dpo_policy"}

    def token_rewards(self, rollout: RolloutTokens, kl_coef: float) -> TokenRewards:
        """:func:`rto_token_rewards` with this loss's reward parameters and the step's current ``kl_coef``."""
        dpo_logps = rollout.dpo_logps if rollout.dpo_logps is not None else rollout.reference_logps
        rewards, parts = rto_token_rewards(
            rollout.policy_logps,
            rollout.reference_logps,
            dpo_logps,
            rollout.scores,
            rollout.mask,
            dpo_reward_scale=self.dpo_reward_scale,
            dpo_reward_clip=self.dpo_reward_clip,
            kl_coef=kl_coef,
            rm_weight=self.rm_weight,
        )
        metrics = {
            "rto/dpo_reward": parts["dpo"].sum(-1),
            "rto/kl": parts["kl"].sum(-1),
            "rto/rm_score": parts["rm"],
            "rto/total_reward": rewards.sum(-1),
        }
        return TokenRewards(rewards, parts["kl"], metrics)
