"""Shared fixtures: a tiny offline model and a small synthetic gold task, each built once per test session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach the Hugging Face Hub; offline mode also makes Hub lookups fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]

GOLD_TASK_SIZES = dict(n_sft=128, n_pairs=128, n_eval=32, n_heldout=32, n_prompts=64)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer (with the gold task's vocabulary and a ChatML template), built once (~3 s)."""
    from prefopt.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Just the tiny model's tokenizer (same corpus, ChatML template), saved without building a model (~0.3 s)."""
    from prefopt.models.tiny import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    train_tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def gold_task_dir(tmp_path_factory) -> Path:
    """A small gold task (standard format, seed 0): sft.jsonl, pairs_train/eval.jsonl, prompts_train/heldout.jsonl,
    task.json, README.md. Sizes: ``GOLD_TASK_SIZES``."""
    from data_tools.synth import write_task

    out = tmp_path_factory.mktemp("gold-task")
    write_task(out, seed=0, **GOLD_TASK_SIZES)
    return out


def _write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def write_jsonl() -> Callable[[Path, Iterable[Any]], Path]:
    """``write_jsonl(path, rows)``: rows are objects (JSON-encoded) or raw strings (written as they are)."""
    return _write_jsonl
