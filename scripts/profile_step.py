#!/usr/bin/env python
"""Profile prefopt DPO training steps with ``torch.profiler``: where does a step's time go?

Uses the benchmark's assets (``scripts/bench_offline.py`` builds them under ``--workdir``). Builds the real trainer
from a recipe, then runs ``--steps`` steps by hand, phase by phase (policy forward, reference forward, loss,
backward, optimizer), under the profiler; the first step is a warm-up and is not profiled.

    python scripts/profile_step.py --config small --steps 3
    python scripts/profile_step.py --config small --reference precomputed train.logps_chunk_size=null
    python scripts/profile_step.py --config small --compare default,recompute,checkpoint-head,full-logits,packing

``--compare`` is the A/B mode for noisy shared machines: one process, one trainer, and the variants take turns
step by step on the same batches (the starting variant rotates every round), so background load hits them all
alike. It reports each variant's median step time and its peak RSS above the pre-step RSS (the kernel's peak
counter is reset before every step), relative to the first variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--reference", choices=("live", "precomputed"), default="live")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default=os.environ.get("PREFOPT_BENCH_DIR", "/tmp/prefopt-bench"))
    parser.add_argument("--rows", type=int, default=20, help="top operators to print")
    parser.add_argument("--trace", help="write a Chrome trace here")
    parser.add_argument(
        "--compare", help="comma-separated variants to A/B in one process (see the docstring)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="--compare: rounds of every variant")
    parser.add_argument("overrides", nargs="*", help="extra prefopt config overrides (key=value)")
    args = parser.parse_args(argv)
    for key, value in {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)

    import bench_offline as bench
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from prefopt.config import load_config
    from prefopt.losses import LossInputs
    from prefopt.models.logps import sequence_totals
    from prefopt.trainer.loop import Trainer
    from prefopt.trainer.setup import loss_from_config
    from prefopt.trainer.steps import _move

    workdir = Path(args.workdir)
    c = bench.CONFIGS[args.config]
    model_dir = bench.build_model(c.get("model", args.config), workdir, print)
    info = bench.build_data(args.config, model_dir, workdir, c["batch"] * (args.steps + 1), "file", print)
    config = load_config(
        REPO / "recipes/tiny/dpo.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"data.train={info['jsonl']}",
            "data.eval=null",
            "data.shuffle=false",
            f"data.max_length={c['max_length']}",
            f"data.max_prompt_length={c['max_prompt']}",
            f"output_dir={workdir / 'out' / 'profile'}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            f"reference.mode={'model' if args.reference == 'live' else 'precomputed'}",
            f"reference.cache_dir={workdir / 'cache'}",
            f"train.per_device_batch_size={c['batch']}",
            "train.lr_scheduler=constant",
            "train.warmup_ratio=0",
            "train.eval_steps=null",
            *args.overrides,
        ],
    )
    trainer = Trainer(config, loss_from_config(config))
    ctx, acc = trainer.ctx, trainer.accelerator

    def step(batch):
        batch = _move(batch, acc.device)
        with record_function("## policy forward"):
            logps = ctx.policy(
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                position_ids=batch.get("position_ids"),
                attention_bias=batch.get("attention_bias"),
            )
            sums, lengths = sequence_totals(logps, batch)
        half = sums.shape[0] // 2
        with record_function("## reference"):
            if os.environ.get(
                "PREFOPT_BENCH_REF_INFERENCE_MODE"
            ):  # experiment: inference_mode instead of no_grad
                with torch.inference_mode():
                    ref_chosen, ref_rejected = ctx.reference.pair_logps(batch)
                ref_chosen, ref_rejected = ref_chosen.clone(), ref_rejected.clone()
            else:
                ref_chosen, ref_rejected = ctx.reference.pair_logps(batch)
        with record_function("## loss"):
            out = ctx.loss(
                LossInputs(
                    policy_chosen_logps=sums[:half],
                    policy_rejected_logps=sums[half:],
                    reference_chosen_logps=ref_chosen,
                    reference_rejected_logps=ref_rejected,
                    chosen_lengths=lengths[:half],
                    rejected_lengths=lengths[half:],
                )
            )
        with record_function("## backward"):
            acc.backward(out.loss)
        with record_function("## optimizer"):
            trainer.updater.optimizer_step()
        return float(batch["attention_mask"].sum())

    batches = list(trainer.epoch_loader(0))
    if args.compare:
        return compare(args, trainer, step, batches, info)
    step(batches[0])  # warm-up
    tokens, started = 0.0, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, profile_memory=True) as prof:
        for batch in batches[1 : args.steps + 1]:
            tokens += step(batch)
    wall = time.perf_counter() - started
    steps = min(args.steps, len(batches) - 1)
    print(
        f"\n{args.config}, reference {args.reference}, overrides {args.overrides or 'none'}: {steps} steps, "
        f"{wall / steps:.3f} s/step, {tokens / wall:.0f} real tokens/s (under the profiler)\n"
    )

    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("## ")}
    total = sum(phases.values())
    print("phase                 share   s/step")
    for key, value in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"{key[3:]:<20} {100 * value / total:5.1f}%  {value / 1e6 / steps:7.3f}")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
    grouped = defaultdict(float)
    for event in events:
        if not event.key.startswith("## "):
            grouped[_group(event.key)] += event.self_cpu_time_total
    self_total = sum(grouped.values())
    print("operator group          self-CPU share")
    for key, value in sorted(grouped.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{key:<24} {100 * value / self_total:5.1f}%")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


# In-process variants: (environment, logps chunk size or "keep", collator).
COMPARE = {
    "default": ({}, "keep", "padded"),
    "recompute": ({"PREFOPT_LOGPS_KEEP_MB": "0"}, "keep", "padded"),
    "keep-4GB": ({"PREFOPT_LOGPS_KEEP_MB": "4096"}, "keep", "padded"),
    "block-32MB": ({"PREFOPT_LOGPS_BLOCK_MB": "32"}, "keep", "padded"),
    "block-64MB": ({"PREFOPT_LOGPS_BLOCK_MB": "64"}, "keep", "padded"),
    "block-16MB": ({"PREFOPT_LOGPS_BLOCK_MB": "16"}, "keep", "padded"),
    "rows-only": (
        {"PREFOPT_LOGPS_TILE_VOCAB": "0"},
        "keep",
        "padded",
    ),  # blocks cut by rows, never by vocabulary
    "rows-only-32MB": ({"PREFOPT_LOGPS_TILE_VOCAB": "0", "PREFOPT_LOGPS_BLOCK_MB": "32"}, "keep", "padded"),
    "checkpoint-head": ({"PREFOPT_LOGPS_HEAD": "checkpoint"}, "keep", "padded"),
    "full-logits": ({}, None, "padded"),
    "chunk-256": ({}, 256, "padded"),
    "chunk-64": ({}, 64, "padded"),
    "block-512MB": ({"PREFOPT_LOGPS_BLOCK_MB": "512"}, 4096, "padded"),
    "inference-mode-ref": ({"PREFOPT_BENCH_REF_INFERENCE_MODE": "1"}, "keep", "padded"),
    "packing": ({}, "keep", "packed"),
    "bucketed": ({}, "keep", "padded-bucketed"),  # batches of similar length (length_grouped_order)
    "no-share-prompt": ({}, "keep", "padded"),  # every prompt twice per pair (train.share_prompt=false)
    "share-prompt": ({}, "keep", "padded"),  # each prompt once per pair (train.share_prompt=true)
}
# Variants that set the policy's and the reference's share_prompt; every other variant uses the config's value.
SHARE_PROMPT = {"no-share-prompt": False, "share-prompt": True}


def compare(args, trainer, step, batches, info) -> int:
    import statistics

    import bench_offline as bench

    from prefopt.data import PairCollator
    from prefopt.data.packing import PackedPairCollator, length_grouped_order, pair_lengths

    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARE]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(COMPARE)}")
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    reference = trainer.reference
    default_chunk = policy.chunk_size
    default_share = trainer.config.train.share_prompt
    pad = info["pad_token_id"]
    rows = [trainer.bundle.train[i] for i in range(len(trainer.bundle.train))]
    size = trainer.config.train.per_device_batch_size
    groups = [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]
    by_length = length_grouped_order(pair_lengths(trainer.bundle.train), size, seed=0, mega_batches=0)
    bucketed = [[rows[i] for i in by_length[j : j + size]] for j in range(0, len(rows) - size + 1, size)]
    collate = {
        "padded": PairCollator(pad),
        "packed": PackedPairCollator(pad),
        "padded-bucketed": PairCollator(pad),
    }
    times = {n: [] for n in names}
    peaks = {n: [] for n in names}
    saved_env = {k: os.environ.get(k) for n in names for k in COMPARE[n][0]}

    def run(name, group):
        env, chunk, collator = COMPARE[name]
        for key in saved_env:
            os.environ.pop(key, None)
        os.environ.update(env)
        policy.chunk_size = default_chunk if chunk == "keep" else chunk
        policy.share_prompt = SHARE_PROMPT.get(name, default_share)
        if hasattr(reference, "chunk_size"):
            reference.chunk_size = policy.chunk_size
            reference.share_prompt = policy.share_prompt
        if collator == "padded-bucketed":
            group = bucketed[groups.index(group) % len(bucketed)]
        batch = collate[collator](group)
        before = bench.reset_peak_rss()
        started = time.perf_counter()
        tokens = step(batch)
        elapsed = time.perf_counter() - started
        return elapsed, bench._status_mib("VmHWM") - before, tokens

    for name in names:  # warm-up: one step of each variant
        run(name, groups[0])
    for number in range(args.rounds):
        group = groups[(number + 1) % len(groups)]
        order = names[number % len(names) :] + names[: number % len(names)]
        for name in order:
            elapsed, peak, tokens = run(name, group)
            times[name].append(tokens / elapsed)
            peaks[name].append(peak)
    for key, value in saved_env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    base = names[0]
    shape = bench.ModelShape.from_dir(trainer.config.model.name_or_path)
    lengths = [
        [(len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in g]
        for g in groups[1 : args.rounds + 1]
    ]

    def flops(
        name,
    ):  # executed matmul GFLOP per step (scripts/bench_flops.py), mean over the measured batches
        env, chunk, collator = COMPARE[name]
        share = SHARE_PROMPT.get(name, default_share) and collator != "packed"
        keep_mb = float(env.get("PREFOPT_LOGPS_KEEP_MB", 256))
        totals = []
        for pairs in lengths:
            rows = sum(c + r for _, c, r in pairs)
            recompute = chunk is not None and (
                env.get("PREFOPT_LOGPS_HEAD") == "checkpoint" or not bench.keeps_softmax(shape, rows, keep_mb)
            )
            totals.append(
                bench.step_flops(
                    shape,
                    pairs,
                    reference=args.reference,
                    share_prompt=share,
                    packing=collator == "packed",
                    recompute_head=recompute,
                    head="all" if chunk is None else "completion",
                )["total"]
            )
        return statistics.mean(totals) / 1e9

    print(
        f"\n{args.config}, reference {args.reference}: {args.rounds} rounds, variants interleaved; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        "| variant | real tok/s (median) | vs " + base + " | step peak above start MiB (median) "
        "| executed GFLOP/step |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        rate = statistics.median(times[name])
        ratio = statistics.median(a / b for a, b in zip(times[name], times[base]))
        print(
            f"| {name} | {rate:.0f} | {ratio:.2f}x | {statistics.median(peaks[name]):.0f} | {flops(name):.1f} |"
        )
    return 0


def _group(name: str) -> str:
    if name in (
        "aten::mm",
        "aten::addmm",
        "aten::addmm_",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "aten::baddbmm",
    ):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (sdpa)"
    if name in (
        "aten::exp",
        "aten::exp_",
        "aten::logsumexp",
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::sub_",
        "aten::mul_",
        "aten::scatter_add_",
    ):
        return "softmax / lm-head elementwise"
    if "adam" in name.lower() or name in (
        "aten::_foreach_mul_",
        "aten::_foreach_add_",
        "aten::lerp_",
        "aten::addcmul_",
        "aten::addcdiv_",
        "aten::sqrt",
        "aten::div",
    ):
        return "optimizer"
    if "norm" in name:
        return "clip / norms"
    return name


if __name__ == "__main__":
    sys.exit(main())
