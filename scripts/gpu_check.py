"""One command that exercises prefopt's hardware paths on a GPU machine, with no network, and prints a table.

    python scripts/gpu_check.py                 # one GPU: all checks, a random-init Qwen2.5-0.5B-shaped model
    python scripts/gpu_check.py --dry-run       # print the plan (every command) and exit
    python scripts/gpu_check.py --tiny --device cpu --only dpo-bf16   # the CPU-runnable subset, tiny model

Checks (each a real ``prefopt train`` run of a few steps, in its own process):

  dpo-bf16      bf16 DPO (model.dtype=bfloat16, fp32 master weights, bf16 autocast), 1 process
  zero2         DeepSpeed ZeRO-2 (torchrun, bf16)
  zero3         DeepSpeed ZeRO-3, live reference in its own engine; final/ reloaded and checked for full tensors
  fsdp2         FSDP2 via recipes/accelerate/fsdp2.yaml (accelerate launch)
  lora-zero3    LoRA + ZeRO-3; final/ reloaded with PeftModel.from_pretrained, non-empty trained adapters
  packing       packed vs padded reference logps, sdpa and flash_attention_2 (needs flash-attn)
  hypo, xpo     online methods with HF generation

The table lists status, wall time, tokens/s (prefopt's own metric) and MFU = 6 * parameters * tokens/s / peak
(bf16 dense peak of the GPU: --peak-tflops, or looked up for A100/H100/H200).

Machines without a network: bring the missing packages as wheels. On a machine with the network and the same
Python/CUDA: ``pip download -d wheels 'prefopt[deepspeed,test]' flash-attn`` (and copy this repository); on the
GPU machine: ``pip install --no-index --find-links wheels -e '.[deepspeed,test]'``. torch comes from the GPU
machine's own install; never let pip replace it (``pip install --dry-run`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


@dataclass
class Check:
    name: str
    launcher: str  # "python" | "torchrun" | "accelerate:<config>"
    recipe: str
    overrides: list[str] = field(default_factory=list)
    gpu_only: bool = False
    verify: str | None = None  # "full" | "lora"


def plan(args, model_dir: Path, data_dir: Path, ds_dir: Path) -> list[Check]:
    bf16 = ["train.mixed_precision=bf16"] + ([] if args.device == "cpu" else ["model.dtype=bfloat16"])
    lora = ["model.peft.r=16", "model.peft.alpha=32", "reference.mode=adapter"]
    common = [
        f"model.name_or_path={model_dir}",
        f"data.train={data_dir / 'pairs_train.jsonl'}",
        "data.eval=null",
        f"train.max_steps={args.max_steps}",
        "train.warmup_ratio=0",
        "logging.logging_steps=1",
        "logging.progress=false",
        "overwrite_output_dir=true",
        f"train.per_device_batch_size={args.batch}",
        f"data.max_length={args.max_length}",
    ]
    online = [
        f"model.name_or_path={model_dir}",
        f"train.max_steps={max(2, args.max_steps // 2)}",
        "train.warmup_ratio=0",
        "logging.logging_steps=1",
        "logging.progress=false",
        "overwrite_output_dir=true",
        "train.per_device_batch_size=4",
        "generation.max_new_tokens=32",
    ]
    dpo = "recipes/tiny/dpo.yaml"
    return [
        Check("dpo-bf16", "python", dpo, common + bf16),
        Check("zero2", "torchrun", dpo, common + [f"train.deepspeed={ds_dir / 'zero2.json'}"]),
        Check("zero3", "torchrun", dpo, common + [f"train.deepspeed={ds_dir / 'zero3.json'}"], verify="full"),
        Check(
            "fsdp2",
            f"accelerate:{REPO / 'recipes/accelerate/fsdp2.yaml'}",
            dpo,
            common,
            verify="full",  # runs on CPU too: prefopt builds accelerate's FSDP state over gloo
        ),
        Check(
            "lora-zero3",
            "torchrun",
            dpo,
            common + lora + [f"train.deepspeed={ds_dir / 'zero3.json'}"],
            verify="lora",
        ),
        Check("packing", "packing", "", [], gpu_only=True),
        Check(
            "hypo",
            "python",
            "recipes/tiny/hypo.yaml",
            online + bf16 + [f"data.train={data_dir / 'pairs_train.jsonl'}", "data.eval=null"],
        ),
        Check(
            "xpo",
            "python",
            "recipes/tiny/xpo.yaml",
            online + bf16 + [f"data.train={data_dir / 'prompts_train.jsonl'}"],
        ),
    ]


def deepspeed_configs(out: Path, device: str) -> Path:
    """ZeRO-2/3 JSONs with bf16 on a GPU (fp32 on CPU: DeepSpeed's CPU backend runs fp32 here)."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in (2, 3):
        zero = {"stage": stage, "overlap_comm": False}
        if stage == 3:
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        config = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": zero,
            "bf16": {"enabled": device != "cpu"},
            "fp16": {"enabled": False},
        }
        (out / f"zero{stage}.json").write_text(json.dumps(config, indent=1))
    return out


def build_model(out: Path, tiny: bool) -> tuple[Path, int]:
    """A random-initialised model (no download): Qwen2.5-0.5B's shape, or prefopt's tiny Llama."""
    from prefopt.models.tiny import build_tiny_model, train_tiny_tokenizer

    if tiny:
        path = build_tiny_model(out)
    else:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = train_tiny_tokenizer()
        torch.manual_seed(0)
        config = Qwen2Config(
            **QWEN25_05B,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
        path = out
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        count = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters()
        )
    return Path(path), count


def command(check: Check, args, out: Path) -> list[str]:
    tail = ["-m", "prefopt", "train", str(REPO / check.recipe), f"output_dir={out}", *check.overrides]
    nproc = str(args.nproc)
    if check.launcher == "python":
        return [sys.executable, *tail]
    if check.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            nproc,
            "--master_port",
            str(args.port),
            *tail,
        ]
    if check.launcher.startswith("accelerate:"):
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            check.launcher.split(":", 1)[1],
            "--num_processes",
            nproc,
            "--main_process_port",
            str(args.port),
            *tail,
        ]
    return [sys.executable, str(Path(__file__).resolve()), "--packing-check", "--out", str(out)]


def verify(check: Check, out: Path, model_dir: Path) -> str:
    """'' when final/ holds full, trained weights (or a non-empty trained adapter); else what is wrong."""
    import torch
    from transformers import AutoModelForCausalLM

    if check.verify == "full":
        model = AutoModelForCausalLM.from_pretrained(out / "final")
        start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        for name, tensor in model.state_dict().items():
            if tensor.shape != start[name].shape:
                return f"final/ {name} has shape {tuple(tensor.shape)}"
        if all(torch.equal(t, start[n].to(t.dtype)) for n, t in model.state_dict().items()):
            return "final/ equals the initial weights"
    if check.verify == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "final")
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        if not lora_b or any(p.numel() == 0 for p in lora_b) or all(p.abs().sum() == 0 for p in lora_b):
            return "final/ adapter is empty or untrained"
    return ""


def packing_check(out: Path) -> int:
    """Packed vs padded reference logps under sdpa and flash_attention_2 on the GPU (max abs difference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefopt.data import PairCollator
    from prefopt.data.packing import PackedPairCollator
    from prefopt.models.logps import completion_token_logps, sequence_totals
    from prefopt.models.tiny import build_tiny_model

    model_dir = build_tiny_model(out / "model")
    rows = [
        {
            "prompt_input_ids": list(range(5, 5 + n)),
            "chosen_input_ids": list(range(40, 40 + n + 3)),
            "rejected_input_ids": list(range(70, 70 + n + 1)),
            "index": i,
        }
        for i, n in enumerate((4, 9, 6, 12))
    ]
    results = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation=impl
        ).cuda()
        sums = []
        for collator in (PairCollator(0), PackedPairCollator(0)):
            batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collator(rows).items()}
            with torch.no_grad():
                logps = completion_token_logps(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["completion_mask"],
                    position_ids=batch.get("position_ids"),
                    attention_bias=batch.get("attention_bias"),
                )
            sums.append(sequence_totals(logps, batch)[0].float().cpu())
        results[impl] = float((sums[0] - sums[1]).abs().max())
    print(json.dumps({"packed_vs_padded_max_abs": results}))
    return 0 if all(v < 5e-2 for v in results.values()) else 1


def tokens_per_second(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [
        json.loads(line).get("tokens_per_second") for line in path.read_text().splitlines() if line.strip()
    ]
    rates = [r for r in rates if r]
    return rates[-1] if rates else None


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--tiny", action="store_true", help="prefopt's tiny Llama instead of the 0.5B shape")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--nproc", type=int, default=1, help="processes for torchrun/accelerate checks")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per check")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--packing-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packing_check:
        return packing_check(args.out)
    if args.device == "cpu" and args.nproc == 1:
        args.nproc = 2  # sharding on CPU needs two processes to mean anything
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / "data"
    model_dir = args.out / "model"
    ds_dir = deepspeed_configs(args.out / "ds", args.device)
    checks = plan(args, model_dir, data_dir, ds_dir)
    wanted = {n for n in args.only.split(",") if n}
    unknown = wanted - {c.name for c in checks}
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}")
    checks = [c for c in checks if not wanted or c.name in wanted]
    if args.dry_run:
        for check in checks:
            print(f"{check.name}: {' '.join(command(check, args, args.out / check.name))}")
        return 0
    from data_tools.synth import write_task

    write_task(data_dir, seed=0, n_sft=64, n_pairs=256, n_eval=16, n_heldout=16, n_prompts=64)
    model_dir, params = build_model(model_dir, args.tiny)
    peak = peak_flops(args)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("ACCELERATE_USE_CPU", None)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for check in checks:
        out = args.out / check.name
        if check.gpu_only and args.device == "cpu":
            rows.append((check.name, "skipped (GPU only)", None, None, None))
            continue
        start = time.time()
        try:
            result = subprocess.run(
                command(check, args, out),
                capture_output=True,
                text=True,
                env=env,
                timeout=args.timeout,
                cwd=REPO,
            )
            status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
            if result.returncode != 0:
                (args.out / f"{check.name}.log").write_text(result.stdout + result.stderr)
            elif check.verify:
                problem = verify(check, out, model_dir)
                status = f"FAILED ({problem})" if problem else "ok"
        except subprocess.TimeoutExpired:
            status = f"FAILED (timeout {args.timeout}s)"
        rate = tokens_per_second(out)
        mfu = 6 * params * rate / (peak * args.nproc) if rate and peak else None
        rows.append((check.name, status, time.time() - start, rate, mfu))
    print(
        f"\nmodel: {'tiny Llama' if args.tiny else 'Qwen2.5-0.5B shape (random init)'}, {params / 1e6:.1f}M "
        f"parameters; device {args.device}, {args.nproc} process(es)"
    )
    print(f"{'check':<12} {'status':<40} {'wall s':>7} {'tokens/s':>10} {'MFU':>6}")
    for name, status, wall, rate, mfu in rows:
        print(
            f"{name:<12} {status:<40} {wall or 0:>7.1f} {rate or 0:>10.0f} "
            f"{'' if mfu is None else f'{100 * mfu:.1f}%':>6}"
        )
    (args.out / "table.json").write_text(
        json.dumps(
            [dict(zip(("check", "status", "wall_s", "tokens_per_second", "mfu"), row)) for row in rows],
            indent=1,
        )
    )
    return 0 if all(r[1].startswith(("ok", "skipped")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
