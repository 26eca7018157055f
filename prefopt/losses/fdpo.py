"""f-DPO: DPO under other f-divergences than the reverse KL."""

from __future__ import annotations

from typing import ClassVar, FrozenSet

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_choice, check_number, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss

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
    """``s(lr) = f'(exp(lr))`` for the divergence's generator ``f``, additive constants dropped."""
    # D_f(pi || pi_ref) = E_ref[f(u)], u = pi / pi_ref = exp(lr).
    if divergence == "reverse_kl":  # f(u) = u log u   -> f'(u) = log u + 1      -> s = lr (+1 dropped)
        return logratios
    if divergence == "forward_kl":  # f(u) = -log u    -> f'(u) = -1/u           -> s = -exp(-lr)
        return -safe_exp(-logratios)
    if (
        divergence == "js"
    ):  # f'(u) = log(2u / (1 + u))                  -> s = logsigmoid(lr) (+log 2 dropped)
        return F.logsigmoid(logratios)
    if (
        divergence == "alpha"
    ):  # f'(u) = (1 - u^-alpha) / alpha       -> s = -exp(-alpha*lr)/alpha (+1/alpha dropped)
        return -safe_exp(-alpha * logratios) / alpha
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


class FDPOLoss(PreferenceLoss):
    """f-DPO — Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints" (arXiv 2309.16240).

    With ``lr = logp_policy - logp_ref`` and ``s(lr) = f'(exp(lr))`` of the divergence's generator::

        L = -logsigmoid(beta * (s(lr_w) - s(lr_l)))

    ==============  ==============================  ==========================================
    divergence      s(lr)                           note
    ==============  ==============================  ==========================================
    ``reverse_kl``  ``lr``                          identical to DPO
    ``forward_kl``  ``-exp(-lr)``
    ``js``          ``logsigmoid(lr)``              = log(2u/(1+u)) - log 2, u = exp(lr)
    ``alpha``       ``-exp(-alpha * lr) / alpha``   paper convention: alpha→0 reverse KL, alpha→1 forward KL
    ==============  ==============================  ==========================================

    TRL's ``f_alpha_divergence_coef`` is ``1 - alpha`` of this convention (they agree only at 0.5), and TRL's
    ``"js_divergence"`` is ``"js"`` here. The exponentials overflow for late-training log-ratios (fp32 ``exp``
    overflows above 88.7), so exponents beyond ``MAX_EXPONENT = 40`` are continued linearly: loss and gradient
    stay finite for log-ratios of ±1000 in fp32 and bf16. Half-precision inputs are computed in fp32.

    Defaults: ``beta=0.1``, ``divergence="reverse_kl"``, ``alpha=0.5`` (in (0, 1); read by ``alpha`` only).
    Reads: ``policy_{chosen,rejected}_logps``, ``reference_{chosen,rejected}_logps``.
    Logs: ``rewards/*`` = ``beta * lr`` for every divergence (so runs compare), ``logps/*`` (sums), and
    ``logits/margin`` = mean of ``beta * (s(lr_w) - s(lr_l))``, the logit inside the loss.
    """

    name: ClassVar[str] = "fdpo"
    needs: ClassVar[FrozenSet[str]] = frozenset({"reference"})
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "f-DPO (Wang et al. 2023): DPO with reverse/forward KL, JS or alpha divergence"

    def __init__(self, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        hint = f"TRL's {divergence!r} is {_TRL_NAMES[divergence]!r} here." if divergence in _TRL_NAMES else ""
        self.divergence = check_choice(self.name, "divergence", divergence, DIVERGENCES, hint)
        self.alpha = check_number(
            self.name,
            "alpha",
            alpha,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            hint="Paper convention: alpha->0 is reverse KL (use divergence='reverse_kl'), "
            "alpha->1 forward KL (use 'forward_kl'); TRL's f_alpha_divergence_coef equals 1 - alpha.",
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = log_ratios(self.name, inputs)
        chosen_scores = divergence_score(chosen_logratios, self.divergence, self.alpha)
        rejected_scores = divergence_score(rejected_logratios, self.divergence, self.alpha)
        logits = self.beta * (chosen_scores - rejected_scores)
        loss = -F.logsigmoid(logits).mean()
        metrics = pairwise_metrics(
            self.beta * chosen_logratios,
            self.beta * rejected_logratios,
            policy_chosen,
            policy_rejected,
            extra={"logits/margin": logits},
        )
        return LossOutput(loss=loss, metrics=metrics)
