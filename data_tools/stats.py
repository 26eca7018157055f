"""``stats FILE``: counts, length percentiles, truncation rates, duplicates and chosen-vs-rejected length bias.

Lengths are in characters (a conversational prompt counts the characters of its messages' contents) and, with
``--tokenizer``, in tokens exactly as the trainer makes them (chat template, EOS on completions). The truncation
rate uses the trainer's truncation rule at ``--max-length`` / ``--max-prompt-length``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any, Optional

from data_tools.validate import add_source_args, load_source
from prefopt.data.formats import PAIR_FORMATS
from prefopt.errors import DataError

PERCENTILES = (50, 90, 99)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="dataset statistics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "file", help="a .jsonl/.json/.csv/.parquet file, a saved dataset directory or a Hub name"
    )
    add_source_args(parser)
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or name: adds token lengths and truncation rates"
    )
    parser.add_argument("--max-length", type=int, default=512, help="prompt+completion tokens (default 512)")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens (default 256)")
    parser.add_argument("--truncation", choices=("keep_end", "keep_start"), default="keep_end")
    parser.add_argument("--chat-template", help="chat template overriding the tokenizer's (string or file)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler=run)


def percentiles(values: list[float]) -> dict[str, Optional[float]]:
    """Nearest-rank percentiles p50/p90/p99 and max (None for no values)."""
    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    ordered = sorted(values)
    out: dict[str, Optional[float]] = {}
    for p in PERCENTILES:
        rank = max(1, -(-p * len(ordered) // 100))
        out[f"p{p}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    out["mean"] = round(sum(ordered) / len(ordered), 2)
    return out


def _examples(result) -> tuple[list[str], list[dict[str, Any]]]:
    fields = (
        ["prompt", "chosen", "rejected"]
        if result.format in PAIR_FORMATS
        else (["prompt", "completion"] if result.format in ("sft", "unpaired") else ["prompt"])
    )
    examples = []
    for _, row in result.rows:
        base = {"prompt": row.prompt, "prompt_messages": json.dumps(row.prompt) if row.conversational else ""}
        if fields[-1] == "rejected":
            examples += [{**base, "chosen": p.chosen, "rejected": p.rejected} for p in row.pairs]
        elif fields[-1] == "completion":
            examples.append({**base, "completion": row.completion})
        else:
            examples.append(base)
    return fields, examples


def _chars(value: Any) -> int:
    return sum(len(m["content"]) for m in value) if isinstance(value, list) else len(value)


def compute(
    result,
    tokenizer=None,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: str = "keep_end",
    chat_template: Optional[str] = None,
) -> dict[str, Any]:
    fields, examples = _examples(result)
    stats: dict[str, Any] = {
        "file": result.source,
        "format": result.format,
        "rows": result.rows_read,
        "valid": len(result.rows),
        "invalid": result.invalid,
        "examples": len(examples),
        "identical_pairs": result.invalid_codes.get("identical", 0),
        "first_invalid_reasons": result.reasons[:5],
    }
    if result.format == "unpaired":
        stats["desirable"] = sum(bool(row.label) for _, row in result.rows)
        stats["undesirable"] = len(result.rows) - stats["desirable"]
    keys = [json.dumps([e[f] for f in fields], sort_keys=True) for e in examples]
    stats["duplicate_examples"] = len(keys) - len(set(keys))
    prompts = Counter(json.dumps(e["prompt"]) for e in examples)
    stats["distinct_prompts"] = len(prompts)
    chars = {f: [_chars(e[f]) for e in examples] for f in fields}
    stats["length_chars"] = {f: percentiles(v) for f, v in chars.items()}
    tokens = None
    if tokenizer is not None:
        tokens = _token_lengths(
            examples, fields, tokenizer, max_length, max_prompt_length, truncation, chat_template, stats
        )
    if "rejected" in fields and examples:
        stats["length_bias"] = {"chars": _bias(chars["chosen"], chars["rejected"])}
        if tokens:
            stats["length_bias"]["tokens"] = _bias(tokens["chosen"], tokens["rejected"])
    return stats


def _token_lengths(
    examples, fields, tokenizer, max_length, max_prompt_length, truncation, chat_template, stats
):
    from prefopt.data.tokenize import COMPLETIONS, ExampleTokenizer, fit_lengths, resolve_chat_template

    kind = "pairs" if "rejected" in fields else "sft" if "completion" in fields else "prompts"
    template = resolve_chat_template(tokenizer, chat_template)
    encoder = ExampleTokenizer(tokenizer, kind, max_length, max_prompt_length, truncation, template)
    texts = [
        encoder.render_prompt(e["prompt"] if not e["prompt_messages"] else "", e["prompt_messages"])
        for e in examples
    ]
    prompt_ids = encoder.encode_prompts(texts, [bool(e["prompt_messages"]) for e in examples])
    names = COMPLETIONS[kind]
    completion_ids = {
        n: encoder.encode_completions([encoder.strip_eos(e[n]) for e in examples]) for n in names
    }
    tokens = {
        "prompt": [len(ids) for ids in prompt_ids],
        **{n: [len(ids) for ids in completion_ids[n]] for n in names},
    }
    stats["length_tokens"] = {f: percentiles(v) for f, v in tokens.items()}
    fitted = [
        fit_lengths(
            prompt_ids[i],
            [completion_ids[n][i] for n in names],
            max_length,
            max_prompt_length,
            truncation,
            names,
        )
        for i in range(len(examples))
    ]
    count = max(len(fitted), 1)
    stats["truncation"] = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation": truncation,
        "prompts_truncated": round(sum(f.prompt_truncated for f in fitted) / count, 4),
        **{
            f"{n}_truncated": round(sum(f.completion_truncated[j] for f in fitted) / count, 4)
            for j, n in enumerate(names)
        },
        "dropped": round(sum(f.dropped is not None for f in fitted) / count, 4),
    }
    return tokens


def _bias(chosen: list[int], rejected: list[int]) -> dict[str, float]:
    n = len(chosen)
    return {
        "chosen_longer": round(sum(c > r for c, r in zip(chosen, rejected)) / n, 4),
        "chosen_shorter": round(sum(c < r for c, r in zip(chosen, rejected)) / n, 4),
        "mean_difference": round(sum(c - r for c, r in zip(chosen, rejected)) / n, 2),
    }


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001
        raise DataError(f"--tokenizer {path}: cannot load it ({type(error).__name__}: {error})") from None


def print_table(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{stats['file']}[/bold]: format {stats['format']}, {stats['rows']} rows, {stats['valid']} "
        f"valid, {stats['invalid']} invalid, {stats['examples']} examples, {stats['distinct_prompts']} "
        f"distinct prompts, {stats['duplicate_examples']} duplicate examples, {stats['identical_pairs']} "
        "identical pairs (chosen == rejected)"
    )
    if "desirable" in stats:
        console.print(f"{stats['desirable']} desirable, {stats['undesirable']} undesirable completions")
    for unit in ("chars", "tokens"):
        lengths = stats.get(f"length_{unit}")
        if not lengths:
            continue
        table = Table(title=f"length in {unit}")
        for column in ("field", "p50", "p90", "p99", "max", "mean"):
            table.add_column(column, justify="left" if column == "field" else "right")
        for name, values in lengths.items():
            table.add_row(name, *(str(values[c]) for c in ("p50", "p90", "p99", "max", "mean")))
        console.print(table)
    if "truncation" in stats:
        t = stats["truncation"]
        rates = ", ".join(
            f"{k.removesuffix('_truncated')} {v:.1%}" for k, v in t.items() if k.endswith("_truncated")
        )
        console.print(
            f"truncation at max_length={t['max_length']}, max_prompt_length={t['max_prompt_length']}: "
            f"{rates}; dropped {t['dropped']:.1%}"
        )
    for unit, bias in stats.get("length_bias", {}).items():
        console.print(
            f"length bias ({unit}): chosen longer in {bias['chosen_longer']:.1%} of pairs, shorter in "
            f"{bias['chosen_shorter']:.1%}; mean chosen - rejected = {bias['mean_difference']}"
        )
    for reason in stats["first_invalid_reasons"]:
        console.print(f"invalid: {reason}", markup=False)


def run(args: argparse.Namespace) -> int:
    result = load_source(args, args.file)
    if not result.rows:
        raise DataError(
            f"{args.file}: no usable rows ({result.rows_read} read, {result.invalid} invalid"
            + (f"; first: {result.reasons[0]}" if result.reasons else "")
            + ")"
        )
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    stats = compute(
        result, tokenizer, args.max_length, args.max_prompt_length, args.truncation, args.chat_template
    )
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print_table(stats)
    return 0
