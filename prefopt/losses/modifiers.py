"""Two options that modify a pairwise loss without changing its formula: LD-DPO and WPO weighting.

Both are keyword parameters of the losses that take them (``prefopt losses NAME`` lists them), validated here and
applied by the loss itself, so the trainer only sees what the loss declares it ``needs``:

**LD-DPO** (``ld_alpha``) -- Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"
(arXiv 2409.06411). DPO's log-probabilities are sums over tokens, so the longer completion of a pair carries more
terms and the implicit reward grows with verbosity. LD-DPO splits each completion at the pair's shared length
``l_p = min(|y_w|, |y_l|)`` and down-weights the tokens beyond it::

    logp_ld(y) = sum_{t <= l_p} logp_t + ld_alpha * sum_{t > l_p} logp_t = logp(y) - (1 - ld_alpha) * tail(y)

for the policy and the reference alike; the loss then runs on ``logp_ld`` (and so do its ``rewards/*`` and
``logps/*``, as in TRL). ``ld_alpha = 1`` is the plain loss, ``0`` drops the excess tokens; the paper tunes
alpha per model, no value is a default (TRL: ``DPOConfig.ld_alpha``, default None = off, as here).
The step provides ``tail(y)`` as the ``*_tail_logps`` fields of :class:`~prefopt.losses.base.LossInputs`
(need ``"length_tails"``); a precomputed reference caches the reference tails beside the sums.

**WPO** (``wpo_weighting``) -- Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization"
(arXiv 2406.11827), Eq. 2 with the paper's weight alignment. Off-policy pairs are re-weighted by how likely the
current policy is to produce them, a detached per-pair weight on the per-pair loss::

    w(y)   = exp( (1/|y|) * sum_t log( p(y_t) / sum_v p(v)^2 ) )       (p: the policy's next-token distribution)
    L      = mean_pairs( w(y_w) * w(y_l) * loss_pair )

``sum_v p(v)^2`` aligns the weights with the policy's own sampling (a token as likely as the policy's typical
choice gets weight ~1). The step provides the sums ``sum_t log(p(y_t) / sum_v p(v)^2)`` as
``chosen_aligned_logps``/``rejected_aligned_logps`` (need ``"aligned_logps"``). This is TRL 1.16's
``use_weighting=True`` (``dpo_trainer.py``, "Eq (2) of the WPO paper"); default off. Losses that sort the batch
(AOT) refuse it, as TRL does: per-pair weights would not follow the sorted pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from prefopt.losses._checks import check_number, compute_dtype, lengths_as_float
from prefopt.losses.base import LossInputs

LENGTH_TAILS = "length_tails"  # need: logps of the tokens past the pair's shared length
ALIGNED_LOGPS = "aligned_logps"  # need: WPO's aligned per-token log-prob sums (policy, no grad)

TAIL_FIELDS = (
    ("policy_chosen_logps", "policy_chosen_tail_logps"),
    ("policy_rejected_logps", "policy_rejected_tail_logps"),
    ("reference_chosen_logps", "reference_chosen_tail_logps"),
    ("reference_rejected_logps", "reference_rejected_tail_logps"),
)


def check_ld_alpha(loss: str, ld_alpha: object) -> Optional[float]:
    """None (off) or a number in [0, 1]."""
    if ld_alpha is None:
        return None
    return check_number(
        loss,
        "ld_alpha",
        ld_alpha,
        low=0.0,
        high=1.0,
        hint="It weights the tokens past the shorter completion's length: 1 = plain loss, 0 = drop them.",
    )


def check_wpo_weighting(loss: str, wpo_weighting: object) -> bool:
    if not isinstance(wpo_weighting, bool):
        raise ValueError(f"{loss}: wpo_weighting must be true or false, got {wpo_weighting!r}")
    return wpo_weighting


def desensitize(loss: str, inputs: LossInputs, ld_alpha: float) -> LossInputs:
    """``inputs`` with every sequence sum replaced by ``logp - (1 - ld_alpha) * tail`` (LD-DPO)."""
    changes = {}
    for sums_name, tail_name in TAIL_FIELDS:
        sums = getattr(inputs, sums_name)
        if sums is None:  # reference-free losses have no reference sums (nor tails)
            continue
        tail = getattr(inputs, tail_name)
        if tail is None:
            raise ValueError(
                f"{loss}: ld_alpha needs LossInputs.{tail_name} (the log-prob of the tokens past the pair's "
                "shared length); the 'pairs' step provides it when the loss declares the need 'length_tails'"
            )
        if tail.shape != sums.shape:
            raise ValueError(
                f"{loss}: {tail_name} has shape {tuple(tail.shape)}, expected {tuple(sums.shape)}"
            )
        tail = tail.to(sums.dtype) if sums_name.startswith("policy") else tail.detach().to(sums.dtype)
        changes[sums_name] = sums - (1.0 - ld_alpha) * tail
    return dataclasses.replace(inputs, **changes)


def wpo_pair_weights(loss: str, inputs: LossInputs, like: torch.Tensor) -> torch.Tensor:
    """Detached ``[B]`` weights ``w(y_w) * w(y_l)`` of WPO (module docstring), in ``like``'s dtype."""
    inputs.require("chosen_aligned_logps", "rejected_aligned_logps")
    weights = []
    for side in ("chosen", "rejected"):
        aligned = compute_dtype(getattr(inputs, f"{side}_aligned_logps").detach()).to(like.dtype)
        lengths = lengths_as_float(loss, f"{side}_lengths", getattr(inputs, f"{side}_lengths"), like)
        weights.append(torch.exp(aligned / lengths))
    return (weights[0] * weights[1]).detach()


@dataclass(frozen=True)
class Modifier:
    """How ``prefopt losses NAME`` describes a modifier (LD-DPO, WPO, TR-DPO): not a loss, an option of several."""

    name: str
    summary: str
    paper: str
    formula: str
    enable: str  # the override that turns it on
    defaults: str
    parameter: Optional[str] = None  # the loss parameter; the losses whose signature has it take the modifier
    takers: str = ""  # who takes it, when not read from the loss signatures


MODIFIERS = {
    modifier.name: modifier
    for modifier in (
        Modifier(
            name="ld_dpo",
            summary="LD-DPO: down-weight the longer completion's tokens past the shorter one's length",
            paper="Liu et al. 2024, Length Desensitization in Direct Preference Optimization "
            "(arXiv 2409.06411)",
            formula="logp_ld(y) = logp(y) - (1 - ld_alpha) * tail(y),  tail = tokens past min(|y_w|, |y_l|); "
            "policy and reference alike, then the loss as usual",
            enable="loss.ld_alpha=0.5 (recipes/tiny/ld_dpo.yaml)",
            defaults="ld_alpha=None (off); 1 = plain loss, 0 = drop the excess tokens; TRL: DPOConfig.ld_alpha",
            parameter="ld_alpha",
        ),
        Modifier(
            name="wpo",
            summary="WPO: weight each pair by the policy's own (aligned, length-normalised) probability of it",
            paper="Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization (arXiv 2406.11827)",
            formula="L = mean(w(y_w) w(y_l) loss_pair),  w(y) = exp(mean_t log(p(y_t) / sum_v p(v)^2)), detached",
            enable="loss.wpo_weighting=true (recipes/tiny/wpo.yaml)",
            defaults="wpo_weighting=False; TRL: DPOConfig.use_weighting",
            parameter="wpo_weighting",
        ),
        Modifier(
            name="tr_dpo",
            summary="TR-DPO: a reference model that moves toward the policy every sync_steps steps",
            paper="Gorbatovski et al. 2024, Learn Your Reference Model for Real Good Alignment (arXiv 2404.09656)",
            formula="every sync_steps steps: theta_ref <- sync_mix * theta_policy + (1 - sync_mix) * theta_ref "
            "(sync_mix = 1: hard update)",
            enable="reference.sync_steps=16 reference.sync_mix=0.6 (any recipe whose loss has a reference model)",
            defaults="sync_steps=None (off), sync_mix=0.6; TRL: sync_ref_model, ref_model_mixup_alpha=0.6, "
            "ref_model_sync_steps=512",
            takers="every loss with a live reference model (reference.mode=model, full fine-tuning); refused with "
            "a precomputed or adapter reference",
        ),
    )
}


def modifier_takers(modifier: Modifier) -> str:
    """The losses that take ``modifier`` (read from their signatures), or its ``takers`` text."""
    if modifier.parameter is None:
        return modifier.takers
    from prefopt.losses.registry import available_losses, loss_parameters

    return ", ".join(name for name in available_losses() if modifier.parameter in loss_parameters(name))
