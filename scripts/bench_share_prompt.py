#!/usr/bin/env python
"""Where sharing a pair batch's prompt pays: the shared-prompt forward against the plain one, forward + backward.

``train.share_prompt=auto`` shares a batch when the duplicated prompt tokens times one decoder layer's parameters
reach ``SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER`` (``prefopt/models/prefix_sharing.py``). This script is the
measurement behind that bar: randomly initialised Llama models of four widths, pair batches with prompts of
different lengths, and ``completion_token_logps`` with ``share_prompt=True`` and ``False`` taking turns round by
round in one process (the same batch: a no-grad forward, as a live reference runs, then a forward whose summed logps
are backpropagated). It prints the saved multiply-adds per layer, the
milliseconds of each path, their ratio and what ``auto`` decides.

    python scripts/bench_share_prompt.py            # all cases (about 3 minutes on 2 cores)
    python scripts/bench_share_prompt.py --quick    # the two smallest models
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (as in the other benchmarks' children): on a shared machine a
# spinning thread that lost its core slows every parallel region by an order of magnitude. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefopt.models.logps import completion_token_logps  # noqa: E402
from prefopt.models.prefix_sharing import sharing_pays_off  # noqa: E402

VOCAB = 853  # the gold task's tokenizer
# (hidden, layers, pairs, prompt tokens, completion tokens at most)
CASES = [
    (64, 2, 8, 24, 48),  # the online benchmark's shape (scripts/bench_online.py)
    (64, 2, 8, 96, 48),
    (64, 2, 8, 256, 48),
    (128, 4, 8, 24, 48),
    (128, 4, 8, 96, 48),
    (256, 4, 8, 24, 48),
    (256, 4, 8, 96, 48),
    (512, 8, 2, 80, 300),
    (512, 8, 4, 40, 48),
]


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(hidden // 16, 1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def pair_batch(pairs: int, prompt: int, completion: int, generator: torch.Generator):
    """A right-padded pair batch: rows i and i + pairs share a prompt (lengths vary by up to a quarter)."""
    prompts = torch.randint(3, VOCAB, (pairs, prompt), generator=generator)
    rows, masks = [], []
    for row in range(2 * pairs):
        length = prompt - (row % pairs) % max(prompt // 4, 1)
        answer = int(torch.randint(completion // 2, completion + 1, (), generator=generator))
        ids = torch.cat(
            [prompts[row % pairs, :length], torch.randint(3, VOCAB, (answer,), generator=generator)]
        )
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[length:] = 1
        rows.append(ids)
        masks.append(mask)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)], attention[i, : len(ids)], completion_mask[i, : len(ids)] = ids, 1, mask
    return input_ids, attention, completion_mask


def forward_backward(model, batch, share: bool) -> float:
    """What a DPO step with a live reference runs: a no-grad forward (the reference), then forward + backward."""
    start = time.perf_counter()
    with torch.no_grad():
        completion_token_logps(model, *batch, share_prompt=share)
    completion_token_logps(model, *batch, share_prompt=share).token_logps.sum().backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only the two smallest models")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(
        "| hidden x layers | pairs x prompt x completion | saved MACs per layer | shared ms | plain ms",
        end="",
    )
    print(" | shared speed | auto |")
    print("|---|---|---:|---:|---:|---:|---|")
    for hidden, layers, pairs, prompt, completion in CASES:
        if args.quick and hidden > 128:
            continue
        model = build_model(hidden, layers)
        batch = pair_batch(pairs, prompt, completion, generator)
        per_layer = sum(p.numel() for p in model.model.layers.parameters()) // layers
        saved_tokens = int((batch[1] - batch[2]).clamp(min=0)[:pairs].sum())
        seconds = {True: 0.0, False: 0.0}
        for share in (True, False):  # warm-up
            forward_backward(model, batch, share)
        rounds = args.rounds if hidden < 512 else max(args.rounds // 2, 1)
        for index in range(rounds):  # alternate which path goes first
            for share in (True, False) if index % 2 else (False, True):
                seconds[share] += forward_backward(model, batch, share)
        decision = "share" if sharing_pays_off(model, saved_tokens) else "plain"
        print(
            f"| {hidden} x {layers} | {pairs} x {prompt} x {completion} | {saved_tokens * per_layer / 1e6:.1f}M "
            f"| {1000 * seconds[True] / rounds:.1f} | {1000 * seconds[False] / rounds:.1f} "
            f"| {seconds[False] / seconds[True]:.2f}x | {decision} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
