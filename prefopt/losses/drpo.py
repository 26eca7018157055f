"""DR-PO: PPO whose rollouts restart from prefixes of dataset responses (plus the reset sampler)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import torch

from prefopt.losses._checks import check_choice, check_number, compute_dtype
from prefopt.losses._metrics import batch_means
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.ppo import MAX_LOG_RATIO, PPOLoss, _masked, sequence_mean

RESET_PREFIX = ("response", "context")


def sample_reset_lengths(
    completion_lengths: Sequence[int], reset_prob: float, rng: random.Random
) -> list[int]:
    """Per rollout sample, how many dataset response tokens to force (0: no reset, an ordinary rollout).

    With probability ``reset_prob`` the sample resets to a prefix of its dataset response of ``k ~ Uniform{1,
    ...,
    L-1}`` tokens, L the response's token length (Cornell-RL/tril ``logit_processors.py:84-87``); a response
    shorter than 2 tokens never resets.
    """
    lengths = []
    for length in completion_lengths:
        reset = rng.random() < reset_prob
        lengths.append(rng.randint(1, length - 1) if reset and length >= 2 else 0)
    return lengths


class DRPOLoss(PPOLoss):
    """Dataset Reset Policy Optimization — Chang et al. 2024, "Dataset Reset Policy Optimization for RLHF"
    (arXiv 2404.08495), Alg. 1; released code Cornell-RL/drpo ``src/tldr/drpo.py``.

    KL-regularised PPO-RLHF, unchanged except where rollouts start: with probability ``reset_prob`` (the
    paper's
    beta, not a KL weight) a rollout starts from the prompt plus the first ``k ~ U{1..L-1}`` tokens of a
    dataset
    response, and the policy samples the rest. Token rewards: ``-kl_coef * (logp_old - logp_ref)`` on every
    response token plus the reward-model score on the last (drpo.py:809-813); GAE and the clipped PPO policy
    and
    value losses of :class:`~prefopt.losses.ppo.PPOLoss`.

    ``reset_prefix`` chooses what the forced prefix is:

    ``response``  the released code: the prefix is part of the response; the policy loss averages over the
                  sampled tokens only (``reset_mask`` excluded, drpo.py:859,881) while the KL penalty, the
                  value
                  loss and the score still cover the prefix.
    ``context``   the paper (Alg. 1 line 9 stores only steps h' >= h): the prefix joins the prompt; the
    response,
                  and every loss term, is the continuation only.

    Defaults (Table 5 and the code): ``kl_coef=0.05`` (fixed), ``clip_eps=0.2``, ``value_clip_eps=0.2``,
    ``gamma=1.0``, ``lam=0.95``, ``value_loss_coef=0.1``, ``reset_prob=1.0`` (best of {.25, .5, .75, 1}).
    Reads the PPO fields of :class:`~prefopt.losses.ppo.PPOLoss` plus ``reset_mask``
    ``[N, T]`` (1 on forced prefix tokens).
    Logs the PPO metrics and ``drpo/reset_tokens`` (share of response tokens that were forced).
    """

    name: ClassVar[str] = "drpo"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "online", "reward", "resets"})
    step: ClassVar[str] = "ppo_resets"
    summary: ClassVar[str] = (
        "DR-PO (Chang et al. 2024): PPO with rollouts reset to prefixes of dataset responses"
    )
    paper: ClassVar[str] = "Chang et al. 2024, Dataset Reset Policy Optimization for RLHF (arXiv 2404.08495)"
    formula: ClassVar[str] = (
        "PPO: mean_seq(token_mean over sampled tokens(-min(r*A, clip(r)*A))) + c_v * value loss"
    )

    def __init__(
        self,
        kl_coef: float = 0.05,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_loss_coef: float = 0.1,
        reset_prob: float = 1.0,
        reset_prefix: str = "response",
    ) -> None:
        self._init_ppo(kl_coef, clip_eps, value_clip_eps, gamma, lam, value_loss_coef)
        self.reset_prob = check_number(self.name, "reset_prob", reset_prob, low=0.0, high=1.0)
        self.reset_prefix = check_choice(
            self.name,
            "reset_prefix",
            reset_prefix,
            RESET_PREFIX,
            hint="response: the released code's choice; context: the paper's",
        )

    # ------------------------------------------------------------------ hooks the ``ppo_resets`` step calls

    def reset_lengths(self, completion_lengths: Sequence[int], rng: random.Random) -> list[int]:
        """How many dataset tokens each rollout is forced to (0: none), with this loss's ``reset_prob``."""
        return sample_reset_lengths(completion_lengths, self.reset_prob, rng)

    def prefix_in_response(self) -> bool:
        """True: the forced prefix is part of the response (code); False: part of the prompt (paper)."""
        return self.reset_prefix == "response"

    def forward(self, inputs: LossInputs) -> LossOutput:
        inputs.require("response_mask", "policy_token_logps", "old_token_logps", "advantages")
        mask = inputs.response_mask.bool()
        reset = inputs.reset_mask.bool() & mask if inputs.reset_mask is not None else torch.zeros_like(mask)
        policy_mask = mask & ~reset
        new_logps = compute_dtype(inputs.policy_token_logps)
        old_logps = compute_dtype(inputs.old_token_logps.detach())
        advantages = compute_dtype(inputs.advantages.detach())
        log_ratio = _masked(new_logps - old_logps, policy_mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        ratio = torch.exp(log_ratio)
        unclipped = -ratio * advantages
        clipped = -ratio.clamp(1.0 - self.clip_eps, 1.0 + self.clip_eps) * advantages
        policy_loss = sequence_mean(torch.maximum(unclipped, clipped), policy_mask)
        loss = policy_loss
        stats = {"ppo/policy_loss": policy_loss.detach()}
        tokens = policy_mask.sum().clamp(min=1)
        stats["ppo/clip_fraction"] = (
            _masked((clipped > unclipped).to(new_logps.dtype), policy_mask).sum() / tokens
        )
        stats["ppo/approx_kl"] = _masked(((ratio - 1.0) - log_ratio).detach(), policy_mask).sum() / tokens
        stats["drpo/reset_tokens"] = reset.sum().to(new_logps.dtype) / mask.sum().clamp(min=1)
        if inputs.values is not None:
            inputs.require("old_values", "returns")
            values = compute_dtype(inputs.values)
            old_values = compute_dtype(inputs.old_values.detach())
            returns = compute_dtype(inputs.returns.detach())
            values_clipped = old_values + (values - old_values).clamp(
                -self.value_clip_eps, self.value_clip_eps
            )
            value_loss = sequence_mean(
                0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2), mask
            )  # the critic learns on the prefix too (drpo.py)
            loss = loss + self.value_loss_coef * value_loss
            stats["ppo/value_loss"] = value_loss.detach()
        return LossOutput(loss=loss, metrics=batch_means(stats))
