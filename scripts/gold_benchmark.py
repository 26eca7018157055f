#!/usr/bin/env python
"""Gold-reward benchmark of prefopt's preference-optimisation methods on the synthetic task (issue 9).

Per seed S (the seed builds the task, the tiny model, SFT and every run, so the spread over seeds is honest: it
includes data, initialisation, training and sampling noise):

1. ``data_tools.synth.write_task(OUT/seed-S/task, seed=S)`` and ``build_tiny_model(..., seed=S)``;
2. SFT with ``recipes/tiny/sft.yaml`` (once per seed: every method of that seed starts from it);
3. one run per method from that SFT model with its tiny recipe (RTO's stage 1 is that seed's DPO run);
4. evaluation on the task's held-out prompts (never seen in training): ``--samples`` samples per prompt at
   temperature 1 for ``--max-prompts`` prompts, scored by the gold reward ``data_tools.synth.score``:
   mean gold reward, win rate against the SFT model's samples (same prompt, same sample slot; ties count half),
   KL(policy || SFT) = mean over the policy's own samples of log pi(y) - log pi_sft(y), mean completion length,
   EOS rate, and the implicit-reward accuracy on the held-out preference pairs (``pairs_eval.jsonl``):
   ``implicit_acc`` uses the method's own implicit reward, as its loss declares it (``implicit_reward()``: SimPO
   beta * mean token log-prob, reference-free; the DPO family beta * log pi/pi_sft), ``ratio_acc`` is the
   DPO-style log-ratio reward for every method.

The SFT baseline's uncertainty: ``sft_boot_std`` = bootstrap std (over held-out prompts, 1000 resamples) of the SFT
mean gold reward, per seed; the bar uses the larger of its mean over seeds and the std over seeds of the SFT means.

Resumable: a run whose ``final/`` and ``result.json`` exist is skipped; a run with ``final/`` but no result is only
evaluated. Results: ``OUT/results.json``, ``OUT/results.md`` and the reward-KL plot (``--plot``).

    python scripts/gold_benchmark.py --quick                 # one seed
    python scripts/gold_benchmark.py --seeds 0,1,2            # full
    python scripts/gold_benchmark.py --methods dpo,simpo --seeds 0 --out runs/gold-bench-try
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

RECIPES = REPO / "recipes" / "tiny"
# method -> (recipe, extra overrides, kind of data it trains on, the entry whose final model is its ppo.dpo_policy)
METHODS = {
    "dpo": ("dpo.yaml", [], "pairs", None),
    "simpo": ("simpo.yaml", [], "pairs", None),
    "fdpo_js": ("fdpo_js.yaml", [], "pairs", None),
    "fdpo_alpha": ("fdpo_alpha.yaml", [], "pairs", None),
    "fdpo_forward_kl": ("fdpo_forward_kl.yaml", [], "pairs", None),
    "rpo": ("rpo.yaml", [], "pairs", None),
    "hypo": ("hypo.yaml", [], "pairs", None),
    "xpo": ("xpo.yaml", [], "prompts", None),
    "rto": ("rto.yaml", [], "prompts", "dpo"),  # RTO's stage 1 is the seed's DPO run
    "copg": ("copg.yaml", [], "pairs", None),  # pairs_train.jsonl carries each completion's gold score
    "tpo": ("tpo.yaml", [], "rated", None),  # triples: best / second / worst of 3 rated completions
    "srpo": ("srpo.yaml", [], "pairs", None),  # evaluated on its first answer (no revision round)
    "dno": ("dno.yaml", [], "iterations", None),  # 3 iterations on thirds of prompts_train.jsonl
    # PPO with resets to prefixes of the SFT data's completions
    "drpo": ("drpo.yaml", [], "completions", None),
}
# The TRL catalogue (issue 16), each with its tiny recipe; opt-in with --methods (16 more runs per seed).
CATALOGUE = (
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "orpo",
    "cpo",
    "mix",
)
DEFAULT_METHODS = list(METHODS)
METHODS.update({name: (f"{name}.yaml", [], "pairs", None) for name in CATALOGUE})
# Issue 16's modifiers, opt-in too: LD-DPO and WPO as DPO recipes with the option on, TR-DPO as DPO's recipe with a
# reference synced every 16 steps (about 3 syncs in the tiny DPO run) at TRL's default mix.
MODIFIERS = {
    "ld_dpo": ("ld_dpo.yaml", [], "pairs", None),
    "wpo": ("wpo.yaml", [], "pairs", None),
    "tr_dpo": ("dpo.yaml", ["reference.sync_steps=16", "reference.sync_mix=0.6"], "pairs", None),
}
METHODS.update(MODIFIERS)
# Pure SimPO (issue 16), opt-in: the SimPO recipe without its SFT term, at the pure setting of the README's "SimPO
# without its SFT term" sweep that keeps EOS best among those reaching DPO's eval accuracy (the paper's large beta,
# no margin, 3x the recipe's learning rate: accuracy 0.72, EOS 0.95 on seed 0). `simpo` against `simpo_pure` is
# SimPO with and without the SFT term.
SIMPO_PURE = ["loss.sft_weight=0", "loss.beta=10", "loss.gamma_beta_ratio=0", "train.learning_rate=1.5e-4"]
METHODS["simpo_pure"] = ("simpo.yaml", SIMPO_PURE, "pairs", None)
# KTO trains on unpaired rows: the task's pairs, each split into a desirable and an undesirable completion by
# `python -m data_tools convert ... --unpaired` (files written next to the task's, once per seed).
METHODS["kto"] = ("kto.yaml", [], "unpaired", None)
BOOTSTRAP = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed (the first of --seeds)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated; default: {','.join(DEFAULT_METHODS)}; all: {','.join(METHODS)}",
    )
    p.add_argument("--out", default="runs/gold-bench")
    p.add_argument("--max-prompts", type=int, default=100, help="held-out prompts evaluated (task has 200)")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--plot", default="docs/gold_frontier.png")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild the table and plot from the finished runs under --out",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra override for every method run, e.g. train.learning_rate=5e-5 (changes the result "
        "directory only if you change --out)",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Pipeline pieces
# ---------------------------------------------------------------------------------------------------------------


def _train(recipe: Path, overrides: list[str]):
    from prefopt.config import load_config
    from prefopt.trainer import train

    return train(load_config(str(recipe), overrides))


def _dump(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def prepare_seed(seed_dir: Path, seed: int) -> Path:
    """Task + tiny model + SFT for one seed; returns the SFT model directory."""
    from data_tools.synth import write_task
    from prefopt.models.tiny import build_tiny_model

    task, model, sft = seed_dir / "task", seed_dir / "tiny-model", seed_dir / "sft"
    if not (
        task / "rated_train.jsonl"
    ).exists():  # deterministic: rewriting leaves the older files byte-identical
        write_task(task, seed=seed)
    if not (model / "config.json").exists():
        build_tiny_model(model, seed=seed)
    if not (sft / "final").exists():
        _train(
            RECIPES / "sft.yaml",
            [
                f"model.name_or_path={model}",
                f"data.train={task / 'sft.jsonl'}",
                f"output_dir={sft}",
                "overwrite_output_dir=true",
                "logging.progress=false",
                f"seed={seed}",
            ],
        )
    return sft / "final"


def method_overrides(method: str, seed_dir: Path, sft_final: Path, seed: int, extra: list[str]) -> list[str]:
    _, overrides, kind, stage1 = METHODS[method]
    task = seed_dir / "task"
    out = [
        f"model.name_or_path={sft_final}",
        f"output_dir={seed_dir / method}",
        "overwrite_output_dir=true",
        "logging.progress=false",
        f"seed={seed}",
        *overrides,
    ]
    if kind == "pairs":
        out += [f"data.train={task / 'pairs_train.jsonl'}", f"data.eval={task / 'pairs_eval.jsonl'}"]
    elif kind == "rated":
        out += [f"data.train={task / 'rated_train.jsonl'}", f"data.eval={task / 'rated_eval.jsonl'}"]
    elif kind == "unpaired":
        out += [f"data.train={unpaired_file(task, 'train')}", f"data.eval={unpaired_file(task, 'eval')}"]
    elif kind == "iterations":
        out += [f"iterations.prompts={task / 'prompts_train.jsonl'}"]
    elif kind == "completions":
        out += [f"data.train={task / 'sft.jsonl'}"]
    else:
        out += [f"data.train={task / 'prompts_train.jsonl'}"]
    if stage1 is not None:
        out.append(f"ppo.dpo_policy={seed_dir / stage1 / 'final'}")
    return out + list(extra)


def unpaired_file(task: Path, split: str) -> Path:
    """``task/unpaired_<split>.jsonl``: ``pairs_<split>.jsonl`` converted with ``data_tools convert --unpaired``."""
    out = task / f"unpaired_{split}.jsonl"
    if not out.exists():
        from data_tools.__main__ import main as data_tools

        status = data_tools(["convert", str(task / f"pairs_{split}.jsonl"), str(out), "--unpaired"])
        if status != 0:
            raise RuntimeError(
                f"converting {task / f'pairs_{split}.jsonl'} to unpaired rows failed ({status})"
            )
    return out


def sample(policy: Path, task: Path, args, seed: int, reference=None):
    from data_tools.synth import score
    from prefopt.evaluate import sample_policy

    return sample_policy(
        policy,
        str(task / "prompts_heldout.jsonl"),
        score,
        reference=reference,
        samples_per_prompt=args.samples,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        seed=1000 + seed,
    )


def bootstrap_std(rewards: list[float], prompt_index: list[int], rng_seed: int = 0) -> float:
    """Std of the mean reward under resampling of prompts (with all their samples)."""
    by_prompt: dict[int, list[float]] = {}
    for r, i in zip(rewards, prompt_index):
        by_prompt.setdefault(i, []).append(r)
    groups = list(by_prompt.values())
    rng = random.Random(rng_seed)
    means = []
    for _ in range(BOOTSTRAP):
        pick = [groups[rng.randrange(len(groups))] for _ in groups]
        total = sum(sum(g) for g in pick)
        means.append(total / sum(len(g) for g in pick))
    return statistics.pstdev(means)


def run_implicit_reward(run_dir: Path):
    """The implicit reward of the loss a run trained with (its config.yaml), or None when the loss has none."""
    from prefopt.config import load_config
    from prefopt.trainer.setup import loss_from_config

    return loss_from_config(load_config(run_dir / "config.yaml")).implicit_reward()


def pair_accuracy(policy: Path, reference: Path, pairs_path: Path, reward=None) -> dict[str, float]:
    """Implicit-reward accuracies on held-out pairs (strict >): log-ratio to the reference, mean token logp and,
    with ``reward`` (the trained loss's ``implicit_reward()``), the method's own implicit reward."""
    import torch

    from prefopt.config import DataConfig
    from prefopt.data import build_datasets
    from prefopt.data.collate import PairCollator
    from prefopt.evaluate import _load
    from prefopt.models.loading import load_tokenizer
    from prefopt.models.logps import completion_token_logps

    tokenizer = load_tokenizer(str(policy))
    bundle = build_datasets(
        DataConfig(train=str(pairs_path), shuffle=False, max_length=96, max_prompt_length=32),
        tokenizer,
        "pairs",
        seed=0,
    )
    rows = list(bundle.train)
    collate = PairCollator(tokenizer.pad_token_id)
    model, ref = _load(policy), _load(reference)
    ratio_hits = avg_hits = own_hits = n = 0
    margins = []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = collate(rows[start : start + 64])
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            pol = completion_token_logps(model, *args)
            refl = completion_token_logps(ref, *args)
            b = len(batch["index"])
            lr = pol.sums - refl.sums
            avg = pol.sums / pol.lengths.clamp(min=1)
            ratio_hits += int((lr[:b] > lr[b:]).sum())
            avg_hits += int((avg[:b] > avg[b:]).sum())
            if reward is not None:
                own = reward.sequence(pol.sums, refl.sums, pol.lengths)
                own_hits += int((own[:b] > own[b:]).sum())
            margins += (lr[:b] - lr[b:]).tolist()
            n += b
    out = {"ratio_acc": ratio_hits / n, "avg_acc": avg_hits / n, "ratio_margin": sum(margins) / n}
    if reward is not None:
        out["implicit_acc"] = own_hits / n
    return out


def evaluate_run(method: str, seed_dir: Path, sft_final: Path, args, seed: int, sft_eval: dict) -> dict:
    from prefopt.evaluate import PolicySamples, win_rate

    task = seed_dir / "task"
    policy = seed_dir / method / "final"
    samples = sample(policy, task, args, seed, reference=sft_final)
    base = PolicySamples(
        prompts=[],
        completions=[],
        prompt_index=sft_eval["prompt_index"],
        rewards=sft_eval["rewards"],
        lengths=[],
        finished=[],
    )
    acc = pair_accuracy(policy, sft_final, task / "pairs_eval.jsonl", run_implicit_reward(seed_dir / method))
    result = {
        "method": method,
        "seed": seed,
        **samples.summary(),
        "win_rate_vs_sft": win_rate(samples, base),
        "boot_std": bootstrap_std(samples.rewards, samples.prompt_index),
        "implicit_acc": None,  # the method's own implicit reward; None for a loss without one
        **acc,
        "examples": [
            {"prompt": p, "completion": c, "gold": r}
            for p, c, r in list(zip(samples.prompts, samples.completions, samples.rewards))[:6]
        ],
    }
    metrics_file = seed_dir / method / "train_metrics.json"
    if metrics_file.exists():
        result["train"] = json.loads(metrics_file.read_text())
    return result


def evaluate_sft(seed_dir: Path, sft_final: Path, args, seed: int) -> dict:
    path = seed_dir / "sft_eval.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("samples") == args.samples * args.max_prompts:
            return cached
    s = sample(sft_final, seed_dir / "task", args, seed)
    acc = pair_accuracy(sft_final, sft_final, seed_dir / "task" / "pairs_eval.jsonl")
    out = {
        "method": "sft",
        "seed": seed,
        **s.summary(),
        "kl": 0.0,
        "win_rate_vs_sft": 0.5,
        "boot_std": bootstrap_std(s.rewards, s.prompt_index),
        "implicit_acc": None,
        "avg_acc": acc["avg_acc"],
        "rewards": s.rewards,
        "prompt_index": s.prompt_index,
        "examples": [
            {"prompt": p, "completion": c, "gold": r}
            for p, c, r in list(zip(s.prompts, s.completions, s.rewards))[:6]
        ],
    }
    _dump(path, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, table, plot
# ---------------------------------------------------------------------------------------------------------------

COLUMNS = [
    ("mean_reward", "gold", "{:+.3f}"),
    ("win_rate_vs_sft", "win vs SFT", "{:.3f}"),
    ("kl", "KL", "{:.2f}"),
    ("mean_length", "length", "{:.1f}"),
    ("eos_rate", "EOS", "{:.2f}"),
    ("implicit_acc", "impl. acc", "{:.3f}"),
]


def _ms(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values)).lstrip('+')}"


def aggregate(results: dict) -> tuple[dict, str]:
    sft = results["sft"]
    seeds = sorted(sft)
    sft_means = [sft[s]["mean_reward"] for s in seeds]
    boot = statistics.mean(sft[s]["boot_std"] for s in seeds)
    seed_std = statistics.stdev(sft_means) if len(sft_means) > 1 else 0.0
    sft_std = max(boot, seed_std)
    summary = {
        "sft": {
            "mean_reward": statistics.mean(sft_means),
            "boot_std": boot,
            "seed_std": seed_std,
            "bar_std": sft_std,
            "seeds": seeds,
        },
        "methods": {},
    }
    header = (
        "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | Δgold vs SFT | bar (Δ > 2σ_SFT) |"
    )
    lines = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    lines.append(
        f"| sft | {len(seeds)} | "
        + " | ".join(_ms([sft[s].get(k) for s in seeds], f) for k, _, f in COLUMNS)
        + f" | σ_SFT = {sft_std:.3f} | |"
    )
    for method, per_seed in results["runs"].items():
        done = sorted(s for s in per_seed if s in sft)
        if not done:
            continue
        deltas = [per_seed[s]["mean_reward"] - sft[s]["mean_reward"] for s in done]
        delta = statistics.mean(deltas)
        passed = delta > 2 * sft_std
        summary["methods"][method] = {
            "seeds": done,
            "delta": delta,
            "passed": passed,
            **{
                k: statistics.mean(per_seed[s][k] for s in done)
                for k, _, _ in COLUMNS
                if all(per_seed[s].get(k) is not None for s in done)
            },
        }
        lines.append(
            f"| {method} | {len(done)} | "
            + " | ".join(_ms([per_seed[s].get(k) for s in done], f) for k, _, f in COLUMNS)
            + f" | {_ms(deltas, '{:+.3f}')} | {'yes' if passed else 'NO'} |"
        )
    return summary, "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    cmap = plt.get_cmap("tab10")
    sft = results["sft"]
    for s, r in sft.items():
        ax.scatter(
            [0.0],
            [r["mean_reward"]],
            marker="*",
            s=160,
            color="black",
            label="SFT" if s == min(sft) else None,
            zorder=3,
        )
    for k, (method, per_seed) in enumerate(results["runs"].items()):
        xs = [max(per_seed[s]["kl"], 1e-3) for s in sorted(per_seed)]
        ys = [per_seed[s]["mean_reward"] for s in sorted(per_seed)]
        ax.scatter(xs, ys, color=cmap(k % 10), label=method, s=40, zorder=2)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(policy ‖ SFT) per sample, nats (from the policy's samples; symlog)")
    ax.set_ylabel("mean gold reward on held-out prompts")
    ax.set_title("Gold reward vs KL on the synthetic task (one point per method and seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------


def _fmt_acc(value) -> str:
    """An implicit-reward accuracy, or "-" for a loss without an implicit reward (PPO, RTO)."""
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    logging.disable(logging.WARNING)
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        seeds = seeds[:1]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    for stage1 in {METHODS[m][3] for m in methods} - {None} - set(methods):
        methods.insert(0, stage1)  # a two-stage method's first stage runs first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results_path = out / "results.json"
    results = {"config": {}, "sft": {}, "runs": {}, "timings": {}}
    if results_path.exists():
        old = json.loads(results_path.read_text())
        results["timings"] = old.get("timings", {})
    results["config"] = {
        "seeds": seeds,
        "methods": methods,
        "max_prompts": args.max_prompts,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "overrides": args.override,
    }
    start = time.perf_counter()
    total = len(seeds) * (1 + len(methods))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("gold benchmark", total=total)
        for seed in seeds:
            seed_dir = out / f"seed-{seed}"
            t0 = time.perf_counter()
            if args.report_only:
                sft_file = seed_dir / "sft_eval.json"
                if not sft_file.exists():
                    continue
                sft_eval = json.loads(sft_file.read_text())
                results["sft"][str(seed)] = {
                    k: v for k, v in sft_eval.items() if k not in ("rewards", "prompt_index")
                }
                for method in methods:
                    result_file = seed_dir / method / "result.json"
                    if result_file.exists():
                        results["runs"].setdefault(method, {})[str(seed)] = json.loads(
                            result_file.read_text()
                        )
                continue
            progress.update(bar, description=f"seed {seed}: task + SFT")
            sft_final = prepare_seed(seed_dir, seed)
            progress.update(bar, description=f"seed {seed}: SFT samples")
            sft_eval = evaluate_sft(seed_dir, sft_final, args, seed)
            results["sft"][str(seed)] = {
                k: v for k, v in sft_eval.items() if k not in ("rewards", "prompt_index")
            }
            results["timings"].setdefault(f"{seed}/sft", time.perf_counter() - t0)
            progress.advance(bar)
            for method in methods:
                run_dir = seed_dir / method
                result_file = run_dir / "result.json"
                if (run_dir / "final").exists() and result_file.exists():
                    res = json.loads(result_file.read_text())
                else:
                    t0 = time.perf_counter()
                    if not (run_dir / "final").exists():
                        progress.update(bar, description=f"seed {seed}: train {method}")
                        trained = _train(
                            RECIPES / METHODS[method][0],
                            method_overrides(method, seed_dir, sft_final, seed, args.override),
                        )
                        _dump(
                            run_dir / "train_metrics.json", {**trained.last_metrics, **trained.eval_metrics}
                        )
                    t_train = time.perf_counter() - t0
                    progress.update(bar, description=f"seed {seed}: evaluate {method}")
                    res = evaluate_run(method, seed_dir, sft_final, args, seed, sft_eval)
                    res["train_seconds"], res["eval_seconds"] = t_train, time.perf_counter() - t0 - t_train
                    _dump(result_file, res)
                results["runs"].setdefault(method, {})[str(seed)] = res
                progress.console.print(
                    f"seed {seed} {method:16s} gold {res['mean_reward']:+.3f} (SFT {sft_eval['mean_reward']:+.3f}) "
                    f"win {res['win_rate_vs_sft']:.2f} KL {res['kl']:.2f} len {res['mean_length']:.1f} "
                    f"EOS {res['eos_rate']:.2f} acc {_fmt_acc(res['implicit_acc'])}"
                    + (
                        f"  [{res.get('train_seconds', 0):.0f}s train, {res.get('eval_seconds', 0):.0f}s eval]"
                        if "train_seconds" in res
                        else ""
                    )
                )
                _dump(results_path, results)
                progress.advance(bar)
    summary, table = aggregate(results)
    results["summary"] = summary
    results["wall_seconds_this_call"] = time.perf_counter() - start
    _dump(results_path, results)
    header = (
        f"Gold benchmark: seeds {seeds}, {args.max_prompts} held-out prompts x {args.samples} samples, "
        f"T=1, max_new_tokens {args.max_new_tokens}. mean ± std over seeds. σ_SFT = max(bootstrap std over "
        f"prompts {summary['sft']['boot_std']:.3f}, std over seeds {summary['sft']['seed_std']:.3f}).\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    console.print(header + table)
    if args.plot:
        plot(results, Path(args.plot))
        console.print(f"plot -> {args.plot}")
    console.print(f"results -> {results_path}; {results['wall_seconds_this_call']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
