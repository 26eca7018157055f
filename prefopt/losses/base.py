"""The loss-module contract every method in ``prefopt.losses`` implements.

A loss is a pure function of tensors: it never sees a model, a tokenizer or a file. The trainer fills a
:class:`LossInputs` with what the loss says it ``needs`` and which kind of ``step`` it runs in, calls the loss, and
back-propagates ``LossOutput.loss``. That is what lets ``loss.name=...`` swap methods without touching the trainer.

Step kinds (``PreferenceLoss.step``) tell the trainer which batch to build:

``"pairs"``          offline preference pairs: policy (and reference) logps of chosen and rejected.
``"pairs+samples"``  offline pairs plus ``samples_per_prompt`` unlabelled policy samples per prompt (HyPO).
``"online_pairs"``   prompt-only data; one policy and one reference sample per prompt, ordered by the reward layer (XPO).
``"ppo"``            rollouts, token-level rewards, a critic (RTO / PPO).
``"sft"``            supervised warm-up on prompt/completion rows (only ``policy_chosen_logps`` / ``chosen_lengths``).
``"reward_pairs"``   reward-model training: scalar scores of chosen and rejected from a sequence classifier.
``"scored_pairs"``   offline pairs plus a scalar reward of each completion from the data (CoPG).
``"triples"``        offline pairs plus a gold completion scored by the policy (TPO).
``"revision_pairs"`` offline pairs plus each completion scored as a revision of either one (SRPO).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, FrozenSet, Optional

import torch

STEP_KINDS = ("pairs", "pairs+samples", "online_pairs", "ppo", "sft", "reward_pairs", "scored_pairs", "triples",
              "revision_pairs")
NEEDS = ("reference", "online", "reward", "scores", "gold", "revisions")
# "scores": a scalar reward per completion from the data (or the reward layer), CoPG.
# "gold": a third, gold completion per pair scored by the policy, TPO.
# "revisions": the pair's completions scored again as revisions of each other, SRPO.


@dataclass
class LossInputs:
    """Everything a loss may read. Shapes: ``[B]`` per pair, ``[M]`` per online sample, ``[N, T]`` per token.

    Sequence log-probabilities are **sums** over completion tokens (EOS included), computed in fp32
    (docs/losses.md, Conventions). Reference quantities carry no gradient.
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

    # CoPG: a scalar reward per completion, from the data or the reward layer; constants (no grad) -------------
    chosen_external_rewards: Optional[torch.Tensor] = None  # [B]
    rejected_external_rewards: Optional[torch.Tensor] = None  # [B]

    # TPO: the gold (best) completion of each triple ----------------------------------------------------------
    gold_logps: Optional[torch.Tensor] = None  # [B] sums over gold completion tokens, with grad
    gold_lengths: Optional[torch.Tensor] = None  # [B]

    # SRPO: logps of y_w / y_l as revisions of y_l / y_w; columns in srpo.REVISION_COLUMNS order --------------
    policy_revision_logps: Optional[torch.Tensor] = None  # [B, 4], with grad
    reference_revision_logps: Optional[torch.Tensor] = None  # [B, 4]

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
    """``loss``: scalar to minimise (may be a surrogate). ``metrics``: floats to log (names: docs/losses.md).

    ``reported_loss`` is the value to log as ``loss`` when it differs from the optimised surrogate (HyPO).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    reported_loss: Optional[float] = None


@dataclass(frozen=True)
class ImplicitReward:
    """How a loss scores one response: the implicit reward its objective compares (docs/losses.md).

    ``r(y) = scale * (logp_policy(y) - logp_ref(y))``, without the reference term when ``uses_reference`` is
    False, divided by ``|y|`` (completion tokens) when ``length_normalized``. DPO family: ``scale=beta``, with
    reference, not normalised; SimPO: ``beta * logp/|y|``; CPO: ``beta * logp``. The token-level reward
    (:meth:`tokens`) sums over a response to :meth:`sequence`.

    Works on torch tensors and numpy arrays alike (plain arithmetic), so the trainer's ``rewards/*`` metrics,
    ``prefopt diagnose`` and the gold benchmark all use the same definition.
    """

    scale: float
    uses_reference: bool = True
    length_normalized: bool = False

    def sequence(self, policy_logps: Any, reference_logps: Any = None, lengths: Any = None) -> Any:
        """``r(y)`` per response from sequence log-prob sums (and lengths when normalised)."""
        value = policy_logps
        if self.uses_reference:
            if reference_logps is None:
                raise ValueError(f"implicit reward {self.formula()} needs reference log-probs")
            value = value - reference_logps
        if self.length_normalized:
            if lengths is None:
                raise ValueError(f"implicit reward {self.formula()} needs completion lengths")
            if bool((lengths <= 0).any()):
                raise ValueError(f"implicit reward {self.formula()}: a completion has zero tokens")
            value = value / lengths
        return self.scale * value

    def tokens(self, policy_token_logps: Any, reference_token_logps: Any, mask: Any, lengths: Any = None) -> Any:
        """Per-token rewards ``[N, T]`` (0 off the completion); each row sums to :meth:`sequence`."""
        value = policy_token_logps
        if self.uses_reference:
            if reference_token_logps is None:
                raise ValueError(f"implicit reward {self.formula()} needs reference log-probs")
            value = value - reference_token_logps
        value = self.scale * value * mask
        if self.length_normalized:
            value = value / lengths.clamp(min=1)[:, None]
        return value

    def formula(self, scale: str = "beta") -> str:
        """Human-readable form, e.g. ``beta * (logp - logp_ref)`` or ``beta * logp / |y|``."""
        core = "(logp - logp_ref)" if self.uses_reference else "logp"
        return f"{scale} * {core}" + (" / |y|" if self.length_normalized else "")


class PreferenceLoss:
    """Base class of every loss module.

    Subclasses set ``name``, ``needs``, ``step`` and ``summary``, take their hyperparameters as keyword
    arguments of ``__init__`` (with the defaults of docs/losses.md; the registry reads the signature to
    list them), and implement :meth:`forward`.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[FrozenSet[str]] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = ""  # one line for `prefopt losses`
    paper: ClassVar[str] = ""  # authors, year, title, arXiv id (for `prefopt losses NAME`)
    formula: ClassVar[str] = ""  # the minimised per-pair loss, plain text (for `prefopt losses NAME`)

    def implicit_reward(self) -> Optional[ImplicitReward]:
        """The reward this loss's objective compares, or None when it has none (SFT, reward model, PPO).

        Diagnostics, the trainer's ``rewards/*`` metrics and the gold benchmark ask this instead of knowing
        loss names. The default is the DPO family's ``beta * (logp - logp_ref)`` for losses that need a
        reference and have a ``beta``; others override it.
        """
        beta = getattr(self, "beta", None)
        if "reference" in self.needs and isinstance(beta, float):
            return ImplicitReward(scale=beta)
        return None

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, inputs: LossInputs) -> LossOutput:
        return self.forward(inputs)

    def hyperparameters(self) -> dict[str, object]:
        """The parameters this instance was built with (for logs and config.yaml)."""
        from prefopt.losses.registry import loss_parameters

        return {key: getattr(self, key) for key in loss_parameters(self.name)}
