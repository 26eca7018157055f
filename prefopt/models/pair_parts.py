"""Per-sequence quantities of a pair batch beyond the log-prob sums: LD-DPO's tails and WPO's aligned sums.

A pair batch stacks B chosen then B rejected sequences (padded: one per row; packed: ``sequence_ids`` number them
0..2B-1 in that order, see ``prefopt/data/packing.py``). Both functions return ``[2B]`` in that order, like
:func:`prefopt.models.logps.sequence_totals`; the losses that use them are in ``prefopt/losses/modifiers.py``.
"""

from __future__ import annotations

import torch

from prefopt.models.logps import TokenLogps, sequence_totals


def _token_layout(logps: TokenLogps, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Flat (sequence index, 1-based position within its completion, completion-token flag) per token, and the
    number of sequences. Positions count completion tokens only, so prompt and padding never shift them."""
    mask = logps.mask
    sequence_ids = batch.get("sequence_ids")
    if sequence_ids is None:
        rows, width = mask.shape
        ids = torch.arange(rows, device=mask.device)[:, None].expand(rows, width).reshape(-1)
        positions = mask.cumsum(-1).reshape(-1)
        return ids, positions, mask.reshape(-1) > 0, rows
    ids = sequence_ids[:, 1:].reshape(-1)  # shifted like the labels
    count = int(batch["num_sequences"])
    flat_mask = mask.reshape(-1)
    valid = (ids >= 0) & (flat_mask > 0)
    running = flat_mask.cumsum(0)  # a packed sequence's tokens are contiguous in the flattened rows
    safe_ids = ids.clamp(min=0)
    first = torch.full((count,), float("inf"), dtype=running.dtype, device=running.device)
    first = first.scatter_reduce(0, safe_ids[valid], running[valid], reduce="amin")
    positions = running - first[safe_ids] + 1
    return safe_ids, positions, valid, count


def pair_tail_sums(logps: TokenLogps, batch: dict) -> torch.Tensor:
    """``[2B]`` sums of the token log-probs past the pair's shared length ``min(|y_w|, |y_l|)`` (LD-DPO).

    The shorter completion of a pair has no tail (0); the longer one's tail is its excess tokens. Gradients flow
    to the token log-probs like the sums'. TRL 1.16 splits the same way (``DPOTrainer._compute_loss``,
    ``shared_mask``/``tail_mask`` from the cumulative completion mask).
    """
    ids, positions, valid, count = _token_layout(logps, batch)
    _, lengths = sequence_totals(logps, batch)
    half = count // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
    tail = valid & (positions > shared[ids])
    values = (logps.token_logps * logps.mask).reshape(-1) * tail.to(logps.token_logps.dtype)
    sums = torch.zeros(count, dtype=values.dtype, device=values.device)
    return sums.index_add(0, ids, values)


def aligned_sums(logps: TokenLogps, batch: dict) -> torch.Tensor:
    """``[2B]`` WPO sums ``sum_t log(p(y_t) / sum_v p(v)^2)`` over completion tokens, detached.

    Needs ``logps.log_sum_sq`` (the policy forward with ``square_probs=True``).
    """
    if logps.log_sum_sq is None:
        raise ValueError(
            "WPO weights need the policy's log sum_v p(v)^2: run the forward with square_probs=True"
        )
    aligned = TokenLogps((logps.token_logps - logps.log_sum_sq).detach() * logps.mask, logps.mask)
    sums, _ = sequence_totals(aligned, batch)
    return sums
