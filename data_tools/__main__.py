"""``python -m data_tools SUBCOMMAND ...``: convert, validate, stats, synth."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from prefopt.errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    import data_tools
    from data_tools import convert, stats, synth, validate

    parser = argparse.ArgumentParser(
        prog="python -m data_tools",
        description=data_tools.__doc__ or "Dataset tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, validate, stats, synth):
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
