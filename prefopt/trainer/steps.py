"""Step kinds: how a batch becomes ``LossInputs`` for whatever loss the recipe names.

The trainer looks the step up by ``loss.step`` (declared by the loss module) and never by the loss's name. Each
step returns a :class:`StepResult`: the loss output, how many real tokens it processed, and optional samples to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prefopt.losses import LossInputs, LossOutput, PreferenceLoss
from prefopt.models.logps import sequence_totals
from prefopt.models.reference import Reference


@dataclass
class StepContext:
    """What steps may use. ``policy`` is the prepared module (``CompletionLogpModel`` or a reward model)."""

    accelerator: Any
    policy: torch.nn.Module
    loss: PreferenceLoss
    reference: Reference
    tokenizer: Any
    config: Any
    generator: Any = None
    reward: Any = None
    reference_generator: Any = None


@dataclass
class StepResult:
    output: LossOutput
    tokens: float
    samples: list[dict] = field(default_factory=list)


def _move(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def pair_logps(ctx: StepContext, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One concatenated chosen+rejected forward: (chosen sums, rejected sums, chosen lengths, rejected lengths)."""
    logps = ctx.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                       position_ids=batch.get("position_ids"), attention_bias=batch.get("attention_bias"))
    sums, lengths = sequence_totals(logps, batch)
    half = sums.shape[0] // 2
    return sums[:half], sums[half:], lengths[:half], lengths[half:]


class PairStep:
    """Offline preference pairs (DPO, SimPO, f-DPO, RPO)."""

    data_kind = "pairs"

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        chosen, rejected, chosen_len, rejected_len = pair_logps(ctx, batch)
        inputs = LossInputs(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                            chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        if "reference" in ctx.loss.needs:
            inputs.reference_chosen_logps, inputs.reference_rejected_logps = ctx.reference.pair_logps(batch)
        self.extend(inputs, batch)
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))

    def extend(self, inputs: LossInputs, batch: dict) -> None:
        """Hook for steps that add online data to an offline pair batch (HyPO)."""


class SFTStep:
    """Supervised warm-up: token-mean NLL on completions."""

    data_kind = "sft"

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        logps = ctx.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        sums, lengths = sequence_totals(logps, batch)
        inputs = LossInputs(policy_chosen_logps=sums, chosen_lengths=lengths)
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))


class RewardPairStep:
    """Bradley–Terry reward-model training: one scalar per sequence from a sequence classifier."""

    data_kind = "pairs"
    model_kind = "sequence_classifier"

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        scores = ctx.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        half = scores.shape[0] // 2
        inputs = LossInputs(chosen_scores=scores[:half], rejected_scores=scores[half:])
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))


def step_registry() -> dict[str, type]:
    from prefopt.trainer.online import HyPOStep, OnlinePairStep
    from prefopt.trainer.pair_variants import pair_variant_steps

    return {
        "pairs": PairStep,
        "sft": SFTStep,
        "reward_pairs": RewardPairStep,
        "pairs+samples": HyPOStep,
        "online_pairs": OnlinePairStep,
        **pair_variant_steps(),
    }
