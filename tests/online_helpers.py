"""Reward functions and judges the online tests import by ``module:callable`` (``reward.function``)."""

from __future__ import annotations


def longer_wins(prompt: str, a: str, b: str) -> float:
    """A pairwise judge: P(a beats b) = 1 when ``a`` is the longer text, 0.5 on a tie (which goes to ``a``)."""
    return 1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0


def nan_reward(prompt: str, completion: str) -> float:
    """A broken reward model: every score is NaN (the PPO non-finite guard must stop the run)."""
    return float("nan")


def number_in_text(prompt: str, completion: str) -> float:
    """The completion read as a number: lets a test choose the raw scores exactly."""
    return float(completion)
