"""Offline pair steps that score more than the pair: per-completion rewards (CoPG), a gold completion (TPO)
and
SRPO's revision sequences. Each fills the extra ``LossInputs`` fields its data kind carries; the loss module
does
the rest. All sequences of a batch go through the policy in one forward (``[groups * B, L]``).
"""

from __future__ import annotations

import torch

from prefopt.losses import LossInputs
from prefopt.models.logps import sequence_totals
from prefopt.trainer.steps import PairStep, StepContext, StepKind, StepResult, _move, register_step


def group_logps(ctx: StepContext, batch: dict, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy ``[groups, B]`` sums and lengths of a batch stacking ``groups`` row groups of B sequences."""
    logps = ctx.policy(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        position_ids=batch.get("position_ids"),
        attention_bias=batch.get("attention_bias"),
    )
    sums, lengths = sequence_totals(logps, batch)
    return sums.view(groups, -1), lengths.view(groups, -1)


@register_step("scored_pairs")
class ScoredPairStep(PairStep):
    """Pairs with a scalar reward per completion (``chosen_score`` / ``rejected_score`` columns)."""

    data_kind = "scored_pairs"

    def extend(self, inputs: LossInputs, batch: dict) -> None:
        device = inputs.policy_chosen_logps.device
        inputs.chosen_external_rewards = batch["chosen_score"].to(device)
        inputs.rejected_external_rewards = batch["rejected_score"].to(device)


class _GroupedStep(StepKind):
    groups = 2

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        sums, lengths = group_logps(ctx, batch, self.groups)
        inputs = LossInputs(
            policy_chosen_logps=sums[0],
            policy_rejected_logps=sums[1],
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        reference = None
        if "reference" in ctx.loss.needs:
            reference = ctx.reference.group_logps(batch, self.groups)
            inputs.reference_chosen_logps, inputs.reference_rejected_logps = reference[0], reference[1]
        self.fill(inputs, sums, lengths, reference)
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))

    def fill(self, inputs: LossInputs, sums, lengths, reference) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@register_step("triples")
class TripleStep(_GroupedStep):
    """Gold/chosen/rejected triples: the gold completion's logps ride along as ``gold_logps`` (TPO)."""

    data_kind = "triples"
    groups = 3

    def fill(self, inputs, sums, lengths, reference) -> None:
        inputs.gold_logps, inputs.gold_lengths = sums[2], lengths[2]


@register_step("revision_pairs")
class RevisionPairStep(_GroupedStep):
    """SRPO: the pair plus four revision sequences, as ``[B, 4]`` policy and reference logps."""

    data_kind = "revision_pairs"
    groups = 6

    def fill(self, inputs, sums, lengths, reference) -> None:
        inputs.policy_revision_logps = sums[2:].T
        if reference is not None:
            inputs.reference_revision_logps = reference[2:].T


def pair_variant_steps() -> dict[str, type]:
    return {"scored_pairs": ScoredPairStep, "triples": TripleStep, "revision_pairs": RevisionPairStep}
