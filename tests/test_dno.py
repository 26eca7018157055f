"""DNO: the large-margin pair builder (worked example), replay, judge checks, and iterations end to end on the
tiny
model (reference refreshed to the previous iterate: every iteration starts at ln 2; resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from prefopt.iterative.pairs import Candidate, large_margin_pairs, replay
from prefopt.iterative.scoring import JudgeError, judge_win_rates
from prefopt.losses import LossInputs, get_loss
from tests.trainer_helpers import REPO


def test_pair_builder_worked_example():
    # Gold 5, students [6, 4, 5, 2, 3]; positive >= 5; margin 2 for a gold positive, 1 for a student one.
    students = [Candidate(f"s{i + 1}", s) for i, s in enumerate([6, 4, 5, 2, 3])]
    candidates = students + [Candidate("gold", 5, is_gold=True)]
    pairs = large_margin_pairs(candidates, min_positive=5, gold_margin=2, student_margin=1)
    named = [(candidates[i].text, candidates[j].text) for i, j in pairs]
    assert len(named) == 10
    assert set(named) == {
        ("gold", "s4"),
        ("gold", "s5"),
        ("s1", "gold"),
        ("s1", "s2"),
        ("s1", "s3"),
        ("s1", "s4"),
        ("s1", "s5"),
        ("s3", "s2"),
        ("s3", "s4"),
        ("s3", "s5"),
    }
    assert large_margin_pairs([Candidate("a", 1.0), Candidate("a", 0.0)]) == []  # same text never pairs


def test_dno_loss_is_dpo_against_the_previous_iterate():
    # eta 0.1; logp / logp_t: y+ -40 / -41.5, y- -55 / -54 -> h = 2.5, loss 0.575939.
    out = get_loss("dpo", beta=0.1)(
        LossInputs(
            policy_chosen_logps=torch.tensor([-40.0], dtype=torch.float64),
            policy_rejected_logps=torch.tensor([-55.0], dtype=torch.float64),
            reference_chosen_logps=torch.tensor([-41.5], dtype=torch.float64),
            reference_rejected_logps=torch.tensor([-54.0], dtype=torch.float64),
        )
    )
    assert out.loss.item() == pytest.approx(0.575939, abs=1e-6)


def test_replay_takes_shares_of_earlier_iterations_without_resampling():
    history = [[{"id": f"a{i}"} for i in range(10)], [{"id": f"b{i}"} for i in range(20)]]
    carried = replay(history, [0.3, 0.15], new_count=20, seed=0)
    ids = [row["id"] for row in carried]
    assert sum(i.startswith("b") for i in ids) == 6 and sum(i.startswith("a") for i in ids) == 3
    assert len(set(ids)) == len(ids)
    assert len(replay(history[:1], [0.3, 0.15], new_count=100, seed=0)) == 10  # at most all of them


def test_judge_win_rates_and_non_probabilities():
    def judge(prompt, a, b):
        return 0.9 if len(a) > len(b) else 0.1

    rates = judge_win_rates(judge, ["p"], [["aaa", "a", "aa"]], ["f.jsonl line 1"])
    assert rates == [[pytest.approx(0.9), pytest.approx(0.1), pytest.approx(0.5)]]
    with pytest.raises(
        JudgeError, match=r"returned 1\.7 for f\.jsonl line 3, field \"prompt\" \(candidate 0 vs 1\)"
    ):
        judge_win_rates(lambda p, a, b: 1.7, ["p"], [["x", "y"]], ["f.jsonl line 3"], judge="reward.function")


def _dno(tmp_path, tiny_model_dir, *overrides) -> int:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Notes on the {item} after work:"}) + "\n"
            for item in ["film", "cafe", "hotel", "park", "game", "bike", "train", "pizza"]
        )
    )
    return main(
        [
            "train",
            str(REPO / "recipes/tiny/dno.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'dno'}",
            f"iterations.prompts={prompts}",
            "iterations.count=2",
            "iterations.samples_per_prompt=3",
            "iterations.student_margin=0.1",
            "generation.max_new_tokens=12",
            "generation.temperature=1.0",
            "generation.top_p=1.0",
            "train.per_device_batch_size=4",
            "logging.logging_steps=1",
            "logging.progress=false",
            "train.learning_rate=1e-3",
            *overrides,
        ]
    )


def test_dno_iterations_refresh_the_reference_and_resume(tmp_path, tiny_model_dir):
    assert _dno(tmp_path, tiny_model_dir) == 0
    out = tmp_path / "dno"
    state = json.loads((out / "iterations.json").read_text())["completed"]
    assert [r["iteration"] for r in state] == [1, 2]
    assert state[1]["reference"] == state[0]["policy"] == str(out / "iteration-1" / "run" / "final")
    assert (out / "final").resolve() == (out / "iteration-2" / "run" / "final").resolve()
    for t in (1, 2):
        records = [
            json.loads(line)
            for line in (out / f"iteration-{t}" / "run" / "metrics.jsonl").read_text().splitlines()
            if line
        ]
        # the reference is the previous iterate (the policy's own start): DPO starts at exactly ln 2 each time
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        config = (out / f"iteration-{t}" / "run" / "config.yaml").read_text()
        assert f"name_or_path: {state[t - 1]['reference']}" in config
    new = [json.loads(line) for line in (out / "iteration-2" / "pairs_new.jsonl").read_text().splitlines()]
    used = [json.loads(line) for line in (out / "iteration-2" / "pairs.jsonl").read_text().splitlines()]
    replayed = [row for row in used if row["iteration"] == 1]
    assert len(replayed) == min(round(0.3 * len(new)), state[0]["pairs"]) == state[1]["replayed"]
    assert all(row["chosen_score"] - row["rejected_score"] >= 0.1 - 1e-9 for row in new)
    samples = [json.loads(line) for line in (out / "iteration-2" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["candidates"]) == 3 for s in samples)  # half the prompts, K = 3

    # An interrupted second iteration: rerunning with resume keeps iteration 1 as it was and redoes iteration
    # 2.
    first_samples = (out / "iteration-1" / "samples.jsonl").stat().st_mtime_ns
    (out / "iterations.json").write_text(json.dumps({"completed": state[:1]}))
    assert _dno(tmp_path, tiny_model_dir) == 2  # existing iterations and no resume: refuse
    assert _dno(tmp_path, tiny_model_dir, "train.resume_from=latest") == 0
    assert (out / "iteration-1" / "samples.jsonl").stat().st_mtime_ns == first_samples
    assert [r["iteration"] for r in json.loads((out / "iterations.json").read_text())["completed"]] == [1, 2]


def test_dno_judge_returning_a_non_probability_exits_2(tmp_path, tiny_model_dir, capsys):
    code = _dno(tmp_path, tiny_model_dir, "reward.kind=judge", "reward.function=tests.test_dno:bad_judge")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "prompts.jsonl line" in err and "returned 3.0" in err and "must return P(a beats b)" in err


def bad_judge(prompt, a, b):
    return 3.0


# --- DNO's general form (Alg. 1): soft targets ----------------------------------------------------------------


def _soft_inputs(policy, reference, scores) -> LossInputs:
    def t(*values):
        return torch.tensor(values, dtype=torch.float64, requires_grad=True)

    return LossInputs(
        policy_chosen_logps=t(policy[0]),
        policy_rejected_logps=t(policy[1]),
        reference_chosen_logps=t(reference[0]),
        reference_rejected_logps=t(reference[1]),
        chosen_external_rewards=t(scores[0]).detach(),
        rejected_external_rewards=t(scores[1]).detach(),
    )


def test_dno_soft_worked_number_and_its_limits():
    # eta 0.1, d = 2.5 (as above), dr = 0.5: -sigma(0.5) log sigma(0.25) - sigma(-0.5) log sigma(-0.25) = 0.670325
    inputs = _soft_inputs((-40.0, -55.0), (-41.5, -54.0), (0.75, 0.25))
    out = get_loss("dno_soft", beta=0.1)(inputs)
    assert out.loss.item() == pytest.approx(0.670325, abs=1e-6)
    assert out.metrics["dno/target"] == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-9)
    # d loss / d logpi(y+) = beta * (sigma(beta d) - sigma(dr)): zero at the optimum beta * d = dr
    out.loss.backward()
    expected = 0.1 * (1 / (1 + math.exp(-0.25)) - 1 / (1 + math.exp(-0.5)))
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(expected, abs=1e-12)
    # a very sharp reward scale turns the soft target into DPO's hard one
    hard = get_loss("dno_soft", beta=0.1, reward_scale=1e4)(
        _soft_inputs((-40.0, -55.0), (-41.5, -54.0), (1, 0))
    )
    assert hard.loss.item() == pytest.approx(0.575939, abs=1e-6)


def test_dno_soft_trains_on_the_iterations_win_rates(tmp_path, tiny_model_dir):
    """One iteration with a pairwise judge (scores = win-rates) and the soft loss, pairs in file order: step 0
    sits at ln 2 (policy = reference) and logs as target the mean of sigma(score difference) of its 4 pairs."""
    code = _dno(
        tmp_path,
        tiny_model_dir,
        "iterations.count=1",
        "iterations.student_margin=0.0",
        "reward.kind=judge",
        "reward.function=data_tools.synth:judge",
        "loss.name=dno_soft",
        "data.shuffle=false",
    )
    assert code == 0
    out = tmp_path / "dno" / "iteration-1"
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(0.0 <= p["rejected_score"] < p["chosen_score"] <= 1.0 for p in pairs)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    first = pairs[:4]  # train.per_device_batch_size=4
    target = sum(1 / (1 + math.exp(p["rejected_score"] - p["chosen_score"])) for p in first) / 4
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["dno/target"] == pytest.approx(target, abs=1e-5)


# --- automatic negatives and the best iterate ------------------------------------------------------------------


def test_repeated_ngram_share_and_automatic_negatives():
    from prefopt.iterative.pairs import repeated_ngram_share

    assert repeated_ngram_share("the cat the cat the cat", 3) == pytest.approx(0.5)  # 4 trigrams, 2 distinct
    assert repeated_ngram_share("a b c d", 3) == 0.0 and repeated_ngram_share("a b", 3) == 0.0
    # s2 scores highest but is degenerate: never a positive, the negative of every positive (margin 0.3 aside)
    candidates = [Candidate("s1", 0.5), Candidate("s2", 0.9, auto_negative=True), Candidate("s3", 0.4)]
    assert large_margin_pairs(candidates, student_margin=0.3) == [(0, 1), (2, 1)]
    plain = [Candidate("s1", 0.5), Candidate("s2", 0.9), Candidate("s3", 0.4)]
    assert large_margin_pairs(plain, student_margin=0.3) == [(1, 0), (1, 2)]


def test_dno_flags_repetitive_samples_and_keeps_the_best_iterate(tmp_path, tiny_model_dir, monkeypatch):
    import prefopt.iterative.run as dno_run
    from prefopt.iterative.pairs import repeated_ngram_share

    # The untrained tiny model's samples are random sub-words that never repeat a word: make the first sample of
    # every training prompt a degenerate one (the real sampler runs; its validation samples are left alone).
    real_generate = dno_run._generate

    def generate_with_a_loop(config, policy_path, prompts, n, seed, prompts_file):
        texts, messages, samples, finished = real_generate(
            config, policy_path, prompts, n, seed, prompts_file
        )
        if n == config.iterations.samples_per_prompt:
            for row in samples:
                row[0] = "great great great great food"
        return texts, messages, samples, finished

    monkeypatch.setattr(dno_run, "_generate", generate_with_a_loop)

    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        "".join(json.dumps({"prompt": f"A note on the {w}:"}) + "\n" for w in ("lake", "shop"))
    )
    code = _dno(
        tmp_path,
        tiny_model_dir,
        "iterations.count=1",
        "iterations.repetition_negative=0.05",
        "iterations.repetition_ngram=1",
        "iterations.select_best=true",
        f"iterations.validation={validation}",
        "reward.function=data_tools.synth:score",
    )
    assert code == 0
    out = tmp_path / "dno"
    samples = [json.loads(line) for line in (out / "iteration-1" / "samples.jsonl").read_text().splitlines()]
    flagged = set()
    for sample in samples:
        for c in sample["candidates"]:
            assert c["repeated_ngrams"] == pytest.approx(repeated_ngram_share(c["text"], 1))
            assert c["auto_negative"] == (c["repeated_ngrams"] > 0.05)
            if c["auto_negative"]:
                flagged.add(c["text"])
    pairs = [json.loads(line) for line in (out / "iteration-1" / "pairs_new.jsonl").read_text().splitlines()]
    assert flagged == {"great great great great food"}
    assert not any(p["chosen"] in flagged for p in pairs)  # a degenerate sample is never chosen
    assert any(p["rejected"] in flagged for p in pairs)
    report = json.loads((out / "validation" / "validation.json").read_text())
    scores = [r["validation_score"] for r in report["iterates"]]
    assert [r["iterate"] for r in report["iterates"]] == [1, 2] and all(math.isfinite(v) for v in scores)
    assert report["iterates"][0]["policy"] == str(tiny_model_dir)
    best = max(range(2), key=lambda k: (scores[k], k))
    assert report["best"] == report["iterates"][best]
    assert (out / "final").resolve() == Path(report["best"]["policy"]).resolve()


def test_select_best_without_validation_prompts_exits_2(tmp_path, tiny_model_dir, capsys):
    assert _dno(tmp_path, tiny_model_dir, "iterations.select_best=true") == 2
    assert "iterations.validation=FILE" in capsys.readouterr().err
    assert not (tmp_path / "dno").exists()
