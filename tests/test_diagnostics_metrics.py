"""The pure diagnostics functions against hand-computed numbers (docs/losses.md, Diagnostics conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefopt.diagnostics import metrics as M

ECE_MARGINS = [2.0, 0.5, -0.3, 1.2, 0.05, -1.5, 3.0, 0.8]


def test_ece_worked_example_from_losses_md():
    probabilities = M.bt_probabilities(ECE_MARGINS)
    result = M.calibration(probabilities)
    assert M.accuracy(ECE_MARGINS) == pytest.approx(0.75)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["ece"] == pytest.approx(0.218972, abs=1e-6)
    assert len(result["bins"]) == 10 and sum(b["count"] for b in result["bins"]) == 8
    # conf = max(p, 1-p) >= 0.5: bins 0-4 stay empty
    assert all(b["count"] == 0 and b["accuracy"] is None for b in result["bins"][:5])
    for b in result["bins"]:
        if b["count"]:
            assert b["gap"] == pytest.approx(b["accuracy"] - b["confidence"])


def test_ece_bin_edges_and_ties():
    # p = 0.5 (margin 0): confidence 0.5 -> bin 5, counted wrong; p -> 1: confidence 1.0 -> bin 9 (not 10)
    result = M.calibration([0.5, 1.0, 0.0])
    assert result["bins"][5]["count"] == 1 and result["bins"][5]["accuracy"] == 0.0
    assert result["bins"][9]["count"] == 2 and result["bins"][9]["accuracy"] == pytest.approx(0.5)
    assert result["ece"] == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 0.5)
    assert M.accuracy([0.0, 0.0, 1e-9]) == pytest.approx(1 / 3)  # strict >
    assert M.calibration([])["ece"] is None and M.accuracy([]) is None


def test_bt_probabilities_are_stable():
    p = M.bt_probabilities([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    assert np.all(np.isfinite(p))
    assert p[0] == 0.0 and p[-1] == 1.0 and p[2] == 0.5
    assert p[3] == pytest.approx(1 / (1 + math.exp(-2))) and p[1] == pytest.approx(1 - p[3])


def test_implicit_rewards_come_from_the_loss():
    # docs/losses.md, Worked numbers: logp -12 / -15 over 6 / 10 tokens, reference -13 / -14
    from prefopt.losses import get_loss

    dpo = M.implicit_rewards(
        [-12.0, -15.0], [-13.0, -14.0], reward=get_loss("dpo", beta=0.1).implicit_reward()
    )
    assert dpo.tolist() == pytest.approx([0.1, -0.1])
    simpo_reward = get_loss("simpo", beta=2.0).implicit_reward()
    simpo = M.implicit_rewards([-12.0, -15.0], reward=simpo_reward, lengths=[6, 10])
    assert simpo.tolist() == pytest.approx([-4.0, -3.0])
    with pytest.raises(ValueError, match="zero tokens"):
        M.implicit_rewards([-1.0], reward=simpo_reward, lengths=[0])
    with pytest.raises(ValueError, match="reference"):
        M.implicit_rewards([-1.0], None, reward=get_loss("dpo").implicit_reward())


def test_distribution_summary():
    values = np.arange(101, dtype=float)
    d = M.distribution(values, n_bins=10)
    assert d["count"] == 101 and d["mean"] == 50.0 and d["min"] == 0.0 and d["max"] == 100.0
    assert d["quantiles"]["p50"] == 50.0 and d["quantiles"]["p01"] == pytest.approx(1.0)
    assert d["std"] == pytest.approx(float(values.std()))
    assert len(d["histogram"]["edges"]) == 11 and sum(d["histogram"]["counts"]) == 101
    assert M.distribution([])["mean"] is None


def test_correlations():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert M.pearson(x, [2.0, 4.0, 6.0, 8.0, 10.0]) == pytest.approx(1.0)
    assert M.pearson(x, [5.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert M.spearman(x, [1.0, 8.0, 27.0, 64.0, 125.0]) == pytest.approx(1.0)  # monotone, not linear
    assert M.pearson(x, [1.0, 8.0, 27.0, 64.0, 125.0]) < 0.99
    assert M.rankdata([10.0, 20.0, 20.0, 5.0]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # Spearman with ties = Pearson of average ranks (hand computed)
    a, b = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    assert M.spearman(a, b) == pytest.approx(M.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    assert M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None and M.pearson([1.0, 2.0], [1.0, 2.0]) is None


def test_length_buckets_edges():
    # relative difference (n_w - n_l) / max: -0.6, -0.5, -0.1, 0.0, 0.1, 0.5, 0.6
    chosen = [4, 5, 9, 10, 10, 10, 10]
    rejected = [10, 10, 10, 10, 9, 5, 4]
    margins = [1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0]
    rows = M.accuracy_by_length_bucket(margins, chosen, rejected)
    assert [r["count"] for r in rows] == [1, 1, 3, 1, 1]
    assert rows[2]["bucket"] == "similar length" and rows[2]["accuracy"] == pytest.approx(2 / 3)
    assert rows[1]["accuracy"] == 0.0 and rows[3]["accuracy"] == 1.0
    assert rows[0]["relative_low"] is None and rows[4]["relative_high"] is None


def test_length_effects():
    # rewards grow with length: the longer completion always wins
    chosen_len, rejected_len = [10, 3, 7, 5], [4, 8, 7, 9]
    chosen_reward = [0.1 * n for n in chosen_len]
    rejected_reward = [0.1 * n for n in rejected_len]
    effects = M.length_effects(chosen_reward, rejected_reward, chosen_len, rejected_len)
    assert effects["unequal_length_pairs"] == 3
    assert effects["longer_wins_rate"] == 1.0
    assert effects["chosen_longer_rate"] == pytest.approx(1 / 3)
    assert effects["reward_vs_length"]["pearson"] == pytest.approx(1.0)
    assert effects["margin_vs_length_difference"]["spearman"] == pytest.approx(1.0)


def test_sample_kl_terms_by_hand():
    policy = np.array([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    reference = np.array([[-1.5, -1.0, -9.0], [-0.5, -1.0, -0.2]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    k1, k3 = M.sample_kl_terms(policy, reference, mask)
    lr = [[0.5, -1.0], [0.0, 0.5, -0.3]]
    assert k1.tolist() == pytest.approx([sum(r) for r in lr])
    assert k3.tolist() == pytest.approx([sum(math.exp(-x) - 1 + x for x in r) for r in lr])
    assert np.all(k3 >= 0)
    summary = M.kl_summary(k1, k3, mask.sum(1))
    assert summary["k1"] == pytest.approx(k1.mean()) and summary["k3"] == pytest.approx(k3.mean())
    assert summary["k1_per_token"] == pytest.approx(k1.sum() / 5)
    assert summary["k1_stderr"] == pytest.approx(k1.std(ddof=1) / math.sqrt(2))


def test_reward_agreement_and_disagreements():
    implicit = [1.0, -0.5, 2.0, 0.3, -1.0]
    explicit = [0.5, 0.4, -3.0, 0.1, -0.2]
    result = M.reward_agreement(implicit, explicit)
    assert result["implicit_accuracy"] == pytest.approx(0.6) and result["explicit_accuracy"] == pytest.approx(
        0.6
    )
    assert result["agreement_rate"] == pytest.approx(0.6)  # pairs 0, 3, 4 agree
    assert result["both_correct_rate"] == pytest.approx(0.4)
    order = M.disagreement_order(implicit, explicit)
    assert sorted(order) == [1, 2] and order[0] == 2  # opposite signs; pair 2 disagrees most
    with pytest.raises(ValueError):
        M.reward_agreement([1.0], [1.0, 2.0])


def test_select_token_examples():
    margins = [0.1, -2.0, 3.0, 0.5, -0.2, 0.0, 1.0, 0.3]
    picks = M.select_token_examples(margins, 6)
    positions = [p for p, _ in picks]
    assert positions[:2] == [2, 1]  # largest-margin correct, largest-margin wrong
    assert len(positions) == 6 and len(set(positions)) == 6
    assert all(why.startswith("typical") for _, why in picks[2:])
    assert M.select_token_examples([1.0], 6) == [(0, "largest-margin correct")]
    assert M.select_token_examples([], 3) == [] and M.select_token_examples(margins, 0) == []


def test_top_contributions_and_token_table():
    top = M.top_contributions(["a", "b", "c"], [0.1, -0.5, 0.2], sign=-1.0, k=2)
    assert [t["token"] for t in top] == ["b", "c"]
    assert top[0]["margin_contribution"] == pytest.approx(0.5)
    sums = np.array([3.0, -4.0, 0.5, 9.0])
    counts = np.array([3, 4, 1, 0])
    table = M.token_table(sums, counts, lambda i: f"t{i}", k=1, min_count=3)
    assert table["highest"][0]["token"] == "t0" and table["highest"][0]["mean_reward"] == 1.0
    assert table["lowest"][0]["token"] == "t1" and table["lowest"][0]["count"] == 4
    assert table["min_count"] == 3
