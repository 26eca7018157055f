#!/usr/bin/env python
"""Online preference optimisation on CPU: prefopt's online DPO and XPO against TRL's ``OnlineDPOTrainer``.

The same work on both sides: the same tiny SFT model (``prefopt.models.tiny`` + ``recipes/tiny/sft.yaml`` on the
synthetic gold task), the same prompts in the same order (prefopt's tokenization; TRL gets the prompt text, and the
script checks that TRL's tokenizer call gives the same ids), the same reward (``data_tools.synth:score``), the same
sampling (temperature 1, no top-k/top-p, 48 new tokens, KV cache), the same batch of prompts, beta, AdamW (fused,
constant lr, no warmup, no weight decay), gradient clipping at 1.0, fp32, no gradient checkpointing, no dropout.
What differs is each method's own definition: TRL's online DPO and prefopt's ``online_dpo`` draw two policy
samples per prompt; prefopt's XPO one policy and one reference sample (``--methods``).

Every run is a fresh child process. The runs of one repeat (each prefopt method and TRL) start together and, after
their warm-up steps, take turns step by step (the parent releases one child's step at a time, in an order that
rotates each step; the others wait, idle): on a shared machine every trainer's steps then meet the same load. Per
optimizer step we time generation (every sampling call of the step, the reference's included) and the rest
(scoring, the forwards, backward, optimizer) separately, and count the decode steps of the sampling calls (each
call runs until its longest sample ends), so that generation is also compared per decode step: the trainers draw
different samples. The first step is a warm-up and is not counted. Peak RSS is the kernel's peak of the child from
its first sampling call on, also given above the RSS at that call (the step's own memory; the rest is the Python
runtime and the model). ``--profile`` runs cProfile in every child after its warm-up step (not while it waits for
its turn) and prints the seconds per step of each phase (generation, the sampler, reward, policy and reference
forwards, backward, optimizer). After training, the parent samples the held-out prompts from each final model with
one fixed seed and scores them with the gold reward: a fast but wrong trainer cannot win.

    python scripts/bench_online.py                                   # online_dpo, xpo, TRL; 12 steps, 2 repeats
    python scripts/bench_online.py --methods xpo --steps 6 --repeats 1 --json out.json
    python scripts/bench_online.py --methods online_dpo,xpo --steps 6 --repeats 1 --profile   # where time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_offline import CHILD_ENV, _status_mib, reset_peak_rss  # noqa: E402 (needs the path above)

SEED = 42
LEARNING_RATE = 2e-4  # recipes/tiny/xpo.yaml
BETA = 0.1
MAX_NEW_TOKENS = 48
METHODS = ("online_dpo", "xpo")


# --------------------------------------------------------------------------------------------------------------
# Timing (children)
# --------------------------------------------------------------------------------------------------------------


class OnlineClock:
    """Generation time and optimizer steps. Step ends are the learning-rate scheduler's ``step()`` calls (both
    trainers call it once per optimizer step, after the optimizer); calls before the first sampling call (the
    scheduler's construction) are ignored. Peak RSS is reset at the first sampling call.

    With ``turns`` (two pipe descriptors from the parent: ``done`` to write, ``go`` to read), the child reports the
    end of every step and waits for the parent's go before the next: the trainers of a round take turns step by
    step, so each of their steps meets the same load on a shared machine. A step then starts at the go."""

    def __init__(self, profile: str | None = None, turns: list[int] | None = None, steps: int = 0):
        self.profile = (
            profile  # a pstats file: cProfile runs from the end of the warm-up step to the last step
        )
        self.profiler = None
        self.turns = turns
        self.steps = steps  # the run's optimizer steps: the profiler stays off after the last
        self.started = None
        self.rss_start = None
        self.step_starts: list[float] = []
        self.step_ends: list[float] = []
        self.generation: list[
            tuple[float, float, int]
        ] = []  # (start, end, decode steps) of every sampling call

    def generation_started(self):
        if self.started is None:
            self.rss_start = reset_peak_rss()
            self.started = time.perf_counter()
            self.step_starts.append(self.started)
        return time.perf_counter()

    def generation_ended(self, start, decode_steps: int):
        self.generation.append((start, time.perf_counter(), decode_steps))

    def step_ended(self):
        if self.started is None:
            return
        self.step_ends.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.disable()  # the wait for the next turn is no part of a step
        if self.turns is not None:
            done, go = self.turns
            os.write(done, b".")
            if not os.read(go, 1):
                raise RuntimeError("the benchmark's parent went away")
        if self.profile and len(self.step_ends) < self.steps:
            if self.profiler is None:
                import cProfile

                self.profiler = cProfile.Profile()
            self.profiler.enable()
        self.step_starts.append(time.perf_counter())

    def save_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()  # (already off after the last step's end)
            self.profiler.dump_stats(self.profile)

    def result(self) -> dict:
        steps, generation, decode_steps = [], [], []
        for begin, end in zip(self.step_starts, self.step_ends):
            calls = [(a, b, n) for a, b, n in self.generation if a >= begin and b <= end]
            steps.append(end - begin)
            generation.append(sum(b - a for a, b, _ in calls))
            decode_steps.append(sum(n for _, _, n in calls))
        return {
            "step_times": steps,
            "generation_times": generation,
            # Decode steps of the step's sampling calls (each call runs until its longest sample ends): the
            # trainers draw different samples, so generation seconds per decode step compare the loops' speed.
            "decode_steps": decode_steps,
            "peak_rss_mib": _status_mib("VmHWM"),
            "rss_start_mib": self.rss_start,
        }


def install_scheduler_clock(clock: OnlineClock) -> None:
    import torch

    original = torch.optim.lr_scheduler.LRScheduler.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        clock.step_ended()
        return out

    torch.optim.lr_scheduler.LRScheduler.step = step


def child_prefopt(spec: dict) -> dict:
    from prefopt.config import load_config
    from prefopt.generation.hf import HFGenerator
    from prefopt.trainer import train

    clock = OnlineClock(spec.get("profile"), spec.get("turns"), spec["steps"])
    install_scheduler_clock(clock)
    original = HFGenerator.generate

    def generate(self, *args, **kwargs):
        start = clock.generation_started()
        rollouts = original(self, *args, **kwargs)
        clock.generation_ended(start, rollouts.completion_ids.shape[1])  # decode steps: the longest sample
        return rollouts

    HFGenerator.generate = generate
    overrides = [
        f"model.name_or_path={spec['model']}",
        "model.dtype=float32",
        f"data.train={spec['prompts']}",
        "data.eval=null",
        "data.shuffle=false",
        f"output_dir={spec['out']}",
        "overwrite_output_dir=true",
        f"seed={SEED}",
        f"loss.name={spec['method']}",
        f"loss.beta={BETA}",
        "reward.kind=function",
        "reward.function=data_tools.synth:score",
        "generation.backend=hf",
        "generation.temperature=1.0",
        "generation.top_k=0",
        "generation.top_p=1.0",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        f"train.learning_rate={LEARNING_RATE}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        "train.mixed_precision='no'",
        f"train.per_device_batch_size={spec['batch']}",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={spec['steps']}",
        "train.eval_steps=null",
        "train.save_steps=null",
        "logging.logging_steps=1",
        "logging.progress=false",
        "logging.sample_steps=null",
        *spec["overrides"],
    ]
    config = load_config(
        REPO / "recipes/tiny" / f"{spec['method']}.yaml", overrides
    )  # every method has a recipe
    train(config)
    clock.save_profile()
    records = [
        json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if line
    ]
    return {
        **clock.result(),
        "losses": [r["loss"] for r in records if "loss" in r],
        "final": str(Path(spec["out"]) / "final"),
    }


def child_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from data_tools.synth import score

    clock = OnlineClock(spec.get("profile"), spec.get("turns"), spec["steps"])
    install_scheduler_clock(clock)
    losses: list[float] = []

    class TimedOnlineDPOTrainer(OnlineDPOTrainer):
        def _generate(self, *args, **kwargs):
            start = clock.generation_started()
            out = super()._generate(*args, **kwargs)
            clock.generation_ended(start, out[2].shape[1])  # completion_ids [2B, decode steps]
            return out

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss.detach()))
            return loss

    def gold(prompts, completions, **kwargs):
        return [float(score(p, c)) for p, c in zip(prompts, completions)]

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = datasets.Dataset.from_dict({"prompt": spec["prompt_texts"]})
    args = OnlineDPOConfig(
        output_dir=spec["out"],
        seed=SEED,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        beta=[BETA],
        loss_type="sigmoid",
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = TimedOnlineDPOTrainer(
        model=spec["model"], reward_funcs=gold, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    clock.save_profile()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    tokenizer.save_pretrained(str(Path(spec["out"]) / "final"))
    return {**clock.result(), "losses": losses, "final": str(Path(spec["out"]) / "final")}


def run_children_in_turns(specs: list[dict], workdir: Path, log) -> list[dict]:
    """Start every child of a round at once; after their warm-up steps, release them one step at a time, in an
    order that rotates each step, so that no trainer meets systematically more or less load than another."""
    children = []
    for spec in specs:
        done_read, done_write = os.pipe()
        go_read, go_write = os.pipe()
        spec = {**spec, "turns": [done_write, go_read]}
        spec_file = workdir / "runs" / f"{spec['name']}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec))
        output = open(workdir / "runs" / f"{spec['name']}.log", "w+")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(spec_file)],
            env={**CHILD_ENV, **os.environ, **spec.get("env", {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(done_write, go_read),
        )
        os.close(done_write)
        os.close(go_read)
        children.append(
            {
                "spec": spec,
                "proc": proc,
                "done": done_read,
                "go": go_write,
                "log": output,
                "t": time.perf_counter(),
            }
        )

    def failed(child) -> RuntimeError:
        child["proc"].wait()
        child["log"].seek(0)
        return RuntimeError(
            f"run {child['spec']['name']} failed (exit {child['proc'].returncode}):\n{child['log'].read()[-3000:]}"
        )

    def step_done(child) -> None:
        if not os.read(child["done"], 1):
            raise failed(child)

    try:
        for child in children:  # warm-up steps (loading and the first step run side by side; not measured)
            step_done(child)
        steps = specs[0]["steps"]
        for step in range(1, steps):
            shift = step % len(children)
            for child in children[shift:] + children[:shift]:
                os.write(child["go"], b"g")
                step_done(child)
        for child in children:  # let them save and exit
            os.write(child["go"], b"g")
        results = []
        for child in children:
            if child["proc"].wait() != 0 or not Path(child["spec"]["result"]).is_file():
                raise failed(child)
            result = json.loads(Path(child["spec"]["result"]).read_text())
            result["wall_s"] = time.perf_counter() - child["t"]
            measured = result["step_times"][1:] or result["step_times"]
            log(
                f"  {child['spec']['name']:<40} {result['wall_s']:6.1f}s  median step "
                f"{statistics.median(measured):.3f}s  peak {result['peak_rss_mib']:.0f} MiB"
            )
            results.append(result)
        return results
    finally:
        for child in children:
            if child["proc"].poll() is None:
                child["proc"].kill()
                child["proc"].wait()
            os.close(child["done"])
            os.close(child["go"])
            child["log"].close()


# Phases of a step in a cProfile dump: (label, a piece of the file path, the function name). Cumulative seconds
# per measured step; nested phases are indented (they are part of the line above, not added to it).
PROFILE_PHASES = {
    "prefopt": [
        ("generation (every sampling call)", "prefopt/generation/hf.py", "generate"),
        ("  sampler: Gumbel noise per row", "prefopt/generation/hf.py", "__call__"),
        ("  decode loop", "prefopt/generation/decode.py", "sample_tokens"),
        ("reward (score call)", "prefopt/models/reward.py", "score"),
        ("pair collation", "prefopt/data/collate.py", "__call__"),
        ("policy log-prob forward (grad)", "prefopt/models/logps.py", "forward"),
        ("reference log-prob forward", "prefopt/models/reference.py", "token_logps"),
        ("loss", "prefopt/losses/base.py", "__call__"),
        ("backward", "prefopt/trainer/updates.py", "backward"),
        ("optimizer step (+clipping)", "prefopt/trainer/updates.py", "optimizer_step"),
    ],
    "trl": [
        ("generation (model.generate)", "online_dpo_trainer.py", "_generate"),
        ("reward (function call)", "online_dpo_trainer.py", "_calculate_rewards_from_functions"),
        ("policy + reference log-prob forwards", "online_dpo_trainer.py", "_forward"),
        ("backward", "accelerate/accelerator.py", "backward"),
        ("optimizer step (+clipping)", "accelerate/optimizer.py", "step"),
    ],
}


def profile_phases(path: str, trainer: str, steps: int) -> list[tuple[str, int, float]]:
    """``(label, calls, seconds per step)`` for the phases found in a cProfile dump."""
    import pstats

    stats = pstats.Stats(path).stats
    rows = []
    for label, file_part, name in PROFILE_PHASES["trl" if trainer == "trl" else "prefopt"]:
        calls, seconds = 0, 0.0
        for (file, _, func), (_, ncalls, _, cumtime, _) in stats.items():
            if func == name and file_part in file:
                calls, seconds = calls + ncalls, seconds + cumtime
        if calls:
            rows.append((label, calls, seconds / steps))
    total = pstats.Stats(path).total_tt
    rows.append(("total under the profiler", 0, total / steps))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Assets and evaluation (parent)
# --------------------------------------------------------------------------------------------------------------


def build_assets(workdir: Path, rows: int, log) -> dict:
    """Gold task, tiny model, its SFT; the training prompts (ids and text) checked against TRL's tokenization."""
    from transformers import AutoTokenizer

    from data_tools.synth import write_task
    from prefopt.config import DataConfig, load_config
    from prefopt.data import build_datasets
    from prefopt.models.tiny import build_tiny_model
    from prefopt.trainer import train

    task, model, sft = workdir / "gold-task", workdir / "tiny-model", workdir / "tiny-sft"
    if not (task / "task.json").is_file():
        log(f"writing the gold task to {task}")
        write_task(task, seed=0)
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    if not (sft / "final" / "config.json").is_file():
        log(f"SFT of the tiny model ({sft})")
        train(
            load_config(
                REPO / "recipes/tiny/sft.yaml",
                [
                    f"model.name_or_path={model}",
                    f"data.train={task / 'sft.jsonl'}",
                    "data.eval=null",
                    f"output_dir={sft}",
                    "overwrite_output_dir=true",
                    "logging.progress=false",
                ],
            )
        )
    tokenizer = AutoTokenizer.from_pretrained(sft / "final")
    prompts = task / "prompts_train.jsonl"
    subset = workdir / f"prompts-{rows}.jsonl"
    subset.write_text("".join(prompts.read_text().splitlines(keepends=True)[:rows]))
    data_cfg = DataConfig(train=str(subset), shuffle=False, max_prompt_length=32, max_length=96)
    bundle = build_datasets(data_cfg, tokenizer, "prompts", seed=SEED, cache_dir=None)
    texts = list(bundle.train["prompt_text"])
    ids = list(bundle.train["prompt_input_ids"])
    trl_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if trl_ids != [list(x) for x in ids]:
        raise RuntimeError("TRL's tokenization of the prompt text differs from prefopt's prompt ids")
    heldout = [
        json.loads(line)["prompt"] for line in (task / "prompts_heldout.jsonl").read_text().splitlines()
    ]
    return {"sft": str(sft / "final"), "prompts": str(subset), "prompt_texts": texts, "heldout": heldout}


def gold_reward(model_dir: str, prompts: list[str], samples: int) -> float:
    """Mean gold reward of ``samples`` samples per held-out prompt (temperature 1, 48 tokens, fixed seed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_tools.synth import score
    from prefopt.generation import HFGenerator, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rollouts = HFGenerator(model, tokenizer, batch_size=64).generate(
        ids, SamplingParams(n=samples, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=SEED)
    )
    texts = [prompts[int(i)] for i in rollouts.prompt_index]
    return statistics.mean(score(p, c) for p, c in zip(texts, rollouts.texts))


# --------------------------------------------------------------------------------------------------------------


def summarise(results: list[dict], log) -> list[dict]:
    rows = []
    trl = [r for r in results if r["trainer"] == "trl"]
    labels = (["trl"] if trl else []) + sorted({r["trainer"] for r in results if r["trainer"] != "trl"})
    base_rates = [1 / statistics.median(r["step_times"][1:]) for r in (trl or results)]
    base_peaks = [r["peak_rss_mib"] for r in (trl or results)]
    for label in labels:
        runs = [r for r in results if r["trainer"] == label]
        step = statistics.median(t for r in runs for t in r["step_times"][1:])
        generation = statistics.median(t for r in runs for t in r["generation_times"][1:])
        per_token = statistics.median(
            t / n * 1000 for r in runs for t, n in zip(r["generation_times"][1:], r["decode_steps"][1:])
        )
        decode_steps = statistics.mean(n for r in runs for n in r["decode_steps"][1:])
        rates = [1 / statistics.median(r["step_times"][1:]) for r in runs]
        rows.append(
            {
                "trainer": "TRL OnlineDPOTrainer" if label == "trl" else f"prefopt {label}",
                "s_per_step": step,
                "generation_s": generation,
                "rest_s": step - generation,
                "generation_ms_per_decode_step": per_token,
                "decode_steps_per_step": decode_steps,
                "steps_per_s_vs_trl": statistics.median(a / b for a, b in zip(rates, base_rates)),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                "memory_vs_trl": statistics.median(r["peak_rss_mib"] / b for r, b in zip(runs, base_peaks)),
                # The step's own memory: the peak above the RSS at the first sampling call (runtime and model
                # loaded), which is what a trainer's choices can change on a model this small.
                "above_start_mib": statistics.median(r["peak_rss_mib"] - r["rss_start_mib"] for r in runs),
                "gold": statistics.mean(r["gold"] for r in runs),
                "final_loss": statistics.mean(r["losses"][-1] for r in runs),
            }
        )
    log(
        "| trainer | s/step (median) | generation s | decode steps/step (mean) | generation ms/decode step "
        "| rest s | steps/s vs TRL | peak RSS MiB | memory vs TRL | peak above start MiB "
        "| gold reward after training | last loss |"
    )
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        log(
            f"| {r['trainer']} | {r['s_per_step']:.3f} | {r['generation_s']:.3f} "
            f"| {r['decode_steps_per_step']:.1f} | {r['generation_ms_per_decode_step']:.1f} | {r['rest_s']:.3f} "
            f"| {r['steps_per_s_vs_trl']:.2f}x | {r['peak_rss_mib']:.0f} | {r['memory_vs_trl']:.2f}x "
            f"| {r['above_start_mib']:.0f} "
            f"| {r['gold']:.3f} | {r['final_loss']:.3f} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"prefopt losses: {', '.join(METHODS)}")
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run (the first is a warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument(
        "--env-variants",
        default="",
        help="extra prefopt runs of the same methods in the same turns, one per space-separated NAME=VALUE "
        "environment setting (e.g. PREFOPT_DECODE_THREADS=0)",
    )
    parser.add_argument(
        "--override-variants",
        default="",
        help="extra prefopt runs of the same methods in the same turns, one per space-separated config override "
        "(e.g. train.share_prompt=false)",
    )
    parser.add_argument(
        "--eval-samples", type=int, default=2, help="samples per held-out prompt for the gold reward"
    )
    parser.add_argument(
        "--overrides", default="", help="extra prefopt overrides, space-separated (key=value)"
    )
    parser.add_argument("--json", help="write all runs and the summary here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile every run after its warm-up step; prints where a step's time goes (slows the runs down)",
    )
    parser.add_argument(
        "--workdir", default=os.environ.get("PREFOPT_BENCH_DIR", "/tmp/prefopt-bench") + "/online"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = (child_trl if spec["trainer"] == "trl" else child_prefopt)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(text):
        print(text, flush=True)

    methods = [m for m in args.methods.split(",") if m]
    assets = build_assets(workdir, args.batch * args.steps, log)
    log(
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; batch {args.batch} prompts, {args.steps} "
        f"steps (first = warm-up), {args.repeats} repeats, {MAX_NEW_TOKENS} new tokens, temperature 1"
    )
    results = []
    stamp = time.strftime("%H%M%S")
    for repeat in range(args.repeats):
        specs = []
        runs = [(method, method, {}, []) for method in methods]
        for setting in args.env_variants.split():
            name, _, value = setting.partition("=")
            runs += [(f"{method} {setting}", method, {name: value}, []) for method in methods]
        for setting in args.override_variants.split():
            runs += [(f"{method} {setting}", method, {}, [setting]) for method in methods]
        for trainer, method, env, extra in runs + ([] if args.no_trl else [("trl", "trl", {}, [])]):
            tag = f"{stamp}-{trainer.replace(' ', '-').replace('=', '')}-r{repeat}"
            spec = {
                "name": tag,
                "trainer": trainer,
                "method": method,
                "env": env,
                "model": assets["sft"],
                "prompts": assets["prompts"],
                "prompt_texts": assets["prompt_texts"],
                "batch": args.batch,
                "steps": args.steps,
                "out": str(workdir / "out" / tag),
                "overrides": args.overrides.split() + extra,
                "result": str(workdir / "runs" / f"{tag}.result.json"),
            }
            if args.profile:
                spec["profile"] = str(workdir / "runs" / f"{tag}.prof")
            specs.append(spec)
        for spec, result in zip(specs, run_children_in_turns(specs, workdir, log)):
            trainer = spec["trainer"]
            if args.profile:
                measured = len(result["step_times"]) - 1
                log(f"    profile of {spec['name']}, seconds per step over {measured} steps:")
                for label, calls, seconds in profile_phases(spec["profile"], trainer, measured):
                    log(f"    {label:<40} {seconds:7.3f}s" + (f"  ({calls} calls)" if calls else ""))
            result["gold"] = gold_reward(result["final"], assets["heldout"], args.eval_samples)
            results.append({**result, "trainer": trainer, "repeat": repeat})
    sft_gold = gold_reward(assets["sft"], assets["heldout"], args.eval_samples)
    log(
        f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; gold reward of the SFT model "
        f"(the starting point): {sft_gold:.3f}"
    )
    rows = summarise(results, log)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summary": rows, "sft_gold": sft_gold, "runs": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
