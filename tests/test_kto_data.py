"""KTO's data: the ``unpaired`` row format and data kind, the collator's mismatched pairs, ``convert --unpaired``,
and the exit-2 messages for bad rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from prefopt.config import DataConfig
from prefopt.data import build_datasets
from prefopt.data.collate import UnpairedCollator, mismatch_shift
from prefopt.data.formats import detect_format, normalize_row
from prefopt.errors import DataError
from tests.test_data_tools import REPO, _env, tool

USER = {"role": "user", "content": "How was the film?"}
REPLY = {"role": "assistant", "content": "Lovely and moving."}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _build(tmp_path, tokenizer, rows, kind="unpaired", **cfg):
    return build_datasets(
        DataConfig(train=str(_write(tmp_path / "data.jsonl", rows)), **cfg), tokenizer, kind
    )


def test_unpaired_rows_are_detected_and_normalised():
    row = {"prompt": "p", "completion": "c", "label": False}
    assert detect_format(row) == "unpaired"
    assert detect_format({"messages": [USER, REPLY], "label": True}) == "unpaired"
    assert detect_format({"prompt": "p", "completion": "c"}) == "sft"  # no label: still SFT
    normal = normalize_row(row, "unpaired")
    assert (normal.prompt, normal.completion, normal.label) == ("p", "c", False)
    chat = normalize_row({"prompt": [USER], "completion": [REPLY], "label": True}, "unpaired")
    assert (chat.prompt, chat.completion, chat.label) == ([USER], "Lovely and moving.", True)


def test_unpaired_kind_from_unpaired_and_from_pair_rows(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "Review 1:", "completion": " lovely", "label": True},
        {"prompt": "Review 2:", "completion": " dull", "label": False},
        {"prompt": "Review 3:", "completion": " great", "label": True},
    ]
    bundle = _build(tmp_path, tiny_tokenizer, rows, shuffle=False)
    assert bundle.train["label"] == [True, False, True]
    assert bundle.train["completion_text"] == [" lovely", " dull", " great"]
    assert (bundle.report.train.desirable, bundle.report.train.undesirable) == (2, 1)
    assert "  2 desirable and 1 undesirable completions" in bundle.report.train.summary_lines("train")
    # a completion ends with EOS, right after the separately tokenized prompt
    first = bundle.train[0]
    assert first["completion_input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert first["prompt_input_ids"] == tiny_tokenizer("Review 1:")["input_ids"]

    pairs = [{"prompt": f"Review {i}:", "chosen": " lovely", "rejected": " dull"} for i in range(2)]
    from_pairs = _build(tmp_path, tiny_tokenizer, pairs, shuffle=False)
    assert from_pairs.train["label"] == [True, False, True, False]
    assert from_pairs.train["completion_text"] == [" lovely", " dull"] * 2
    assert from_pairs.train["prompt_text"] == ["Review 0:", "Review 0:", "Review 1:", "Review 1:"]


def test_conversational_unpaired_rows_use_the_chat_template(tmp_path, tiny_tokenizer):
    rows = [{"prompt": [USER], "completion": [REPLY], "label": True}] * 2
    bundle = _build(tmp_path, tiny_tokenizer, rows)
    rendered = tiny_tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert bundle.train[0]["prompt_text"] == rendered
    assert json.loads(bundle.train[0]["prompt_messages"]) == [USER]


BAD_ROWS = [
    ({"prompt": "p", "completion": "c", "label": "yes"}, 'field "label": expected true (desirable) or false'),
    ({"prompt": "p", "completion": "c", "label": 1}, 'field "label": expected true (desirable) or false'),
    ({"prompt": "p", "completion": "c", "label": None}, 'field "label" is empty (null)'),
    ({"prompt": "p", "completion": "c"}, 'field "label" is missing'),
    ({"prompt": "p", "completion": "", "label": True}, 'field "completion" is empty'),
    ({"completion": "c", "label": True}, 'field "prompt" is missing'),
    ({"prompt": "p", "completion": 3, "label": True}, 'field "completion": expected a string'),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_unpaired_rows_name_file_line_and_field(tmp_path, tiny_tokenizer, bad, message):
    rows = [
        {"prompt": "p0", "completion": "c0", "label": True},
        bad,
        {"prompt": "p", "completion": "c", "label": False},
    ]
    with pytest.raises(DataError, match=re.escape(f"data.jsonl line 2: {message}")):
        _build(tmp_path, tiny_tokenizer, rows)
    skipped = _build(tmp_path, tiny_tokenizer, rows, on_invalid="skip")
    assert len(skipped.train) == 2 and skipped.report.train.invalid_rows == 1


def test_rows_without_a_label_cannot_feed_the_unpaired_kind(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"format 'sft' has no completions labelled desirable or undesirable"):
        _build(tmp_path, tiny_tokenizer, [{"prompt": "p", "completion": "c"}])


def test_mismatch_shift_avoids_a_prompts_own_completions():
    assert mismatch_shift([[1], [2], [3], [4]]) == 1  # TRL's rotation by one
    assert mismatch_shift([[1], [1], [2], [2]]) == 2  # the two rows of a pair side by side
    assert mismatch_shift([[1], [1], [1]]) == 1  # nothing better exists


def test_collator_pairs_each_prompt_with_the_previous_rows_completion():
    rows = [
        {"index": 0, "prompt_input_ids": [5, 6], "completion_input_ids": [10, 2], "label": True},
        {"index": 1, "prompt_input_ids": [7], "completion_input_ids": [11, 12, 13, 2], "label": False},
        {"index": 2, "prompt_input_ids": [8, 8, 8], "completion_input_ids": [14, 2], "label": True},
    ]
    batch = UnpairedCollator(pad_token_id=0, max_length=5)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 10, 2, 0], [7, 11, 12, 13, 2], [8, 8, 8, 14, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["label"].tolist() == [True, False, True] and batch["label"].dtype == torch.bool
    # row i gets row i-1's completion (row 0 the last one's), cut to max_length: [8, 8, 8] + [11, 12, 13, 2][:2]
    assert batch["mismatched_input_ids"].tolist() == [[5, 6, 14, 2, 0], [7, 10, 2, 0, 0], [8, 8, 8, 11, 12]]
    assert batch["mismatched_completion_mask"].tolist() == [
        [0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
    ]
    assert batch["mismatched_attention_mask"].sum(1).tolist() == [4, 3, 5]


def test_convert_unpaired_from_pairs_and_back_to_conversational(tmp_path):
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"Review {i}:", "chosen": " lovely", "rejected": " dull"} for i in range(3)],
    )
    out = tmp_path / "unpaired.jsonl"
    result = tool("convert", pairs, out, "--unpaired")
    assert result.returncode == 0, result.stderr
    assert f"wrote 6 rows (pairs -> standard unpaired) to {out}" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[:2] == [
        {"prompt": "Review 0:", "completion": " lovely", "label": True},
        {"prompt": "Review 0:", "completion": " dull", "label": False},
    ]
    assert [r["label"] for r in rows] == [True, False] * 3
    chat = tmp_path / "chat.jsonl"
    assert tool("convert", out, chat, "--to", "conversational").returncode == 0
    first = json.loads(chat.read_text().splitlines()[0])
    assert first == {
        "prompt": [{"role": "user", "content": "Review 0:"}],
        "completion": [{"role": "assistant", "content": " lovely"}],
        "label": True,
    }
    valid = tool("validate", chat, "--kind", "unpaired")
    assert valid.returncode == 0 and "3 desirable and 3 undesirable completions" in valid.stdout


def test_convert_unpaired_refuses_rows_without_pairs(tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    result = tool("convert", sft, tmp_path / "o.jsonl", "--unpaired")
    assert result.returncode == 2
    assert "--unpaired splits preference pairs" in result.stderr and "format 'sft'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_train_on_a_bad_unpaired_row_exits_2_naming_file_line_and_field(tmp_path, tiny_model_dir):
    data = _write(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "p", "completion": "c", "label": True},
            {"prompt": "p", "completion": "d", "label": "no"},
        ],
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt",
            "train",
            "recipes/tiny/kto.yaml",
            f"model.name_or_path={tiny_model_dir}",
        ]
        + [f"data.train={data}", "data.eval=null", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 2, result.stderr
    assert f'{data} line 2: field "label": expected true (desirable) or false (undesirable)' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_gold_benchmark_trains_kto_on_the_tasks_pairs_as_unpaired_rows(tmp_path, gold_task_dir):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("gold_benchmark", REPO / "scripts" / "gold_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.METHODS["kto"] == ("kto.yaml", [], "unpaired", None)
    task = tmp_path / "seed-0" / "task"
    task.mkdir(parents=True)
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl"):
        shutil.copy(gold_task_dir / name, task / name)
    overrides = bench.method_overrides("kto", tmp_path / "seed-0", tmp_path / "sft", 0, [])
    assert f"data.train={task / 'unpaired_train.jsonl'}" in overrides
    assert f"data.eval={task / 'unpaired_eval.jsonl'}" in overrides
    pairs = (task / "pairs_train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in (task / "unpaired_train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(pairs)
    first = json.loads(pairs[0])
    assert rows[0] == {"prompt": first["prompt"], "completion": first["chosen"], "label": True}
    assert rows[1] == {"prompt": first["prompt"], "completion": first["rejected"], "label": False}
