"""The f-divergence option of every loss built on the chosen-minus-rejected reward difference.

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints" (arXiv 2309.16240): constraining the policy with an f-divergence ``D_f(pi || pi_ref)`` instead of
the reverse KL replaces the log-ratio ``lr`` inside DPO-style losses by the score ``s(lr) = f'(exp(lr))``.

==============  =====================================  ==========================================
divergence      s(lr)                                  note
==============  =====================================  ==========================================
``reverse_kl``  ``lr``                                 plain DPO and its relatives
``forward_kl``  ``1 - exp(-lr)``
``js``          ``log 2 + logsigmoid(lr)``             = log(2u / (1 + u)), u = exp(lr)
``alpha``       ``(1 - exp(-alpha * lr)) / alpha``     paper convention: alpha->0 reverse KL, alpha->1 forward KL
==============  =====================================  ==========================================

Every score is normalised so that ``s(0) = 0`` (``f'(1) = 0``, as TRL 1.16 writes them): the constant cancels in
a difference ``s(lr_w) - s(lr_l)``, but not in the length-normalised differences of IPO and sigmoid-norm, where
it keeps a policy equal to its reference at a score of 0. TRL's ``f_alpha_divergence_coef`` equals ``1 - alpha``
of this convention (they agree only at 0.5); TRL's ``"js_divergence"``/``"alpha_divergence"`` are ``"js"``/
``"alpha"`` here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_choice, check_number

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

# exp(40) ~ 2.4e17: far beyond where the sigmoid saturates (so the loss is unchanged wherever it matters),
# yet small enough that beta * exp(40) times a few backward factors cannot reach inf in fp32/bf16.
MAX_EXPONENT = 40.0

_TRL_NAMES = {"js_divergence": "js", "alpha_divergence": "alpha"}


def safe_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for ``x <= MAX_EXPONENT``, continued linearly (tangent line) above it.

    A hard clamp would also be finite, but it zeroes the gradient of exactly the worst-violated pairs; the
    tangent continuation keeps the value continuous and the gradient at the constant ``exp(MAX_EXPONENT)``.
    """
    capped = torch.exp(x.clamp(max=MAX_EXPONENT))
    return torch.where(x > MAX_EXPONENT, capped * (1.0 + (x - MAX_EXPONENT)), capped)


def divergence_score(logratios: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """``s(lr) = f'(exp(lr))`` for the divergence's generator ``f``, normalised so that ``s(0) = 0``."""
    # D_f(pi || pi_ref) = E_ref[f(u)], u = pi / pi_ref = exp(lr).
    if divergence == "reverse_kl":  # f(u) = u log u - u + 1  -> f'(u) = log u
        return logratios
    if divergence == "forward_kl":  # f(u) = u - 1 - log u    -> f'(u) = 1 - 1/u
        return 1.0 - safe_exp(-logratios)
    if divergence == "js":  # f'(u) = log(2u / (1 + u)) = log 2 + logsigmoid(lr)
        return math.log(2.0) + F.logsigmoid(logratios)
    if divergence == "alpha":  # f'(u) = (1 - u^-alpha) / alpha
        return (1.0 - safe_exp(-alpha * logratios)) / alpha
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


def check_divergence(loss: str, divergence: object, alpha: object) -> tuple[str, float]:
    """Validated ``(divergence, alpha)`` with messages that translate TRL's names."""
    hint = f"TRL's {divergence!r} is {_TRL_NAMES[divergence]!r} here." if divergence in _TRL_NAMES else ""
    divergence = check_choice(loss, "divergence", divergence, DIVERGENCES, hint)
    alpha = check_number(
        loss,
        "alpha",
        alpha,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        hint="Paper convention: alpha->0 is reverse KL (use divergence='reverse_kl'), "
        "alpha->1 forward KL (use 'forward_kl'); TRL's f_alpha_divergence_coef equals 1 - alpha.",
    )
    return divergence, alpha
