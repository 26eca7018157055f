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
  ``"online_policy_pairs"`` prompt-only data; two policy samples per prompt, ordered by the reward layer or a
                       pairwise judge (online DPO, as TRL's ``OnlineDPOTrainer``).
  ``"ppo"``            rollouts, token-level rewards, a critic and several optimizer updates per rollout (RTO, PPO);
                       the loss implements the rollout hooks of :class:`prefopt.losses.ppo.PPOLoss`.
  ``"sft"``            supervised warm-up on prompt/completion rows (only ``policy_chosen_logps`` / ``chosen_lengths``).
  ``"reward_pairs"``   reward-model training: scalar scores of chosen and rejected from a sequence classifier.
  ``"scored_pairs"``   offline pairs plus a scalar reward of each completion from the data (CoPG).
  ``"triples"``        offline pairs plus a gold completion scored by the policy (TPO).
  ``"revision_pairs"`` offline pairs plus each completion scored as a revision of either one (SRPO).
  ``"unpaired"``       single completions labelled desirable or undesirable (KTO), plus each prompt paired with
                       another row's completion when the loss needs ``"mismatched"``.

* ``needs`` -- a set drawn from :data:`NEEDS` (class attribute; an instance may narrow it in ``__init__``, e.g. RTO
  drops ``"dpo_policy"`` when its DPO reward is switched off):

  ``"reference"``   a reference model (or precomputed reference logps) -> ``reference_*`` fields.
  ``"online"``      the policy samples while it trains (a generator is built; the reference must be live).
  ``"reward"``      scalar scores from the reward layer (``reward.kind`` model, function or implicit).
  ``"preference"``  something that orders two samples: a pairwise judge (``reward.kind=judge``) or any scorer.
  ``"dpo_policy"``  a frozen stage-1 DPO policy for token rewards (``ppo.dpo_policy`` or ``ppo.dpo_adapter``).
  ``"scores"``      a scalar reward per completion from the data (or the reward layer), CoPG.
  ``"gold"``        a third, gold completion per pair scored by the policy, TPO.
  ``"revisions"``   the pair's completions scored again as revisions of each other, SRPO.
  ``"resets"``      prompt rows with a dataset completion whose prefixes rollouts restart from, DR-PO.
  ``"length_tails"`` the ``*_tail_logps`` fields: log-prob of the tokens past the pair's shared length (LD-DPO,
                    ``ld_alpha``; :mod:`prefopt.losses.modifiers`).
  ``"aligned_logps"`` the ``*_aligned_logps`` fields: WPO's aligned log-prob sums of the policy (``wpo_weighting``).
  ``"mismatched"``  policy and reference logps of each prompt paired with another row's completion (KTO's KL
                    reference point); built anew for every batch, so the reference must be live (not precomputed).

  The config refuses, at load time, a recipe that cannot satisfy them (e.g. ``reward.kind=none`` for a loss that
  needs a reward, exit status 2).

* hooks the step may call, all with defaults here: :meth:`PreferenceLoss.online_samples_per_prompt` (online samples per
  prompt, ``pairs+samples``), :meth:`PreferenceLoss.implicit_reward` (an :class:`ImplicitReward`, the reward
  a pair loss implies, for metrics, diagnostics and evaluation),
  and for ``"ppo"`` the rollout hooks of ``PPOLoss`` (``token_rewards``,
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
from typing import Any, ClassVar, Optional

import torch

STEP_KINDS = (
    "pairs",
    "pairs+samples",
    "online_pairs",
    "online_policy_pairs",
    "ppo",
    "sft",
    "reward_pairs",
    "scored_pairs",
    "triples",
    "revision_pairs",
    "ppo_resets",
    "unpaired",
)
NEEDS = (
    "reference",
    "online",
    "reward",
    "preference",
    "dpo_policy",
    "scores",
    "gold",
    "revisions",
    "resets",
    "length_tails",
    "aligned_logps",
    "mismatched",
)


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

    # LD-DPO (need "length_tails"): sums over the completion tokens past min(|y_w|, |y_l|), i.e. the longer
    # completion's excess; 0 for the shorter one ----------------------------------------------------------------
    policy_chosen_tail_logps: Optional[torch.Tensor] = None  # [B], with grad
    policy_rejected_tail_logps: Optional[torch.Tensor] = None  # [B], with grad
    reference_chosen_tail_logps: Optional[torch.Tensor] = None  # [B]
    reference_rejected_tail_logps: Optional[torch.Tensor] = None  # [B]

    # WPO (need "aligned_logps"): sum_t log(p(y_t) / sum_v p(v)^2) under the policy, no grad -------------------
    chosen_aligned_logps: Optional[torch.Tensor] = None  # [B]
    rejected_aligned_logps: Optional[torch.Tensor] = None  # [B]

    # HyPO: unlabelled samples y_j ~ pi for the batch's prompts -------------------------------------------------
    sample_policy_logps: Optional[torch.Tensor] = None  # [M], with grad
    sample_reference_logps: Optional[torch.Tensor] = None  # [M]
    sample_prompt_index: Optional[torch.Tensor] = (
        None  # [M] long: which prompt of the batch each sample answers
    )

    # XPO: policy logp of the reference sample, and the scores that ordered each pair ---------------------------
    reference_sample_policy_logps: Optional[torch.Tensor] = None  # [B], with grad
    policy_sample_scores: Optional[torch.Tensor] = None  # [B] reward of the policy sample (logged only)
    reference_sample_scores: Optional[torch.Tensor] = None  # [B] reward of the reference sample (logged only)

    # Scores of chosen and rejected: reward-model training (the model's outputs, with grad); online DPO (the
    # reward layer's scores of the two policy samples, logged only) --------------------------------------------
    chosen_scores: Optional[torch.Tensor] = None  # [B]
    rejected_scores: Optional[torch.Tensor] = None  # [B]

    # CoPG: a scalar reward per completion, from the data or the reward layer; constants (no grad) -------------
    chosen_external_rewards: Optional[torch.Tensor] = None  # [B]
    rejected_external_rewards: Optional[torch.Tensor] = None  # [B]

    # TPO: the gold (best) completion of each triple ----------------------------------------------------------
    gold_logps: Optional[torch.Tensor] = None  # [B] sums over gold completion tokens, with grad
    gold_lengths: Optional[torch.Tensor] = None  # [B]

    # SRPO: logps of y_w / y_l as revisions of y_l / y_w; columns in srpo.REVISION_COLUMNS order --------------
    policy_revision_logps: Optional[torch.Tensor] = None  # [B, 4], with grad
    reference_revision_logps: Optional[torch.Tensor] = None  # [B, 4]

    # Unpaired rows (KTO): one completion per prompt, judged on its own ----------------------------------------
    policy_logps: Optional[torch.Tensor] = None  # [B] sums over the completion tokens, with grad
    reference_logps: Optional[torch.Tensor] = None  # [B]
    desirable: Optional[torch.Tensor] = (
        None  # [B] bool: True for a desirable completion, False for undesirable
    )
    completion_lengths: Optional[torch.Tensor] = None  # [B]
    # Each prompt with another row's completion (KTO's KL reference point). Constants of the objective; during
    # training the step gathers them from every process, so M = B x processes.
    mismatched_policy_logps: Optional[torch.Tensor] = None  # [M]
    mismatched_reference_logps: Optional[torch.Tensor] = None  # [M]

    # PPO (RTO): per-token tensors of one minibatch, already aligned to response tokens -------------------------
    response_mask: Optional[torch.Tensor] = None  # [N, T] 1 on response tokens
    policy_token_logps: Optional[torch.Tensor] = None  # [N, T] current policy, with grad
    old_token_logps: Optional[torch.Tensor] = None  # [N, T] rollout-time policy
    advantages: Optional[torch.Tensor] = None  # [N, T]
    returns: Optional[torch.Tensor] = None  # [N, T]
    values: Optional[torch.Tensor] = None  # [N, T] current critic, with grad
    old_values: Optional[torch.Tensor] = None  # [N, T] critic at rollout time
    reset_mask: Optional[torch.Tensor] = (
        None  # [N, T] DR-PO: 1 on response tokens forced from a dataset prefix
    )

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

    def tokens(
        self, policy_token_logps: Any, reference_token_logps: Any, mask: Any, lengths: Any = None
    ) -> Any:
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
    """Base class of every loss module (the declaration contract is in this module's docstring).

    Subclasses set ``name``, ``needs``, ``step`` and ``summary``, take their hyperparameters as keyword
    arguments of ``__init__`` (with the defaults of docs/losses.md; the registry reads the signature to
    list them), and implement :meth:`forward`.
    """

    name: ClassVar[str] = ""
    needs: frozenset[str] = frozenset()
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = ""  # one line for `prefopt losses`
    paper: ClassVar[str] = ""  # authors, year, title, arXiv id (for `prefopt losses NAME`)
    formula: ClassVar[str] = ""  # the minimised per-pair loss, plain text (for `prefopt losses NAME`)
    ld_alpha: Optional[float] = (
        None  # LD-DPO, for losses that take ``ld_alpha`` (prefopt/losses/modifiers.py)
    )

    def _set_ld_alpha(self, ld_alpha: Optional[float]) -> None:
        """Take the LD-DPO option (``ld_alpha``; None = off) and declare the need for the tail log-probs."""
        from prefopt.losses.modifiers import LENGTH_TAILS, check_ld_alpha

        self.ld_alpha = check_ld_alpha(self.name, ld_alpha)
        if self.ld_alpha is not None:
            self.needs = frozenset(self.needs | {LENGTH_TAILS})

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
        if self.ld_alpha is not None:  # LD-DPO: the loss runs on length-desensitised sums
            from prefopt.losses.modifiers import desensitize

            inputs = desensitize(self.name, inputs, self.ld_alpha)
        return self.forward(inputs)

    def label_balance_warning(self, desirable: int, undesirable: int) -> Optional[str]:
        """A warning about the training split's desirable/undesirable counts (unpaired data), or None."""
        return None

    def online_samples_per_prompt(self) -> int:
        """How many online policy samples per prompt a ``pairs+samples`` step draws for this loss (default 1)."""
        return 1

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
