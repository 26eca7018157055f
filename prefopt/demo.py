"""``prefopt demo``: the whole pipeline on the embedded offline default, in a few minutes on a laptop CPU.

1. the synthetic gold-reward task (``data_tools synth gold-task``), 2. the tiny Llama + BPE tokenizer,
3. SFT warm-up (``recipes/tiny/sft.yaml``), 4. DPO (``recipes/tiny/dpo.yaml``), 5. the gold reward of SFT and DPO
samples on held-out prompts. Then a summary: where everything is, final loss, reward accuracy, margin.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)


def run_demo(out: Path, steps: Optional[int] = None, eval_prompts: int = 100) -> int:
    from data_tools.synth import score, write_task
    from prefopt.recipes import find_recipe
    from prefopt.config import load_config
    from prefopt.evaluate import sample_policy, win_rate
    from prefopt.models.tiny import build_tiny_model
    from prefopt.trainer import train

    console = Console()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    task, model_dir = out / "gold-task", out / "tiny-model"
    console.rule("[bold]prefopt demo")
    console.print(f"1/5 synthetic gold-reward task -> {task}")
    write_task(task, seed=0)
    console.print(f"2/5 tiny Llama + BPE tokenizer -> {model_dir}")
    build_tiny_model(model_dir)
    common = ["overwrite_output_dir=true"] + ([f"train.max_steps={steps}"] if steps else [])
    console.print("3/5 SFT warm-up (recipes/tiny/sft.yaml)")
    train(load_config(find_recipe("recipes/tiny/sft.yaml"), [
        f"model.name_or_path={model_dir}", f"data.train={task / 'sft.jsonl'}", f"output_dir={out / 'sft'}", *common]))
    console.print("4/5 DPO (recipes/tiny/dpo.yaml)")
    dpo = train(load_config(find_recipe("recipes/tiny/dpo.yaml"), [
        f"model.name_or_path={out / 'sft' / 'final'}", f"data.train={task / 'pairs_train.jsonl'}",
        f"data.eval={task / 'pairs_eval.jsonl'}", f"output_dir={out / 'dpo'}", *common]))
    console.print(f"5/5 gold reward of samples on {eval_prompts} held-out prompts (2 per prompt)")
    heldout = str(task / "prompts_heldout.jsonl")
    sft_samples = sample_policy(out / "sft" / "final", heldout, score, max_prompts=eval_prompts)
    dpo_samples = sample_policy(out / "dpo" / "final", heldout, score, max_prompts=eval_prompts,
                                reference=out / "sft" / "final")

    metrics = {**dpo.last_metrics, **dpo.eval_metrics}
    table = Table(title="DPO on the synthetic gold task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies",
                "eval/rewards/margins"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("gold reward: SFT -> DPO", f"{sft_samples.mean_reward:+.3f} -> {dpo_samples.mean_reward:+.3f}")
    table.add_row("win rate of DPO vs SFT (gold)", f"{win_rate(dpo_samples, sft_samples):.3f}")
    table.add_row("KL(DPO || SFT) per sample", f"{dpo_samples.kl:.3f}")
    table.add_row("mean length: SFT -> DPO", f"{sft_samples.mean_length:.1f} -> {dpo_samples.mean_length:.1f}")
    console.print(table)
    console.print(f"outputs: {out}/  (tiny-model/, gold-task/, sft/, dpo/ with config.yaml, metrics.jsonl, final/)")
    console.print(f"next: prefopt diagnose --policy {out}/dpo/final --reference {out}/sft/final "
                  f"--data {task}/pairs_eval.jsonl --out {out}/dpo/diagnostics")
    console.print(f"finished in {time.perf_counter() - start:.0f} s")
    return 0
