"""Tokenization: the prompt/completion boundary, EOS, masks, truncation, fingerprints, caching."""

from __future__ import annotations

import json

import pytest
import torch

from prefopt.config import DataConfig
from prefopt.data import PairCollator, PromptCollator, SFTCollator, build_datasets
from prefopt.data.tokenize import fit_lengths
from prefopt.errors import DataError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# "brown" is one token of the tiny tokenizer: tokenizing "bro" + "wn fox" jointly would merge across the boundary.
PAIRS = [
    {"prompt": "The quick bro", "chosen": "wn fox jumps", "rejected": "ken dog"},
    {"prompt": "A review of the film:", "chosen": " wonderful and moving", "rejected": " boring<|im_end|>"},
    {"prompt": "Question: what is two plus three? Answer:", "chosen": " five", "rejected": " six, surely"},
]
CONVERSATION = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "Green, I think."}],
}


def _bundle(
    tmp_path, tokenizer, rows, kind="pairs", seed=0, cache_dir=None, name="d.jsonl", unchecked=False, **cfg
):
    cfg.setdefault("shuffle", False)
    cfg["train"] = str(_write(tmp_path / name, rows))
    data_cfg = (
        DataConfig.model_construct(**{**DataConfig().model_dump(), **cfg}) if unchecked else DataConfig(**cfg)
    )
    return build_datasets(data_cfg, tokenizer, kind, seed=seed, cache_dir=cache_dir)


def test_completion_starts_exactly_where_the_prompt_ends(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    bundle = _bundle(tmp_path, tok, PAIRS)
    eos = tok.eos_token_id
    for row, source in zip(bundle.train, PAIRS):
        assert row["prompt_text"] == source["prompt"] and row["prompt_messages"] == ""
        assert row["prompt_input_ids"] == tok(source["prompt"])["input_ids"]
        for name in ("chosen", "rejected"):
            text = source[name].removesuffix("<|im_end|>")
            assert row[f"{name}_text"] == text  # completion strings carry no EOS
            assert row[f"{name}_input_ids"] == tok(text, add_special_tokens=False)["input_ids"] + [eos]
            assert row[f"{name}_input_ids"].count(eos) == 1  # an EOS already in the text is not doubled
    joint = tok("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    first = bundle.train[0]
    assert (
        first["prompt_input_ids"] + first["chosen_input_ids"][:-1] != joint
    )  # no merge crossed the boundary

    batch = PairCollator(tok.pad_token_id)([bundle.train[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["completion_mask"].shape == (6, batch["input_ids"].shape[1])
    for i in range(3):
        row = bundle.train[i]
        for j, name in ((i, "chosen"), (i + 3, "rejected")):
            seq = row["prompt_input_ids"] + row[f"{name}_input_ids"]
            start, end = len(row["prompt_input_ids"]), len(seq)
            assert batch["input_ids"][j, :end].tolist() == seq  # exactly what the model sees
            assert batch["completion_mask"][j].tolist() == [0] * start + [1] * (end - start) + [0] * (
                batch["input_ids"].shape[1] - end
            )
            assert batch["input_ids"][j, end - 1] == eos
            assert batch["attention_mask"][j].sum() == end
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()  # padding never masked in
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["chosen_text"] == [r["chosen_text"] for r in bundle.train]


def test_masks_do_not_depend_on_the_pad_id(tmp_path, tiny_tokenizer):
    bundle = _bundle(tmp_path, tiny_tokenizer, PAIRS)
    rows = [bundle.train[i] for i in range(3)]
    with_pad = PairCollator(tiny_tokenizer.pad_token_id)(rows)
    with_eos = PairCollator(tiny_tokenizer.eos_token_id)(rows)  # pad == EOS, as in many checkpoints
    assert torch.equal(with_pad["completion_mask"], with_eos["completion_mask"])
    assert torch.equal(with_pad["attention_mask"], with_eos["attention_mask"])
    sft = _bundle(tmp_path, tiny_tokenizer, PAIRS, kind="sft")
    batch = SFTCollator(tiny_tokenizer.eos_token_id, pad_to_multiple_of=8)([sft.train[0], sft.train[1]])
    assert batch["input_ids"].shape[1] % 8 == 0
    for i in range(2):
        n_prompt, n_completion = (
            len(sft.train[i]["prompt_input_ids"]),
            len(sft.train[i]["completion_input_ids"]),
        )
        assert batch["completion_mask"][i].tolist()[n_prompt : n_prompt + n_completion] == [1] * n_completion
        assert batch["completion_mask"][i].sum() == n_completion
    prompts = _bundle(tmp_path, tiny_tokenizer, PAIRS, kind="prompts")
    batch = PromptCollator()([prompts.train[2], prompts.train[0]])
    assert batch["index"].tolist() == [2, 0] and batch["prompt_text"][1] == "The quick bro"


def test_conversational_rows_use_the_chat_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    bundle = _bundle(tmp_path, tok, [CONVERSATION])
    row = bundle.train[0]
    expected_prompt = tok.apply_chat_template(
        CONVERSATION["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert row["prompt_text"] == expected_prompt
    assert row["prompt_input_ids"] == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    assert json.loads(row["prompt_messages"]) == CONVERSATION["prompt"]
    assert row["chosen_text"] == "Blue."
    assert row["chosen_input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    # With ChatML the assistant turn is the content followed by <|im_end|>: prompt + completion is the conversation.
    full = tok.apply_chat_template(CONVERSATION["prompt"] + CONVERSATION["chosen"], tokenize=False)
    assert full.rstrip("\n") == row["prompt_text"] + row["chosen_text"] + tok.eos_token

    override = (
        "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    )
    custom = _bundle(tmp_path, tok, [CONVERSATION], chat_template=override)
    assert custom.train[0]["prompt_text"] == "<<Be brief.>><<Sky colour?>>=>"
    assert custom.fingerprint != bundle.fingerprint

    no_template = type(tok).from_pretrained(tok.name_or_path)
    no_template.chat_template = None
    with pytest.raises(DataError, match="set data.chat_template"):
        _bundle(tmp_path, no_template, [CONVERSATION])


def test_hh_rows_become_conversations(tmp_path, tiny_tokenizer):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}
    row = _bundle(tmp_path, tiny_tokenizer, [hh]).train[0]
    assert json.loads(row["prompt_messages"]) == [{"role": "user", "content": "Hi"}]
    assert row["prompt_text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (row["chosen_text"], row["rejected_text"]) == ("Hello there.", "Go.")


def test_fit_lengths_rules():
    prompt, long = list(range(10)), list(range(100, 108))
    kept = fit_lengths(prompt, [long, [1, 2]], max_length=12, max_prompt_length=6, truncation="keep_end")
    assert kept.prompt_ids == [4, 5, 6, 7, 8, 9] and kept.prompt_truncated
    assert kept.completion_ids == [[100, 101, 102, 103, 104, 105], [1, 2]]  # completion keeps its start
    assert kept.completion_truncated == [True, False] and kept.dropped is None
    start = fit_lengths(prompt, [long], max_length=12, max_prompt_length=6, truncation="keep_start")
    assert start.prompt_ids == [0, 1, 2, 3, 4, 5]
    gone = fit_lengths(prompt, [long, [1]], max_length=10, max_prompt_length=10, names=("chosen", "rejected"))
    assert gone.dropped == "chosen"


def test_truncation_counts_and_drops(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = " ".join(["the film was wonderful"] * 10)
    rows = [
        {"prompt": long_prompt, "chosen": " a " * 20, "rejected": " b"},
        {"prompt": "Hi:", "chosen": " yes", "rejected": " no"},
    ]
    prompt_len = len(tok(long_prompt)["input_ids"])
    bundle = _bundle(tmp_path, tok, rows, max_length=16, max_prompt_length=8, truncation="keep_end")
    report = bundle.report.train
    assert report.truncated_prompts == 1 and report.truncated_completions == {"chosen": 1, "rejected": 0}
    first = bundle.train[0]
    assert first["prompt_input_ids"] == tok(long_prompt)["input_ids"][prompt_len - 8 :]
    assert len(first["prompt_input_ids"]) + len(first["chosen_input_ids"]) == 16
    assert first["chosen_input_ids"][-1] != tok.eos_token_id  # a cut completion does not end
    starts = _bundle(tmp_path, tok, rows, max_length=16, max_prompt_length=8, truncation="keep_start")
    assert starts.train[0]["prompt_input_ids"] == tok(long_prompt)["input_ids"][:8]
    # A prompt allowed the whole max_length leaves nothing for the completion: the row is dropped and counted.
    # (The recipe schema refuses max_prompt_length >= max_length; the tokenizer still guards unchecked configs.)
    dropped = _bundle(
        tmp_path, tok, rows, max_length=8, max_prompt_length=8, on_invalid="skip", unchecked=True
    )
    assert dropped.report.train.dropped_rows == 1 and len(dropped.train) == 1
    assert "line 1: the prompt takes 8 of data.max_length=8 tokens" in dropped.report.train.dropped_reasons[0]
    assert dropped.train["index"] == [0] and dropped.train[0]["prompt_text"] == "Hi:"
    with pytest.raises(DataError, match="no train rows left after tokenization"):
        _bundle(tmp_path, tok, rows[:1], max_length=8, max_prompt_length=8, unchecked=True)


def _fingerprint(tmp_path, tok, rows=PAIRS, name="d.jsonl", seed=0, kind="pairs", **cfg):
    return _bundle(tmp_path, tok, rows, kind=kind, seed=seed, name=name, **cfg).fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    base = _fingerprint(tmp_path, tok)
    assert base == _fingerprint(tmp_path, tok)  # same inputs
    assert base == _fingerprint(tmp_path, tok, name="copy.jsonl")  # same contents elsewhere
    assert base == _fingerprint(tmp_path, tok, num_proc=2)  # settings that do not change the ids
    changed = [
        _fingerprint(tmp_path, tok, rows=PAIRS[:2]),
        _fingerprint(tmp_path, tok, rows=[dict(PAIRS[0], chosen="wn cat")] + PAIRS[1:]),
        _fingerprint(tmp_path, tok, max_length=64),
        _fingerprint(tmp_path, tok, max_prompt_length=8),
        _fingerprint(tmp_path, tok, truncation="keep_start"),
        _fingerprint(tmp_path, tok, chat_template="{{ messages }}"),
        _fingerprint(tmp_path, tok, shuffle=True),
        _fingerprint(tmp_path, tok, seed=1, shuffle=True),
        _fingerprint(tmp_path, tok, kind="sft"),
    ]
    other = type(tok).from_pretrained(tok.name_or_path)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    changed.append(_fingerprint(tmp_path, other))
    assert len(set(changed + [base])) == len(changed) + 1


def test_shuffle_is_seeded_and_index_follows_rows(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(30)]
    one = _bundle(tmp_path, tiny_tokenizer, rows, seed=3, shuffle=True)
    again = _bundle(tmp_path, tiny_tokenizer, rows, seed=3, shuffle=True)
    other = _bundle(tmp_path, tiny_tokenizer, rows, seed=4, shuffle=True)
    assert one.train["prompt_text"] == again.train["prompt_text"] != other.train["prompt_text"]
    assert one.train["prompt_text"] != [r["prompt"] for r in rows]
    assert one.train["index"] == list(range(30))


def test_tokenization_cache_is_keyed_by_fingerprint(tmp_path, tiny_tokenizer):
    cache = tmp_path / "cache"
    first = _bundle(tmp_path, tiny_tokenizer, PAIRS, cache_dir=str(cache), eval_size=1)
    files = sorted(p.name for p in cache.iterdir())
    assert any(first.fingerprint[:32] in name and "train" in name for name in files)
    second = _bundle(tmp_path, tiny_tokenizer, PAIRS, cache_dir=str(cache), eval_size=1)
    assert sorted(p.name for p in cache.iterdir()) == files  # loaded, not rewritten under a new name
    assert second.train.to_dict() == first.train.to_dict() and second.eval.to_dict() == first.eval.to_dict()
    assert second.report.to_dict() == first.report.to_dict()


def test_num_proc_gives_the_same_rows(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": f"Review {i} of the film:", "chosen": " wonderful", "rejected": " dull"}
        for i in range(600)
    ]
    single = _bundle(tmp_path, tiny_tokenizer, rows)
    parallel = _bundle(tmp_path, tiny_tokenizer, rows, num_proc=2)
    assert parallel.train.to_dict() == single.train.to_dict()
