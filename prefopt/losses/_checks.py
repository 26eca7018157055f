"""Small helpers shared by the loss modules: hyperparameter validation and input preparation.

Validation lives in each loss's ``__init__`` (so a loss built directly, not through the registry, is checked
too); these helpers keep the messages uniform: they name the loss, the parameter, the allowed range and the
bad value.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from prefopt.losses.base import LossInputs


def check_number(
    loss: str,
    param: str,
    value: object,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float after checking it is a real number inside the given interval."""
    # bool is an int subclass: `beta=True` is almost certainly a config mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{loss}: {param} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value:  # NaN
        raise ValueError(f"{loss}: {param} must be a number, got NaN")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        message = f"{loss}: {param} must be in {left}{lo}, {hi}{right}, got {value:g}"
        raise ValueError(f"{message}. {hint}" if hint else message)
    return value


def check_int(loss: str, param: str, value: object, *, low: int) -> int:
    """Return ``value`` as an int after checking it is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{loss}: {param} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{loss}: {param} must be >= {low}, got {value}")
    return int(value)


def check_choice(loss: str, param: str, value: object, choices: tuple[str, ...], hint: str = "") -> str:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        message = f"{loss}: unknown {param} {value!r}; choose one of {', '.join(choices)}"
        raise ValueError(f"{message}. {hint}" if hint else message)
    return str(value)


def compute_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to fp32 so the loss arithmetic is fp32 (float64 stays float64).

    Sequence log-probs are fp32 sums by contract, but a bf16 caller would otherwise lose the small differences
    DPO-style losses are made of; gradients flow back to the original dtype through the cast.
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def pair_tensors(
    loss: str, inputs: LossInputs, *, reference: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fetch the ``[B]`` policy (and reference) logps of a batch of pairs, checked and in the compute dtype.

    Reference logps are detached: they are constants of the objective (docs/losses.md, Conventions).
    """
    names = ["policy_chosen_logps", "policy_rejected_logps"]
    if reference:
        names += ["reference_chosen_logps", "reference_rejected_logps"]
    inputs.require(*names)
    tensors = [getattr(inputs, name) for name in names]
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"{loss}: policy_chosen_logps must have shape [B], got {tuple(shape)}")
    for name, tensor in zip(names, tensors):
        if tensor.shape != shape:
            raise ValueError(
                f"{loss}: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shape)} like policy_chosen_logps"
            )
    policy_chosen, policy_rejected = (compute_dtype(t) for t in tensors[:2])
    if not reference:
        return policy_chosen, policy_rejected, None, None
    reference_chosen, reference_rejected = (compute_dtype(t.detach()) for t in tensors[2:])
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


def log_ratios(
    loss: str, inputs: LossInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(policy_chosen, policy_rejected, lr_w, lr_l)`` with ``lr = logp_policy - logp_ref``.

    See docs/losses.md, Conventions.
    """
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = pair_tensors(
        loss, inputs, reference=True
    )
    return (
        policy_chosen,
        policy_rejected,
        policy_chosen - reference_chosen,
        policy_rejected - reference_rejected,
    )


def lengths_as_float(
    loss: str, name: str, lengths: Optional[torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """Completion lengths as a float tensor; a zero (or negative) length raises rather than divide by 0."""
    if lengths is None:
        raise ValueError(f"LossInputs is missing required field(s): {name} ({loss} normalises by length)")
    if lengths.shape != like.shape:
        raise ValueError(f"{loss}: {name} has shape {tuple(lengths.shape)}, expected {tuple(like.shape)}")
    lengths = lengths.detach().to(device=like.device, dtype=like.dtype)
    if bool((lengths <= 0).any()):
        bad = torch.nonzero(lengths <= 0).flatten().tolist()
        raise ValueError(
            f"{loss}: {name} has zero-length completion(s) at batch position(s) {bad}; a length-normalised "
            "log-prob is undefined for an empty completion (check truncation and the completion mask)"
        )
    return lengths
