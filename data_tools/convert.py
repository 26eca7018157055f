"""``convert IN OUT``: any readable format into standard (plain strings) or conversational (messages) JSONL.

Pair formats become ``{"prompt", "chosen", "rejected"}``, SFT rows ``{"prompt", "completion"}``, unpaired rows
``{"prompt", "completion", "label"}``, prompt rows ``{"prompt"}``. ``--unpaired`` turns each preference pair into
two unpaired rows for KTO: the chosen completion with ``"label": true``, then the rejected one with ``false``.
Rated rows become pairs (``--rated-pairs``), HH rows conversational pairs. To standard, a prompt of one user
message becomes its content; longer conversations need ``--tokenizer`` to be rendered with its chat template.
The output is written to a temporary file and renamed, so OUT is never half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from data_tools.validate import add_source_args, load_source
from prefopt.data.formats import PAIR_FORMATS, NormalRow
from prefopt.errors import DataError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a dataset to standard or conversational JSONL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="input file, saved dataset directory or Hub name")
    parser.add_argument("output", metavar="OUT", help="output .jsonl file")
    parser.add_argument(
        "--to",
        choices=("standard", "conversational"),
        default="standard",
        help="output form (default standard)",
    )
    add_source_args(parser)
    parser.add_argument(
        "--tokenizer", help="tokenizer whose chat template renders multi-message prompts (--to standard)"
    )
    parser.add_argument(
        "--unpaired",
        action="store_true",
        help="write each pair as two unpaired rows (KTO): chosen with label true, rejected with label false",
    )
    parser.add_argument(
        "--skip-invalid", action="store_true", help="leave invalid rows out (counted) instead of failing"
    )
    parser.set_defaults(handler=run)


class _Renderer:
    def __init__(self, tokenizer_path: Optional[str]):
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if len(messages) == 1 and messages[0]["role"] == "user":
            return messages[0]["content"]
        if not self.tokenizer_path:
            raise ValueError(
                f"the prompt has {len(messages)} messages; converting multi-message prompts to standard "
                "form needs --tokenizer PATH (its chat template renders them)"
            )
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            except Exception as error:  # noqa: BLE001
                raise DataError(f"--tokenizer {self.tokenizer_path}: cannot load it ({error})") from None
            if not getattr(self._tokenizer, "chat_template", None):
                raise DataError(f"--tokenizer {self.tokenizer_path}: has no chat template")
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def convert_row(
    row: NormalRow, fmt: str, to: str, renderer: _Renderer, unpaired: bool = False
) -> list[dict[str, Any]]:
    if to == "conversational":
        prompt: Any = row.prompt if row.conversational else [{"role": "user", "content": row.prompt}]

        def reply(text: str) -> Any:
            return [{"role": "assistant", "content": text}]
    else:
        prompt = renderer.prompt_text(row.prompt) if row.conversational else row.prompt

        def reply(text: str) -> Any:
            return text

    if fmt in PAIR_FORMATS and unpaired:
        return [
            {"prompt": prompt, "completion": reply(text), "label": label}
            for p in row.pairs
            for text, label in ((p.chosen, True), (p.rejected, False))
        ]
    if fmt in PAIR_FORMATS:
        return [
            {"prompt": prompt, "chosen": reply(p.chosen), "rejected": reply(p.rejected)} for p in row.pairs
        ]
    if fmt == "unpaired":
        return [{"prompt": prompt, "completion": reply(row.completion), "label": row.label}]
    if fmt == "sft":
        return [{"prompt": prompt, "completion": reply(row.completion)}]
    return [{"prompt": prompt}]


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    result = load_source(args, args.input)
    if args.unpaired and result.format is not None and result.format not in PAIR_FORMATS + ("unpaired",):
        raise DataError(
            f"{args.input}: --unpaired splits preference pairs into desirable and undesirable rows, but the "
            f"rows have format '{result.format}' (pair formats: {', '.join(PAIR_FORMATS)})"
        )
    reasons = list(result.reasons)
    invalid = result.invalid
    renderer = _Renderer(args.tokenizer)
    rows: list[dict[str, Any]] = []
    for location, row in result.rows:
        try:
            rows.extend(convert_row(row, result.format, args.to, renderer, args.unpaired))
        except ValueError as error:
            invalid += 1
            reasons.append(f"{location}: {error}")
    if invalid and not args.skip_invalid:
        more = (
            f" ({invalid - 1} more; --skip-invalid leaves them out)"
            if invalid > 1
            else " (--skip-invalid leaves it out)"
        )
        raise DataError(reasons[0] + more)
    if not rows:
        raise DataError(f"{args.input}: nothing to convert ({result.rows_read} rows read, {invalid} invalid)")
    write_jsonl_atomic(args.output, rows)
    skipped = f", {invalid} invalid rows skipped" if invalid else ""
    form = f"{args.to} unpaired" if args.unpaired else args.to
    print(f"wrote {len(rows)} rows ({result.format} -> {form}) to {args.output}{skipped}")
    for reason in reasons[:5]:
        print(f"  skipped: {reason}", file=sys.stderr)
    return 0
