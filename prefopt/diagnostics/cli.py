"""``prefopt diagnose``: implicit-reward diagnostics of a trained policy, or plots of a run's metrics.

Two forms::

    prefopt diagnose --policy P [--reference R] --data D [--data D2 ...] --out DIR [options]
    prefopt diagnose --run OUTPUT_DIR [--out DIR]          # default DIR: OUTPUT_DIR/diagnostics

When ``--policy`` is a prefopt run directory (``config.yaml`` + ``final/``) or its ``final/``, unset options come
from the run's ``config.yaml``: the loss and its parameters, whose ``implicit_reward()`` scores the pairs (DPO family
``beta * (logp - logp_ref)``; SimPO-trained policies ``beta * avg logp``, no reference),
the reference (``reference.name_or_path``, else the starting model), ``data.max_length`` /
``data.max_prompt_length`` / ``data.chat_template``, ``model.dtype`` and ``generation.max_new_tokens``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from prefopt.errors import UserInputError

DEFAULTS = {"max_length": 512, "max_prompt_length": 256, "dtype": "auto", "max_new_tokens": 128}
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz", ".ndjson", ".arrow")


def add_diagnose_parser(subparsers, func) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "diagnose",
        help="implicit-reward diagnostics of a policy (or plots of a run's metrics.jsonl)",
        description=(
            "Accuracy, margins, calibration (ECE), length effects, token-level rewards, KL from samples and "
            "agreement with an explicit reward, for a policy against its reference on preference pairs. Writes "
            "DIR/diagnostics.json, DIR/report.html (self-contained) and PNG plots. With --run OUTPUT_DIR: plots "
            "of a training run's metrics.jsonl instead."
        ),
    )
    parser.add_argument(
        "--run",
        metavar="OUTPUT_DIR",
        help="plot a training run's metrics.jsonl (other model "
        "options are ignored); default --out OUTPUT_DIR/diagnostics",
    )
    parser.add_argument(
        "--policy", help="trained model dir, PEFT adapter dir, or a prefopt run dir / its final/"
    )
    parser.add_argument(
        "--reference",
        help="reference model (default: from the run's config.yaml; for a PEFT "
        "adapter without a run: its base model)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="D",
        help="preference pairs (jsonl/json/csv/parquet/saved dataset); repeat for several",
    )
    parser.add_argument("--out", help="output directory (written atomically)")
    parser.add_argument(
        "--beta", type=float, help="implicit-reward beta (default: the run's, else the loss's default)"
    )
    parser.add_argument(
        "--loss",
        metavar="NAME",
        help="whose implicit reward to use: any loss of `prefopt losses` that has one, e.g. dpo = "
        "beta*(logp - logp_ref), simpo = beta*logp/|y| (default: the run's loss, else the default "
        "loss of a recipe)",
    )
    reward = parser.add_mutually_exclusive_group()
    reward.add_argument(
        "--reward-model", metavar="RM", help="sequence-classifier reward model to compare against"
    )
    reward.add_argument(
        "--reward-function", metavar="MODULE:FN", help="python reward function to compare against"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="samples per prompt for KL / length / "
        "EOS rate / explicit reward of the policy's own completions (default 0: off)",
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=64,
        help="prompts to sample from, per dataset (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="sample length cap (default: the run's, else 128)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (default: %(default)s; the KL estimates assume 1.0: samples from "
        "the policy itself)",
    )
    parser.add_argument("--max-pairs", type=int, help="use the first N pairs of each dataset")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="pairs per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length", type=int, help="prompt+completion token cap (default: the run's, else 512)"
    )
    parser.add_argument(
        "--max-prompt-length", type=int, help="prompt token cap (default: the run's, else 256)"
    )
    parser.add_argument(
        "--token-examples",
        type=int,
        default=6,
        metavar="K",
        help="pairs shown token by token: largest-margin correct, largest-margin wrong, typical "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--top-disagreements",
        type=int,
        default=10,
        help="pairs listed where implicit and explicit reward disagree most (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        help="data format: auto, pairs, conversational, hh, rated (default: %(default)s)",
    )
    parser.add_argument("--chat-template", help="chat template (string or file) for conversational data")
    parser.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="invalid data rows (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype (default: the run's, else auto: bf16 on a capable GPU, fp32 on CPU)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=func)
    return parser


def run_diagnose(args: argparse.Namespace) -> int:
    if args.run:
        from prefopt.diagnostics.run_plots import run_report

        out = Path(args.out) if args.out else Path(args.run) / "diagnostics"
        path = run_report(Path(args.run), out)
        print(f"run report written to {path}")
        return 0
    settings = resolve_settings(args)
    from prefopt.diagnostics.pipeline import diagnose
    from prefopt.errors import DataError

    try:
        result = diagnose(settings)
    except DataError as error:  # the data layer names the trainer's keys; here the user typed flags
        raise DataError(with_diagnose_flags(str(error))) from None
    print(f"diagnostics written to {result}")
    return 0


# The trainer's data keys that diagnose exposes as its own flags (its hints must name what the user can type).
_DATA_FLAGS = {
    "data.on_invalid=skip": "--on-invalid skip",
    "data.max_prompt_length": "--max-prompt-length",
    "data.max_length": "--max-length",
    "data.chat_template": "--chat-template",
    "data.format": "--format",
    "data.max_samples": "--max-pairs",
}


def with_diagnose_flags(message: str) -> str:
    for key, flag in _DATA_FLAGS.items():
        message = message.replace(key, flag)
    return message


# ------------------------------------------------------------------------------------------------- settings


def _check_positive(args: argparse.Namespace) -> None:
    for name in (
        "batch_size",
        "max_pairs",
        "max_prompts",
        "max_new_tokens",
        "max_length",
        "max_prompt_length",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("samples", "token_examples", "top_disagreements"):
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.beta is not None and args.beta <= 0:
        raise UserInputError(f"--beta must be > 0, got {args.beta}")
    if args.temperature <= 0:
        raise UserInputError(f"--temperature must be > 0 for sampling, got {args.temperature}")


def _looks_local(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.lower().endswith(_DATA_SUFFIXES)
        or "\\" in name
    )


def find_run(policy: Path) -> tuple[Path, Optional[Path]]:
    """(model directory, run directory or None) for a ``--policy`` argument."""
    if (
        (policy / "config.yaml").is_file()
        and not (policy / "config.json").is_file()
        and not (policy / "adapter_config.json").is_file()
    ):
        final = policy / "final"
        if not final.is_dir():
            raise UserInputError(
                f"--policy: '{policy}' is a prefopt run directory without a final/ model (training "
                "did not finish); pass a model directory"
            )
        return final, policy
    parent = policy.resolve().parent
    if (parent / "config.yaml").is_file() and (policy.name == "final" or (parent / "metrics.jsonl").exists()):
        return policy, parent
    return policy, None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserInputError(f"{path}: cannot read the run's config: {error}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: not a prefopt config (expected a mapping)")
    return data


def _implicit_reward(name: str, params: dict[str, Any], where: str):
    """The loss ``name``'s implicit reward with ``params``; a loss without one, or a bad name, is a user error."""
    from prefopt.losses import available_losses, get_loss

    try:
        loss = get_loss(name, **params)
    except ValueError as error:
        raise UserInputError(f"{where}: {error}") from None
    reward = loss.implicit_reward()
    if reward is None:
        having = [n for n in available_losses() if get_loss(n).implicit_reward() is not None]
        raise UserInputError(
            f"{where}: loss '{name}' has no implicit reward; choose one of {', '.join(having)}"
        )
    return reward


def _run_loss_reward(run_loss: dict[str, Any], run_dir: Optional[Path], notes: list[str]):
    """(name, implicit reward) the run's ``loss`` section trained with, or None with a note when it has none."""
    from prefopt.losses import get_loss

    name = run_loss.get("name")
    params = {k: v for k, v in run_loss.items() if k != "name"}
    try:
        reward = get_loss(name, **params).implicit_reward()
    except (
        ValueError,
        TypeError,
    ) as error:  # a config from another prefopt version: say so, use the default form
        notes.append(
            f"{run_dir}/config.yaml: loss section not understood ({error}); using the default loss's "
            "implicit reward"
        )
        return None
    if reward is None:
        notes.append(
            f"the run trained with loss '{name}', which has no implicit reward; diagnostics use the "
            "default loss's form"
        )
        return None
    return name, reward


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting of a diagnose run, with where each model/loss setting came from (``sources``)."""
    _check_positive(args)
    if not args.policy:
        raise UserInputError("diagnose: --policy is required (or use --run OUTPUT_DIR to plot a run)")
    if not args.data:
        raise UserInputError("diagnose: at least one --data file of preference pairs is required")
    if not args.out:
        raise UserInputError("diagnose: --out DIR is required")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out: '{out}' exists and is not a directory")
    policy = Path(args.policy).expanduser()
    if not policy.exists() and _looks_local(args.policy):
        raise UserInputError(f"--policy: '{args.policy}' does not exist")
    model_dir, run_dir = find_run(policy) if policy.exists() else (policy, None)  # else a hub id
    run = read_run_config(run_dir) if run_dir is not None else {}
    sources: dict[str, str] = {}
    notes: list[str] = []

    def pick(name: str, cli_value, run_value, default):
        if cli_value is not None:
            sources[name] = "command line"
            return cli_value
        if run_value is not None:
            sources[name] = f"{run_dir}/config.yaml"
            return run_value
        sources[name] = "default"
        return default

    import dataclasses

    from prefopt.losses import DEFAULT_LOSS

    run_section = run.get("loss") or {}
    run_loss = run_section.get("name")
    trained = _run_loss_reward(run_section, run_dir, notes) if run_loss is not None else None
    loss = pick("loss", args.loss, trained[0] if trained else None, DEFAULT_LOSS)
    if trained is not None and loss == trained[0]:
        reward = trained[1]
    else:
        reward = _implicit_reward(loss, {}, "--loss" if args.loss else "diagnose")
    beta = float(
        pick(
            "beta",
            args.beta,
            reward.scale if trained is not None and loss == trained[0] else None,
            reward.scale,
        )
    )
    reward = dataclasses.replace(reward, scale=beta)
    if trained is not None and run_section.get("divergence", "reverse_kl") != "reverse_kl":
        notes.append(
            "the run used a non-reverse-KL f-divergence; beta*log-ratio is its logged reward, not the "
            "quantity its loss compares"
        )

    from prefopt.diagnostics.compute import adapter_base

    base = adapter_base(str(model_dir))
    run_reference = None
    if run and (reward.uses_reference or args.samples):
        # the run's reference, else the model it started from (also a LoRA adapter's base); SimPO runs only need
        # it for the KL of samples
        run_reference = (run.get("reference") or {}).get("name_or_path") or (run.get("model") or {}).get(
            "name_or_path"
        )
    reference = pick("reference", args.reference, run_reference, base)
    if not reward.uses_reference and not args.samples:
        if args.reference:
            notes.append(
                f"--reference is not used: {loss} rewards need no reference (it is used for the KL of "
                "--samples)"
            )
        reference = None
    if reward.uses_reference and reference is None:
        raise UserInputError(
            f"diagnose: --reference is required for {loss}'s implicit reward "
            f"{reward.formula()} (or pass a prefopt run directory whose config.yaml names it, "
            "or use --loss with a reference-free loss)"
        )
    if reference is not None and _looks_local(reference) and not Path(reference).expanduser().exists():
        where = "--reference" if sources["reference"] == "command line" else sources["reference"]
        if reward.uses_reference or where == "--reference":
            raise UserInputError(f"{where}: reference model '{reference}' does not exist")
        notes.append(f"the run's reference '{reference}' does not exist here: no KL estimate for the samples")
        reference = None
    data_cfg = run.get("data") or {}
    settings = {
        "policy": str(model_dir),
        "run_dir": str(run_dir) if run_dir else None,
        "policy_is_adapter": base is not None,
        "adapter_base": base,
        "reference": reference,
        "loss": loss,
        "beta": beta,
        "reward": reward,
        "implicit_reward": reward.formula(f"{beta:g}"),
        "trained_loss": run_loss,
        "data": _check_data(args.data),
        "out": str(out),
        "max_length": pick("max_length", args.max_length, data_cfg.get("max_length"), DEFAULTS["max_length"]),
        "max_prompt_length": pick(
            "max_prompt_length",
            args.max_prompt_length,
            data_cfg.get("max_prompt_length"),
            DEFAULTS["max_prompt_length"],
        ),
        "chat_template": pick("chat_template", args.chat_template, data_cfg.get("chat_template"), None),
        "dtype": pick("dtype", args.dtype, (run.get("model") or {}).get("dtype"), DEFAULTS["dtype"]),
        "max_new_tokens": pick(
            "max_new_tokens",
            args.max_new_tokens,
            (run.get("generation") or {}).get("max_new_tokens"),
            DEFAULTS["max_new_tokens"],
        ),
        "format": args.format,
        "on_invalid": args.on_invalid,
        "max_pairs": args.max_pairs,
        "batch_size": args.batch_size,
        "token_examples": args.token_examples,
        "top_disagreements": args.top_disagreements,
        "samples": args.samples,
        "max_prompts": args.max_prompts,
        "temperature": args.temperature,
        "seed": args.seed,
        "device": args.device or _default_device(),
        "reward_model": args.reward_model,
        "reward_function": args.reward_function,
        "progress": not args.no_progress,
        "sources": sources,
        "notes": notes,
    }
    if (
        args.reward_model
        and _looks_local(args.reward_model)
        and not Path(args.reward_model).expanduser().exists()
    ):
        raise UserInputError(f"--reward-model: '{args.reward_model}' does not exist")
    if settings["max_prompt_length"] >= settings["max_length"]:
        raise UserInputError(
            f"--max-prompt-length ({settings['max_prompt_length']}) must be below --max-length "
            f"({settings['max_length']})"
        )
    if args.temperature != 1.0 and args.samples:
        notes.append(
            f"samples drawn at temperature {args.temperature}: the KL estimates are for the tempered "
            "sampling distribution's samples scored by the untempered policy, not KL(policy || reference)"
        )
    return settings


def _check_data(paths: list[str]) -> list[dict[str, str]]:
    """``[{"name", "path"}]`` with unique names (file stems); missing local paths are user errors."""
    entries, used = [], set()
    for path in paths:
        local = Path(path).expanduser()
        if not local.exists() and _looks_local(path):
            raise UserInputError(f"--data: '{path}' does not exist")
        name = local.name
        for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".csv", ".parquet"):
            name = name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"
        unique, number = name, 2
        while unique in used:
            unique, number = f"{name}_{number}", number + 1
        used.add(unique)
        entries.append({"name": unique, "path": path})
    return entries


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
