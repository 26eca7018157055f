"""PPO as a loss module: the clipped policy/value objective plus the rollout-time hooks the ``ppo`` step calls.

A ``ppo`` step (``prefopt/trainer/ppo.py``) samples responses, asks the loss for per-token rewards
(:meth:`PPOLoss.token_rewards`), advantages (:meth:`PPOLoss.advantages`), then takes several optimizer updates over
minibatches with :meth:`PPOLoss.forward`. A method that is "PPO with another reward" (RTO) subclasses
:class:`PPOLoss` and overrides :meth:`PPOLoss.token_rewards`; the step never reads the loss's hyperparameters.

All tensors are right-padded ``[N, T]`` aligned to response tokens, with ``mask`` 1 on response tokens; values at
masked positions are ignored (they may be garbage, even NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from prefopt.losses._checks import check_number, compute_dtype
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss

RM_SCORE_CLIP = 10.0
# exp(20) ~ 5e8: any ratio that far from 1 is clipped by PPO anyway; the cap only keeps exp (and 0 * inf in
# the backward of the unselected branch) from producing inf/NaN when a stale rollout drifts very far.
MAX_LOG_RATIO = 20.0


@dataclass
class RolloutTokens:
    """What the ``ppo`` step measured on one rollout batch, handed to :meth:`PPOLoss.token_rewards`.

    ``policy_logps``/``reference_logps``/``dpo_logps``: per-token logps ``[N, T]`` of the rollout policy, the
    reference and (when the loss needs ``"dpo_policy"``) the frozen DPO policy; ``scores``: ``[N]`` sequence
    scores from the reward layer; ``mask``: ``[N, T]`` bool, 1 on response tokens.
    """

    policy_logps: torch.Tensor
    reference_logps: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    dpo_logps: Optional[torch.Tensor] = None


@dataclass
class TokenRewards:
    """``rewards`` ``[N, T]`` (zero outside the mask); ``kl`` ``[N, T]`` the per-token log-ratio to the reference
    that the step's adaptive-KL controller and eval read; ``metrics``: per-sequence ``[N]`` tensors to log."""

    rewards: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not x * mask: 0 * NaN (e.g. -inf - -inf at padding) would still be NaN.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ppo_token_rewards(
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rm_scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    rm_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ziegler et al. 2019's shaped reward: ``-kl_coef * (logp_old_t - logp_ref_t)`` on every response token plus
    ``rm_weight * clamp(score, -10, 10)`` on the last one. Returns ``(rewards, kl, clamped scores)``."""
    mask = mask.bool()
    old_logps, ref_logps = (compute_dtype(t.detach()) for t in (old_logps, ref_logps))
    kl = old_logps - ref_logps
    rm = compute_dtype(rm_scores.detach()).reshape(-1).to(kl.dtype).clamp(-RM_SCORE_CLIP, RM_SCORE_CLIP)
    # The last response token of a row is the mask position whose running count equals the row's total.
    is_last = mask & (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True))
    rewards = -kl_coef * kl + is_last.to(kl.dtype) * (rm_weight * rm)[:, None]
    return _masked(rewards, mask), _masked(kl, mask), rm


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` past a response's end = 0, ``A_t = delta_t +
    gamma * lam * A_{t+1}``, ``R_t = A_t + V_t``. Any position with ``mask`` 0 ends the recursion, so each
    row's last response token bootstraps from 0 whatever its length. Returns ``(advantages, returns)``,
    ``[N, T]``, zero outside ``mask``, without gradient.
    """
    mask = mask.bool()
    rewards = _masked(compute_dtype(rewards.detach()), mask)
    values = _masked(compute_dtype(values.detach()).to(rewards.dtype), mask)
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    next_advantage = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = _masked(delta + gamma * lam * next_advantage, mask[:, t])
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    return advantages, _masked(advantages + values, mask)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    mean: Optional[torch.Tensor | float] = None,
    var: Optional[torch.Tensor | float] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the positions where ``mask`` is 1; zero elsewhere.

    ``shift_mean=False`` adds the mean back (rescale only). The statistics are over *all* response tokens of
    the rollout batch: on several ranks either pass precomputed global ``mean``/``var``, or ``reduce``, a
    callable that sums a tensor across ranks (e.g. ``lambda t: accelerator.reduce(t, reduction="sum")``); it
    is called on a 2-vector (sum, count) and then on the sum of squared deviations. ``unbiased`` applies
    Bessel's correction to the variance.
    """
    mask = mask.bool()
    x_masked = _masked(x, mask)
    totals = torch.stack([x_masked.sum(), mask.sum().to(x.dtype)])
    if reduce is not None:
        totals = reduce(totals)
    count = totals[1]
    if mean is None:
        mean = totals[0] / count.clamp(min=1)
    if var is None:
        squares = _masked((x - mean) ** 2, mask).sum()
        if reduce is not None:
            squares = reduce(squares)
        var = squares / ((count - 1) if unbiased else count).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked(whitened, mask)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's masked token mean (sequences with no tokens are left out)."""
    tokens = mask.sum(-1).to(x.dtype)
    per_sequence = _masked(x, mask).sum(-1) / tokens.clamp(min=1)
    has_tokens = (tokens > 0).to(x.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


class PPOLoss(PreferenceLoss):
    """Proximal Policy Optimization (Schulman et al. 2017) with the KL-shaped sparse reward of RLHF (Ziegler et al.
    2019, "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593). Per minibatch::

        ratio        = exp(logp_new - logp_old)
        policy_loss  = mean_seq( token_mean( -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) ) )
        V_clip       = V_old + clip(V - V_old, -value_clip_eps, value_clip_eps)
        value_loss   = mean_seq( token_mean( 0.5 * max((V_clip - R)^2, (V - R)^2) ) )
        loss         = policy_loss + value_loss_coef * value_loss

    Rollout hooks (the ``ppo`` step calls them; subclasses change the reward by overriding
    :meth:`token_rewards`): reward ``r_t = -kl_coef * (logp_old_t - logp_ref_t) + [t == last] * clamp(score, -10,
    10)``; advantages by GAE (:func:`gae`), whitened over every response token of every rank (:func:`masked_whiten`).
    ``kl_coef`` is the *initial* coefficient: with ``ppo.adaptive_kl_target`` the step adapts it and passes the
    current value to :meth:`token_rewards`.

    Defaults equal RTO's (``loss.name=ppo`` is ``loss.name=rto loss.dpo_reward_scale=0``): ``kl_coef=0.01``,
    ``clip_eps=0.2``, ``value_clip_eps=0.2``, ``gamma=1.0``, ``lam=0.95``, ``value_loss_coef=1.0`` (the value loss
    already carries its 0.5).

    Reads: ``response_mask``, ``policy_token_logps`` (with grad), ``old_token_logps``, ``advantages``, all
    ``[N, T]``; ``values`` (with grad), ``old_values`` and ``returns`` for the value loss (values and
    old_values both None: policy loss only).
    Logs: ``ppo/policy_loss``, ``ppo/value_loss``, ``ppo/clip_fraction`` and ``ppo/value_clip_fraction``
    (share of response tokens where the clipped branch is the one used), ``ppo/approx_kl`` (token mean of
    ``(ratio - 1) - log ratio``, Schulman's non-negative k3 estimator of KL(old || new)); at rollout time
    ``ppo/kl``, ``ppo/score``, ``ppo/total_reward`` (per-sequence means).
    """

    name: ClassVar[str] = "ppo"
    needs: frozenset[str] = frozenset({"reference", "online", "reward"})
    step: ClassVar[str] = "ppo"
    summary: ClassVar[str] = (
        "PPO (Schulman et al. 2017) on a sparse reward with a KL penalty to the reference"
    )
    paper: ClassVar[str] = (
        "Schulman et al. 2017, Proximal Policy Optimization Algorithms (arXiv 1707.06347); RLHF form of "
        "Ziegler et al. 2019 (arXiv 1909.08593)"
    )
    formula: ClassVar[str] = "L = mean -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + value_loss_coef L_value"

    def __init__(
        self,
        kl_coef: float = 0.01,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_loss_coef: float = 1.0,
    ) -> None:
        self._init_ppo(kl_coef, clip_eps, value_clip_eps, gamma, lam, value_loss_coef)

    def _init_ppo(self, kl_coef, clip_eps, value_clip_eps, gamma, lam, value_loss_coef) -> None:
        name = self.name
        self.kl_coef = check_number(name, "kl_coef", kl_coef, low=0.0)
        self.clip_eps = check_number(name, "clip_eps", clip_eps, low=0.0, low_open=True)
        self.value_clip_eps = check_number(name, "value_clip_eps", value_clip_eps, low=0.0, low_open=True)
        self.gamma = check_number(name, "gamma", gamma, low=0.0, high=1.0)
        self.lam = check_number(name, "lam", lam, low=0.0, high=1.0)
        self.value_loss_coef = check_number(name, "value_loss_coef", value_loss_coef, low=0.0)

    # ---------------------------------------------------------------------------------------- rollout hooks

    def initial_kl_coef(self) -> float:
        """The KL coefficient the step starts from (and keeps, without an adaptive-KL target)."""
        return float(self.kl_coef)

    def token_rewards(self, rollout: RolloutTokens, kl_coef: float) -> TokenRewards:
        """Per-token rewards of one rollout batch with the step's current ``kl_coef``."""
        rewards, kl, rm = ppo_token_rewards(
            rollout.policy_logps, rollout.reference_logps, rollout.scores, rollout.mask, kl_coef=kl_coef
        )
        return TokenRewards(
            rewards, kl, {"ppo/kl": kl.sum(-1), "ppo/score": rm, "ppo/total_reward": rewards.sum(-1)}
        )

    def advantages(
        self,
        rewards: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        whiten: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE with this loss's ``gamma``/``lam``, then (``whiten``) whitening over the batch (``reduce``: a sum
        across ranks). Returns ``(advantages, returns)``; the returns come from the raw advantages."""
        raw, returns = gae(rewards, values, mask, self.gamma, self.lam)
        return (masked_whiten(raw, mask, reduce=reduce) if whiten else raw), returns

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("response_mask", "policy_token_logps", "old_token_logps", "advantages")
        if (inputs.values is None) != (inputs.old_values is None):
            raise ValueError(f"{self.name}: pass both values and old_values for the value loss, or neither")
        if inputs.values is not None:
            inputs.require("returns")
        mask = inputs.response_mask.bool()
        new_logps = compute_dtype(inputs.policy_token_logps)
        for field_name in ("old_token_logps", "advantages", "returns", "values", "old_values"):
            tensor = getattr(inputs, field_name)
            if tensor is not None and tensor.shape != mask.shape:
                raise ValueError(
                    f"{self.name}: {field_name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(mask.shape)} like response_mask"
                )
        old_logps = compute_dtype(inputs.old_token_logps.detach())
        advantages = compute_dtype(inputs.advantages.detach())

        log_ratio = _masked(new_logps - old_logps, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        ratio = torch.exp(log_ratio)
        unclipped = -ratio * advantages
        clipped = -ratio.clamp(1.0 - self.clip_eps, 1.0 + self.clip_eps) * advantages
        policy_loss = sequence_mean(torch.maximum(unclipped, clipped), mask)
        token_stats = {
            "ppo/clip_fraction": (clipped > unclipped).to(new_logps.dtype),
            "ppo/approx_kl": ((ratio - 1.0) - log_ratio).detach(),
        }
        loss = policy_loss
        sequence_stats = {"ppo/policy_loss": policy_loss}

        if inputs.values is not None:
            values = compute_dtype(inputs.values)
            old_values = compute_dtype(inputs.old_values.detach())
            returns = compute_dtype(inputs.returns.detach())
            values_clipped = old_values + (values - old_values).clamp(
                -self.value_clip_eps, self.value_clip_eps
            )
            loss_unclipped = (values - returns) ** 2
            loss_clipped = (values_clipped - returns) ** 2
            value_loss = sequence_mean(0.5 * torch.maximum(loss_unclipped, loss_clipped), mask)
            loss = loss + self.value_loss_coef * value_loss
            sequence_stats["ppo/value_loss"] = value_loss
            token_stats["ppo/value_clip_fraction"] = (loss_clipped > loss_unclipped).to(values.dtype)

        # Token statistics are means over all response tokens of the minibatch.
        count = mask.sum().clamp(min=1)
        stats = {key: value.detach() for key, value in sequence_stats.items()}
        stats.update({key: _masked(value, mask).sum() / count for key, value in token_stats.items()})
        return LossOutput(loss=loss, metrics=batch_means(stats))
