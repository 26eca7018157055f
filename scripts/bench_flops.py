"""Matmul FLOPs a preference-training step actually executes, next to the conventional ``6 N`` estimate.

Used by ``scripts/bench_offline.py`` (and the online benchmark). The conventional figure, ``6 N`` per real token
for the policy plus ``2 N`` for a live reference (``N`` = parameters without the input embedding), assumes every
token runs through every weight once forward and twice backward. What a trainer executes differs:

- the decoder body runs over every *padded* position of the batch (padding is computed, then masked);
- attention's ``QK^T`` and ``PV`` products (``4 h`` FLOPs per query/key pair and layer) are not in ``6 N``; we count
  every pair of the padded rows (``L^2`` per row): with a padding mask the CPU sdpa kernels compute every block;
- the lm head (``2 h V`` per row) runs where the trainer computes it: prefopt at completion positions only, TRL
  1.16 on CPU at every position; its backward is two GEMMs (``4 h V``), plus one more forward GEMM when the
  softmax is recomputed instead of kept (prefopt's fused head above ``PREFOPT_LOGPS_KEEP_MB``, the checkpointed
  head always);
- with the prompt shared per pair (``train.share_prompt``) the prompt runs once: ``B P + 2B C`` body positions and
  ``B P^2 + 2B C (P + C)`` attention pairs instead of ``2B (P + C)`` and ``2B (P + C)^2``;
- a live reference adds one forward (body + attention + its head positions); a precomputed one adds nothing.

Only matmul FLOPs are counted (norms, rotary, softmax and the optimizer are elementwise and small against them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        c = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            intermediate=c["intermediate_size"],
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            vocab=c["vocab_size"],
        )

    @property
    def body_per_position(self) -> int:
        """Forward matmul FLOPs of the decoder's linear layers for one position (2 per multiply-add)."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return self.layers * 2 * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate)

    @property
    def attention_per_pair(self) -> int:
        """Forward FLOPs of ``QK^T`` and ``PV`` for one query/key pair, over all layers."""
        return self.layers * 4 * self.hidden

    @property
    def head_per_row(self) -> int:
        return 2 * self.hidden * self.vocab


def shares_prompt(shape: ModelShape, pairs: list[tuple[int, int, int]]) -> bool:
    """``train.share_prompt=auto``'s decision for this batch (``prefix_sharing.sharing_pays_off``): the prompt
    tokens times one layer's linear weights (norms left out: 2 x hidden, under 0.1% here) against the bar."""
    from prefopt.models.prefix_sharing import SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER

    per_layer = shape.body_per_position // (2 * shape.layers)
    return sum(p for p, _, _ in pairs) * per_layer >= SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER


def forward_flops(
    shape: ModelShape,
    pairs: list[tuple[int, int, int]],
    *,
    head: str,
    share_prompt: bool | str,
    packing: bool,
) -> tuple[float, float, float]:
    """(body, attention, head) forward FLOPs of one pass over a pair batch. ``pairs``: (prompt, chosen, rejected)
    lengths; ``head``: ``"completion"`` (head rows = completion tokens) or ``"all"`` (every padded position)."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(p + c for p, c in rows)
    completion_rows = sum(c for _, c in rows)
    if packing:
        total = sum(p + c for p, c in rows)
        positions, attention_pairs = total, total * total
    elif share_prompt is True or (share_prompt == "auto" and shares_prompt(shape, pairs)):
        prompt_width, completion_width = max(p for p, _, _ in pairs), max(c for _, c in rows)
        positions = len(pairs) * prompt_width + len(rows) * completion_width
        attention_pairs = len(pairs) * prompt_width**2 + len(rows) * completion_width * (
            prompt_width + completion_width
        )
    else:
        positions, attention_pairs = len(rows) * width, len(rows) * width * width
    head_rows = completion_rows if head == "completion" else positions
    return (
        positions * shape.body_per_position,
        attention_pairs * shape.attention_per_pair,
        head_rows * shape.head_per_row,
    )


def step_flops(
    shape: ModelShape,
    pairs: list[tuple[int, int, int]],
    *,
    reference: str,
    head: str = "completion",
    recompute_head: bool = False,
    share_prompt: bool | str = False,
    packing: bool = False,
) -> dict:
    """Executed matmul FLOPs of one offline DPO step, by part, and the total."""
    body, attention, head_fwd = forward_flops(
        shape, pairs, head=head, share_prompt=share_prompt, packing=packing
    )
    policy_forward = body + attention + head_fwd
    policy_backward = 2 * (body + attention) + 2 * head_fwd + (head_fwd if recompute_head else 0)
    reference_forward = policy_forward if reference == "live" else 0.0
    return {
        "policy_forward": policy_forward,
        "policy_backward": policy_backward,
        "reference_forward": reference_forward,
        "head": head_fwd * (3 + recompute_head + (reference == "live")),
        "total": policy_forward + policy_backward + reference_forward,
    }


def conventional_flops(matmul_params: int, real_tokens: int, reference: str) -> float:
    """The usual ``6 N`` per token (+ ``2 N`` for a live reference's forward)."""
    return (6 + (2 if reference == "live" else 0)) * matmul_params * real_tokens


def keeps_softmax(shape: ModelShape, completion_rows: int, keep_mb: float = 256) -> bool:
    """Whether prefopt's fused head keeps the softmax (no recompute): ``rows * vocab * 4 <= KEEP_MB``."""
    return 0 < completion_rows * shape.vocab * 4 <= keep_mb * 2**20
