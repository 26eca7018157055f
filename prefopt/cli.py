"""The ``prefopt`` command: ``train``, ``losses``, ``tiny-model``, ``demo``, ``evaluate``, ``diagnose``.

Bad input (recipe keys, data rows, paths) ends with one message on stderr and exit status 2, never a traceback.
``prefopt train`` runs the same under ``accelerate launch -m prefopt train ...`` and ``torchrun -m prefopt train``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from prefopt.errors import UserInputError
from prefopt.recipes import REPO_ROOT, find_recipe  # noqa: F401 - re-exported (``prefopt.cli.find_recipe``)

# Below this many columns `prefopt losses` prints one block per loss instead of a table.
WIDE_TABLE_COLUMNS = 140


# ----------------------------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from prefopt.config import load_config
    from prefopt.trainer import TrainingDiverged, train

    config = load_config(find_recipe(args.recipe), args.overrides)
    try:
        result = train(config)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    from rich.console import Console

    if int(os.environ.get("RANK", "0")) != 0:
        return
    metrics = {**result.last_metrics, **result.eval_metrics}
    console = Console()
    console.print(
        f"[bold green]done[/]: {result.global_step} optimizer steps; outputs in {result.output_dir}"
    )
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "eval/loss",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "online/kl",
        "ppo/policy_loss",
        "rto/rm_score",
    ):
        if key in metrics:
            console.print(f"  {key:<26} {metrics[key]:.4f}")
    if result.final_dir is not None:
        console.print(f"  final model: {result.final_dir}")


def cmd_losses(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prefopt.losses import available_losses, loss_class
    from prefopt.losses.modifiers import MODIFIERS

    console = Console(width=args.width, highlight=False)
    if args.name in MODIFIERS:  # LD-DPO, WPO, TR-DPO: options of several losses, described like one
        console.print(_modifier_detail(args.name))
        return 0
    if args.name is not None:
        try:
            loss_class(args.name)
        except ValueError as error:
            raise UserInputError(f"prefopt losses: {error}") from None
        console.print(_loss_detail(args.name))
        return 0
    from rich.table import Table
    from rich.text import Text

    from prefopt.losses import loss_parameters

    rows = []
    for name in available_losses():
        cls = loss_class(name)
        params = ", ".join(f"{k}={v!r}" for k, v in loss_parameters(name).items()) or "(none)"
        rows.append((name, cls.summary, params, ", ".join(sorted(cls.needs)) or "policy only", cls.step))
    if console.width < WIDE_TABLE_COLUMNS:
        # A five-column table squeezed into a narrow terminal cuts every cell to a few characters: one block
        # per loss instead, each field on its own wrapped line.
        console.print("prefopt losses: loss.name=... in a recipe; formulas, defaults: docs/losses.md")
        console.print(_modifiers_line(console.width) + "\n", markup=False, highlight=False, soft_wrap=True)
        for name, summary, params, needs, step in rows:
            console.print(Text.assemble((name, "bold"), f"  needs: {needs}; step: {step}"))
            for line in (summary, f"parameters: {params}"):
                wrapped = textwrap.fill(
                    line, width=console.width, initial_indent="  ", subsequent_indent="    "
                )
                console.print(wrapped, markup=False, highlight=False, soft_wrap=True)
            console.print()
        return 0
    table = Table(title="prefopt losses (loss.name=... in a recipe; formulas and defaults: docs/losses.md)")
    for column in ("name", "what it is", "parameters (defaults)", "needs", "step"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(_modifiers_line(console.width), markup=False, highlight=False)
    return 0


def _modifiers_line(width: int) -> str:
    from prefopt.losses.modifiers import MODIFIERS

    listed = ", ".join(f"{m.name} ({m.enable.split(' (')[0]})" for m in MODIFIERS.values())
    return textwrap.fill(f"modifiers (prefopt losses NAME for one): {listed}", width=width)


def _modifier_detail(name: str):
    """A modifier in full: what it does, paper, formula, how to turn it on, defaults, which losses take it."""
    from rich.markup import escape
    from rich.table import Table

    from prefopt.losses.modifiers import MODIFIERS, modifier_takers

    modifier = MODIFIERS[name]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("modifier", f"{name}: {escape(modifier.summary)}")
    grid.add_row("paper", escape(modifier.paper))
    grid.add_row("formula", escape(modifier.formula))
    grid.add_row("turn on", escape(modifier.enable))
    grid.add_row("defaults", escape(modifier.defaults))
    grid.add_row("taken by", escape(modifier_takers(modifier)))
    grid.add_row("reference", f"docs/losses.md#{name}")
    return grid


def _needs(cls) -> str:
    return f"{', '.join(sorted(cls.needs)) or 'policy only'}; step: {cls.step}"


def _parameter_list(name: str) -> str:
    from prefopt.losses import loss_parameters

    return ", ".join(f"{k}={v!r}" for k, v in loss_parameters(name).items()) or "no parameters"


def _loss_detail(name: str):
    """Everything about one loss: summary, paper, formula, parameters with defaults, needs, implicit reward."""
    import inspect

    from rich.markup import escape
    from rich.table import Table

    from prefopt.losses import get_loss, loss_class, loss_parameters

    cls = loss_class(name)
    try:
        reward = get_loss(name).implicit_reward()
        reward_text = reward.formula() if reward is not None else "none"
    except ValueError:  # a mixture: its first part's
        reward_text = "the first part's that has one"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("loss", f"{name}: {escape(cls.summary)}")
    grid.add_row("paper", escape(cls.paper))
    grid.add_row("formula", escape(cls.formula))
    parameters = loss_parameters(name)
    grid.add_row("parameters", "\n".join(f"{k} = {v!r}" for k, v in parameters.items()) or "none")
    grid.add_row("needs", _needs(cls))
    grid.add_row("implicit reward", reward_text)
    grid.add_row("reference", f"docs/losses.md#{name}")
    grid.add_row("", "")
    grid.add_row("details", escape(_reflow(inspect.getdoc(cls) or "")))
    return grid


def _reflow(doc: str) -> str:
    """Join the hard-wrapped lines of each prose paragraph so the terminal wraps them; keep indented blocks."""
    paragraphs = []
    for block in doc.split("\n\n"):
        lines = block.splitlines()
        indented = any(line.startswith((" ", "=")) for line in lines)
        paragraphs.append(block if indented else " ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from prefopt.models.tiny import build_tiny_model

    path = build_tiny_model(
        args.out,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        seed=args.seed,
    )
    print(f"tiny model and tokenizer saved to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from prefopt.demo import run_demo

    return run_demo(Path(args.out), steps=args.max_steps, eval_prompts=args.eval_prompts)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from prefopt.evaluate_cli import run_evaluate

    return run_evaluate(args)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from prefopt.diagnostics.cli import run_diagnose

    return run_diagnose(args)


# ------------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefopt", description="Preference optimization for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train from a recipe",
        description=(
            "Train from a YAML recipe. Override any key with dotted KEY=VALUE, e.g. "
            "`prefopt train recipes/tiny/dpo.yaml loss.name=simpo loss.beta=2.0`. Multi-process: "
            "`accelerate launch -m prefopt train ...` or `torchrun --nproc_per_node N -m prefopt train ...`."
        ),
    )
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    train.set_defaults(func=cmd_train)

    losses = sub.add_parser("losses", help="list every loss, its parameters, defaults and needs")
    losses.add_argument(
        "name", nargs="?", help="show this loss in full: formula, parameters, defaults, paper"
    )
    losses.add_argument("--width", type=int, default=None, help="output width (default: terminal)")
    losses.set_defaults(func=cmd_losses)

    tiny = sub.add_parser(
        "tiny-model", help="build the offline tiny Llama + BPE tokenizer with a chat template"
    )
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--vocab-size", type=int, default=1024)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)

    demo = sub.add_parser(
        "demo", help="build the tiny model and the synthetic task, train DPO, print a summary"
    )
    demo.add_argument(
        "--out",
        default="runs",
        help="where everything goes (default: runs, where the tiny recipes read their inputs)",
    )
    demo.add_argument(
        "--max-steps", type=int, default=None, help="cap the SFT and DPO runs (default: the recipes')"
    )
    demo.add_argument(
        "--eval-prompts", type=int, default=100, help="held-out prompts for the gold evaluation"
    )
    demo.set_defaults(func=cmd_demo)

    from prefopt.evaluate_cli import add_evaluate_parser

    add_evaluate_parser(sub, cmd_evaluate)

    try:
        from prefopt.diagnostics.cli import add_diagnose_parser
    except ImportError:  # diagnostics are optional at import time of the CLI
        add_diagnose_parser = None
    if add_diagnose_parser is not None:
        add_diagnose_parser(sub, cmd_diagnose)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _destroy_process_group()


def _quiet_libraries() -> None:
    """Weight-loading and shard-writing bars from transformers drown the training log."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass


def _destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
