#!/usr/bin/env python
"""Offline DPO throughput/memory benchmark: prefopt against ``trl.DPOTrainer`` doing the same work.

Same work means: the same Llama-architecture checkpoint, the same token ids in the same order (TRL is given
prefopt's tokenization as a pre-tokenized dataset and a sequential sampler; checked batch by batch against TRL's own
collator), the same batch size, fp32 on CPU, AdamW (fused on both sides unless ``--adam torch``; no weight decay,
constant lr, no warmup),
gradient clipping at 1.0, beta 0.1, sigmoid DPO loss, no gradient checkpointing, no dropout. The per-step losses of
the two runs are compared: a difference above ~1e-4 means the comparison is not of the same work.

Every run is a separate child process (clean peak RSS; the peak is reset when training starts, so it is the peak
*during training*), and prefopt/TRL runs alternate. Step time = time between the ends of consecutive optimizer
steps; the first step is a warm-up and is not counted. Tokens are real (non-padding) tokens of the batch.

    python scripts/bench_offline.py                               # tiny, small, large-vocab; live + precomputed
    python scripts/bench_offline.py --configs small --steps 6 --repeats 3 --json out.json
    python scripts/bench_offline.py --configs small --variants default,checkpoint-head,full-logits,packing
    python scripts/bench_offline.py --quick --configs tiny --steps 2
    python scripts/bench_offline.py --no-trl --configs ratio-1:4,ratio-1:1,ratio-4:1 --variants no-share-prompt,default

FLOPs: "executed" counts the matmul FLOPs each trainer actually runs (padding, attention, the lm head where it is
computed, the reference forward, head recomputation; scripts/bench_flops.py), next to the conventional 6N figure;
both as a share of the fp32 matmul throughput the script measures on this machine at its start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_flops import ModelShape, conventional_flops, keeps_softmax, step_flops  # noqa: E402

# Model shapes and data lengths (in tokens: every generated word is one token of the config's tokenizer).
CONFIGS = {
    "tiny": dict(
        vocab=None,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=256,
        batch=8,
        steps_scale=4,
        prompt=(8, 24),
        completion=(8, 40),
        max_length=128,
        max_prompt=48,
    ),
    "small": dict(
        vocab=32000,
        hidden=384,
        layers=4,
        heads=6,
        intermediate=1024,
        batch=2,
        prompt=(64, 160),
        completion=(128, 320),
        max_length=512,
        max_prompt=192,
    ),
    "large-vocab": dict(
        vocab=128000,
        hidden=256,
        layers=4,
        heads=4,
        intermediate=704,
        batch=2,
        prompt=(64, 160),
        completion=(128, 320),
        max_length=512,
        max_prompt=192,
    ),
    # Prompt/completion length ratios 1:4, 1:1, 4:1 (~400 tokens a sequence) on the small model: the shared-prompt
    # A/B (variants default,no-share-prompt).
    "ratio-1:4": dict(
        model="small",
        vocab=32000,
        hidden=384,
        layers=4,
        heads=6,
        intermediate=1024,
        batch=2,
        prompt=(48, 112),
        completion=(256, 384),
        max_length=512,
        max_prompt=384,
    ),
    "ratio-1:1": dict(
        model="small",
        vocab=32000,
        hidden=384,
        layers=4,
        heads=6,
        intermediate=1024,
        batch=2,
        prompt=(160, 240),
        completion=(160, 240),
        max_length=512,
        max_prompt=384,
    ),
    "ratio-4:1": dict(
        model="small",
        vocab=32000,
        hidden=384,
        layers=4,
        heads=6,
        intermediate=1024,
        batch=2,
        prompt=(256, 384),
        completion=(48, 112),
        max_length=512,
        max_prompt=384,
    ),
}
MODES = ("live", "precomputed")
LEARNING_RATE = 1e-4  # large enough that the losses move visibly within a few steps
SEED = 42
# prefopt ablations: (config overrides, environment). "default" is what a user gets.
VARIANTS = {
    "default": ([], {}),
    "no-share-prompt": (
        ["train.share_prompt=false"],
        {},
    ),  # every prompt twice per pair (before the third round)
    "share-prompt": (["train.share_prompt=true"], {}),  # each prompt once wherever it applies (before "auto")
    "recompute": (
        [],
        {"PREFOPT_LOGPS_KEEP_MB": "0"},
    ),  # fused head, always recomputing the logits in backward
    "checkpoint-head": (
        [],
        {"PREFOPT_LOGPS_HEAD": "checkpoint"},
    ),  # the previous chunked head (recompute + autograd)
    "full-logits": (["train.logps_chunk_size=null"], {}),  # plain forward: [2B, L, V] logits
    "chunk-256": (["train.logps_chunk_size=256"], {}),
    "chunk-4096": (["train.logps_chunk_size=4096"], {}),
    "packing": (["data.packing=true"], {}),
    "dense-embedding-grad": (["train.sparse_embedding_grad=false"], {}),
    "glibc-adaptive": (["train.return_freed_host_memory=false"], {}),  # glibc's adaptive mmap threshold
    "rows-only-128MB": (
        [],
        {"PREFOPT_LOGPS_TILE_VOCAB": "0", "PREFOPT_LOGPS_BLOCK_MB": "128"},
    ),  # the earlier head
    "previous": (
        [
            "train.sparse_embedding_grad=false",
            "train.return_freed_host_memory=false",
            "train.share_prompt=false",
        ],
        {"PREFOPT_LOGPS_TILE_VOCAB": "0", "PREFOPT_LOGPS_BLOCK_MB": "128"},
    ),  # before the second round
}
CHILD_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",
    # Other jobs share the cores: spinning OpenMP workers then collapse throughput (10x on the tiny model).
    "OMP_WAIT_POLICY": "PASSIVE",
}


# --------------------------------------------------------------------------------------------------------------
# Memory and timing helpers (used in the children)
# --------------------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak covers training only; returns the current RSS."""
    # not Linux or not permitted: the peak then covers the whole process
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


class StepClock:
    def __init__(self, steps: int):
        self.steps = steps
        self.times: list[float] = []
        self.start = None
        self.rss_start = None
        self.peak = None

    def begin(self):
        self.rss_start = reset_peak_rss()
        self.start = time.perf_counter()

    def step(self):
        self.times.append(time.perf_counter())
        if len(self.times) == self.steps:
            self.peak = _status_mib("VmHWM")

    def intervals(self) -> list[float]:
        edges = [self.start, *self.times]
        return [b - a for a, b in zip(edges, edges[1:])]


# --------------------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------------------


def child_prefopt(spec: dict) -> dict:
    from prefopt.config import load_config
    from prefopt.trainer import loop, train, updates

    clock = StepClock(spec["steps"])
    original_run, original_step = loop.Trainer.run, updates.Updater.optimizer_step

    def run(self):
        clock.begin()
        return original_run(self)

    def optimizer_step(self):
        applied = original_step(self)
        clock.step()
        return applied

    loop.Trainer.run, updates.Updater.optimizer_step = run, optimizer_step
    c = spec["config"]
    overrides = [
        f"model.name_or_path={spec['model']}",
        "model.dtype=float32",
        f"data.train={spec['data']}",
        "data.eval=null",
        "data.shuffle=false",
        f"data.max_length={c['max_length']}",
        f"data.max_prompt_length={c['max_prompt']}",
        f"output_dir={spec['out']}",
        "overwrite_output_dir=true",
        f"seed={SEED}",
        "loss.name=dpo",
        "loss.beta=0.1",
        f"reference.mode={'model' if spec['mode'] == 'live' else 'precomputed'}",
        f"reference.cache_dir={spec['cache']}",
        f"reference.batch_size={c['batch']}",
        f"train.learning_rate={LEARNING_RATE}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        "train.mixed_precision='no'",
        f"train.per_device_batch_size={c['batch']}",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={spec['steps']}",
        "train.eval_steps=null",
        "train.save_steps=null",
        "logging.logging_steps=1",
        "logging.progress=false",
        "logging.sample_steps=null",
        f"train.fused_optimizer={'true' if spec.get('adam', 'fused') == 'fused' else 'false'}",
        *spec["overrides"],
    ]
    config = load_config(REPO / "recipes/tiny/dpo.yaml", overrides)
    started = time.perf_counter()
    train(config)
    records = [
        json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if line
    ]
    records = [r for r in records if "loss" in r]
    return {
        "losses": [r["loss"] for r in records],
        "logps_chosen": [r["logps/chosen"] for r in records],
        "step_times": clock.intervals(),
        "peak_rss_mib": clock.peak,
        "rss_start_mib": clock.rss_start,
        "setup_s": clock.start - started,
    }


def child_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepClock(spec["steps"])
    losses: list[float] = []
    logps_chosen: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step()

    class PreTokenizedDPOTrainer(DPOTrainer):
        """Takes prefopt's token ids as they are (``prompt_ids``/``chosen_ids``/``rejected_ids``)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
                logps_chosen.append(self._metrics["train"]["logps/chosen"][-1])
            return loss

    c = spec["config"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = datasets.load_from_disk(spec["trl_data"])
    args = DPOConfig(
        output_dir=spec["out"],
        seed=SEED,
        per_device_train_batch_size=c["batch"],
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if spec.get("adam", "fused") == "fused" else "adamw_torch",
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=spec["mode"] == "precomputed",
        precompute_ref_batch_size=c["batch"],
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    started = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(
        model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
    )
    trainer.train()
    return {
        "losses": losses,
        "logps_chosen": logps_chosen,
        "step_times": clock.intervals(),
        "peak_rss_mib": clock.peak,
        "rss_start_mib": clock.rss_start,
        "setup_s": clock.start - started,
    }


def run_child(spec: dict, workdir: Path, log) -> dict:
    spec_file = workdir / "runs" / f"{spec['name']}.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    env = {**CHILD_ENV, **os.environ, **spec.get("env", {})}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_file)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    result_file = Path(spec["result"])
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"run {spec['name']} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    log(
        f"  {spec['name']:<48} {wall:6.1f}s  "
        f"median step {statistics.median(result['step_times'][1:] or result['step_times']):.3f}s"
        f"  peak {result['peak_rss_mib']:.0f} MiB"
    )
    return result


# --------------------------------------------------------------------------------------------------------------
# Assets: tokenizer, model, data (cached under the work directory)
# --------------------------------------------------------------------------------------------------------------


def _syllable_words(rng: random.Random, count: int) -> list[str]:
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    return sorted(words)


def build_model(name: str, workdir: Path, log) -> Path:
    from prefopt.models.tiny import build_tiny_model, train_tiny_tokenizer

    c = CONFIGS[name]
    out = workdir / "models" / name
    if (out / "config.json").is_file():
        return out
    log(f"building the {name} model (vocab {c['vocab'] or 'tiny'}) in {out}")
    tokenizer = None
    if c["vocab"]:
        rng = random.Random(0)
        vocabulary = _syllable_words(rng, int(c["vocab"] * 2.5))
        lines = [" ".join(rng.choice(vocabulary) for _ in range(30)) for _ in range(c["vocab"] // 2)]
        tokenizer = train_tiny_tokenizer(lines, vocab_size=c["vocab"])
    build_tiny_model(
        out,
        tokenizer=tokenizer,
        hidden_size=c["hidden"],
        num_layers=c["layers"],
        num_heads=c["heads"],
        intermediate_size=c["intermediate"],
        max_position_embeddings=1024,
        seed=0,
    )
    return out


def one_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that are a space plus letters: each such word encodes to exactly one token."""
    words = []
    for token in tokenizer.get_vocab():
        if token.startswith("\u0120") and token[1:].isalpha() and token[1:].isascii():
            word = " " + token[1:]
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
            if len(words) >= 4000:
                break
    return sorted(words)


def build_data(name: str, model_dir: Path, workdir: Path, rows: int, order: str, log) -> dict:
    """Pairs jsonl for prefopt, the same token ids as a saved dataset for TRL, and per-step real token counts."""
    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from prefopt.config import DataConfig
    from prefopt.data import PairCollator, build_datasets
    from prefopt.data.packing import length_grouped_order, pair_lengths
    from prefopt.models.loading import load_tokenizer

    c = CONFIGS[name]
    base = workdir / "data" / f"{name}-{rows}-{order}"
    info_file = base / "info-v2.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(model_dir))
    words = one_token_words(tokenizer)
    rng = random.Random(f"{name}-data")

    def text(low, high):
        return "".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    examples = [
        {"prompt": text(*c["prompt"]), "chosen": text(*c["completion"]), "rejected": text(*c["completion"])}
        for _ in range(rows)
    ]
    jsonl = base / "pairs.jsonl"

    def write(items):
        jsonl.write_text("".join(json.dumps(e) + "\n" for e in items))

    data_cfg = DataConfig(
        train=str(jsonl), shuffle=False, max_length=c["max_length"], max_prompt_length=c["max_prompt"]
    )
    write(examples)
    bundle = build_datasets(data_cfg, tokenizer, "pairs", seed=SEED, cache_dir=None)
    if order == "bucketed":  # rewrite the file in length-grouped order; both trainers read it in that order
        position = length_grouped_order(pair_lengths(bundle.train), c["batch"], seed=SEED, mega_batches=0)
        write([examples[i] for i in position])
        bundle = build_datasets(data_cfg, tokenizer, "pairs", seed=SEED, cache_dir=None)
    report = bundle.report.train
    if report.truncated_prompts or any(report.truncated_completions.values()) or len(bundle.train) != rows:
        raise RuntimeError(f"{name}: the benchmark data must not be truncated or dropped: {report}")
    train = bundle.train
    trl_columns = {
        "prompt_ids": train["prompt_input_ids"],
        "chosen_ids": train["chosen_input_ids"],
        "rejected_ids": train["rejected_input_ids"],
    }
    datasets.Dataset.from_dict(trl_columns).save_to_disk(str(base / "trl"))

    # Same ids, masks and order in both trainers' batches: prefopt's PairCollator against TRL's collator.
    ours, theirs = (
        PairCollator(tokenizer.pad_token_id),
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id),
    )
    tokens, padded, step_pairs = [], [], []
    for start in range(0, rows, c["batch"]):
        rows_ = [train[i] for i in range(start, start + c["batch"])]
        a = ours(rows_)
        b = theirs(
            [
                {
                    "prompt_ids": r["prompt_input_ids"],
                    "chosen_ids": r["chosen_input_ids"],
                    "rejected_ids": r["rejected_input_ids"],
                }
                for r in rows_
            ]
        )
        for key in ("input_ids", "attention_mask", "completion_mask"):
            if not bool((a[key] == b[key]).all()):
                raise RuntimeError(f"{name}: prefopt and TRL batches differ in {key} at row {start}")
        tokens.append(int(a["attention_mask"].sum()))
        step_pairs.append(
            [
                [len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])]
                for r in rows_
            ]
        )
        padded.append(int(a["attention_mask"].numel()))
    lengths = [
        len(p) + len(x)
        for p, ch, rj in zip(
            train["prompt_input_ids"], train["chosen_input_ids"], train["rejected_input_ids"]
        )
        for x in (ch, rj)
    ]
    completion = sum(
        len(ch) + len(rj) for ch, rj in zip(train["chosen_input_ids"], train["rejected_input_ids"])
    )
    info = {
        "jsonl": str(jsonl),
        "trl": str(base / "trl"),
        "tokens_per_step": tokens,
        "padded_per_step": padded,
        "pairs_per_step": step_pairs,
        "sequence_length": [min(lengths), statistics.mean(lengths), max(lengths)],
        "completion_share": completion / sum(lengths),
        "pad_token_id": tokenizer.pad_token_id,
    }
    info_file.write_text(json.dumps(info))
    return info


def model_params(model_dir: Path) -> dict:
    from safetensors import safe_open

    total = embed = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safetensors handles are not dicts
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= size
            total += count
            if "embed_tokens" in key:
                embed += count
    return {"total": total, "embedding": embed, "matmul": total - embed}


def matmul_tflops(size: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 matmul throughput of this process (all threads torch uses), in TFLOP/s."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------


def flop_options(trainer: str, variant: str) -> dict:
    """How a run computes (``bench_flops.step_flops`` options, less ``recompute_head``) and its keep budget."""
    if trainer == "trl":  # TRL 1.16 on CPU: the lm head at every position, nothing shared, nothing recomputed
        return {
            "head": "all",
            "share_prompt": False,
            "packing": False,
            "keep_mb": float("inf"),
            "checkpoint": False,
        }
    overrides, env = VARIANTS[variant]
    packing = "data.packing=true" in overrides
    return {
        "head": "all" if "train.logps_chunk_size=null" in overrides else "completion",
        "share_prompt": False
        if "train.share_prompt=false" in overrides or packing
        else (True if "train.share_prompt=true" in overrides else "auto"),
        "packing": packing,
        "keep_mb": float(env.get("PREFOPT_LOGPS_KEEP_MB", 256)),
        "checkpoint": env.get("PREFOPT_LOGPS_HEAD") == "checkpoint",
    }


def run_flops(meta_config: dict, shape: ModelShape, mode: str, trainer: str, variant: str) -> list[float]:
    """Executed matmul FLOPs of each step of a run (``scripts/bench_flops.py``)."""
    options = flop_options(trainer, variant)
    keep_mb, checkpointed = options.pop("keep_mb"), options.pop("checkpoint")
    flops = []
    for pairs in meta_config["pairs_per_step"]:
        rows = sum(c + r for _, c, r in pairs)
        recompute = options["head"] == "completion" and (
            checkpointed or not keeps_softmax(shape, rows, keep_mb)
        )
        flops.append(
            step_flops(shape, [tuple(p) for p in pairs], reference=mode, recompute_head=recompute, **options)[
                "total"
            ]
        )
    return flops


def summarise(results: list[dict], meta: dict) -> list[dict]:
    rows = []
    keys = sorted(
        {(r["config"], r["mode"]) for r in results}, key=lambda k: (list(CONFIGS).index(k[0]), k[1])
    )
    peak_tflops = max(meta["matmul_tflops"], meta.get("matmul_tflops_end", 0.0))
    for config, mode in keys:
        group = [r for r in results if r["config"] == config and r["mode"] == mode]
        tokens = meta[config]["tokens_per_step"]
        params = meta[config]["params"]["matmul"]
        shape = ModelShape.from_dir(meta[config]["model"])

        def stats(runs, tokens=tokens, config=config, shape=shape, mode=mode):
            rates, steps, peaks, executed = [], [], [], []
            for run in runs:
                times = run["step_times"][1:]  # step 1 is a warm-up
                rates.append(sum(tokens[1 : len(times) + 1]) / sum(times))
                flops = run_flops(meta[config], shape, mode, run["trainer"], run["variant"])
                executed.append(sum(flops[1 : len(times) + 1]) / sum(times))
                steps.extend(times)
                peaks.append(run["peak_rss_mib"])
            return (
                statistics.median(rates),
                statistics.median(steps),
                statistics.median(peaks),
                rates,
                executed,
            )

        labels = [("trl", "default")] if any(r["trainer"] == "trl" for r in group) else []
        labels += [
            ("prefopt", v)
            for v in sorted(
                {r["variant"] for r in group if r["trainer"] == "prefopt"},
                key=lambda v: list(VARIANTS).index(v),
            )
        ]
        baseline_runs = [r for r in group if (r["trainer"], r["variant"]) == labels[0]]
        _, _, base_peak, base_rates, _ = stats(baseline_runs)
        base_losses = baseline_runs
        for trainer, variant in labels:
            runs = [r for r in group if (r["trainer"], r["variant"]) == (trainer, variant)]
            rate, step, peak, rates, executed = stats(runs)
            loss_diff = logps_diff = None
            if (trainer, variant) != labels[0]:
                pairs = list(zip(runs, base_losses))
                loss_diff = max(max(abs(a - b) for a, b in zip(p["losses"], t["losses"])) for p, t in pairs)
                logps_diff = max(abs(p["logps_chosen"][0] - t["logps_chosen"][0]) for p, t in pairs)
            # Paired ratio: each run against the baseline run of the same repeat (they ran back to back).
            paired = [a / b for a, b in zip(rates, base_rates)]
            conventional = rate * conventional_flops(params, 1, mode)
            rows.append(
                {
                    "config": config,
                    "reference": mode,
                    "trainer": "TRL" if trainer == "trl" else f"prefopt/{variant}",
                    "baseline": "TRL" if labels[0][0] == "trl" else f"prefopt/{labels[0][1]}",
                    "tokens_per_s": rate,
                    "s_per_step": step,
                    "peak_rss_mib": peak,
                    "speed_vs_baseline": statistics.median(paired),
                    "memory_vs_baseline": peak / base_peak,
                    "conventional_gflops": conventional / 1e9,
                    "conventional_mfu": conventional / (peak_tflops * 1e12),
                    "executed_gflops": statistics.median(executed) / 1e9,
                    "executed_mfu": statistics.median(executed) / (peak_tflops * 1e12),
                    "max_loss_diff": loss_diff,
                    "step0_logps_diff": logps_diff,
                    "repeats": len(runs),
                    "setup_s": statistics.median(r["setup_s"] for r in runs),
                    "rss_start_mib": statistics.median(r["rss_start_mib"] for r in runs),
                }
            )
    return rows


def print_table(rows: list[dict], meta: dict, log) -> None:
    log("")
    log(
        f"matmul throughput (fp32 2048^2, best of 3 s, this process): {meta['matmul_tflops'] * 1e3:.1f} GFLOP/s at the "
        f"start, {meta.get('matmul_tflops_end', float('nan')) * 1e3:.1f} at the end (shares use the higher); "
        f"threads {meta['threads']}; load average {meta.get('load_start', '?')} -> {meta.get('load_end', '?')}; "
        f"{meta['steps']} steps per run (first = warm-up; tiny x4), {meta['repeats']} repeats; AdamW {meta['adam']}; "
        f"data order {meta['order']}"
    )
    for config in CONFIGS:
        if config in meta:
            m = meta[config]
            lo, mean, hi = m["sequence_length"]
            prompt = statistics.mean(p for step in m["pairs_per_step"] for p, _, _ in step)
            completion = statistics.mean(
                x for step in m["pairs_per_step"] for _, c, r in step for x in (c, r)
            )
            log(
                f"{config}: {m['params']['total'] / 1e6:.1f}M params ({m['params']['matmul'] / 1e6:.1f}M without the "
                f"input embedding), batch {CONFIGS[config]['batch']} pairs, sequences {lo}-{hi} tokens (mean "
                f"{mean:.0f}; prompt {prompt:.0f} : completion {completion:.0f}), completion share "
                f"{m['completion_share']:.2f}, padding {1 - sum(m['tokens_per_step']) / sum(m['padded_per_step']):.2f}"
            )
    log("")
    log(
        "| config | reference | trainer | real tok/s | s/step (median) | peak RSS MiB | speed vs baseline "
        "| memory vs baseline | executed GFLOP/s (% of matmul peak) | 6N GFLOP/s (%) | max loss diff "
        "| step-0 logps diff |"
    )
    log("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = "" if r["max_loss_diff"] is None else f"{r['max_loss_diff']:.1e}"
        logps = "" if r["step0_logps_diff"] is None else f"{r['step0_logps_diff']:.1e}"
        log(
            f"| {r['config']} | {r['reference']} | {r['trainer']} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} "
            f"| {r['peak_rss_mib']:.0f} | {r['speed_vs_baseline']:.2f}x | {r['memory_vs_baseline']:.2f}x "
            f"| {r['executed_gflops']:.1f} ({100 * r['executed_mfu']:.0f}%) "
            f"| {r['conventional_gflops']:.1f} ({100 * r['conventional_mfu']:.0f}%) | {diff} | {logps} |"
        )
    log(
        "(baseline: TRL where it ran, else the first prefopt variant listed; executed FLOPs: scripts/bench_flops.py)"
    )


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small,large-vocab")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="default", help=f"prefopt variants: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--order",
        choices=("file", "bucketed"),
        default="file",
        help="data order for both trainers: as generated, or grouped by length",
    )
    parser.add_argument(
        "--adam",
        choices=("torch", "fused"),
        default="fused",
        help="AdamW for both: fused=True (TRL's default adamw_torch_fused, prefopt's default "
        "train.fused_optimizer=true) or torch's for-each-parameter loop (adamw_torch, "
        "train.fused_optimizer=false)",
    )
    parser.add_argument("--json", help="write all runs and the summary here")
    parser.add_argument("--quick", action="store_true", help="one repeat, live reference only")
    parser.add_argument(
        "--no-trl",
        action="store_true",
        help="prefopt variants only (ratios against the first variant), e.g. the shared-prompt A/B",
    )
    parser.add_argument("--workdir", default=os.environ.get("PREFOPT_BENCH_DIR", "/tmp/prefopt-bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = (child_prefopt if spec["trainer"] == "prefopt" else child_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = ["live"] if args.quick else [m.strip() for m in args.modes.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    repeats = 1 if args.quick else args.repeats
    for name, known in ((configs, CONFIGS), (modes, MODES), (variants, VARIANTS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; valid: {', '.join(known)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(text):
        print(text, flush=True)

    import torch

    meta: dict = {
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "repeats": repeats,
        "order": args.order,
        "adam": args.adam,
    }
    meta["matmul_tflops"] = matmul_tflops()
    meta["load_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    for name in configs:
        model_dir = build_model(CONFIGS[name].get("model", name), workdir, log)
        steps = args.steps * CONFIGS[name].get(
            "steps_scale", 1
        )  # milliseconds per tiny step: run more of them
        info = build_data(name, model_dir, workdir, CONFIGS[name]["batch"] * steps, args.order, log)
        meta[name] = {**info, "model": str(model_dir), "params": model_params(model_dir), "steps": steps}

    results = []
    stamp = time.strftime("%H%M%S")
    for repeat in range(repeats):
        for name in configs:
            for mode in modes:
                # Alternate who goes first from one repeat to the next, so drift in machine load cancels out.
                order = [("prefopt", v) for v in variants] + ([] if args.no_trl else [("trl", "default")])
                if repeat % 2:
                    order.reverse()
                for trainer, variant in order:
                    tag = f"{stamp}-{name}-{mode}-{trainer}-{variant}-r{repeat}"
                    overrides, env = VARIANTS[variant] if trainer == "prefopt" else ([], {})
                    spec = {
                        "name": tag,
                        "trainer": trainer,
                        "variant": variant,
                        "config": CONFIGS[name],
                        "config_name": name,
                        "mode": mode,
                        "steps": meta[name]["steps"],
                        "model": meta[name]["model"],
                        "data": meta[name]["jsonl"],
                        "trl_data": meta[name]["trl"],
                        "out": str(workdir / "out" / tag),
                        "cache": str(workdir / "cache"),
                        "result": str(workdir / "runs" / f"{tag}.result.json"),
                        "overrides": overrides,
                        "env": env,
                        "adam": args.adam,
                    }
                    result = run_child(spec, workdir, log)
                    results.append(
                        {
                            **result,
                            "trainer": trainer,
                            "variant": variant,
                            "config": name,
                            "mode": mode,
                            "repeat": repeat,
                        }
                    )
    meta["matmul_tflops_end"] = matmul_tflops()
    meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = summarise(results, meta)
    print_table(rows, meta, log)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
