"""Scoring DNO's candidates: a scorer (reward model, reward function, implicit reward) gives one score each; a
pairwise judge ranks them by win-rate, ``score_i = mean_{j != i} P(c_i beats c_j)`` (Alg. 2: "rank by pairwise
win-rate"; with a preference function this is the paper's ``r_t(x, y) = E_{y'} P(y > y' | x)`` over the
candidates)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

from prefopt.errors import UserInputError


class JudgeError(UserInputError):
    """The pairwise judge returned something other than a probability (exit status 2)."""


def check_probability(value: object, *, judge: str, where: str) -> float:
    """``value`` as a float in [0, 1] (booleans count as 1 / 0); anything else is the judge's error."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise JudgeError(
        f"{judge} returned {value!r} for {where}: a pairwise judge must return P(a beats b), a number "
        "in [0, 1] (or a bool)"
    )


def judge_win_rates(
    judge_fn: Callable,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    locations: Sequence[str],
    *,
    judge: str = "reward.function",
) -> list[list[float]]:
    """Per prompt, each candidate's mean probability of beating the others, from ``judge_fn(prompt, a, b)``
    (``judge_fn.batched = True``: ``judge_fn(prompts, as, bs) -> list``), over all ordered pairs."""
    calls = [
        (p, i, j)
        for p, texts in enumerate(candidates)
        for i in range(len(texts))
        for j in range(len(texts))
        if i != j
    ]
    args = (
        [prompts[p] for p, _, _ in calls],
        [candidates[p][i] for p, i, _ in calls],
        [candidates[p][j] for p, _, j in calls],
    )
    if getattr(judge_fn, "batched", False):
        results = list(judge_fn(*args))
        if len(results) != len(calls):
            raise JudgeError(f"{judge}: returned {len(results)} verdicts for {len(calls)} comparisons")
    else:
        results = [judge_fn(p, a, b) for p, a, b in zip(*args)]
    totals = [[0.0] * len(texts) for texts in candidates]
    for (p, i, j), value in zip(calls, results):
        totals[p][i] += check_probability(
            value, judge=judge, where=f'{locations[p]}, field "prompt" (candidate {i} vs {j})'
        )
    return [[total / max(len(row) - 1, 1) for total in row] for row in totals]
