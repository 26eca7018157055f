"""Row formats: detection, normalisation, validation messages, and every source type."""

from __future__ import annotations

import json

import pytest

from prefopt.config import DataConfig
from prefopt.data import build_datasets
from prefopt.data.formats import NormalizeOptions, RowError, detect_format, normalize_row
from prefopt.data.sources import Source, load_rows
from prefopt.errors import DataError

USER = {"role": "user", "content": "How are you?"}
GOOD = {"role": "assistant", "content": "Very well, thank you."}
BAD = {"role": "assistant", "content": "Go away."}
HH_CHOSEN = (
    "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the hen cross?"
)
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."
RATED = {
    "prompt": "Rate me",
    "completions": [
        {"text": "ok", "score": 5},
        {"text": "best", "score": 9},
        {"text": "worst", "score": 1},
        {"text": "fine", "score": 6},
    ],
}


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "conversational"),
        ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "hh"),
        (RATED, "rated"),
        ({"instruction": "x", "completions": []}, "rated"),
        ({"prompt": "p"}, "prompts"),
        ({"prompt": [USER]}, "prompts"),
        ({"prompt": "p", "completion": "c"}, "sft"),
        ({"messages": [USER, GOOD]}, "sft"),
    ],
)
def test_detect_each_format(row, expected):
    assert detect_format(row) == expected


def test_detect_rejects_unknown_rows():
    with pytest.raises(RowError, match=r'matches no known format \(fields: "question", "text"\)'):
        detect_format({"question": "q", "text": "t"})


def test_hh_splits_shared_prompt_and_final_reply():
    row = normalize_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "hh")
    assert row.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert (row.pairs[0].chosen, row.pairs[0].rejected) == ("Why did the hen cross?", "No.")


def test_implicit_prompt_is_longest_common_prefix():
    system = {"role": "system", "content": "Be kind."}
    row = normalize_row({"chosen": [system, USER, GOOD], "rejected": [system, USER, BAD]}, "conversational")
    assert row.prompt == [system, USER]
    assert (row.pairs[0].chosen, row.pairs[0].rejected) == (GOOD["content"], BAD["content"])
    explicit = normalize_row({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational")
    assert explicit.prompt == [USER] and explicit.completion == GOOD["content"]


def test_rated_best_worst_and_all_with_gap():
    best_worst = normalize_row(RATED, "rated", NormalizeOptions("best_worst"))
    assert [(p.chosen, p.rejected, p.gap) for p in best_worst.pairs] == [("best", "worst", 8.0)]
    assert best_worst.completion == "best"
    every = normalize_row(RATED, "rated", NormalizeOptions("all"))
    assert len(every.pairs) == 6 and all(p.gap > 0 for p in every.pairs)
    gapped = normalize_row(RATED, "rated", NormalizeOptions("all", rated_min_gap=3))
    assert sorted((p.chosen, p.rejected) for p in gapped.pairs) == [  # gap > 3 strictly: best-fine (3) is out
        ("best", "ok"),
        ("best", "worst"),
        ("fine", "worst"),
        ("ok", "worst"),
    ]
    tied = normalize_row(
        {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}, "rated"
    )
    assert tied.pairs == [] and tied.rated


def test_ultrafeedback_style_rated_rows():
    row = {
        "instruction": "Explain",
        "completions": [
            {"response": "long answer", "overall_score": 3, "fine-grained_score": 4.5},
            {"response": "short", "overall_score": 8, "fine-grained_score": 2.0},
        ],
    }
    normal = normalize_row(row, "rated")
    assert normal.prompt == "Explain"
    # fine-grained_score is preferred over overall_score (UltraFeedback's overall scores are unreliable)
    assert (normal.pairs[0].chosen, normal.pairs[0].rejected) == ("long answer", "short")


def _build(tmp_path, tokenizer, rows, kind="pairs", write=None, **cfg):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return build_datasets(DataConfig(train=str(path), **cfg), tokenizer, kind, seed=0)


def test_curriculum_orders_easy_to_hard(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": f"q{i}", "completions": [{"text": "hi", "score": 0}, {"text": f"lo{i}", "score": g}]}
        for i, g in enumerate([2, 9, 5, 7, 1])
    ]
    bundle = _build(tmp_path, tiny_tokenizer, rows, format="rated", curriculum=True)
    assert bundle.curriculum
    assert bundle.train["prompt_text"] == ["q1", "q3", "q2", "q0", "q4"]
    assert bundle.train["index"] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="data.curriculum .* needs rated rows"):
        _build(tmp_path, tiny_tokenizer, [{"prompt": "p", "chosen": "a", "rejected": "b"}], curriculum=True)


BAD_ROWS = [
    ('{"prompt": "p", "chosen": "a"', r"line 2: invalid JSON"),
    ({"prompt": "p", "chosen": "a"}, r'line 2: field "rejected" is missing'),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, r'line 2: field "rejected" is empty'),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, r'line 2: field "prompt" is empty'),
    (
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        r'line 2: field "chosen": expected a string, got integer',
    ),
    (
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        r'line 2: fields "chosen" and "rejected" are identical',
    ),
    ({"prompt": "p", "chosen": "a", "rejected": None}, r'line 2: field "rejected" is empty \(null\)'),
    ("[1, 2]", r"line 2: expected an object \(mapping of fields\), got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, tiny_tokenizer, bad, message):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        bad,
        {"prompt": "q", "chosen": "c", "rejected": "d"},
    ]
    with pytest.raises(DataError, match=r"data\.jsonl " + message):
        _build(tmp_path, tiny_tokenizer, rows)
    bundle = _build(tmp_path, tiny_tokenizer, rows, on_invalid="skip")
    assert len(bundle.train) == 2
    assert bundle.report.train.invalid_rows == 1
    assert "line 2" in bundle.report.train.invalid_reasons[0]
    bundle.write_report(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert written["train"]["invalid_rows"] == 1
    assert "line 2" in (tmp_path / "out" / "data_invalid_rows.txt").read_text()


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": [{"role": "user"}], "chosen": [GOOD], "rejected": [BAD]},
            r'field "prompt" message 1: "content" is '
            r"missing",
        ),
        (
            {"prompt": [USER], "chosen": [USER], "rejected": [BAD]},
            r'field "chosen": the final message has role "user"',
        ),
        (
            {"chosen": [GOOD], "rejected": [BAD]},
            r'field "prompt" is empty \(chosen and rejected share no messages',
        ),
        (
            {"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},
            r'field "chosen" and "rejected" differ before their final message',
        ),
        (
            {"prompt": [USER], "chosen": "text", "rejected": [BAD]},
            r'field "chosen": expected a list of messages',
        ),
    ],
)
def test_bad_conversational_rows(row, message):
    with pytest.raises(RowError, match=message):
        normalize_row(row, "conversational")


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"chosen": "no turns here", "rejected": "x"}, "hh", r'field "chosen": no "\\n\\nAssistant:" turn'),
        (
            {"prompt": "p", "completions": [{"text": "a", "score": 1}]},
            "rated",
            r"needs at least 2 rated completions",
        ),
        (
            {"prompt": "p", "completions": [{"text": "a", "score": "high"}, {"text": "b", "score": 1}]},
            "rated",
            r'field "completions\[0\].score": expected a finite number',
        ),
        (
            {"prompt": "p", "completions": [{"text": "a"}, {"text": "b", "score": 1}]},
            "rated",
            r'field "completions\[0\].score" is missing',
        ),
        ({"prompt": "p"}, "sft", r'field "completion" is missing'),
        ({"prompt": ["x"]}, "prompts", r'field "prompt" message 1: expected an object'),
    ],
)
def test_bad_rows_of_other_formats(row, fmt, message):
    with pytest.raises(RowError, match=message):
        normalize_row(row, fmt)


def test_mixed_formats_and_kind_mismatch(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    ]
    with pytest.raises(
        DataError,
        match=r'line 2: field "prompt": expected a string, got list; for message lists use '
        r"data.format=conversational",
    ):
        _build(tmp_path, tiny_tokenizer, rows)
    with pytest.raises(DataError, match=r"format 'sft' has no preference pairs"):
        _build(tmp_path, tiny_tokenizer, [{"prompt": "p", "completion": "c"}], kind="pairs")
    with pytest.raises(DataError, match=r"no usable rows"):
        _build(tmp_path, tiny_tokenizer, ["{broken", "{broken"], on_invalid="skip")


def _rows(n=6):
    return [{"prompt": f"prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(n)]


def test_every_source_type(tmp_path, tiny_tokenizer):
    import datasets
    import pandas as pd

    rows = _rows()
    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows))
    paths["json_data"] = tmp_path / "d2.json"
    paths["json_data"].write_text(json.dumps({"data": rows}))
    paths["json_lines"] = tmp_path / "d3.json"
    datasets.Dataset.from_list(rows).to_json(paths["json_lines"])  # datasets writes JSON lines
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    paths["disk"] = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(paths["disk"])
    paths["dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    ).save_to_disk(paths["dict"])
    for name, path in paths.items():
        bundle = build_datasets(DataConfig(train=str(path), shuffle=False), tiny_tokenizer, "pairs")
        expected = 4 if name == "dict" else 6
        assert len(bundle.train) == expected, name
        assert bundle.train[0]["prompt_text"] == "prompt 0", name
        assert bundle.train[0]["chosen_text"] == " good 0", name
    split = build_datasets(DataConfig(train=str(paths["dict"]), eval_split="test"), tiny_tokenizer, "pairs")
    assert len(split.eval) == 2
    with pytest.raises(DataError, match="split 'nope' not found .* available: train, test"):
        build_datasets(DataConfig(train=str(paths["dict"]), split="nope"), tiny_tokenizer, "pairs")


def test_locations_per_source_type(tmp_path):
    bad = {"prompt": "p", "chosen": "a"}
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected\np,a,b\n"multi\nline",c,\n')
    result = load_rows(Source(str(tmp_path / "d.csv")))
    assert result.reasons == [f'{tmp_path / "d.csv"} line 3: field "rejected" is empty']
    (tmp_path / "d.json").write_text(json.dumps([_rows(1)[0], bad]))
    result = load_rows(Source(str(tmp_path / "d.json")))
    assert result.reasons == [
        f'{tmp_path / "d.json"} row 2: field "rejected" is missing'
    ]  # 1-based, like lines


def test_missing_files_and_unreachable_hub_names(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"data/missing.jsonl: file not found"):
        build_datasets(DataConfig(train="data/missing.jsonl"), tiny_tokenizer, "pairs")
    with pytest.raises(
        DataError,
        match=r"no-such-org/no-such-dataset: not a local file or directory, and loading it "
        r"as a Hugging Face Hub dataset",
    ):
        build_datasets(DataConfig(train="no-such-org/no-such-dataset"), tiny_tokenizer, "pairs")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        build_datasets(DataConfig(train=str(tmp_path / "x.txt")), tiny_tokenizer, "pairs")
    with pytest.raises(DataError, match="data.format: unknown format 'weird'"):
        load_rows(Source(str(_write(tmp_path))), "weird")


def _write(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


def test_max_samples_eval_size_and_kinds(tmp_path, tiny_tokenizer):
    path = _write(tmp_path)
    bundle = build_datasets(
        DataConfig(train=str(path), max_samples=5, eval_size=0.4), tiny_tokenizer, "pairs"
    )
    assert (len(bundle.train), len(bundle.eval)) == (3, 2)
    assert bundle.report.train.stopped_at_max_samples
    train_prompts = set(bundle.train["prompt_text"])
    assert not train_prompts & set(bundle.eval["prompt_text"])
    sft = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, "sft")
    assert set(sft.train.column_names) == {
        "index",
        "prompt_input_ids",
        "completion_input_ids",
        "prompt_text",
        "completion_text",
    }
    assert sorted(sft.train["completion_text"]) == sorted(f" good {i}" for i in range(6))
    prompts = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, "prompts")
    assert set(prompts.train.column_names) == {"index", "prompt_input_ids", "prompt_text", "prompt_messages"}
    with pytest.raises(DataError, match="would leave no training rows"):
        build_datasets(DataConfig(train=str(path), eval_size=6), tiny_tokenizer, "pairs")
