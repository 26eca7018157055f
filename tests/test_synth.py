"""The synthetic gold task: determinism, the gold reward's properties, the Bradley-Terry labels, prompt splits."""

from __future__ import annotations

import json
import random

import pytest

from data_tools import synth
from data_tools.synth import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, score

PROMPT = "My review of the hotel after work:"
SIZES = dict(n_sft=50, n_pairs=60, n_eval=20, n_heldout=30, n_prompts=40)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_byte_identical_files(tmp_path):
    synth.write_task(tmp_path / "a", seed=7, **SIZES)
    synth.write_task(tmp_path / "b", seed=7, **SIZES)
    synth.write_task(tmp_path / "c", seed=8, **SIZES)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "README.md",
        "pairs_eval.jsonl",
        "pairs_train.jsonl",
        "prompts_heldout.jsonl",
        "prompts_train.jsonl",
        "rated_eval.jsonl",
        "rated_train.jsonl",
        "sft.jsonl",
        "task.json",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() != (tmp_path / "c" / "sft.jsonl").read_bytes()
    task = json.loads((tmp_path / "a" / "task.json").read_text())
    assert task["seed"] == 7 and task["bt_temperature"] == synth.DEFAULT_BT_TEMPERATURE
    assert task["counts"] == {
        "sft.jsonl": 50,
        "pairs_train.jsonl": 60,
        "pairs_eval.jsonl": 20,
        "prompts_train.jsonl": 40,
        "prompts_heldout.jsonl": 30,
        "rated_train.jsonl": 60,
        "rated_eval.jsonl": 20,
    }
    assert task["reward_function"] == "data_tools.synth:score"


def test_positive_words_beat_negative_ones():
    for positive, negative in zip(sorted(POSITIVE_WORDS), sorted(NEGATIVE_WORDS)):
        assert score(PROMPT, f" the hotel was {positive}.") > score(PROMPT, f" the hotel was {negative}.")
    assert (
        score(PROMPT, " i loved it, the staff was lovely.")
        > score(PROMPT, " the staff was okay.")
        > score(PROMPT, " i hated it, the staff was rude and dull.")
    )


def test_neutral_padding_never_raises_the_score():
    rng = random.Random(0)
    raised = 0
    for _ in range(500):
        completion = synth.sample_completion(rng, "hotel")
        padded = completion + " " + " ".join(rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(1, 15)))
        raised += score(PROMPT, padded) > score(PROMPT, completion) + 1e-12
    assert raised == 0
    good = " the hotel was lovely and i loved it."
    assert score(
        PROMPT, good + " the place seemed okay and it felt usual and standard overall so i saw it"
    ) < score(PROMPT, good)


def test_score_range_and_penalties():
    rng = random.Random(1)
    samples = [synth.sample_completion(rng, rng.choice(synth.ITEMS)) for _ in range(300)]
    adversarial = [
        "",
        "<|im_end|>",
        "great " * 200,
        " ".join(sorted(POSITIVE_WORDS)) * 3,
        "!!!",
        "hotel " * 50,
    ]
    for text in samples + adversarial:
        assert -1.0 <= score(PROMPT, text) <= 1.0
    assert score(PROMPT, "") == -1.0
    base = " the hotel was lovely."
    assert score(PROMPT, base) > score(PROMPT, " the film was lovely.")  # off topic
    assert score(PROMPT, " the view was lovely, the hotel was great.") > score(
        PROMPT, " the view was lovely."
    )
    assert score(PROMPT, base + " lovely lovely lovely") < score(PROMPT, base)  # repetition earns nothing
    assert score(PROMPT, base + "<|im_end|>") == score(PROMPT, base)  # special tokens are not words
    long = " the hotel was lovely, " + ", ".join(f"the {a} was okay" for a in synth.ASPECTS[:8])
    assert len(long.split()) > 30 and score(PROMPT, long) < score(PROMPT, base)
    messages = [{"role": "user", "content": PROMPT}]
    assert score(messages, [{"role": "assistant", "content": base}]) == score(PROMPT, base)
    assert score(f"<|im_start|>user\n{PROMPT}<|im_end|>\n", base) == score(PROMPT, base)


def test_bradley_terry_labels():
    assert synth.preference_probability(PROMPT, " lovely", " awful") > 0.99
    assert synth.judge(PROMPT, " the hotel was awful", " the hotel was great") < 0.01
    built = synth.build_task(0, temperature=1e-6, **SIZES)
    assert all(r["chosen_score"] >= r["rejected_score"] for r in built["files"]["pairs_train.jsonl"])
    noisy = synth.build_task(0, temperature=10.0, **SIZES)
    agree = noisy["task"]["stats"]["pairs_train"]["label_agrees_with_gold"]
    assert agree < 0.8  # a high temperature makes labels close to coin flips
    for row in built["files"]["pairs_train.jsonl"]:
        assert row["chosen_score"] == pytest.approx(score(row["prompt"], row["chosen"]), abs=1e-4)


def test_prompts_and_quality_spread(gold_task_dir):
    heldout = {r["prompt"] for r in _read(gold_task_dir / "prompts_heldout.jsonl")}
    train = {
        r["prompt"]
        for name in ("sft.jsonl", "pairs_train.jsonl", "prompts_train.jsonl")
        for r in _read(gold_task_dir / name)
    }
    assert heldout and train and not heldout & train
    assert {r["prompt"] for r in _read(gold_task_dir / "pairs_eval.jsonl")} <= heldout
    big = synth.build_task(0)  # the default sizes
    assert big["task"]["counts"]["sft.jsonl"] == 2000 and big["task"]["counts"]["pairs_eval.jsonl"] == 200
    scores = [r["gold_score"] for r in big["files"]["sft.jsonl"]]
    assert min(scores) < -0.5 and max(scores) > 0.5 and big["task"]["stats"]["sft_gold_std"] > 0.3
    words = [len(r["completion"].split()) for r in big["files"]["sft.jsonl"]]
    assert sorted(words)[len(words) // 2] in range(8, 17)  # a typical completion has 6-20 words
    assert 0.8 < big["task"]["stats"]["pairs_train"]["label_agrees_with_gold"] < 0.97


def test_conversational_task_and_tokenizer_corpus(tmp_path, tiny_tokenizer):
    from prefopt.config import DataConfig
    from prefopt.data import build_datasets

    synth.write_task(tmp_path, seed=0, conversational=True, **SIZES)
    row = _read(tmp_path / "pairs_train.jsonl")[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    bundle = build_datasets(DataConfig(train=str(tmp_path / "pairs_train.jsonl")), tiny_tokenizer, "pairs")
    assert len(bundle.train) == SIZES["n_pairs"] and bundle.train[0]["prompt_text"].startswith(
        "<|im_start|>user"
    )
    lines = synth.corpus_lines()
    assert lines == synth.corpus_lines()
    vocabulary = set(" ".join(lines).replace(",", " ").replace(".", " ").replace(":", " ").split())
    assert set(POSITIVE_WORDS) | set(NEGATIVE_WORDS) | set(NEUTRAL_WORDS) | set(synth.ITEMS) <= vocabulary
    # every task word is a single token of the tiny tokenizer (the corpus goes into its training)
    split = [
        w
        for w in sorted(vocabulary & (set(POSITIVE_WORDS) | set(NEGATIVE_WORDS)))
        if len(tiny_tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1
    ]
    assert split == []
