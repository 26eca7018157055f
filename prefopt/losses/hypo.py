"""HyPO: offline DPO plus a reverse-KL penalty estimated on online samples of the current policy."""

from __future__ import annotations

from typing import ClassVar

import torch

from prefopt.losses._checks import check_int, check_number, compute_dtype, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss
from prefopt.losses.dpo import sigmoid_preference_loss

_SAMPLE_FIELDS = ("sample_policy_logps", "sample_reference_logps")


def leave_one_out_baseline(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the *other* entries of its group; 0 for an entry alone in its group (RLOO)."""
    # Compact arbitrary prompt ids to 0..G-1; G <= len(values) bounds the buffers without a .max() sync.
    _, group_ids = torch.unique(group, return_inverse=True)
    num_groups = group_ids.numel()
    sums = values.new_zeros(num_groups).index_add_(0, group_ids, values)
    counts = values.new_zeros(num_groups).index_add_(0, group_ids, torch.ones_like(values))
    others = (counts[group_ids] - 1.0).clamp(min=1.0)
    baseline = (sums[group_ids] - values) / others
    return torch.where(counts[group_ids] >= 2, baseline, torch.zeros_like(baseline))


class HyPOLoss(PreferenceLoss):
    """Hybrid Preference Optimization — Song et al. 2024, "The Importance of Online Data: Understanding
    Preference Fine-tuning via Coverage" (arXiv 2406.01462).

    Objective: offline DPO on the preference pairs plus a reverse-KL penalty on unlabelled samples
    ``y_j ~ pi`` drawn from the current policy for the batch's prompts::

        objective = L_DPO + kl_coef * KL_hat,     KL_hat = mean_j k_j,   k_j = logp_pi(y_j) - logp_ref(y_j)
        surrogate = L_DPO + kl_coef * mean_j( stopgrad(k_j - b_j) * logp_pi(y_j) )

    The KL's gradient is a score-function (REINFORCE) gradient because ``y_j`` was sampled from ``pi``;
    differentiating ``k_j`` directly would be wrong (its expected gradient is zero). ``b_j`` is the
    leave-one-out mean of ``k`` over the other samples of the same prompt when that prompt has at least two
    samples (RLOO), else 0. ``LossOutput.loss`` is the surrogate (minimise it); ``reported_loss`` is
    ``L_DPO + kl_coef * KL_hat`` (log that as ``loss``).

    Defaults: ``beta=0.1``, ``kl_coef=0.1``, ``samples_per_prompt=2`` — prefopt defaults, not values verified
    against the paper. The step draws :meth:`online_samples_per_prompt` samples per prompt.
    Reads: the DPO fields, plus ``sample_policy_logps`` ``[M]`` (with grad), ``sample_reference_logps``
    ``[M]`` and ``sample_prompt_index`` ``[M]`` (which prompt each sample answers; when None, samples are
    taken to come in consecutive blocks of ``samples_per_prompt``). When no samples are given at all (e.g.
    evaluation on held-out pairs) the loss is plain DPO and ``online/kl`` is not logged.
    Logs: ``rewards/*``, ``logps/*``, ``online/kl`` = ``KL_hat``, ``dpo/loss`` = ``L_DPO``.
    """

    name: ClassVar[str] = "hypo"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "online"})
    step: ClassVar[str] = "pairs+samples"
    summary: ClassVar[str] = "HyPO (Song et al. 2024): offline DPO + kl_coef * KL(pi||ref) on online samples"
    paper: ClassVar[str] = (
        "Song et al. 2024, Understanding Preference Fine-Tuning Through the Lens of Coverage (arXiv"
        " 2406.01462)"
    )
    formula: ClassVar[str] = (
        "L = L_DPO + kl_coef KL(pi || pi_ref), KL estimated on policy samples (RLOO score-function gradient)"
    )

    def __init__(self, beta: float = 0.1, kl_coef: float = 0.1, samples_per_prompt: int = 2) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.kl_coef = check_number(self.name, "kl_coef", kl_coef, low=0.0)
        self.samples_per_prompt = check_int(self.name, "samples_per_prompt", samples_per_prompt, low=1)

    def online_samples_per_prompt(self) -> int:
        return self.samples_per_prompt

    def _prompt_index(self, inputs: LossInputs, num_samples: int) -> torch.Tensor:
        if inputs.sample_prompt_index is not None:
            index = inputs.sample_prompt_index
            if index.shape != (num_samples,):
                raise ValueError(
                    f"{self.name}: sample_prompt_index has shape {tuple(index.shape)}, "
                    f"expected ({num_samples},)"
                )
            return index.to(inputs.sample_policy_logps.device)
        if num_samples % self.samples_per_prompt:
            raise ValueError(
                f"{self.name}: sample_prompt_index is None and {num_samples} samples are not a multiple of "
                f"samples_per_prompt={self.samples_per_prompt}; pass sample_prompt_index"
            )
        return torch.arange(num_samples, device=inputs.sample_policy_logps.device) // self.samples_per_prompt

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        dpo_loss = sigmoid_preference_loss(self.beta * (chosen_logratios - rejected_logratios)).mean()
        extra: dict[str, torch.Tensor] = {"dpo/loss": dpo_loss}

        loss = dpo_loss
        reported = dpo_loss
        if any(getattr(inputs, name) is not None for name in _SAMPLE_FIELDS):
            inputs.require(*_SAMPLE_FIELDS)
            sample_policy = compute_dtype(inputs.sample_policy_logps)
            sample_reference = compute_dtype(inputs.sample_reference_logps.detach())
            if sample_policy.ndim != 1 or sample_policy.shape != sample_reference.shape:
                raise ValueError(
                    f"{self.name}: sample_policy_logps {tuple(sample_policy.shape)} and "
                    f"sample_reference_logps {tuple(sample_reference.shape)} must both have shape [M]"
                )
            if sample_policy.numel():
                kl_per_sample = (sample_policy - sample_reference).detach()
                baseline = leave_one_out_baseline(
                    kl_per_sample, self._prompt_index(inputs, sample_policy.numel())
                )
                surrogate = ((kl_per_sample - baseline) * sample_policy).mean()
                kl_hat = kl_per_sample.mean()
                loss = dpo_loss + self.kl_coef * surrogate
                reported = dpo_loss + self.kl_coef * kl_hat
                extra["online/kl"] = kl_hat

        # The reported objective rides along with the metrics so the whole step needs one host sync.
        extra["_reported"] = reported
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            extra,
        )
        return LossOutput(loss=loss, metrics=metrics, reported_loss=metrics.pop("_reported"))
