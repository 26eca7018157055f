"""The loss-module contract every method in ``prefopt.losses`` implements.

A loss is a pure function of tensors: it never sees a model, a tokenizer or a file. The trainer fills a
:class:`LossInputs` with what the loss says it ``needs`` and which kind of ``step`` it runs in, calls the loss, and
back-propagates ``LossOutput.loss``. That is what lets ``loss.name=...`` swap methods without touching the trainer.

How a loss declares what its step needs (the trainer reads only these declarations, never a loss's name or its
hyperparameter attributes):

* ``step`` -- the step kind that builds its inputs (one of the kinds registered in ``prefopt/trainer/kinds.py``;
  see ``prefopt/trainer/steps.py`` for how a step kind is written and registered):

  ``"pairs"``          offline preference pairs: policy (and reference) logps of chosen and rejected.
  ``"pairs+samples"``  offline pairs plus :meth:`PreferenceLoss.online_samples_per_prompt` unlabelled policy samples per
                       prompt (HyPO).
  ``"online_pairs"``   prompt-only data; one policy and one reference sample per prompt, ordered by the reward
                       layer or a pairwise judge (XPO).
  ``"ppo"``            rollouts, token-level rewards, a critic and several optimizer updates per rollout (RTO, PPO);
                       the loss implements the rollout hooks of :class:`prefopt.losses.ppo.PPOLoss`.
  ``"sft"``            supervised warm-up on prompt/completion rows (only ``policy_chosen_logps`` / ``chosen_lengths``).
  ``"reward_pairs"``   reward-model training: scalar scores of chosen and rejected from a sequence classifier.

* ``needs`` -- a set drawn from :data:`NEEDS` (class attribute; an instance may narrow it in ``__init__``, e.g. RTO
  drops ``"dpo_policy"`` when its DPO reward is switched off):

  ``"reference"``   a reference model (or precomputed reference logps) -> ``reference_*`` fields.
  ``"online"``      the policy samples while it trains (a generator is built; the reference must be live).
  ``"reward"``      scalar scores from the reward layer (``reward.kind`` model, function or implicit).
  ``"preference"``  something that orders two samples: a pairwise judge (``reward.kind=judge``) or any scorer.
  ``"dpo_policy"``  a frozen stage-1 DPO policy for token rewards (``ppo.dpo_policy`` or ``ppo.dpo_adapter``).

  The config refuses, at load time, a recipe that cannot satisfy them (e.g. ``reward.kind=none`` for a loss that
  needs a reward, exit status 2).

* hooks the step may call, all with defaults here: :meth:`PreferenceLoss.online_samples_per_prompt` (online samples per
  prompt, ``pairs+samples``), :meth:`PreferenceLoss.implicit_reward` (the reward a pair loss implies, for
  diagnostics and evaluation), and for ``"ppo"`` the rollout hooks of ``PPOLoss`` (``token_rewards``,
  ``advantages``, ``initial_kl_coef``; the adaptive-KL state lives in the step, which passes the current
  coefficient to ``token_rewards``, so the loss object is never mutated by the trainer).

To add a loss: subclass :class:`PreferenceLoss` (or ``PPOLoss``), set ``name``/``needs``/``step``/``summary``, take
hyperparameters as keyword arguments of ``__init__`` (the registry reads the signature), implement :meth:`forward`,
and add the class to ``prefopt/losses/registry.py``. Nothing in the trainer changes.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, FrozenSet, Optional

import torch

STEP_KINDS = ("pairs", "pairs+samples", "online_pairs", "ppo", "sft", "reward_pairs")
NEEDS = ("reference", "online", "reward", "preference", "dpo_policy")


@dataclass
class LossInputs:
    """Everything a loss may read. Shapes: ``[B]`` per pair, ``[M]`` per online sample, ``[N, T]`` per token.

    Sequence log-probabilities are **sums** over completion tokens (EOS included), computed in fp32
    (LOSSES.md section 0). Reference quantities carry no gradient.
    """

    # Offline / online pairs ---------------------------------------------------------------------------------
    policy_chosen_logps: Optional[torch.Tensor] = None  # [B], with grad
    policy_rejected_logps: Optional[torch.Tensor] = None  # [B], with grad
    reference_chosen_logps: Optional[torch.Tensor] = None  # [B] or None for reference-free losses
    reference_rejected_logps: Optional[torch.Tensor] = None  # [B]
    chosen_lengths: Optional[torch.Tensor] = None  # [B] completion token counts
    rejected_lengths: Optional[torch.Tensor] = None  # [B]

    # HyPO: unlabelled samples y_j ~ pi for the batch's prompts -------------------------------------------------
    sample_policy_logps: Optional[torch.Tensor] = None  # [M], with grad
    sample_reference_logps: Optional[torch.Tensor] = None  # [M]
    sample_prompt_index: Optional[torch.Tensor] = None  # [M] long: which prompt of the batch each sample answers

    # XPO: policy logp of the reference sample, and the scores that ordered each pair ---------------------------
    reference_sample_policy_logps: Optional[torch.Tensor] = None  # [B], with grad
    policy_sample_scores: Optional[torch.Tensor] = None  # [B] reward of the policy sample (logged only)
    reference_sample_scores: Optional[torch.Tensor] = None  # [B] reward of the reference sample (logged only)

    # Reward-model training ----------------------------------------------------------------------------------
    chosen_scores: Optional[torch.Tensor] = None  # [B], with grad
    rejected_scores: Optional[torch.Tensor] = None  # [B], with grad

    # PPO (RTO): per-token tensors of one minibatch, already aligned to response tokens -------------------------
    response_mask: Optional[torch.Tensor] = None  # [N, T] 1 on response tokens
    policy_token_logps: Optional[torch.Tensor] = None  # [N, T] current policy, with grad
    old_token_logps: Optional[torch.Tensor] = None  # [N, T] rollout-time policy
    advantages: Optional[torch.Tensor] = None  # [N, T]
    returns: Optional[torch.Tensor] = None  # [N, T]
    values: Optional[torch.Tensor] = None  # [N, T] current critic, with grad
    old_values: Optional[torch.Tensor] = None  # [N, T] critic at rollout time

    def require(self, *names: str) -> None:
        """Raise a ValueError naming every field a loss needs that the caller left as None."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"LossInputs is missing required field(s): {', '.join(missing)}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class LossOutput:
    """``loss``: scalar to minimise (may be a surrogate). ``metrics``: floats to log, names as in LOSSES.md.

    ``reported_loss`` is the value to log as ``loss`` when it differs from the optimised surrogate (HyPO).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    reported_loss: Optional[float] = None


class PreferenceLoss:
    """Base class of every loss module (the declaration contract is in this module's docstring).

    Subclasses set ``name``, ``needs``, ``step`` and ``summary``, take their hyperparameters as keyword
    arguments of ``__init__`` (with the defaults of LOSSES.md; the registry reads the signature to list them),
    and implement :meth:`forward`.
    """

    name: ClassVar[str] = ""
    needs: FrozenSet[str] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = ""  # one line for `prefopt losses`

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, inputs: LossInputs) -> LossOutput:
        return self.forward(inputs)

    def online_samples_per_prompt(self) -> int:
        """How many online policy samples per prompt a ``pairs+samples`` step draws for this loss (default 1)."""
        return 1

    def implicit_reward(
        self, policy_logps: torch.Tensor, reference_logps: Optional[torch.Tensor], lengths: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The reward this loss implies for completions, ``[B]``, or None when it implies none (the default).

        ``policy_logps``/``reference_logps``: summed completion logps ``[B]`` (reference None for reference-free
        losses); ``lengths``: completion token counts ``[B]``. The DPO family returns ``beta * (policy -
        reference)``, SimPO ``beta * policy / lengths``. Steps and diagnostics call this instead of recomputing a
        method's reward from its hyperparameters.
        """
        return None

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        """``{parameter: default}`` read from ``__init__``'s signature, in order (the loss's hyperparameters)."""
        signature = inspect.signature(cls.__init__)
        return {
            param.name: param.default
            for param in signature.parameters.values()
            if param.name != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        }

    def hyperparameters(self) -> dict[str, object]:
        """The parameters this instance was built with (for logs and config.yaml)."""
        return {key: getattr(self, key) for key in self.parameter_defaults()}
