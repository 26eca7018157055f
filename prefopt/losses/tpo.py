"""TPO: reference-free triple preference optimisation (gold, chosen, rejected), and its TPO-L variant."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prefopt.losses._checks import check_choice, check_number, compute_dtype, lengths_as_float, pair_tensors
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")


def gold_nll(loss: str, inputs: LossInputs) -> torch.Tensor:
    """Batch token-mean NLL of the gold completions: ``-sum_i logp(g_i) / sum_i |g_i|``
    (``nn.CrossEntropyLoss``
    over every gold completion token of the batch, as the TPO code and TRL do; not a per-sequence mean)."""
    inputs.require("gold_logps")
    gold = compute_dtype(inputs.gold_logps)
    lengths = lengths_as_float(loss, "gold_lengths", inputs.gold_lengths, gold)
    return -gold.sum() / lengths.sum()


class TPOLoss(PreferenceLoss):
    """Triple Preference Optimization — Saeidi et al. 2024, "Triple Preference Optimization: Achieving Better
    Alignment using a Single Step Optimization" (arXiv 2405.16681); the authors' code sahsaeedi/TPO
    ``utils/tpo_trainer.py`` (v2) and TRL 1.16 ``trl/experimental/tpo/tpo_trainer.py:663-712``.

    Reference-free. Each example is a triple: a gold completion ``g`` (the best one; the TPO code calls it
    ``reference``, which is *not* a reference model), a chosen ``y_w`` and a rejected ``y_l``::

        L = mean_pairs[ pref(logp(y_w) - logp(y_l)) ] + alpha * NLL(g)

    with ``NLL(g)`` one token mean over all gold completion tokens of the batch and ``pref`` by ``loss_type``:

    ``sigmoid``  ``-(1-e) logsigmoid(beta z) - e logsigmoid(-beta z)``, ``z`` on summed logps (TPO)
    ``hinge``    ``relu(1 - beta z)``, summed logps
    ``ipo``      ``(z - 1/(2 beta))^2``, ``z`` on mean per-token logps
    ``tpo-l``    ``-(1-e) logsigmoid(beta z - gamma) - e logsigmoid(-(beta z - gamma))``, mean logps (TPO-L;
                 the code subtracts ``gamma/beta`` from ``z``, the same thing)

    ``alpha=0`` drops the gold term (and the gold forward). Defaults follow TRL and the v2 README for base
    models:
    ``beta=0.01``, ``alpha=1.0``, ``gamma=0.5``, ``label_smoothing=0``; the README uses beta 2-10 and gamma
    0.3-10 for TPO-L (``tpo_l`` defaults to beta 2.0). Training starts from the base model (no SFT stage).
    Reads: ``policy_{chosen,rejected}_logps``, ``{chosen,rejected}_lengths``, ``gold_logps``,
    ``gold_lengths``.
    Logs: ``rewards/*`` (``beta * logp``, sums or means as the loss uses), ``logps/*``, ``tpo/gold_nll``.
    """

    name: ClassVar[str] = "tpo"
    needs: ClassVar[frozenset[str]] = frozenset({"gold"})
    step: ClassVar[str] = "triples"
    summary: ClassVar[str] = (
        "TPO (Saeidi et al. 2024): reference-free, -logsigmoid(beta*(logp_w - logp_l)) + alpha*NLL(gold)"
    )

    paper: ClassVar[str] = (
        "Saeidi et al. 2024, Triple Preference Optimization: Achieving Better Alignment using a Single Step "
        "Optimization (arXiv 2405.16681)"
    )
    formula: ClassVar[str] = (
        "L = -logsigmoid(beta * (logp(y_w) - logp(y_l))) + alpha * NLL(gold) (token mean)"
    )

    def __init__(
        self,
        beta: float = 0.01,
        alpha: float = 1.0,
        loss_type: str = "sigmoid",
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.alpha = check_number(self.name, "alpha", alpha, low=0.0)
        self.loss_type = check_choice(self.name, "loss_type", loss_type, LOSS_TYPES)
        self.gamma = check_number(self.name, "gamma", gamma)
        self.label_smoothing = check_number(
            self.name, "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True
        )
        # Without the NLL term the gold completions are not needed: plain pair data will do.
        self.needs = type(self).needs if self.alpha > 0 else frozenset()
        self.step = type(self).step if self.alpha > 0 else "pairs"

    def implicit_reward(self):
        """``beta * logp`` (reference-free; per token for ``ipo`` / ``tpo-l``): what the loss compares."""
        from prefopt.losses.base import ImplicitReward

        return ImplicitReward(
            scale=self.beta, uses_reference=False, length_normalized=self.loss_type in ("ipo", "tpo-l")
        )

    def forward(self, inputs: LossInputs) -> LossOutput:
        chosen, rejected, _, _ = pair_tensors(self.name, inputs, reference=False)
        if self.loss_type in ("ipo", "tpo-l"):
            chosen = chosen / lengths_as_float(self.name, "chosen_lengths", inputs.chosen_lengths, chosen)
            rejected = rejected / lengths_as_float(
                self.name, "rejected_lengths", inputs.rejected_lengths, rejected
            )
        z = chosen - rejected
        e = self.label_smoothing
        if self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * z)
        elif self.loss_type == "ipo":
            losses = (z - 1 / (2 * self.beta)) ** 2
        else:
            logits = self.beta * z - (self.gamma if self.loss_type == "tpo-l" else 0.0)
            losses = -(1 - e) * F.logsigmoid(logits) - e * F.logsigmoid(-logits)
        loss = losses.mean()
        extra = {}
        if self.alpha > 0:
            nll = gold_nll(self.name, inputs)
            loss = loss + self.alpha * nll
            extra["tpo/gold_nll"] = nll
        metrics = pairwise_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected, extra)
        return LossOutput(loss=loss, metrics=metrics)


class TPOLLoss(TPOLoss):
    """TPO-L: :class:`TPOLoss` with ``loss_type="tpo-l"`` (length-normalised logps and a target margin gamma)
    and the v2 README's scale ``beta=2.0`` (it uses beta 2-10, gamma 0.3-10)."""

    name: ClassVar[str] = "tpo_l"
    formula: ClassVar[str] = (
        "L = -logsigmoid(beta * (avg(y_w) - avg(y_l)) - gamma) + alpha * NLL(gold) (token mean)"
    )
    summary: ClassVar[str] = (
        "TPO-L (Saeidi et al. 2024): -logsigmoid(beta*(avg_w - avg_l) - gamma) + alpha*NLL(gold)"
    )

    def __init__(
        self, beta: float = 2.0, alpha: float = 1.0, gamma: float = 0.5, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(
            beta=beta, alpha=alpha, loss_type="tpo-l", gamma=gamma, label_smoothing=label_smoothing
        )
