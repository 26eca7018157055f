"""Step kinds: how a batch becomes ``LossInputs`` (and optimizer updates) for whatever loss the recipe names.

The run scaffold (``prefopt/trainer/loop.py``) looks the step kind up by ``loss.step`` (declared by the loss, see
``prefopt/losses/base.py``) and never by the loss's name. Everything else -- accelerator, output dir, data, policy,
reference, optimizers, the non-finite guard (``train.max_skipped_steps``), checkpoint/resume, eval, logging and
the final save -- is shared by every step kind.

How to add a step kind
----------------------
1. Subclass :class:`StepKind` in a module of ``prefopt/trainer`` and decorate it with ``@register_step("name")``;
   add the module to the import list of ``prefopt/trainer/kinds.py`` (that module is the registry the scaffold
   reads; keeping the imports there is what keeps the step modules free of import cycles).
2. Class attributes: ``data_kind`` (``pairs``, ``sft`` or ``prompts``: which dataset/collator the scaffold builds)
   and ``model_kind`` (``causal_lm`` or ``sequence_classifier``).
3. Implement ``__call__(batch) -> StepResult``: the loss on one micro-batch (used for training and for eval).
   Read from the loss only what it declares: ``loss.needs``, ``loss.step`` and the hooks of the loss base classes.
4. Optional class-level hooks, all with defaults here, for step kinds that train differently:

   * :meth:`StepKind.check_config` / :meth:`StepKind.check_models` -- refuse (``ConfigError``, exit 2) settings
     the step cannot honour (the second gets the policy's tokenizer); called before the scaffold writes anything.
   * :meth:`StepKind.check_data` -- look at the built datasets (e.g. warn about label balance, KTO).
   * :meth:`StepKind.loader_batch_size` / :meth:`StepKind.batches_per_step` / :meth:`StepKind.updates_per_step` --
     rows per loader batch, loader batches per global step, optimizer updates per global step (PPO: one rollout
     batch per step, ``epochs x minibatches`` updates).
   * :meth:`StepKind.trainables` -- extra trained modules (PPO's critic), each with its own learning rate; the
     scaffold builds their optimizers/schedulers, prepares, clips, steps and checkpoints them with the policy.
5. Optional instance hooks: :meth:`StepKind.train_batch` (the default runs ``__call__`` with gradient accumulation
   and one optimizer update per global step; PPO overrides it to run several updates per rollout through the same
   :class:`~prefopt.trainer.updates.Updater`), :meth:`StepKind.eval_batch` (metrics on one eval batch),
   :meth:`StepKind.state_dict` / :meth:`StepKind.load_state_dict` (step state such as the adaptive KL coefficient,
   saved in every checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from prefopt.losses import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.modifiers import ALIGNED_LOGPS, LENGTH_TAILS
from prefopt.models.logps import sequence_totals
from prefopt.models.pair_parts import aligned_sums, pair_tail_sums
from prefopt.models.reference import Reference


@dataclass
class StepContext:
    """What steps may use. ``policy`` is the prepared module (``CompletionLogpModel`` or a reward model);
    ``modules`` holds the prepared extra trainables by name (PPO's ``critic``); ``extras`` what a step kind's
    ``trainables`` hook built before ``prepare`` and wants back (e.g. the DPO scorer)."""

    accelerator: Any
    policy: torch.nn.Module
    loss: PreferenceLoss
    reference: Reference
    tokenizer: Any
    config: Any
    generator: Any = None
    reward: Any = None
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    global_step: Callable[[], int] = lambda: 0  # the scaffold's optimizer-step counter (for seeds)


@dataclass
class StepResult:
    output: LossOutput
    tokens: float
    samples: list[dict] = field(default_factory=list)


@dataclass
class Trainable:
    """An extra module a step kind trains beside the policy, with its own learning rate."""

    name: str
    module: torch.nn.Module
    learning_rate: float


_REGISTRY: dict[str, type[StepKind]] = {}


def register_step(name: str) -> Callable[[type[StepKind]], type[StepKind]]:
    """Class decorator: make a step kind available under ``name`` (the value of a loss's ``step``)."""

    def decorate(cls: type[StepKind]) -> type[StepKind]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"step kind {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})"
            )
        _REGISTRY[name] = cls
        cls.kind = name
        return cls

    return decorate


def registered_steps() -> dict[str, type[StepKind]]:
    """The step kinds registered so far (import ``prefopt.trainer.kinds`` to get all of them)."""
    return dict(_REGISTRY)


def _move(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StepKind:
    """Base of every step kind; see the module docstring for the contract."""

    kind: ClassVar[str] = ""
    data_kind: ClassVar[str] = "pairs"
    model_kind: ClassVar[str] = "causal_lm"
    batch_size_key: ClassVar[str] = "train.per_device_batch_size"  # the config key of loader_batch_size

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    # ------------------------------------------------------------------------ class hooks (before models load)

    @classmethod
    def check_config(cls, config, loss: PreferenceLoss) -> None:
        """Raise ``ConfigError`` for settings this step cannot honour. Called before anything is written."""

    @classmethod
    def check_models(cls, config, tokenizer) -> None:
        """Checks that need the policy's tokenizer (e.g. tokenizer lineage); called before anything is written."""

    @classmethod
    def check_data(cls, config, loss: PreferenceLoss, bundle) -> None:
        """Checks (or warnings) on the tokenized datasets (``prefopt.data.DataBundle``); called once built."""

    @classmethod
    def loader_batch_size(cls, config) -> int:
        """Rows per device in one loader batch."""
        return config.train.per_device_batch_size

    @classmethod
    def batches_per_step(cls, config) -> int:
        """Loader batches per global step (gradient accumulation for ordinary steps)."""
        return config.train.gradient_accumulation_steps

    @classmethod
    def updates_per_step(cls, config) -> int:
        """Optimizer updates per global step (the schedulers' length is total steps times this)."""
        return 1

    @classmethod
    def trainables(
        cls, config, tokenizer, policy: torch.nn.Module, accelerator, loss, extras: dict[str, Any]
    ) -> list[Trainable]:
        """Extra modules to train beside the policy (built before ``accelerator.prepare``). Anything else built
        here for the step (frozen helpers) goes into ``extras``, which reaches the step as ``ctx.extras``."""
        return []

    # ------------------------------------------------------------------------------------------- per batch

    def __call__(self, batch: dict) -> StepResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_batch(self, batch: dict, updater) -> Optional[StepResult]:
        """Train on one loader batch. Returns the step's result when a global step completed, else None.

        Default: forward + backward inside gradient accumulation; one optimizer update per
        ``batches_per_step`` loader batches (the :class:`~prefopt.trainer.updates.Updater` applies the
        non-finite guard, clipping and the scheduler)."""
        with updater.accumulate():
            result = self(batch)
            updater.backward(result.output.loss)
            updater.record(result)
            if updater.sync_gradients:
                updater.optimizer_step()
                return result
        return None

    def eval_batch(self, batch: dict) -> tuple[dict[str, float], float]:
        """Metrics of one eval batch and its weight (rows). Default: the training metrics of ``__call__``."""
        result = self(batch)
        return step_metrics(result), float(len(batch["index"]))

    def state_dict(self) -> dict:
        """Step state to checkpoint (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def step_metrics(result: StepResult) -> dict:
    """The loss's metrics plus ``loss`` (the reported objective when it differs from the optimised surrogate)."""
    metrics = dict(result.output.metrics)
    reported = result.output.reported_loss
    metrics["loss"] = float(reported if reported is not None else result.output.loss.detach())
    return metrics


def pair_inputs(ctx: StepContext, batch: dict) -> LossInputs:
    """``LossInputs`` of a pair batch: one concatenated chosen+rejected policy forward, the reference's sums, and
    what the loss's modifiers declare (``length_tails``: LD-DPO's tails; ``aligned_logps``: WPO's sums)."""
    needs = ctx.loss.needs
    wpo = ALIGNED_LOGPS in needs
    logps = ctx.policy(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        position_ids=batch.get("position_ids"),
        attention_bias=batch.get("attention_bias"),
        **({"square_probs": True} if wpo else {}),
    )
    sums, lengths = sequence_totals(logps, batch)
    half = sums.shape[0] // 2
    inputs = LossInputs(
        policy_chosen_logps=sums[:half],
        policy_rejected_logps=sums[half:],
        chosen_lengths=lengths[:half],
        rejected_lengths=lengths[half:],
    )
    tails = LENGTH_TAILS in needs
    if tails:
        policy_tails = pair_tail_sums(logps, batch)
        inputs.policy_chosen_tail_logps, inputs.policy_rejected_tail_logps = (
            policy_tails[:half],
            policy_tails[half:],
        )
    if wpo:
        aligned = aligned_sums(logps, batch)
        inputs.chosen_aligned_logps, inputs.rejected_aligned_logps = aligned[:half], aligned[half:]
    if "reference" in needs and tails:
        (
            inputs.reference_chosen_logps,
            inputs.reference_rejected_logps,
            inputs.reference_chosen_tail_logps,
            inputs.reference_rejected_tail_logps,
        ) = ctx.reference.pair_logps_and_tails(batch)
    elif "reference" in needs:
        inputs.reference_chosen_logps, inputs.reference_rejected_logps = ctx.reference.pair_logps(batch)
    return inputs


@register_step("pairs")
class PairStep(StepKind):
    """Offline preference pairs (DPO, SimPO, f-DPO, RPO, ... and the LD-DPO / WPO modifiers)."""

    data_kind = "pairs"

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        inputs = pair_inputs(ctx, batch)
        self.extend(inputs, batch)
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))

    def extend(self, inputs: LossInputs, batch: dict) -> None:
        """Hook for pair steps whose data carries more than the pair (e.g. per-completion scores)."""


@register_step("sft")
class SFTStep(StepKind):
    """Supervised warm-up: token-mean NLL on completions."""

    data_kind = "sft"

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        logps = ctx.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        sums, lengths = sequence_totals(logps, batch)
        inputs = LossInputs(policy_chosen_logps=sums, chosen_lengths=lengths)
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))


@register_step("reward_pairs")
class RewardPairStep(StepKind):
    """Bradley–Terry reward-model training: one scalar per sequence from a sequence classifier."""

    data_kind = "pairs"
    model_kind = "sequence_classifier"

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        scores = (
            ctx.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits[:, 0]
            .float()
        )
        half = scores.shape[0] // 2
        inputs = LossInputs(chosen_scores=scores[:half], rejected_scores=scores[half:])
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))
