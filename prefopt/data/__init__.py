"""Data for the trainer: read -> check and normalise rows -> split -> order -> tokenize -> collate.

```python
from prefopt.data import build_datasets, PairCollator
bundle = build_datasets(config.data, tokenizer, "pairs", seed=42, cache_dir=".prefopt_cache/data")
loader = DataLoader(bundle.train, batch_size=4, collate_fn=PairCollator(tokenizer.pad_token_id))
```

``kind`` is what the training step consumes: ``"pairs"`` (preference pairs), ``"prompts"`` (prompt-only rows for
online methods; pair, rated and SFT rows give their prompts), ``"sft"`` (prompt/completion; pair rows give
prompt+chosen, rated rows their best-scored completion) or ``"unpaired"`` (prompt/completion/label, KTO; each pair
gives its chosen completion labelled desirable and its rejected one labelled undesirable). Columns of each kind are
listed in :data:`COLUMNS`.

Order of operations: rows are read and checked (``data.max_samples`` caps the valid source rows read); the eval split
is ``data.eval``, else ``data.eval_split`` of the same source, else ``data.eval_size`` source rows carved out of train
at random with the seed (whole source rows, so pairs of one rated prompt never straddle the splits); train examples
are shuffled with the seed (``data.shuffle``) or, with ``data.curriculum``, ordered by descending score gap (easy
first; ties in shuffled order); then tokenized once with ``datasets.map`` (cached under ``cache_dir``, keyed by the
fingerprint). ``index`` is the row's position in its split after all of that.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

from prefopt.data.formats import FORMATS, KIND_FORMATS, NormalizeOptions, NormalRow, check_kind, detect_format
from prefopt.data.report import DataReport, SplitReport
from prefopt.data.revision import RevisionTemplate
from prefopt.data.sources import LoadResult, Source, load_rows, raise_for_invalid
from prefopt.data.tokenize import (
    COMPLETIONS,
    ExampleTokenizer,
    data_fingerprint,
    flag_columns,
    resolve_chat_template,
    tokenizer_fingerprint,
)
from prefopt.errors import DataError

__all__ = [
    "build_datasets",
    "DataBundle",
    "DataReport",
    "PairCollator",
    "PromptCollator",
    "SFTCollator",
    "pad_sequences",
    "COLUMNS",
    "KINDS",
    "FORMATS",
    "Source",
    "load_rows",
    "detect_format",
]

KINDS = ("pairs", "prompts", "sft", "scored_pairs", "triples", "revision_pairs", "reset_prompts", "unpaired")
_PAIR_COLUMNS = (
    "index",
    "prompt_input_ids",
    "chosen_input_ids",
    "rejected_input_ids",
    "prompt_text",
    "chosen_text",
    "rejected_text",
    "prompt_messages",
)
COLUMNS = {
    "pairs": _PAIR_COLUMNS,
    # CoPG: a scalar reward per completion; TPO: a gold completion; SRPO: the prompt rendered as a request to
    # revise each completion of the pair (data.revision_template).
    "scored_pairs": _PAIR_COLUMNS + ("chosen_score", "rejected_score"),
    "triples": _PAIR_COLUMNS + ("gold_input_ids", "gold_text"),
    "revision_pairs": _PAIR_COLUMNS + ("revise_chosen_prompt_input_ids", "revise_rejected_prompt_input_ids"),
    # DR-PO: prompts with the dataset response whose prefixes rollouts restart from
    "reset_prompts": ("index", "prompt_input_ids", "prompt_text", "prompt_messages", "completion_input_ids"),
    "prompts": ("index", "prompt_input_ids", "prompt_text", "prompt_messages"),
    "sft": ("index", "prompt_input_ids", "completion_input_ids", "prompt_text", "completion_text"),
    # KTO: one completion per row, judged on its own (label True: desirable)
    "unpaired": (
        "index",
        "prompt_input_ids",
        "completion_input_ids",
        "label",
        "prompt_text",
        "completion_text",
        "prompt_messages",
    ),
}
PAIR_KINDS = (
    "pairs",
    "scored_pairs",
    "triples",
    "revision_pairs",
)  # kinds whose examples are preference pairs
PASSTHROUGH = {  # example columns kept as they are
    "scored_pairs": ("chosen_score", "rejected_score"),
    "unpaired": ("label",),
}
# Settings that change neither which rows exist, nor their order, nor their ids: left out of the fingerprint.
_NOT_FINGERPRINTED = ("train", "eval", "num_proc", "packing")


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset | None
    report: DataReport
    fingerprint: str
    kind: str
    curriculum: bool = False  # train rows are in curriculum order: do not reshuffle them

    def write_report(self, output_dir: str | os.PathLike):
        return self.report.write(output_dir)


def build_datasets(
    data_cfg, tokenizer, kind: str, seed: int = 42, cache_dir: Optional[str] = None
) -> DataBundle:
    """Read, check, split, order and tokenize ``data_cfg.train`` (and the eval split) for a ``kind`` of step."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not data_cfg.train:
        raise DataError(
            "data.train: no training data given (a .jsonl/.json/.csv/.parquet file, a saved dataset "
            "directory, or a Hub dataset name)"
        )
    options = NormalizeOptions(data_cfg.rated_pairs, data_cfg.rated_min_gap)
    template = resolve_chat_template(tokenizer, data_cfg.chat_template)
    encoder = ExampleTokenizer(
        tokenizer,
        kind,
        data_cfg.max_length,
        data_cfg.max_prompt_length,
        data_cfg.truncation,
        template,
        revision=RevisionTemplate.from_config(data_cfg),
    )

    train_source = Source(data_cfg.train, data_cfg.split)
    train_load = _load(train_source, data_cfg, options, kind, data_cfg.max_samples)
    eval_source = _eval_source(data_cfg, train_source)
    eval_load = _load(eval_source, data_cfg, options, kind, None) if eval_source else None

    train_rows, eval_rows = train_load.rows, eval_load.rows if eval_load else None
    carved = 0
    if data_cfg.eval_size:
        if eval_source is not None:
            raise DataError(
                "data.eval_size: the eval split is already given by data.eval or data.eval_split; "
                "set only one of them"
            )
        train_rows, eval_rows = _carve(train_rows, data_cfg.eval_size, seed, train_source.name)
        carved = len(eval_rows)

    settings = {k: v for k, v in data_cfg.model_dump(mode="json").items() if k not in _NOT_FINGERPRINTED}
    fingerprint = data_fingerprint(
        {
            "kind": kind,
            "settings": settings,
            "seed": seed
            if data_cfg.shuffle or data_cfg.eval_size
            else None,  # the seed only matters for these
            "train": train_source.content_hash(),
            "eval": eval_source.content_hash() if eval_source else None,
            "tokenizer": tokenizer_fingerprint(tokenizer, template),
        }
    )
    report = DataReport(kind=kind, fingerprint=fingerprint, settings={**settings, "seed": seed})

    curriculum = bool(data_cfg.curriculum and kind in PAIR_KINDS)
    if curriculum and train_load.format != "rated":
        raise DataError(
            f"data.curriculum orders pairs by the gap between their scores, which needs rated rows "
            f"(format rated); {train_source.name} has format '{train_load.format}'"
        )
    train_examples = _examples(train_rows, kind)
    if curriculum:
        if data_cfg.shuffle:
            random.Random(seed).shuffle(train_examples)
        train_examples.sort(key=lambda example: -example["_gap"])  # stable: easy (large gap) first
    elif data_cfg.shuffle:
        random.Random(seed).shuffle(train_examples)

    report.train = _split_report(train_load, train_rows, carved_rows=carved)
    train = _tokenize(train_examples, "train", encoder, data_cfg, fingerprint, cache_dir, report.train)
    eval_ds = None
    if eval_rows is not None:
        report.eval = (
            _split_report(eval_load, eval_rows)
            if eval_load
            else SplitReport(
                source=f"{train_source.name} (carved with data.eval_size)",
                format=train_load.format,
                rows_read=len(eval_rows),
            )
        )
        if eval_load is None:
            _count_rated(report.eval, eval_rows)
        eval_ds = _tokenize(
            _examples(eval_rows, kind), "eval", encoder, data_cfg, fingerprint, cache_dir, report.eval
        )
    return DataBundle(
        train=train, eval=eval_ds, report=report, fingerprint=fingerprint, kind=kind, curriculum=curriculum
    )


# ---------------------------------------------------------------------------------------------------------------


def _load(
    source: Source, data_cfg, options: NormalizeOptions, kind: str, max_rows: Optional[int]
) -> LoadResult:
    result = load_rows(source, data_cfg.format, options, max_rows=max_rows)
    if data_cfg.on_invalid == "error":
        raise_for_invalid(result)
    if result.format is not None:
        try:
            check_kind(result.format, kind, source.name)
        except ValueError as error:
            raise DataError(str(error)) from None
    if not result.rows:
        raise DataError(
            f"{source.name}: no usable rows ({result.rows_read} read, {result.invalid} invalid"
            + (f"; first problem: {result.reasons[0]}" if result.reasons else "")
            + ")"
        )
    return result


def _eval_source(data_cfg, train_source: Source) -> Optional[Source]:
    if data_cfg.eval:
        return Source(data_cfg.eval, data_cfg.eval_split or data_cfg.split)
    if data_cfg.eval_split:
        if train_source.kind not in ("disk", "hub"):
            raise DataError(
                f"data.eval_split: '{train_source.name}' is a single file without splits; give the eval "
                "file as data.eval, or carve one with data.eval_size"
            )
        return Source(data_cfg.train, data_cfg.eval_split)
    return None


def _carve(rows: list, eval_size: float | int, seed: int, name: str) -> tuple[list, list]:
    total = len(rows)
    count = round(eval_size * total) if eval_size < 1 else int(eval_size)
    count = max(count, 1)
    if eval_size < 0 or count >= total:
        raise DataError(
            f"data.eval_size={eval_size}: would leave no training rows out of the {total} rows of {name}"
        )
    order = list(range(total))
    random.Random(f"eval-carve-{seed}").shuffle(order)
    chosen = set(order[:count])
    return (
        [r for i, r in enumerate(rows) if i not in chosen],
        [r for i, r in enumerate(rows) if i in chosen],
    )


def _examples(rows: list[tuple[str, NormalRow]], kind: str) -> list[dict[str, Any]]:
    examples = []
    for location, row in rows:
        base = {
            "prompt": row.prompt if isinstance(row.prompt, str) else "",
            "prompt_messages": json.dumps(row.prompt, ensure_ascii=False) if row.conversational else "",
            "_source": location,
        }
        if kind == "triples":
            pair = row.triple if row.rated else row.pairs[0]
            if (
                pair is None
            ):  # a rated row with < 3 completions or a tie below the best: no triple, like no pair
                continue
            examples.append(
                {
                    **base,
                    "chosen_text": pair.chosen,
                    "rejected_text": pair.rejected,
                    "gold_text": pair.gold,
                    "_gap": pair.gap if pair.gap is not None else 0.0,
                }
            )
        elif kind in PAIR_KINDS:
            for pair in row.pairs:
                example = {
                    **base,
                    "chosen_text": pair.chosen,
                    "rejected_text": pair.rejected,
                    "_gap": pair.gap if pair.gap is not None else 0.0,
                }
                if kind == "scored_pairs":
                    if pair.chosen_score is None or pair.rejected_score is None:
                        raise DataError(
                            f'{location}: field "chosen_score" is missing: this loss needs a scalar reward '
                            "for each completion (chosen_score and rejected_score on pair rows, or rated "
                            "rows; or set reward.* to score the pairs before training)"
                        )
                    example.update(chosen_score=pair.chosen_score, rejected_score=pair.rejected_score)
                examples.append(example)
        elif kind == "unpaired":
            if row.label is not None:
                examples.append({**base, "completion_text": row.completion, "label": row.label})
            else:  # a pair row: its chosen completion is desirable, its rejected one undesirable
                for pair in row.pairs:
                    examples.append({**base, "completion_text": pair.chosen, "label": True})
                    examples.append({**base, "completion_text": pair.rejected, "label": False})
        elif kind in ("sft", "reset_prompts"):
            examples.append({**base, "completion_text": row.completion})
        else:
            examples.append(base)
    return examples


def _count_rated(report: SplitReport, rows: list[tuple[str, NormalRow]]) -> None:
    rated = [row for _, row in rows if row.rated]
    report.rated_rows = len(rated)
    report.pairs_from_rated = sum(len(row.pairs) for row in rated)
    report.rated_rows_without_pairs = sum(not row.pairs for row in rated)
    report.rated_identical_pairs_skipped = sum(row.rated_skipped_identical for row in rated)


def _split_report(load: LoadResult, rows: list, carved_rows: int = 0) -> SplitReport:
    report = SplitReport(
        source=load.source,
        format=load.format,
        rows_read=load.rows_read,
        invalid_rows=load.invalid,
        invalid_reasons=list(load.reasons),
        stopped_at_max_samples=load.stopped_at_max_samples,
        carved_rows=carved_rows,
    )
    _count_rated(report, rows)
    return report


def _tokenize(
    examples: list[dict[str, Any]],
    split: str,
    encoder: ExampleTokenizer,
    data_cfg,
    fingerprint: str,
    cache_dir: Optional[str],
    report: SplitReport,
):
    from datasets import Dataset

    report.examples = len(examples)
    if not examples:
        raise DataError(
            f"{report.source}: no {encoder.kind} examples for the {split} split (e.g. rated rows whose "
            "scores all tie, or a gap below data.rated_min_gap)"
        )
    if encoder.chat_template is None and any(e["prompt_messages"] for e in examples):
        raise DataError(
            f"{report.source}: conversational rows need a chat template and the tokenizer has none; set "
            "data.chat_template (a Jinja template string or a path to a template file)"
        )
    columns = [
        "prompt",
        "prompt_messages",
        "_source",
        *(f"{n}_text" for n in COMPLETIONS[encoder.kind]),
        *PASSTHROUGH.get(encoder.kind, ()),
    ]
    dataset = Dataset.from_dict({c: [e[c] for e in examples] for c in columns})
    key = f"{fingerprint[:32]}-{split}"
    kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=512,
        remove_columns=["prompt"],
        new_fingerprint=key,
        desc=f"tokenizing {split}",
    )
    num_proc = (
        data_cfg.num_proc if data_cfg.num_proc and data_cfg.num_proc > 1 and len(examples) > 512 else None
    )
    kwargs["num_proc"] = num_proc
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        kwargs.update(
            cache_file_name=os.path.join(cache_dir, f"tokenized-{key}.arrow"), load_from_cache_file=True
        )
    else:
        kwargs["keep_in_memory"] = True
    dataset = dataset.map(encoder, **kwargs)

    flags = dataset.select_columns(flag_columns(encoder.kind)).to_dict()
    errors = [e for e in flags["_error"] if e]
    if errors and data_cfg.on_invalid == "error":
        raise DataError(
            errors[0] + (f"\n({len(errors) - 1} more rows fail the same way)" if len(errors) > 1 else "")
        )
    report.template_errors = len(errors)
    report.invalid_rows += len(errors)
    report.invalid_reasons.extend(errors)
    report.truncated_prompts = sum(flags["_prompt_truncated"])
    report.truncated_completions = {
        name: sum(flags[f"_{name}_truncated"]) for name in COMPLETIONS[encoder.kind]
    }
    dropped = [d for d in flags["_dropped"] if d]
    report.dropped_rows = len(dropped)
    report.dropped_reasons = dropped
    keep = [i for i, (e, d) in enumerate(zip(flags["_error"], flags["_dropped"])) if not e and not d]
    if not keep:
        raise DataError(
            f"{report.source}: no {split} rows left after tokenization ({len(dropped)} dropped because "
            f"data.max_length={data_cfg.max_length} left no room for the completion, {len(errors)} "
            "failed the chat template)" + (f"; first: {(dropped or errors)[0]}" if dropped or errors else "")
        )
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    dataset = dataset.remove_columns(flag_columns(encoder.kind))
    dataset = dataset.add_column("index", list(range(len(dataset))))
    dataset = dataset.select_columns(list(COLUMNS[encoder.kind]))
    report.rows = len(dataset)
    if "label" in dataset.column_names:
        report.desirable = sum(dataset["label"])
        report.undesirable = report.rows - report.desirable
    return dataset


_LAZY = {"PairCollator", "PromptCollator", "SFTCollator", "pad_sequences"}


def __getattr__(name: str):
    # The collators need torch; importing them lazily keeps `python -m data_tools` and row checks fast.
    if name in _LAZY:
        from prefopt.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'prefopt.data' has no attribute {name!r}")


# Re-exported for data_tools and tests.
__all__ += ["NormalizeOptions", "KIND_FORMATS", "ExampleTokenizer", "SplitReport"]
