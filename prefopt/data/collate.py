"""Padded collators: lists of tokenized rows -> right-padded tensors with an explicit completion mask.

``completion_mask`` is 1 exactly on the positions that hold completion tokens (EOS included) and 0 on the prompt and
on padding. It is built from the known prompt and completion lengths, never from ``ids != pad`` (the pad token is
often EOS). It is not shifted: position t is 1 when ``input_ids[t]`` is a completion token; the loss code shifts it
with the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch


def pad_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Concatenate each prompt with its completion and right-pad all rows to the longest one."""
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: the tokenizer needs a pad token (any id works; it is masked out)"
        )
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(lengths)
    input_ids = torch.full((rows, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    completion_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = len(prompt), len(prompt) + len(completion)
        if end:
            input_ids[row, :end] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[row, :end] = 1
        completion_mask[row, start:end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _index(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)


def _check(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError("cannot collate an empty batch")


class PairCollator:
    """Preference pairs -> one ``[2B, L]`` batch: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected.

    Also returns ``index`` ``[B]`` and, as plain lists, ``prompt_input_ids``, ``prompt_text``, ``prompt_messages``,
    ``chosen_text`` and ``rejected_text`` (text fields default to "" when a row lacks them, e.g. online pairs).
    """

    passthrough = ("prompt_text", "prompt_messages", "chosen_text", "rejected_text")
    groups = 2  # row groups of B sequences in ``input_ids``

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        prompts = [row["prompt_input_ids"] for row in rows]
        completions = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        batch: dict[str, Any] = pad_sequences(
            prompts + prompts, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        batch["index"] = _index(rows)
        batch["prompt_input_ids"] = [list(p) for p in prompts]
        for key in self.passthrough:
            batch[key] = [row.get(key, "") for row in rows]
        return batch


class SFTCollator:
    """Prompt/completion rows -> ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, L]`` and ``index``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        batch: dict[str, Any] = pad_sequences(
            [row["prompt_input_ids"] for row in rows],
            [row["completion_input_ids"] for row in rows],
            self.pad_token_id,
            self.pad_to_multiple_of,
        )
        batch["index"] = _index(rows)
        return batch


class PromptCollator:
    """Prompt-only rows -> ``index`` ``[B]`` and the lists ``prompt_input_ids``, ``prompt_text``, ``prompt_messages``
    (generation pads prompts itself, on whichever side its backend needs)."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        return {
            "index": _index(rows),
            "prompt_input_ids": [list(row["prompt_input_ids"]) for row in rows],
            "prompt_text": [row.get("prompt_text", "") for row in rows],
            "prompt_messages": [row.get("prompt_messages", "") for row in rows],
        }


class ScoredPairCollator(PairCollator):
    """:class:`PairCollator` plus ``chosen_score`` / ``rejected_score`` ``[B]`` float64 tensors (CoPG's rewards)."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(rows)
        for key in ("chosen_score", "rejected_score"):
            batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float64)
        return batch


class TripleCollator(PairCollator):
    """Gold/chosen/rejected triples -> one ``[3B, L]`` batch: chosen rows, rejected rows, then prompt+gold rows."""

    groups = 3

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        prompts = [row["prompt_input_ids"] for row in rows]
        completions = [row[f"{name}_input_ids"] for name in ("chosen", "rejected", "gold") for row in rows]
        batch: dict[str, Any] = pad_sequences(
            prompts * 3, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        batch["index"] = _index(rows)
        batch["prompt_input_ids"] = [list(p) for p in prompts]
        for key in self.passthrough:
            batch[key] = [row.get(key, "") for row in rows]
        return batch


# (prompt column, completion) of each row group of a revision batch, after chosen and rejected; the order is
# prefopt.losses.srpo.REVISION_COLUMNS: y_w | y_l, y_l | y_l, y_w | y_w, y_l | y_w.
REVISION_GROUPS = (
    ("revise_rejected_prompt_input_ids", "chosen_input_ids"),
    ("revise_rejected_prompt_input_ids", "rejected_input_ids"),
    ("revise_chosen_prompt_input_ids", "chosen_input_ids"),
    ("revise_chosen_prompt_input_ids", "rejected_input_ids"),
)


class RevisionPairCollator(PairCollator):
    """SRPO pairs -> one ``[6B, L]`` batch: prompt+chosen, prompt+rejected, then the four revision sequences of
    :data:`REVISION_GROUPS` (each completion after the prompt that asks to revise the other or itself)."""

    groups = 6

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        prompts = [row["prompt_input_ids"] for row in rows]
        all_prompts = prompts * 2 + [row[p] for p, _ in REVISION_GROUPS for row in rows]
        completions = (
            [row["chosen_input_ids"] for row in rows]
            + [row["rejected_input_ids"] for row in rows]
            + [row[c] for _, c in REVISION_GROUPS for row in rows]
        )
        batch: dict[str, Any] = pad_sequences(
            all_prompts, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        batch["index"] = _index(rows)
        batch["prompt_input_ids"] = [list(p) for p in prompts]
        for key in self.passthrough:
            batch[key] = [row.get(key, "") for row in rows]
        return batch


class ResetPromptCollator(PromptCollator):
    """DR-PO: :class:`PromptCollator` plus ``completion_input_ids`` (lists, EOS last), the dataset responses whose
    prefixes rollouts restart from."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(rows)
        batch["completion_input_ids"] = [list(row["completion_input_ids"]) for row in rows]
        return batch


def mismatch_shift(prompts: Sequence[Sequence[int]]) -> int:
    """How far completions rotate within a batch so that no row is paired with a completion of its own prompt.

    KTO's KL reference point is estimated on mismatched pairs (x_i, y_{i-k}); the paper and TRL rotate by one
    (``k = 1``). When the rows of one pair sit next to each other (a pair file read without shuffling), ``k = 1``
    would pair a prompt with its own other completion, so the smallest ``k`` that pairs every row with another
    prompt is used; ``1`` when no shift does (every row has the same prompt)."""
    rows = len(prompts)
    keys = [tuple(p) for p in prompts]
    for shift in range(1, rows):
        if all(keys[i] != keys[(i - shift) % rows] for i in range(rows)):
            return shift
    return 1


class UnpairedCollator:
    """Unpaired rows (KTO) -> ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, L]``, ``label`` ``[B]``
    (bool, True = desirable), ``index``, and the mismatched sequences ``mismatched_input_ids``,
    ``mismatched_attention_mask``, ``mismatched_completion_mask`` ``[B, L']``: row i's prompt followed by the
    completion of row ``i - k`` (:func:`mismatch_shift`; ``k = 1`` as in the KTO paper and TRL 1.16's
    ``add_kl_completion_ids``), cut to ``max_length`` tokens as TRL's collator cuts its KL sequences.

    ``groups = 1``: a precomputed reference caches the logps of the rows' own completions only (the mismatched
    ones change with every batch, so they need a live reference).
    """

    groups = 1

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None, max_length: Optional[int] = None
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        _check(rows)
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        completions = [list(row["completion_input_ids"]) for row in rows]
        batch: dict[str, Any] = pad_sequences(
            prompts, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        shift = mismatch_shift(prompts)
        mismatched = [completions[(i - shift) % len(rows)] for i in range(len(rows))]
        if self.max_length is not None:
            mismatched = [c[: max(self.max_length - len(p), 0)] for p, c in zip(prompts, mismatched)]
        other = pad_sequences(prompts, mismatched, self.pad_token_id, self.pad_to_multiple_of)
        batch.update({f"mismatched_{key}": value for key, value in other.items()})
        batch["label"] = torch.tensor([bool(row["label"]) for row in rows], dtype=torch.bool)
        batch["index"] = _index(rows)
        return batch
