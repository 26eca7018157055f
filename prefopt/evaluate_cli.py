"""``prefopt evaluate``: sample a trained policy on prompts, score the samples, and (for SRPO) let it revise.

    prefopt evaluate runs/tiny-dpo/final runs/gold-task/prompts_heldout.jsonl \\
        --reward data_tools.synth:score --reference runs/tiny-sft/final --samples 4 --out samples.jsonl
    prefopt evaluate runs/tiny-srpo/final runs/gold-task/prompts_heldout.jsonl \\
        --reward data_tools.synth:score --revisions 2

Prints one row per round (round 0 = the policy's own answers; round n = its n-th revision of them, SRPO's
inference, Choi et al. 2024 "Self-Improving Robust Preference Optimization"): mean reward, mean length, EOS rate
and, for round 0 with ``--reference``, KL(policy || reference) estimated on the policy's samples as the mean of
``log pi(y|x) - log ref(y|x)``. With ``--out`` every sample is written as one JSON line (the file appears only
complete). The revision prompt is the one the model was trained with (``data.revision_template`` /
``data.revision_instruction`` in ``final/prefopt_config.yaml``), or the default template when that file is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

from prefopt.errors import ConfigError, UserInputError


def add_evaluate_parser(sub, handler) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="sample a model on prompts, score the samples with a reward function, KL to a reference",
        description=__doc__.split("\n\n")[0],
    )
    evaluate.add_argument("policy", help="model directory (e.g. a run's final/)")
    evaluate.add_argument("prompts", help="prompt file (jsonl/json/csv/parquet; prompt rows as for training)")
    evaluate.add_argument(
        "--reward", default=None, metavar="MODULE:FUNCTION", help="reward(prompt, completion) -> float"
    )
    evaluate.add_argument("--reference", default=None, help="model directory to measure KL against")
    evaluate.add_argument("--samples", type=_positive_int, default=4, help="samples per prompt (default 4)")
    evaluate.add_argument("--max-prompts", type=_positive_int, default=None, help="first N prompts only")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=48)
    evaluate.add_argument("--temperature", type=_non_negative_float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--revisions",
        type=_non_negative_int,
        default=0,
        help="let the policy revise its answer this many times (SRPO's inference; default 0)",
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    evaluate.add_argument("--out", default=None, help="write every sample as JSON lines here")
    evaluate.set_defaults(func=handler)


def run_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prefopt.evaluate import sample_policy, sample_with_revisions
    from prefopt.models.reward import import_callable

    policy = _model_dir(args.policy, "policy")
    reference = _model_dir(args.reference, "--reference") if args.reference else None
    if not Path(args.prompts).is_file():
        raise UserInputError(f"prompts: no such file '{args.prompts}'")
    if args.out and Path(args.out).is_dir():
        raise UserInputError(f"--out: '{args.out}' is a directory; give a file name such as samples.jsonl")
    reward_fn = import_callable(args.reward, key="--reward") if args.reward else _no_reward
    common = dict(
        samples_per_prompt=args.samples,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    # KL is measured on the policy's own answers (round 0), as the gold benchmark does.
    if args.revisions:
        rounds = sample_with_revisions(
            policy,
            args.prompts,
            reward_fn,
            revisions=args.revisions,
            template=_training_revision_template(policy),
            reference=reference,
            **common,
        )
    else:
        rounds = [sample_policy(policy, args.prompts, reward_fn, reference=reference, **common)]

    table = Table(title=f"{policy} on {args.prompts}")
    for column in ("round", "samples", "mean reward", "mean length", "EOS rate", "KL to reference"):
        table.add_column(column, justify="right")
    for number, samples in enumerate(rounds):
        summary = samples.summary()
        table.add_row(
            str(number),
            str(summary["samples"]),
            _fmt(summary["mean_reward"] if args.reward else None),
            f"{summary['mean_length']:.1f}",
            f"{summary['eos_rate']:.2f}",
            _fmt(summary["kl"]),
        )
    Console().print(table)
    if args.out:
        _write_samples(Path(args.out), rounds, scored=bool(args.reward))
        print(f"samples written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------ helpers


def _no_reward(prompt: str, completion: str) -> float:
    return math.nan


def _model_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UserInputError(f"{what}: '{path}' is not a model directory (no config.json)")
    return directory


def _training_revision_template(policy: Path):
    """The revision template the model was trained with, read from the copy of its recipe in ``final/``."""
    from prefopt.data.revision import RevisionTemplate
    from prefopt.trainer.model_card import CONFIG_NAME

    config_file = policy / CONFIG_NAME
    if not config_file.is_file():
        return RevisionTemplate()
    from prefopt.config import load_config

    try:
        data = load_config(str(config_file)).data
    except UserInputError as error:
        raise ConfigError(f"{config_file}: cannot read the training config ({error})") from None
    return RevisionTemplate.from_config(data)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _write_samples(path: Path, rounds, *, scored: bool) -> None:
    """All rows to a temporary file in the target folder, then one rename: no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            for number, samples in enumerate(rounds):
                for j in range(len(samples.completions)):
                    row = {
                        "round": number,
                        "prompt_index": samples.prompt_index[j],
                        "prompt": samples.prompts[j],
                        "completion": samples.completions[j],
                        "reward": samples.rewards[j] if scored else None,
                        "length": samples.lengths[j],
                        "finished": samples.finished[j],
                    }
                    if samples.kl_per_sample:
                        row["kl"] = samples.kl_per_sample[j]
                    out.write(json.dumps(row) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
