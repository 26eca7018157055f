"""Pure diagnostics functions on numbers: no model, no tokenizer, no I/O.

Inputs are 1-D array-likes (lists, numpy arrays or CPU tensors); everything is computed in float64 and every
result is plain Python (``float``/``int``/``list``/``dict``, ``None`` where a number is undefined, e.g. the
correlation of a constant), so it can go straight into ``diagnostics.json``.

Conventions (docs/losses.md): a pair's implicit reward margin is ``r(y_w) - r(y_l)`` with
``r(y)`` the trained loss's implicit reward (``PreferenceLoss.implicit_reward()``: DPO family
``beta * (logp_policy(y) - logp_ref(y))``, SimPO ``beta * logp_policy(y) / |y|``, ...); accuracy counts
strict ``margin > 0``; the Bradley-Terry probability is ``sigmoid(margin)``; ECE is top-label with 10 equal
bins, ``conf = max(p, 1 - p)``, correct = ``p > 0.5``, bin = ``min(floor(conf * 10), 9)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)

# Relative length difference d = (|y_w| - |y_l|) / max(|y_w|, |y_l|) -> bucket: d < -0.5, -0.5 <= d < -0.1,
# -0.1 <= d <= 0.1, 0.1 < d <= 0.5, d > 0.5 (edges belong to the bucket nearer "similar").
LENGTH_BUCKETS = (
    ("chosen much shorter", -math.inf, -0.5),
    ("chosen shorter", -0.5, -0.1),
    ("similar length", -0.1, 0.1),
    ("chosen longer", 0.1, 0.5),
    ("chosen much longer", 0.5, math.inf),
)


def as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _float(value: Any) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------ rewards


def implicit_rewards(
    policy_logps: Any, reference_logps: Any = None, *, reward: Any, lengths: Any = None
) -> np.ndarray:
    """``r(y)`` per response under the loss's :class:`~prefopt.losses.ImplicitReward` (e.g. DPO's
    ``beta * (logp_policy - logp_ref)``, SimPO's ``beta * logp_policy / lengths``), in float64."""
    return np.asarray(
        reward.sequence(
            as_array(policy_logps),
            None if reference_logps is None else as_array(reference_logps),
            None if lengths is None else as_array(lengths),
        ),
        dtype=np.float64,
    )


def accuracy(margins: Any) -> Optional[float]:
    """Fraction of pairs with ``margin > 0`` (strict: a tie is wrong). ``None`` for no pairs."""
    values = as_array(margins)
    return float(np.mean(values > 0)) if values.size else None


def bt_probabilities(margins: Any) -> np.ndarray:
    """``sigmoid(margin)``, computed without overflow for large |margin|."""
    values = as_array(margins)
    out = np.empty_like(values)
    positive = values >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-values[positive]))
    exp = np.exp(values[~positive])
    out[~positive] = exp / (1.0 + exp)
    return out


def calibration(probabilities: Any, n_bins: int = 10) -> dict[str, Any]:
    """Top-label expected calibration error and the reliability-diagram bins.

    ``conf = max(p, 1 - p)`` lies in [0.5, 1], so with 10 equal bins only bins 5..9 can be non-empty; all
    ``n_bins`` are returned (empty ones with ``count`` 0 and ``None`` averages) so plots keep a fixed axis.
    """
    probs = as_array(probabilities)
    confidence = np.maximum(probs, 1.0 - probs)
    correct = probs > 0.5
    index = np.minimum(np.floor(confidence * n_bins).astype(int), n_bins - 1)
    total = probs.size
    ece = 0.0
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        entry: dict[str, Any] = {
            "lower": b / n_bins,
            "upper": (b + 1) / n_bins,
            "count": count,
            "confidence": None,
            "accuracy": None,
            "gap": None,
        }
        if count:
            conf_b = float(confidence[members].mean())
            acc_b = float(correct[members].mean())
            entry.update(confidence=conf_b, accuracy=acc_b, gap=acc_b - conf_b)
            ece += count / total * abs(acc_b - conf_b)
        bins.append(entry)
    return {
        "ece": ece if total else None,
        "accuracy": float(correct.mean()) if total else None,
        "mean_confidence": float(confidence.mean()) if total else None,
        "bins": bins,
    }


def distribution(values: Any, n_bins: int = 30) -> dict[str, Any]:
    """Count, mean, std (population), min, max, quantiles ``p01..p99`` and a histogram (edges, counts)."""
    data = as_array(values)
    data = data[np.isfinite(data)]
    if not data.size:
        return {
            "count": 0,
            "mean": None,
            "std": None,
            "min": None,
            "max": None,
            "quantiles": {},
            "histogram": {"edges": [], "counts": []},
        }
    counts, edges = np.histogram(data, bins=n_bins)
    return {
        "count": int(data.size),
        "mean": float(data.mean()),
        "std": float(data.std()),
        "min": float(data.min()),
        "max": float(data.max()),
        "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(data, q)) for q in QUANTILES},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


# ------------------------------------------------------------------------------------------- correlations


def rankdata(values: Any) -> np.ndarray:
    """Ranks starting at 1, ties get the average of the ranks they span (as Spearman's rho needs)."""
    data = as_array(values)
    order = np.argsort(data, kind="mergesort")
    ranks = np.empty(data.size, dtype=np.float64)
    sorted_values = data[order]
    start = 0
    while start < data.size:
        end = start
        while end + 1 < data.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: Any, y: Any) -> Optional[float]:
    """Pearson's r; ``None`` with fewer than 3 points or a constant input."""
    a, b = as_array(x), as_array(y)
    if a.size != b.size:
        raise ValueError(f"pearson: {a.size} vs {b.size} values")
    if a.size < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator == 0.0:
        return None
    return _float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def spearman(x: Any, y: Any) -> Optional[float]:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


def correlation(x: Any, y: Any) -> dict[str, Optional[float]]:
    return {"pearson": pearson(x, y), "spearman": spearman(x, y)}


# ------------------------------------------------------------------------------------------ length effects


def length_effects(
    chosen_rewards: Any, rejected_rewards: Any, chosen_lengths: Any, rejected_lengths: Any
) -> dict[str, Any]:
    """How the implicit reward relates to completion length (in tokens, EOS included).

    ``reward_vs_length``: correlation over all completions (chosen and rejected pooled).
    ``margin_vs_length_difference``: correlation of ``r_w - r_l`` with ``|y_w| - |y_l|``.
    ``longer_wins_rate``: among pairs of unequal length, how often the longer completion has the higher reward;
    ``chosen_longer_rate``: how often the labelled chosen completion is the longer one (the data's own bias).
    """
    r_w, r_l = as_array(chosen_rewards), as_array(rejected_rewards)
    n_w, n_l = as_array(chosen_lengths), as_array(rejected_lengths)
    margins, length_difference = r_w - r_l, n_w - n_l
    unequal = length_difference != 0
    longer_reward = np.where(length_difference > 0, r_w, r_l)[unequal]
    shorter_reward = np.where(length_difference > 0, r_l, r_w)[unequal]
    return {
        "reward_vs_length": correlation(np.concatenate([r_w, r_l]), np.concatenate([n_w, n_l])),
        "margin_vs_length_difference": correlation(margins, length_difference),
        "unequal_length_pairs": int(unequal.sum()),
        "longer_wins_rate": float(np.mean(longer_reward > shorter_reward)) if unequal.any() else None,
        "chosen_longer_rate": float(np.mean(length_difference[unequal] > 0)) if unequal.any() else None,
        "chosen_length": distribution(n_w, n_bins=20),
        "rejected_length": distribution(n_l, n_bins=20),
        "by_length_difference": accuracy_by_length_bucket(margins, n_w, n_l),
    }


def accuracy_by_length_bucket(
    margins: Any, chosen_lengths: Any, rejected_lengths: Any
) -> list[dict[str, Any]]:
    """Accuracy and mean margin per bucket of the relative length difference (see ``LENGTH_BUCKETS``)."""
    values = as_array(margins)
    n_w, n_l = as_array(chosen_lengths), as_array(rejected_lengths)
    longest = np.maximum(np.maximum(n_w, n_l), 1.0)
    relative = (n_w - n_l) / longest
    bucket = np.select(
        [relative < -0.5, relative < -0.1, relative <= 0.1, relative <= 0.5], [0, 1, 2, 3], default=4
    )
    rows = []
    for number, (name, low, high) in enumerate(LENGTH_BUCKETS):
        members = bucket == number
        count = int(members.sum())
        rows.append(
            {
                "bucket": name,
                "relative_low": _float(low),
                "relative_high": _float(high),
                "count": count,
                "accuracy": accuracy(values[members]) if count else None,
                "mean_margin": float(values[members].mean()) if count else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------------- samples and KL


def sample_kl_terms(
    policy_token_logps: Any, reference_token_logps: Any, mask: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample KL estimator terms from ``[N, T]`` token log-probs of samples ``y ~ policy``.

    ``k1 = sum_t lr_t`` with ``lr_t = logp_policy_t - logp_ref_t`` (the sequence log-ratio, unbiased for
    KL(policy || reference), one sample can be negative); ``k3 = sum_t (exp(-lr_t) - 1 + lr_t)`` (Schulman's
    k3 per token, summed over the response: unbiased by the chain rule, never negative, lower variance).
    """
    policy, reference = _matrix(policy_token_logps), _matrix(reference_token_logps)
    weights = _matrix(mask)
    log_ratio = (policy - reference) * weights
    k3 = (np.expm1(-log_ratio) + log_ratio) * weights
    return log_ratio.sum(axis=1), k3.sum(axis=1)


def _matrix(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def kl_summary(k1: Any, k3: Any, lengths: Any) -> dict[str, Any]:
    """Mean, std and standard error of both estimators, plus the per-token KL (k1 total / tokens)."""
    a, b, n = as_array(k1), as_array(k3), as_array(lengths)
    count = a.size
    if not count:
        return {
            "samples": 0,
            "k1": None,
            "k1_std": None,
            "k1_stderr": None,
            "k3": None,
            "k3_std": None,
            "k3_stderr": None,
            "k1_per_token": None,
        }
    return {
        "samples": int(count),
        "k1": float(a.mean()),
        "k1_std": float(a.std()),
        "k1_stderr": float(a.std(ddof=1) / math.sqrt(count)) if count > 1 else None,
        "k3": float(b.mean()),
        "k3_std": float(b.std()),
        "k3_stderr": float(b.std(ddof=1) / math.sqrt(count)) if count > 1 else None,
        "k1_per_token": float(a.sum() / n.sum()) if n.sum() > 0 else None,
    }


def mean_std(values: Any) -> dict[str, Optional[float]]:
    data = as_array(values)
    if not data.size:
        return {"mean": None, "std": None}
    return {"mean": float(data.mean()), "std": float(data.std())}


# ------------------------------------------------------------------------------ implicit vs explicit


def reward_agreement(implicit_margins: Any, explicit_margins: Any) -> dict[str, Any]:
    """How an implicit reward and an explicit one (reward model or function) judge the same labelled pairs.

    ``agreement_rate``: fraction of pairs where both prefer the same completion, i.e. ``(m_imp > 0) ==
    (m_exp > 0)`` (a tie counts as preferring the rejected one, as in accuracy).
    """
    imp, exp = as_array(implicit_margins), as_array(explicit_margins)
    if imp.size != exp.size:
        raise ValueError(f"reward_agreement: {imp.size} implicit vs {exp.size} explicit margins")
    return {
        "pairs": int(imp.size),
        "implicit_accuracy": accuracy(imp),
        "explicit_accuracy": accuracy(exp),
        "agreement_rate": float(np.mean((imp > 0) == (exp > 0))) if imp.size else None,
        "both_correct_rate": float(np.mean((imp > 0) & (exp > 0))) if imp.size else None,
        "margin_correlation": correlation(imp, exp),
        "explicit_margin": distribution(exp),
    }


def disagreement_order(implicit_margins: Any, explicit_margins: Any) -> list[int]:
    """Indices of the pairs where the two rewards disagree, strongest disagreement first.

    Margins are put on one scale by dividing each by its own standard deviation; pairs with opposite
    preferences are ranked by ``|z_imp - z_exp|``.
    """
    imp, exp = as_array(implicit_margins), as_array(explicit_margins)
    z_imp = imp / (imp.std() or 1.0)
    z_exp = exp / (exp.std() or 1.0)
    disagree = np.flatnonzero((imp > 0) != (exp > 0))
    score = np.abs(z_imp - z_exp)[disagree]
    return [int(i) for i in disagree[np.argsort(-score, kind="mergesort")]]


# ------------------------------------------------------------------------------------- token level


def select_token_examples(margins: Any, count: int) -> list[tuple[int, str]]:
    """``count`` pair positions to show token by token, with why each was picked.

    The largest-margin correct pair, the most confidently wrong pair (most negative margin), then pairs at evenly
    spaced margin quantiles ("typical"). Positions are into ``margins``; duplicates are skipped.
    """
    values = as_array(margins)
    picked: list[tuple[int, str]] = []
    if count <= 0 or not values.size:
        return picked
    correct = np.flatnonzero(values > 0)
    wrong = np.flatnonzero(values <= 0)
    if correct.size:
        picked.append((int(correct[np.argmax(values[correct])]), "largest-margin correct"))
    if wrong.size and len(picked) < count:
        picked.append((int(wrong[np.argmin(values[wrong])]), "largest-margin wrong"))
    order = np.argsort(values, kind="mergesort")
    remaining = count - len(picked)
    taken = {index for index, _ in picked}
    for k in range(remaining):
        q = (k + 1) / (remaining + 1)
        center = round(q * (values.size - 1))
        nearest = sorted(range(values.size), key=lambda j: (abs(j - center), j))  # walk out from the quantile
        position = next((int(order[j]) for j in nearest if int(order[j]) not in taken), None)
        if position is None:
            break
        taken.add(position)
        picked.append((position, f"typical (margin quantile {q:.2f})"))
    return picked


def top_contributions(tokens: Sequence[str], rewards: Sequence[float], sign: float, k: int = 5) -> list[dict]:
    """The ``k`` tokens with the largest |reward| of one response; ``contribution = sign * reward`` is what the
    token adds to the pair's margin (+1 for the chosen response, -1 for the rejected one)."""
    values = as_array(rewards)
    order = np.argsort(-np.abs(values), kind="mergesort")[:k]
    return [
        {
            "position": int(i),
            "token": tokens[i],
            "reward": float(values[i]),
            "margin_contribution": float(sign * values[i]),
        }
        for i in order
    ]


def token_table(sums: Any, counts: Any, decode, *, k: int = 20, min_count: int = 3) -> dict[str, list[dict]]:
    """Tokens with the highest and lowest mean token reward over the dataset (vocabulary-sized ``sums`` and
    ``counts`` arrays); tokens seen fewer than ``min_count`` times are left out (lowered when too few remain)."""
    totals, seen = as_array(sums), as_array(counts)
    threshold = min_count
    while threshold > 1 and int((seen >= threshold).sum()) < k:
        threshold -= 1
    eligible = np.flatnonzero(seen >= max(threshold, 1))
    if not eligible.size:
        return {"highest": [], "lowest": [], "min_count": threshold}
    means = totals[eligible] / seen[eligible]
    order = np.argsort(means, kind="mergesort")

    def rows(positions) -> list[dict]:
        return [
            {
                "token_id": int(eligible[p]),
                "token": decode(int(eligible[p])),
                "mean_reward": float(means[p]),
                "count": int(seen[eligible[p]]),
                "total_reward": float(totals[eligible[p]]),
            }
            for p in positions
        ]

    return {"highest": rows(order[::-1][:k]), "lowest": rows(order[:k]), "min_count": threshold}
