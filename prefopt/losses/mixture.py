"""Weighted mixtures of losses: ``loss.mix: [{name: dpo, weight: 0.8}, {name: bco_pair, weight: 0.2}, ...]``."""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Optional

import torch

from prefopt.losses.base import ImplicitReward, LossInputs, LossOutput, PreferenceLoss

# Parts must build their LossInputs from the same batch of pairs. An SFT part reads only the chosen side of it
# (NLL on the chosen responses, as TRL's loss_type="sft" does inside DPOTrainer).
MIXABLE_STEPS = ("pairs", "sft")


class MixtureLoss(PreferenceLoss):
    """A weighted sum of pairwise losses, trained on one batch of preference pairs.

    ::

        L = sum_k weight_k * L_k

    Each part is ``{"name": <loss>, "weight": <float>, <that loss's parameters>...}``; parameters not given keep
    the part's defaults. Parts must run on preference pairs (``prefopt losses`` lists each loss's step); an
    ``sft`` part is the NLL of the chosen responses. This is TRL 1.16's ``loss_type=[...]``,
    ``loss_weights=[...]`` (e.g. MPO, Wang et al. 2024, arXiv 2411.10442: ``sigmoid`` 0.8, ``bco_pair`` 0.2,
    ``sft`` 1.0), with each part's own parameters instead of one shared ``beta``.

    Logs: every metric of part k under the part's name (``dpo/rewards/margins``, ``sft/sft/nll``...; a name used
    twice gets ``_2``, ``_3``), its unweighted loss as ``<part>/loss``, and the top-level ``rewards/*`` /
    ``logps/*`` of the first part that has an implicit reward (which is also the mixture's implicit reward).
    Needs: the union of the parts' needs.
    """

    name: ClassVar[str] = "mix"
    step: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "Weighted sum of pairwise losses: mix=[{name: dpo, weight: 0.8}, ...]"
    paper: ClassVar[str] = (
        "TRL's multi-loss DPO (loss_type/loss_weights); MPO: Wang et al. 2024 (arXiv 2411.10442)"
    )
    formula: ClassVar[str] = "L = sum_k weight_k L_k"

    def __init__(self, mix: Optional[list[dict[str, Any]]] = None) -> None:
        from prefopt.losses.registry import get_loss

        if not mix or not isinstance(mix, (list, tuple)):
            raise ValueError(
                f"{self.name}: mix must be a non-empty list of parts like "
                "[{name: dpo, weight: 0.8}, {name: sft, weight: 1.0}], got " + repr(mix)
            )
        self.parts: list[tuple[str, float, PreferenceLoss]] = []
        used: dict[str, int] = {}
        for index, part in enumerate(mix):
            where = f"{self.name}: part {index}"
            if not isinstance(part, dict) or "name" not in part:
                raise ValueError(f"{where} must be a mapping with a 'name' (and a 'weight'), got {part!r}")
            params = {k: v for k, v in part.items() if k not in ("name", "weight")}
            weight = part.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
                raise ValueError(f"{where} ({part['name']}): weight must be a number >= 0, got {weight!r}")
            if part["name"] == self.name:
                raise ValueError(f"{where}: a mixture cannot contain a mixture")
            try:
                loss = get_loss(part["name"], **params)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            if loss.step not in MIXABLE_STEPS:
                raise ValueError(
                    f"{where}: loss '{loss.name}' runs a '{loss.step}' step; only losses on preference pairs "
                    f"(steps {', '.join(MIXABLE_STEPS)}) can be mixed"
                )
            used[loss.name] = used.get(loss.name, 0) + 1
            prefix = loss.name if used[loss.name] == 1 else f"{loss.name}_{used[loss.name]}"
            self.parts.append((prefix, float(weight), loss))
        if all(loss.step != "pairs" for _, _, loss in self.parts):
            raise ValueError(f"{self.name}: at least one part must be a preference loss (not only sft)")
        self.needs: frozenset[str] = frozenset().union(*(loss.needs for _, _, loss in self.parts))

    @property
    def mix(self) -> list[dict[str, Any]]:
        """The parts with every parameter resolved (for config.yaml)."""
        return [
            {"name": loss.name, "weight": weight, **loss.hyperparameters()} for _, weight, loss in self.parts
        ]

    def implicit_reward(self) -> Optional[ImplicitReward]:
        return next((r for r in (loss.implicit_reward() for _, _, loss in self.parts) if r is not None), None)

    def forward(self, inputs: LossInputs) -> LossOutput:
        total: Optional[torch.Tensor] = None
        metrics: dict[str, float] = {}
        headline: Optional[dict[str, float]] = None
        for prefix, weight, loss in self.parts:
            out = loss(inputs)
            total = weight * out.loss if total is None else total + weight * out.loss
            metrics[f"{prefix}/loss"] = float(out.loss.detach())
            metrics.update({f"{prefix}/{key}": value for key, value in out.metrics.items()})
            if headline is None and loss.implicit_reward() is not None:
                headline = {k: v for k, v in out.metrics.items() if k.startswith(("rewards/", "logps/"))}
        metrics.update(headline or {})
        return LossOutput(loss=total, metrics=metrics)
