"""``python -m data_tools ...`` end to end, through subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


HH = [
    {
        "chosen": f"\n\nHuman: Question {i}?\n\nAssistant: A helpful answer {i}.",
        "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: No.",
    }
    for i in range(3)
]


def test_help_on_every_subcommand():
    for command in ([], ["convert"], ["validate"], ["stats"], ["synth"], ["synth", "gold-task"]):
        result = tool(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_convert_hh_to_standard_and_conversational(tmp_path):
    source = _write(tmp_path / "hh.jsonl", HH)
    out = tmp_path / "out" / "standard.jsonl"
    result = tool("convert", source, out, "--to", "standard")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"prompt": "Question 0?", "chosen": "A helpful answer 0.", "rejected": "No."}
    conv = tmp_path / "conv.jsonl"
    assert tool("convert", source, conv, "--to", "conversational").returncode == 0
    row = json.loads(conv.read_text().splitlines()[1])
    assert row["prompt"] == [{"role": "user", "content": "Question 1?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "A helpful answer 1."}]
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the temporary file was renamed away


def test_convert_rated_rows_and_multi_turn_prompts(tmp_path, tiny_tokenizer_dir):
    rated = _write(
        tmp_path / "rated.jsonl",
        [
            {
                "prompt": "p",
                "completions": [
                    {"text": "a", "score": 3},
                    {"text": "b", "score": 1},
                    {"text": "c", "score": 2},
                ],
            }
        ],
    )
    out = tmp_path / "pairs.jsonl"
    assert tool("convert", rated, out, "--rated-pairs", "all").returncode == 0
    assert len(out.read_text().splitlines()) == 3
    multi = _write(
        tmp_path / "multi.jsonl",
        [
            {
                "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e",
            }
        ],
    )
    result = tool("convert", multi, tmp_path / "x.jsonl")
    assert result.returncode == 2
    assert "line 1: the prompt has 3 messages" in result.stderr and "--tokenizer" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()  # nothing half-written
    result = tool("convert", multi, tmp_path / "x.jsonl", "--tokenizer", tiny_tokenizer_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "x.jsonl").read_text())["prompt"].endswith("<|im_start|>assistant\n")


def test_convert_bad_input_exits_2(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{oops"])
    result = tool("convert", bad, tmp_path / "o.jsonl")
    assert result.returncode == 2
    assert "bad.jsonl line 2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert tool("convert", bad, tmp_path / "o.jsonl", "--skip-invalid").returncode == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1
    missing = tool("convert", tmp_path / "nope.jsonl", tmp_path / "o2.jsonl")
    assert missing.returncode == 2 and "nope.jsonl: file not found" in missing.stderr


def test_validate_clean_and_dirty(tmp_path):
    clean = _write(tmp_path / "clean.jsonl", HH)
    result = tool("validate", clean)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "format hh; 3 rows, 3 valid, 0 invalid" in result.stdout
    dirty = _write(
        tmp_path / "dirty.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
        ],
    )
    result = tool("validate", dirty, "--json")
    assert result.returncode == 2
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["valid"], summary["invalid"], summary["format"]) == (3, 1, 2, "pairs")
    assert summary["first_reasons"][0].endswith('dirty.jsonl line 2: field "rejected" is missing')
    assert summary["invalid_by_kind"] == {"identical": 1, "missing": 1}
    assert "line 2" in result.stderr
    wrong_kind = tool("validate", _write(tmp_path / "p.jsonl", [{"prompt": "only"}]), "--kind", "pairs")
    assert wrong_kind.returncode == 2 and "cannot feed 'pairs'" in wrong_kind.stdout


def test_stats_json_and_table(tmp_path, tiny_tokenizer_dir):
    rows = [
        {"prompt": "Review of the film:", "chosen": " wonderful and moving", "rejected": " dull"},
        {"prompt": "Review of the film:", "chosen": " wonderful and moving", "rejected": " dull"},
        {"prompt": "Another review:", "chosen": " ok", "rejected": " terrible pacing and awful dialogue"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
    ]
    data = _write(tmp_path / "s.jsonl", rows)
    result = tool(
        "stats",
        data,
        "--json",
        "--tokenizer",
        tiny_tokenizer_dir,
        "--max-length",
        "8",
        "--max-prompt-length",
        "4",
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["rows"], stats["valid"], stats["examples"]) == (4, 3, 3)
    assert stats["duplicate_examples"] == 1 and stats["identical_pairs"] == 1
    assert stats["length_chars"]["chosen"]["max"] == len(" wonderful and moving")
    assert set(stats["length_chars"]["prompt"]) == {"p50", "p90", "p99", "max", "mean"}
    assert stats["length_bias"]["chars"]["chosen_longer"] == pytest.approx(2 / 3, abs=1e-3)
    assert "tokens" in stats["length_bias"] and stats["length_tokens"]["chosen"]["max"] >= 2
    assert stats["truncation"]["prompts_truncated"] == 1.0  # every prompt is longer than 4 tokens
    table = tool("stats", data)
    assert table.returncode == 0 and "length in chars" in table.stdout and "chosen longer" in table.stdout
    assert tool("stats", tmp_path / "missing.jsonl").returncode == 2


def test_synth_writes_a_loadable_task(tmp_path):
    out = tmp_path / "task"
    result = tool(
        "synth",
        "gold-task",
        "--out",
        out,
        "--seed",
        "3",
        "--n-sft",
        "20",
        "--n-pairs",
        "20",
        "--n-eval",
        "5",
        "--n-heldout",
        "10",
        "--n-prompts",
        "15",
    )
    assert result.returncode == 0, result.stderr
    assert tool("validate", out / "pairs_train.jsonl", "--kind", "pairs").returncode == 0
    assert tool("validate", out / "sft.jsonl", "--kind", "sft").returncode == 0
    assert tool("validate", out / "prompts_heldout.jsonl", "--kind", "prompts").returncode == 0
    bad = tool("synth", "gold-task", "--out", out, "--n-heldout", "5000")
    assert bad.returncode == 2 and "--n-heldout" in bad.stderr
