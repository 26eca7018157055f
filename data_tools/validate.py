"""``validate FILE``: the trainer's own row checks, as a report. Exit 0 when every row is usable, 2 otherwise."""

from __future__ import annotations

import argparse
import json
import sys

from prefopt.data.formats import FORMATS, KIND_FORMATS, NormalizeOptions
from prefopt.data.sources import LoadResult, Source, load_rows

FIRST = 10


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every tool that reads a dataset shares."""
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto",) + FORMATS,
        help="row format (default: detected from the first row)",
    )
    parser.add_argument(
        "--split", default="train", help="split of a saved DatasetDict or Hub dataset (default train)"
    )
    parser.add_argument(
        "--rated-pairs",
        default="best_worst",
        choices=("best_worst", "all"),
        help="pairs from rated rows: best vs worst, or every pair with a score gap (default best_worst)",
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=0.0,
        help="rated rows: only pairs whose score gap exceeds this (default 0)",
    )


def load_source(args: argparse.Namespace, path: str) -> LoadResult:
    """Read and check every row of ``path``; invalid rows are counted, not raised."""
    source = Source(path, args.split)
    return load_rows(source, args.format, NormalizeOptions(args.rated_pairs, args.min_gap))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a dataset with the trainer's checks",
        description="Run the checks the trainer runs on every row (reading, format, fields, "
        "types, chosen != rejected) and summarise. Exit 0 when clean, 2 when "
        "any row is invalid or nothing is usable.",
    )
    parser.add_argument(
        "file", help="a .jsonl/.json/.csv/.parquet file, a saved dataset directory or a Hub name"
    )
    add_source_args(parser)
    parser.add_argument(
        "--kind", choices=tuple(KIND_FORMATS), help="also check the rows can feed this kind of step"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run)


def summarise(result, kind=None) -> dict:
    problems = []
    if kind and result.format and result.format not in KIND_FORMATS[kind]:
        problems.append(
            f"format '{result.format}' cannot feed '{kind}' steps (needs one of "
            f"{', '.join(KIND_FORMATS[kind])})"
        )
    if not result.rows:
        problems.append("no usable rows")
    return {
        "file": result.source,
        "format": result.format,
        "rows": result.rows_read,
        "valid": len(result.rows),
        "invalid": result.invalid,
        "invalid_by_kind": dict(sorted(result.invalid_codes.items())),
        "first_reasons": result.reasons[:FIRST],
        "pairs": sum(len(row.pairs) for _, row in result.rows),
        "desirable": sum(row.label is True for _, row in result.rows),
        "undesirable": sum(row.label is False for _, row in result.rows),
        "rated_rows_without_pairs": result.rated_rows_without_pairs,
        "problems": problems,
        "ok": not result.invalid and not problems,
    }


def run(args: argparse.Namespace) -> int:
    summary = summarise(load_source(args, args.file), args.kind)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(
            f"{summary['file']}: format {summary['format'] or 'unknown'}; {summary['rows']} rows, "
            f"{summary['valid']} valid, {summary['invalid']} invalid; {summary['pairs']} preference pairs"
            + (
                f", {summary['desirable']} desirable and {summary['undesirable']} undesirable completions"
                if summary["desirable"] or summary["undesirable"]
                else ""
            )
        )
        if summary["rated_rows_without_pairs"]:
            print(
                f"  {summary['rated_rows_without_pairs']} rated rows give no pair (scores tied or gap too small)"
            )
        for reason in summary["first_reasons"]:
            print(f"  invalid: {reason}")
        if summary["invalid"] > FIRST:
            print(f"  ... and {summary['invalid'] - FIRST} more invalid rows")
        for problem in summary["problems"]:
            print(f"  problem: {problem}")
        print("OK" if summary["ok"] else "FAILED")
    if not summary["ok"]:
        first = (summary["first_reasons"] or summary["problems"])[0]
        print(
            f"error: {summary['file']}: {summary['invalid']} invalid rows; first: {first}"
            if summary["invalid"]
            else f"error: {summary['file']}: {first}",
            file=sys.stderr,
        )
    return 0 if summary["ok"] else 2
