"""DNO's large-margin pair builder and the replay of earlier iterations' pairs (Rosset et al. 2024, arXiv
2404.03715, Alg. 2 and Sec. 5.1). Pure functions of scores and texts: no model, no I/O."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float
    is_gold: bool = False  # the teacher's (dataset's) answer rather than a policy sample
    auto_negative: bool = False  # a degenerate sample (repeated n-grams): only ever a negative


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one: ``1 - unique / total`` (0 when the
    text has fewer than ``n`` words). "the cat the cat the cat" has 4 trigrams, 2 unique: 0.5."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def large_margin_pairs(
    candidates: Sequence[Candidate],
    *,
    min_positive: Optional[float] = None,
    gold_margin: float = 0.0,
    student_margin: float = 0.0,
) -> list[tuple[int, int]]:
    """Every ``(positive, negative)`` index pair DNO keeps for one prompt.

    A positive must score at least ``min_positive`` (the paper: 5 on its 6-point scale; None: no floor). Its
    negative must score at least ``gold_margin`` lower when the positive is the gold answer (paper: 2) and
    ``student_margin`` lower when it is a policy sample (paper: 1), and always strictly lower. All qualifying
    pairs
    are kept: gold over sample, sample over gold and sample over sample (dropping sample-over-gold,
    "DNO-Restrictive",
    hurt in the paper). Identical texts never pair. Order: by positive, then negative, in candidate order.
    An ``auto_negative`` candidate (a degenerate sample, the paper's automatic negatives) is never a positive and
    is the negative of every positive whatever the scores.
    """
    pairs = []
    for i, positive in enumerate(candidates):
        if positive.auto_negative or (min_positive is not None and positive.score < min_positive):
            continue
        margin = gold_margin if positive.is_gold else student_margin
        for j, negative in enumerate(candidates):
            if i == j or positive.text == negative.text:
                continue
            gap = positive.score - negative.score
            if negative.auto_negative or (gap > 0 and gap >= margin):
                pairs.append((i, j))
    return pairs


def replay(
    history: Sequence[Sequence[dict]], fractions: Sequence[float], new_count: int, seed: int
) -> list[dict]:
    """Pairs carried over from earlier iterations: ``fractions[k]`` x ``new_count`` pairs drawn without
    replacement from the pairs of iteration t-1-k (``history[-1]`` is t-1), at most all of them.

    DNO mixes in up to 30% of pairs from t-1, 15% from t-2 and so on (Sec. 5.1), without re-sampling them.
    """
    rng = random.Random(seed)
    carried: list[dict] = []
    for back, fraction in enumerate(fractions, start=1):
        if back > len(history):
            break
        source = list(history[-back])
        count = min(len(source), round(fraction * new_count))
        carried.extend(rng.sample(source, count))
    return carried
