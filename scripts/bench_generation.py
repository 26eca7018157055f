#!/usr/bin/env python
"""HF-backend generation speed on CPU: prefopt's lean sampling loop against plain ``model.generate``.

One process, the same model, the same left-padded prompt batch and the same seed for both; the two take turns
round by round (the first mover alternates), so machine load hits them alike. Both produce the same tokens
(checked here every round, and in ``tests/test_generation.py``), so tokens/s compare the same work: generated
tokens up to each row's EOS over wall time.

    python scripts/bench_generation.py                          # tiny and small (bench_offline's), batch 8 and 32
    python scripts/bench_generation.py --models small --batches 8 --new-tokens 48 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def build(name: str, workdir: Path) -> Path:
    if name == "tiny":
        from prefopt.models.tiny import build_tiny_model

        out = workdir / "models" / "gen-tiny"
        return out if (out / "config.json").is_file() else build_tiny_model(out)
    import bench_offline as bench

    return bench.build_model(name, workdir, print)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="tiny,small", help="tiny (prefopt's tiny model) or a bench_offline config"
    )
    parser.add_argument("--batches", default="8,32", help="prompts per generate call")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--prompt-tokens", default="16,48", help="prompt lengths drawn uniformly from this range"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workdir", default=os.environ.get("PREFOPT_BENCH_DIR", "/tmp/prefopt-bench"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.generation import HFGenerator, SamplingParams

    low, high = (int(x) for x in args.prompt_tokens.split(","))
    print(
        f"threads {torch.get_num_threads()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"{args.new_tokens} new tokens, temperature 1, prompts {low}-{high} tokens, {args.rounds} rounds"
    )
    print(
        "| model | params | batch | model.generate tok/s | lean loop tok/s | speed-up (median of rounds) "
        "| same tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in [m for m in args.models.split(",") if m]:
        model_dir = build(name, Path(args.workdir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        params = sum(p.numel() for p in model.parameters())
        vocab = model.config.vocab_size
        for batch in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            prompts = [
                torch.randint(
                    4, vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g
                ).tolist()
                for _ in range(batch)
            ]
            generators = {
                loop: HFGenerator(model, tokenizer, batch_size=batch, loop=loop)
                for loop in ("generate", "lean")
            }
            rates: dict[str, list[float]] = {loop: [] for loop in generators}
            same = True
            for number in range(args.rounds + 1):  # round 0 is a warm-up
                sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=number)
                order = list(generators) if number % 2 else list(reversed(generators))
                outputs = {}
                for loop in order:
                    started = time.perf_counter()
                    outputs[loop] = generators[loop].generate(prompts, sampling)
                    elapsed = time.perf_counter() - started
                    if number:
                        rates[loop].append(float(outputs[loop].completion_lengths.sum()) / elapsed)
                same &= torch.equal(outputs["lean"].completion_ids, outputs["generate"].completion_ids)
            ratio = statistics.median(a / b for a, b in zip(rates["lean"], rates["generate"]))
            print(
                f"| {name} | {params / 1e6:.1f}M | {batch} | {statistics.median(rates['generate']):.0f} "
                f"| {statistics.median(rates['lean']):.0f} | {ratio:.2f}x | {'yes' if same else 'NO'} |",
                flush=True,
            )
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
