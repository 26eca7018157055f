"""What every generator returns, and the post-processing both backends share.

A backend only has to produce, for each prompt, ``n`` lists of generated token ids. :func:`build_rollouts` turns
those into :class:`Rollouts`: the completion truncated after its first EOS, a mask covering the completion up to
and including that EOS, the ``finished`` flag and the decoded text. Because both backends go through the same
function, an HF rollout and a vLLM rollout of the same tokens are identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding; ``top_k == 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes one ``generate`` call reproducible without touching the trainer's RNG stream.

    ``prompt_seeds`` (one per prompt) gives every prompt its own random stream (sample ``j`` of prompt ``i`` from
    :func:`sample_seed` of ``prompt_seeds[i]`` and ``j``): the samples then do not depend on which other prompts
    share the call, the sub-batch or the rank, so 1 and N data-parallel processes draw the same samples."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None
    prompt_seeds: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a prompt whose seed is ``prompt_seed`` (a 63-bit mix of the two)."""
    import hashlib

    digest = hashlib.blake2b(f"{prompt_seed}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Rollouts:
    """``N = len(prompts) * n`` completions, grouped prompt-major (prompt 0's ``n`` samples come first).

    ``completion_ids`` is right-padded with the pad id; ``completion_mask`` is 1 on generated tokens up to and
    including the first EOS and 0 after it (so a completion that hit ``max_new_tokens`` is masked in full and
    ``finished`` is False for it).
    """

    prompt_index: torch.LongTensor  # [N]
    prompt_ids: list[list[int]]  # [N], unpadded
    completion_ids: torch.LongTensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T]
    texts: list[str]  # [N]
    finished: torch.BoolTensor  # [N]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_lengths(self) -> torch.LongTensor:
        """Completion tokens counted by the mask (EOS included), [N]."""
        return self.completion_mask.sum(dim=1).long()

    def to_sequences(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Prompt + completion per row, right-padded to the longest row.

        Returns ``input_ids`` [N, L], ``attention_mask`` [N, L] (1 on prompt and completion tokens) and
        ``completion_mask`` [N, L] (1 on completion tokens, unshifted: the per-token logp function shifts it with
        the labels). Tokens after the first EOS are dropped, so padding never enters the attention mask.
        """
        lengths = self.completion_lengths.tolist()
        rows = [
            list(prompt) + self.completion_ids[i, : lengths[i]].tolist()
            for i, prompt in enumerate(self.prompt_ids)
        ]
        width = max((len(row) for row in rows), default=0)
        count = len(rows)
        input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((count, width), dtype=torch.long)
        completion_mask = torch.zeros((count, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
            completion_mask[i, len(self.prompt_ids[i]) : len(row)] = 1
        device = self.completion_ids.device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "completion_mask": completion_mask.to(device),
        }


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollouts:
        """Sample ``sampling.n`` completions for every prompt (token ids, unpadded)."""
        ...

    def load_weights(self, model) -> None:
        """Make the generator sample from ``model``'s current weights (no-op where it uses the live model)."""
        ...


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS list
    (chat models often have several, e.g. end-of-turn and end-of-text)."""
    ids: list[int] = []
    candidates: list = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None) if model is not None else None
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        if candidate is None:
            continue
        for token in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("the tokenizer has no EOS token: generation could never finish a completion")
    return ids


def pad_token_id(tokenizer, model=None) -> int:
    """The tokenizer's pad id, else the model's generation-config pad id, else the (first) EOS id."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    generation_config = getattr(model, "generation_config", None) if model is not None else None
    if generation_config is not None and generation_config.pad_token_id is not None:
        pad = generation_config.pad_token_id
        return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    return eos_token_ids(tokenizer, model)[0]


def build_rollouts(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Iterable[int]],
    n: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    tokenizer,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """Assemble :class:`Rollouts` from raw generated token lists.

    ``completions`` holds ``len(prompt_ids) * n`` token lists, prompt-major. Each is cut after its first EOS
    (anything a backend emitted after it, padding included, is dropped); a list with no EOS is an unfinished
    completion that ran out of ``max_new_tokens``.
    """
    if len(completions) != len(prompt_ids) * n:
        raise ValueError(
            f"expected {len(prompt_ids)} prompts x {n} = {len(prompt_ids) * n} completions, got {len(completions)}"
        )
    eos_set = {int(token) for token in eos_ids}
    kept: list[list[int]] = []
    finished: list[bool] = []
    for tokens in completions:
        tokens = [int(token) for token in tokens]
        end = next((i for i, token in enumerate(tokens) if token in eos_set), None)
        if end is None:
            kept.append(tokens)
            finished.append(False)
        else:
            kept.append(tokens[: end + 1])
            finished.append(True)
    width = max((len(tokens) for tokens in kept), default=0)
    count = len(kept)
    completion_ids = torch.full((count, width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((count, width), dtype=torch.long)
    for i, tokens in enumerate(kept):
        if tokens:
            completion_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            completion_mask[i, : len(tokens)] = 1
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True) if kept else []
    prompt_index = torch.arange(len(prompt_ids), dtype=torch.long).repeat_interleave(n)
    return Rollouts(
        prompt_index=prompt_index.to(device),
        prompt_ids=[list(map(int, prompt_ids[i])) for i in prompt_index.tolist()],
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        texts=texts,
        finished=torch.tensor(finished, dtype=torch.bool, device=device),
    )
