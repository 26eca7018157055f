"""Rollouts that restart from a prefix of a dataset response (DR-PO, Chang et al. 2024, arXiv 2404.08495).

Backend-agnostic: the generator (Hugging Face or vLLM) is asked to continue ``prompt + prefix`` like any
prompt,
which is what the released code's logits processor achieves by forcing the first k tokens
(Cornell-RL/tril ``logit_processors.py:109``). The forced tokens use up the generation budget: a row forced to
k
tokens keeps at most ``max_new_tokens - k`` sampled ones (the code samples a fixed 53 tokens in all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefopt.generation.base import Rollouts, SamplingParams, build_rollouts


@dataclass
class ResetRollouts:
    """``rollouts``: what the policy is trained on; ``reset_mask`` ``[N, T]`` aligned with
    ``rollouts.completion_ids`` (1 on forced tokens; all 0 when the prefix is context); ``texts``: prefix +
    continuation, what the reward scores in both modes; ``reset_lengths``: k per row (0: no reset)."""

    rollouts: Rollouts
    reset_mask: torch.Tensor
    texts: list[str]
    reset_lengths: list[int]


def generate_with_resets(
    generator,
    prompt_ids: Sequence[Sequence[int]],
    prefixes: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    tokenizer,
    prefix_in_response: bool = True,
) -> ResetRollouts:
    """One continuation per prompt from ``prompt + prefix`` (an empty prefix is an ordinary rollout).

    ``prefix_in_response=True`` (the released code): the response is prefix + continuation and ``reset_mask``
    marks the prefix. ``False`` (the paper): the prefix joins the prompt and the response is the continuation.
    """
    if sampling.n != 1:
        raise ValueError("generate_with_resets samples one continuation per (prompt, prefix)")
    budget = sampling.max_new_tokens
    prefixes = [list(prefix)[: budget - 1] for prefix in prefixes]  # at least one sampled token per row
    contexts = [list(p) + prefix for p, prefix in zip(prompt_ids, prefixes)]
    raw = generator.generate(contexts, sampling)
    lengths = raw.completion_lengths.tolist()
    continuations = [
        raw.completion_ids[i, : min(lengths[i], budget - len(prefixes[i]))].tolist()
        for i in range(len(contexts))
    ]
    device = raw.completion_ids.device
    common = dict(eos_ids=eos_ids, pad_id=pad_id, tokenizer=tokenizer, device=device)
    if prefix_in_response:
        rollouts = build_rollouts(prompt_ids, [p + c for p, c in zip(prefixes, continuations)], 1, **common)
        texts = list(rollouts.texts)
    else:
        rollouts = build_rollouts(contexts, continuations, 1, **common)
        texts = tokenizer.batch_decode(
            [p + c for p, c in zip(prefixes, continuations)], skip_special_tokens=True
        )
    reset_mask = torch.zeros_like(rollouts.completion_mask)
    if prefix_in_response:
        for i, prefix in enumerate(prefixes):
            reset_mask[i, : len(prefix)] = 1
    return ResetRollouts(rollouts, reset_mask, texts, [len(p) for p in prefixes])
