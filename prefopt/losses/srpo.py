"""SRPO: self-improving robust preference optimisation (one model as generator and as reviser)."""

from __future__ import annotations

from typing import ClassVar

from prefopt.losses._checks import check_number, compute_dtype, log_ratios
from prefopt.losses._metrics import pairwise_metrics
from prefopt.losses.base import LossInputs, LossOutput, PreferenceLoss

# Column order of ``policy_revision_logps`` / ``reference_revision_logps``: (completion | revised answer).
REVISION_COLUMNS = ("chosen|rejected", "rejected|rejected", "chosen|chosen", "rejected|chosen")


class SRPOLoss(PreferenceLoss):
    """Self-Improving Robust Preference Optimization — Choi et al., ICLR 2025 (arXiv 2406.01660).

    One model plays two roles: the generator ``pi(y | x)`` (plain prompt) and the reviser ``pi(y' | x, y)``
    (the
    prompt, an answer ``y`` and a revision instruction, rendered by ``data.revision_template``). The paper's
    min-max objective ``min_pi max_pi' E[P(y' > y | x)] - beta KL(pi' || ref) + beta KL(pi || ref)`` has the
    fixed point ``beta lr'(y' | y) = P(y' > y) - beta log Z(y)`` and ``beta lr(y) = -beta log Z(y) + c``. With
    ``lr = logp_policy - logp_ref`` (sums) and the six log-ratios::

        a = lr(y_w | x, y_l)   b = lr(y_l | x, y_l)   c = lr(y_w | x, y_w)   e = lr(y_l | x, y_w)
        g = lr(y_w | x)        h = lr(y_l | x)

    and hard labels (``P(y_w > y_l) = 1``) these targets give::

        L_imp = (1/2 - beta (a - b))^2 + (1/2 - beta (c - e))^2        (reviser: p - 1/2 in both contexts)
        L_gen = (beta (a + g - e - h) - 1)^2                          (generator: 2p - 1)
        L     = mean[(1 - alpha) L_gen + alpha L_imp]

    Source of this form: the closed, unmerged TRL pull request huggingface/trl#1772 (``srpo_loss``, commit
    680f611, alpha hard-coded to 0.8); the targets were re-derived here from the min-max fixed point above and
    agree. The paper's body (its offline loss ``L_alpha``) could not be read from this project's sources, so
    whether the paper combines the terms as this weighted sum of squares or inside a single square is NOT
    confirmed; the weighted sum is what is implemented and tested.

    Defaults: ``beta=0.1``, ``alpha=0.8`` (the PR's values). Reads: ``policy_{chosen,rejected}_logps``,
    ``reference_{chosen,rejected}_logps`` (g, h), ``policy_revision_logps`` and ``reference_revision_logps``
    ``[B, 4]`` with columns (a, b, c, e) in :data:`REVISION_COLUMNS` order.
    Logs: ``rewards/*`` (``beta * lr`` of the generator), ``logps/*``, ``srpo/improve_loss``,
    ``srpo/generate_loss``,
    ``srpo/revision_margin`` (``beta (a - b)``, the reviser's preference for y_w when revising y_l).
    """

    name: ClassVar[str] = "srpo"
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "revisions"})
    step: ClassVar[str] = "revision_pairs"
    summary: ClassVar[str] = (
        "SRPO (Choi et al. 2025): generator + in-context reviser, (1-alpha)L_gen + alpha*L_imp (squared)"
    )

    paper: ClassVar[str] = (
        "Choi et al. 2025, Self-Improving Robust Preference Optimization (ICLR 2025, arXiv 2406.01660)"
    )
    formula: ClassVar[str] = (
        "L = (1-alpha)*(beta*(a+g-e-h) - 1)^2 + alpha*[(1/2 - beta*(a-b))^2 + (1/2 - beta*(c-e))^2]"
    )

    def __init__(self, beta: float = 0.1, alpha: float = 0.8) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, low_open=True)
        self.alpha = check_number(self.name, "alpha", alpha, low=0.0, high=1.0)

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy_chosen, policy_rejected, g, h = log_ratios(self.name, inputs)
        inputs.require("policy_revision_logps", "reference_revision_logps")
        policy_revision = compute_dtype(inputs.policy_revision_logps)
        reference_revision = compute_dtype(inputs.reference_revision_logps.detach())
        expected = (policy_chosen.shape[0], len(REVISION_COLUMNS))
        for name, tensor in (
            ("policy_revision_logps", policy_revision),
            ("reference_revision_logps", reference_revision),
        ):
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{self.name}: {name} has shape {tuple(tensor.shape)}, expected {expected} "
                    f"(columns {', '.join(REVISION_COLUMNS)})"
                )
        revision = policy_revision - reference_revision.to(policy_revision.device)
        a, b, c, e = revision.unbind(-1)
        improve_loss = (0.5 - self.beta * (a - b)) ** 2 + (0.5 - self.beta * (c - e)) ** 2
        generate_loss = (self.beta * (a + g - e - h) - 1.0) ** 2
        loss = ((1 - self.alpha) * generate_loss + self.alpha * improve_loss).mean()
        metrics = pairwise_metrics(
            self.beta * g,
            self.beta * h,
            policy_chosen,
            policy_rejected,
            {
                "srpo/improve_loss": improve_loss,
                "srpo/generate_loss": generate_loss,
                "srpo/revision_margin": self.beta * (a - b),
            },
        )
        return LossOutput(loss=loss, metrics=metrics)
