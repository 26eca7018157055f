"""Implicit-reward diagnostics: ``prefopt diagnose``.

Modules: :mod:`~prefopt.diagnostics.metrics` (pure functions), :mod:`~prefopt.diagnostics.compute` (model passes),
:mod:`~prefopt.diagnostics.pipeline` (orchestration, atomic output), :mod:`~prefopt.diagnostics.plots`,
:mod:`~prefopt.diagnostics.report` (HTML), :mod:`~prefopt.diagnostics.run_plots` (``--run``; its
``run_summary.json`` keys are documented there), :mod:`~prefopt.diagnostics.cli`.

Definitions (docs/losses.md, Conventions and Diagnostics conventions). ``logp(y)``: sum of the completion's
token log-probs, EOS included.
Implicit reward ``r(y) = beta * (logp_policy(y) - logp_ref(y))`` (``loss = "dpo"``; every DPO-family method) or
``beta * logp_policy(y) / |y|`` (``loss = "simpo"``, no reference; SimPO's ``gamma`` is not subtracted). Margin
``m = r(y_w) - r(y_l)``; accuracy = fraction with ``m > 0`` (strict); Bradley-Terry probability ``p = sigmoid(m)``;
ECE: top-label, 10 equal bins, ``conf = max(p, 1-p)``, correct = ``p > 0.5``, bin ``min(floor(conf*10), 9)``.
Token reward ``beta * (logp_policy_t - logp_ref_t)`` (SimPO ``beta * logp_policy_t / |y|``); sums to ``r(y)``.
Lengths are completion tokens counted by the completion mask (EOS included).

``diagnostics.json``
--------------------
A *distribution* is ``{count, mean, std (population), min, max, quantiles: {p01, p05, p10, p25, p50, p75, p90,
p95, p99}, histogram: {edges [31], counts [30]}}`` (20 bins for lengths and shares); a *correlation* is
``{pearson, spearman}`` (``null`` with fewer than 3 points or a constant input). ``null`` marks anything
undefined. Top level:

- ``format_version`` (1), ``created_at`` (UTC ISO time), ``notes`` (list of warnings, e.g. the run's loss has
  no DPO-style reward, or samples at a temperature other than 1).
- ``settings``: ``policy`` (model dir actually loaded), ``run_dir`` (prefopt run whose config.yaml was read, or
  null), ``policy_is_adapter``, ``adapter_base``, ``reference`` (null for SimPO), ``loss`` (``dpo``/``simpo``),
  ``beta``, ``trained_loss`` (the run's ``loss.name``), ``data`` (``[{name, path}]``), ``max_length``,
  ``max_prompt_length``, ``format``, ``max_pairs``, ``batch_size``, ``token_examples``, ``samples``,
  ``max_prompts``, ``max_new_tokens``, ``temperature``, ``seed``, ``dtype``, ``device``,
  ``reference_is_adapter_disabled_policy`` (reference = the adapter's base, scored with the adapter off),
  ``explicit_reward`` (``"model PATH"`` / ``"function module:fn"`` / null), ``sources`` (``{setting: "command
  line" | "<run>/config.yaml" | "default"}`` for loss, beta, reference, lengths, chat_template, dtype,
  max_new_tokens).
- ``summary``: one row per dataset (the generalisation table): ``dataset``, ``pairs``, ``accuracy``,
  ``margin_mean``, ``margin_std``, ``ece``, ``mean_bt_probability``, ``chosen_reward_mean``,
  ``rejected_reward_mean``, ``longer_wins_rate``, ``explicit_accuracy``, ``agreement_rate``, ``kl_k1``, ``kl_k3``
  (the last four null without ``--reward-*`` / ``--samples``).
- ``plots``: ``{"datasets": "datasets.png"}`` (per-dataset accuracy / margin / ECE bars) with several ``--data``.
- ``datasets.<name>`` (name = file stem, made unique), for each ``--data``:

  - ``path``, ``pairs`` (pairs evaluated, after ``--max-pairs``: the first N in file order).
  - ``accuracy``; ``margin`` (distribution of ``m``); ``rewards.chosen`` / ``rewards.rejected`` (distributions).
  - ``logps``: means of the summed log-probs ``policy_chosen``, ``policy_rejected``, ``reference_chosen``,
    ``reference_rejected`` (reference ones null for SimPO).
  - ``calibration``: ``ece``, ``accuracy`` (``p > 0.5``, equals ``accuracy``), ``mean_confidence``,
    ``mean_bt_probability`` (mean ``p``), ``log_loss`` (mean ``-log sigmoid(m)``: the DPO loss at this beta /
    SimPO's with gamma 0), ``bins`` (10 entries ``{lower, upper, count, confidence, accuracy, gap = accuracy -
    confidence}``; only bins 5-9 can be non-empty since ``conf >= 0.5``).
  - ``length``: ``reward_vs_length`` (correlation over all completions, chosen and rejected pooled),
    ``margin_vs_length_difference`` (correlation of ``m`` with ``|y_w| - |y_l|``), ``unequal_length_pairs``,
    ``longer_wins_rate`` (among pairs of unequal length: the longer completion has the higher reward),
    ``chosen_longer_rate`` (the labelled chosen one is the longer: the data's own bias), ``chosen_length`` /
    ``rejected_length`` (distributions), ``by_length_difference``: five buckets of ``d = (|y_w| - |y_l|) /
    max(|y_w|, |y_l|)`` - ``chosen much shorter`` (d < -0.5), ``chosen shorter`` (-0.5 <= d < -0.1), ``similar
    length`` (|d| <= 0.1), ``chosen longer`` (0.1 < d <= 0.5), ``chosen much longer`` (d > 0.5) - each
    ``{bucket, relative_low, relative_high, count, accuracy, mean_margin}``.
  - ``tokens``: ``top5_share`` (distribution over pairs of the share of ``sum |token contribution|`` carried by
    the pair's 5 largest; contributions are the chosen tokens' rewards and minus the rejected tokens' rewards,
    which sum to ``m``), ``highest`` / ``lowest`` (20 tokens each with the highest / lowest mean token reward over
    all responses: ``{token_id, token, mean_reward, count, total_reward, count_chosen, mean_reward_chosen,
    count_rejected, mean_reward_rejected}``), ``min_count`` (tokens seen fewer times are left out; lowered from 3
    on small data), ``examples`` (``--token-examples`` pairs: largest-margin correct, largest-margin wrong, then
    pairs at evenly spaced margin quantiles): ``{index, why, prompt, chosen_text, rejected_text, margin,
    bt_probability, correct, chosen: {tokens, token_ids, rewards, reward}, rejected: {...}, top_tokens: [{position,
    token, reward, margin_contribution, side}]}``.
  - ``explicit`` (with ``--reward-model`` / ``--reward-function``): ``source``, ``pairs``, ``implicit_accuracy``,
    ``explicit_accuracy`` (explicit margin ``> 0``), ``agreement_rate`` (both prefer the same completion:
    ``(m_imp > 0) == (m_exp > 0)``), ``both_correct_rate``, ``margin_correlation`` (correlation),
    ``explicit_margin`` (distribution), ``disagreements`` (``--top-disagreements`` pairs with opposite preferences,
    largest ``|m_imp/std_imp - m_exp/std_exp|`` first: ``{index, prompt, chosen_text, rejected_text,
    implicit_margin, explicit_margin}``).
  - ``samples`` (with ``--samples N``; N samples for each of the first ``--max-prompts`` distinct prompts):
    ``prompts``, ``samples_per_prompt``, ``count``, ``temperature``, ``max_new_tokens``, ``kl`` (null without a
    reference): ``{samples, k1, k1_std, k1_stderr, k3, k3_std, k3_stderr, k1_per_token}`` where **k1** is the mean
    over samples of the sequence log-ratio ``logp_policy(y) - logp_ref(y)`` (unbiased for KL(policy || reference);
    single samples can be negative) and **k3** the mean over samples of ``sum_t (exp(-lr_t) - 1 + lr_t)`` with
    ``lr_t = logp_policy_t - logp_ref_t`` (Schulman's k3 per token, summed: also unbiased, never negative, lower
    variance); ``k1_per_token`` = total log-ratio / total sampled tokens. Both assume temperature 1. Then
    ``length`` (distribution of sample lengths), ``eos_rate`` (fraction that ended with EOS before
    ``max_new_tokens``), ``policy_logp`` / ``implicit_reward`` (``beta * k1`` per sample, DPO form only) /
    ``explicit_reward`` (``{mean, std}``; null when not available), ``examples`` (3 ``{prompt, completion}``).
  - ``per_pair_file``: ``pairs-<name>.jsonl`` in the output directory, one line per pair in dataset order:
    ``index`` (the pair's position in the loaded data), ``chosen_reward``, ``rejected_reward``, ``margin``,
    ``bt_probability``, ``chosen_length``, ``rejected_length``, ``policy_chosen_logp``, ``policy_rejected_logp``,
    ``reference_chosen_logp`` / ``reference_rejected_logp`` (DPO form only), ``explicit_chosen`` /
    ``explicit_rejected`` (with an explicit reward).
  - ``plots``: ``{margins, reliability, length, tokens, explicit, samples}`` -> PNG file names (the last two
    only when computed).
"""

from prefopt.diagnostics.metrics import (
    accuracy,
    bt_probabilities,
    calibration,
    implicit_rewards,
    kl_summary,
    length_effects,
    reward_agreement,
    sample_kl_terms,
)

__all__ = [
    "accuracy",
    "bt_probabilities",
    "calibration",
    "implicit_rewards",
    "kl_summary",
    "length_effects",
    "reward_agreement",
    "sample_kl_terms",
]
