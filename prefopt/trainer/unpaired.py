"""The ``unpaired`` step kind: single completions labelled desirable or undesirable (KTO's data).

A batch (``prefopt.data.collate.UnpairedCollator``) holds B prompt+completion rows with their labels and, for a
loss that needs ``"mismatched"``, the same prompts followed by another row's completion. The rows' own
completions go through the policy with gradient; the mismatched ones only feed a constant of the objective (KTO's
KL reference point), so they go through the policy without gradient, which saves their backward pass. During
training the mismatched log-probs are gathered from every process, so the reference point is one estimate over the
global batch (TRL 1.16 averages the per-process means, the same number with equal per-device batches). Eval
shards can differ in length across processes, so eval batches use their own rows only (a collective there could
wait forever for a rank that has finished).
"""

from __future__ import annotations

import logging

import torch

from prefopt.errors import ConfigError
from prefopt.losses import LossInputs
from prefopt.models.logps import sequence_totals
from prefopt.trainer.steps import StepKind, StepResult, _move, register_step, step_metrics

logger = logging.getLogger(__name__)

MISMATCHED = ("input_ids", "attention_mask", "completion_mask")


@register_step("unpaired")
class UnpairedStep(StepKind):
    """Unpaired rows: ``policy_logps``, ``reference_logps``, ``desirable`` and the mismatched logps."""

    data_kind = "unpaired"

    @classmethod
    def check_config(cls, config, loss) -> None:
        if "mismatched" not in loss.needs:
            return
        sizes = {
            "train.per_device_batch_size": config.train.per_device_batch_size,
            "train.eval_batch_size": config.train.eval_batch_size,
        }
        for key, size in sizes.items():
            if size is not None and size < 2:
                raise ConfigError(
                    f"{key}: loss '{loss.name}' pairs each prompt with another row's completion of the same "
                    f"batch to estimate its KL reference point; {size} row per device has no other row. Use "
                    "2 or more (more rows give a steadier estimate)"
                )

    @classmethod
    def check_data(cls, config, loss, bundle) -> None:
        report = bundle.report.train
        warning = loss.label_balance_warning(report.desirable, report.undesirable)
        if warning:
            logger.warning(warning)

    def __call__(self, batch: dict) -> StepResult:
        return self._step(batch, across_processes=True)

    def eval_batch(self, batch: dict) -> tuple[dict[str, float], float]:
        result = self._step(batch, across_processes=False)
        return step_metrics(result), float(len(batch["index"]))

    def _step(self, batch: dict, across_processes: bool) -> StepResult:
        ctx = self.ctx
        batch = _move(batch, ctx.accelerator.device)
        logps = ctx.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        sums, lengths = sequence_totals(logps, batch)
        inputs = LossInputs(policy_logps=sums, completion_lengths=lengths, desirable=batch["label"])
        if "reference" in ctx.loss.needs:
            inputs.reference_logps = ctx.reference.group_logps(batch, 1)[0]
        if "mismatched" in ctx.loss.needs:
            mismatched = [batch[f"mismatched_{key}"] for key in MISMATCHED]  # padded, never packed
            with torch.no_grad():
                policy = ctx.policy(*mismatched).sums
            reference = ctx.reference.token_logps(*mismatched).sums
            if across_processes and ctx.accelerator.num_processes > 1:
                policy, reference = ctx.accelerator.gather((policy.contiguous(), reference.contiguous()))
            inputs.mismatched_policy_logps, inputs.mismatched_reference_logps = policy, reference
        return StepResult(ctx.loss(inputs), tokens=float(batch["attention_mask"].sum()))
