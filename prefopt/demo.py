"""``prefopt demo``: the whole pipeline on the embedded offline default, in a few minutes on a laptop CPU.

1. the synthetic gold-reward task (``data_tools synth gold-task``), 2. the tiny Llama + BPE tokenizer,
3. SFT warm-up (``recipes/tiny/sft.yaml``), 4. DPO (``recipes/tiny/dpo.yaml``), 5. the gold reward of SFT and DPO
samples on held-out prompts. Then a summary: where everything is, final loss, reward accuracy, margin, and the
next commands, which work as printed. The default ``--out runs`` is where the tiny recipes read their inputs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)


def run_demo(out: Path, steps: Optional[int] = None, eval_prompts: int = 100) -> int:
    from data_tools.synth import score, write_task
    from prefopt.config import load_config
    from prefopt.evaluate import sample_policy, win_rate
    from prefopt.models.tiny import build_tiny_model
    from prefopt.recipes import find_recipe
    from prefopt.trainer import train

    console = Console()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # The same layout the tiny recipes read (runs/tiny-model, runs/gold-task, runs/tiny-sft, runs/tiny-dpo), so
    # with the default --out every recipe runs as it is once the demo has finished.
    task, model_dir, sft_dir, dpo_dir = (
        out / name for name in ("gold-task", "tiny-model", "tiny-sft", "tiny-dpo")
    )
    console.rule("[bold]prefopt demo")
    console.print(f"1/5 synthetic gold-reward task -> {task}")
    write_task(task, seed=0)
    console.print(f"2/5 tiny Llama + BPE tokenizer -> {model_dir}")
    build_tiny_model(model_dir)
    # With --max-steps the DPO run still leaves a checkpoint, so `train.resume_from=latest` has one to resume.
    capped = [f"train.max_steps={steps}", f"train.save_steps={steps}"] if steps else []
    common = ["overwrite_output_dir=true", *capped]
    console.print(f"3/5 SFT warm-up (recipes/tiny/sft.yaml) -> {sft_dir}")
    train(
        load_config(
            find_recipe("recipes/tiny/sft.yaml"),
            [
                f"model.name_or_path={model_dir}",
                f"data.train={task / 'sft.jsonl'}",
                f"output_dir={sft_dir}",
                *common,
            ],
        )
    )
    console.print(f"4/5 DPO (recipes/tiny/dpo.yaml) -> {dpo_dir}")
    dpo = train(
        load_config(
            find_recipe("recipes/tiny/dpo.yaml"),
            [
                f"model.name_or_path={sft_dir / 'final'}",
                f"data.train={task / 'pairs_train.jsonl'}",
                f"data.eval={task / 'pairs_eval.jsonl'}",
                f"output_dir={dpo_dir}",
                *common,
            ],
        )
    )
    console.print(f"5/5 gold reward of samples on {eval_prompts} held-out prompts (2 per prompt)")
    heldout = str(task / "prompts_heldout.jsonl")
    sft_samples = sample_policy(sft_dir / "final", heldout, score, max_prompts=eval_prompts)
    dpo_samples = sample_policy(
        dpo_dir / "final", heldout, score, max_prompts=eval_prompts, reference=sft_dir / "final"
    )

    metrics = {**dpo.last_metrics, **dpo.eval_metrics}
    table = Table(title="DPO on the synthetic gold task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "eval/loss",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
    ):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row(
        "gold reward: SFT -> DPO", f"{sft_samples.mean_reward:+.3f} -> {dpo_samples.mean_reward:+.3f}"
    )
    table.add_row("win rate of DPO vs SFT (gold)", f"{win_rate(dpo_samples, sft_samples):.3f}")
    table.add_row("KL(DPO || SFT) per sample", f"{dpo_samples.kl:.3f}")
    table.add_row(
        "mean length: SFT -> DPO", f"{sft_samples.mean_length:.1f} -> {dpo_samples.mean_length:.1f}"
    )
    console.print(table)
    console.print(
        f"outputs: {out}/  (tiny-model/, gold-task/, tiny-sft/ and tiny-dpo/ with config.yaml, "
        "metrics.jsonl, final/)"
    )
    console.print("next, from this directory:")
    for command in next_commands(out, steps):
        console.print(f"  {command}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"finished in {time.perf_counter() - start:.0f} s")
    return 0


def next_commands(out: Path, steps: Optional[int] = None) -> list[str]:
    """The commands to run after the demo, exactly as they work from the directory the demo ran in.

    With the default ``--out runs`` they are the README's tour; elsewhere they carry the overrides that point
    the tiny recipes at the demo's outputs, and with ``--max-steps`` the same step cap.
    """
    commands = []
    activate = _activate_command()
    if activate:
        commands.append(activate)
    paths: list[str] = []
    if out != Path("runs"):
        paths = [
            f"model.name_or_path={out}/tiny-sft/final",
            f"data.train={out}/gold-task/pairs_train.jsonl",
            f"data.eval={out}/gold-task/pairs_eval.jsonl",
        ]
    cap = [f"train.max_steps={steps}"] if steps else []
    train = ["prefopt", "train"]
    commands += [
        "prefopt losses",
        _join(
            *train,
            "recipes/tiny/simpo.yaml",
            *paths,
            *cap,
            *([f"output_dir={out}/tiny-simpo"] if paths else []),
        ),
        _join(
            *train,
            "recipes/tiny/dpo.yaml",
            *paths,
            *cap,
            *([f"output_dir={out}/tiny-dpo"] if paths else []),
            "train.resume_from=latest",
        ),
        _join(
            "prefopt",
            "diagnose",
            "--policy",
            f"{out}/tiny-dpo/final",
            "--reference",
            f"{out}/tiny-sft/final",
            "--data",
            f"{out}/gold-task/pairs_eval.jsonl",
            "--out",
            f"{out}/tiny-dpo/diagnostics",
        ),
    ]
    return commands


def _join(*words: str) -> str:
    """A shell command line: each word quoted when it needs to be (a path with spaces)."""
    return " ".join(shlex.quote(word) for word in words)


def _activate_command() -> Optional[str]:
    """``source .../bin/activate`` when the demo's environment is not the active one (``make demo``)."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.is_file() or os.environ.get("VIRTUAL_ENV") == sys.prefix:
        return None
    try:
        shown = activate.relative_to(Path.cwd())
    except ValueError:
        shown = activate
    return _join("source", str(shown))
