"""Padding-free packing of preference pairs, and length-grouped ordering (the cheaper alternative on CPU).

:class:`PackedPairCollator` lays the ``2B`` sequences of a pair batch (chosen ``0..B-1``, rejected ``B..2B-1``, the
order of :class:`~prefopt.data.PairCollator`) end to end in **one** row of ``N`` real tokens:

- ``position_ids`` restart at 0 for every sequence, so rotary embeddings see the same positions as in a padded row;
- ``sequence_ids`` say which sequence a token belongs to (-1 on the optional tail padding); ``num_sequences = 2B``.
  :func:`prefopt.models.logps.sequence_totals` scatters per-token logps back to per-sequence sums with them;
- ``attention_bias`` is a boolean ``[1, 1, N, N]`` mask, True where query ``i`` may attend to key ``j``: same
  sequence and ``j <= i`` (causal **and** block-diagonal), so chosen, rejected and other pairs never see each other.
  Transformers (5.x) hands a 4D mask to the attention kernel unchanged. ``sdpa`` takes the boolean form as is;
  ``eager`` adds the mask to the scores, so :func:`~prefopt.models.logps.completion_token_logps` turns it into an
  additive one for eager models; flash-attention gets no mask at all and goes varlen from the restarting
  ``position_ids`` (batch of one row), which costs ``sum(L_i^2)`` instead of ``N^2``.
- ``completion_mask`` is 0 on the first token of every sequence, whatever it is: the label at a sequence's first
  position would be predicted from the *previous* sequence's last token, and a padded batch never scores it either
  (it has no left neighbour). Prompts are normally non-empty, so this only matters for prompt-less rows.

The block mask is ``O(N^2)`` in memory and, with sdpa/eager, in attention FLOPs: on CPU packing is usually slower
than padding (see docs/performance.md). :func:`length_grouped_order` reduces padding without it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Optional

import torch

from prefopt.data.collate import PairCollator, _check, _index


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, L]`` sequence ids -> boolean ``[rows, 1, L, L]``: True where key ``j <= i`` is in ``i``'s sequence.

    Padding (-1) is its own block, so every query row has at least one visible key (no all-masked softmax rows).
    """
    length = sequence_ids.shape[-1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    return (same & causal)[:, None]


class PackedPairCollator:
    """Preference pairs -> one packed row ``[1, N]`` holding the ``2B`` sequences, plus ``attention_bias``.

    Keys: ``input_ids``, ``attention_mask`` (1 on real tokens), ``completion_mask`` (unshifted), ``position_ids``,
    ``sequence_ids``, ``num_sequences``, ``attention_bias`` (``[1, 1, N, N]`` bool; omitted with
    ``attention_bias=False``, e.g. for flash-attention where ``position_ids`` suffice), ``index`` ``[B]`` and the
    passthrough lists of :class:`~prefopt.data.PairCollator`.
    """

    passthrough = PairCollator.passthrough

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None, attention_bias: bool = True
    ):
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer needs a pad token (any id works; it is masked out)"
            )
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.attention_bias = attention_bias

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        completions = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        prompts2 = prompts + prompts
        real = sum(len(p) + len(c) for p, c in zip(prompts2, completions))
        width = real
        if self.pad_to_multiple_of:
            width = -(-max(real, 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((width,), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(width, dtype=torch.long)
        completion_mask = torch.zeros(width, dtype=torch.long)
        position_ids = torch.zeros(width, dtype=torch.long)
        sequence_ids = torch.full((width,), -1, dtype=torch.long)
        start = 0
        for number, (prompt, completion) in enumerate(zip(prompts2, completions)):
            ids = prompt + list(completion)
            end = start + len(ids)
            if end > start:
                input_ids[start:end] = torch.tensor(ids, dtype=torch.long)
                attention_mask[start:end] = 1
                completion_mask[start + len(prompt) : end] = 1
                completion_mask[start] = (
                    0  # never predicted from the previous sequence (see module docstring)
                )
                position_ids[start:end] = torch.arange(end - start)
                sequence_ids[start:end] = number
            start = end
        # Tail padding restarts positions too: flash-attention's varlen split treats it as one more sequence.
        position_ids[real:] = torch.arange(width - real)

        batch: dict[str, Any] = {
            "input_ids": input_ids[None],
            "attention_mask": attention_mask[None],
            "completion_mask": completion_mask[None],
            "position_ids": position_ids[None],
            "sequence_ids": sequence_ids[None],
            "num_sequences": len(completions),
        }
        if self.attention_bias:
            batch["attention_bias"] = block_causal_mask(batch["sequence_ids"])
        batch["index"] = _index(rows)
        batch["prompt_input_ids"] = prompts
        for key in self.passthrough:
            batch[key] = [row.get(key, "") for row in rows]
        return batch


def pair_lengths(dataset) -> list[int]:
    """Tokens a pair puts into a padded batch row: prompt + the longer completion."""
    prompts = dataset["prompt_input_ids"]
    chosen = dataset["chosen_input_ids"]
    rejected = dataset["rejected_input_ids"]
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batches: int = 50
) -> list[int]:
    """A row order whose consecutive ``batch_size`` groups have similar lengths (less padding in padded batches).

    The rows are shuffled, cut into windows of ``mega_batches * batch_size`` rows, each window is sorted by length
    (longest first) and cut into batches, and the batches are shuffled again. This keeps the data order random at
    the scale of a window, like Hugging Face's ``LengthGroupedSampler``; ``mega_batches=0`` sorts the whole set.
    Changing the order changes which pairs share a step, so it is an opt-in, not a free speed-up: apply it to the
    data file (``data.shuffle=false`` keeps file order) or select the dataset rows in this order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = len(order) if mega_batches <= 0 else max(mega_batches * batch_size, batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    # Keep a short last batch (if any) at the end so that drop_last loaders drop the same rows every time.
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) != batch_size]
    rng.shuffle(full)
    return [i for b in full + short for i in b]


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of a padded batch's ``[2B, L]`` cells that are padding, over the batches of ``order`` (a rough gauge:
    it counts the pair length, prompt + longer completion, for both rows of a pair)."""
    cells = real = 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        group = [lengths[i] for i in order[start : start + batch_size]]
        cells += max(group) * len(group)
        real += sum(group)
    return 1.0 - real / cells if cells else 0.0
