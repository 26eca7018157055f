"""Per-token completion log-probabilities, without materialising ``[batch, seq, vocab]`` fp32 log-softmax.

Convention (LOSSES.md section 0): the log-prob of token ``t`` comes from ``log_softmax(logits[t-1])`` in fp32,
gathered at ``input_ids[t]``; the completion mask is shifted with the labels. We run the decoder body once, pick
the hidden states of the positions that predict a completion token, and apply the lm head + log-softmax to those
rows only, ``chunk_size`` rows at a time under activation checkpointing. Prompt positions never reach the lm head,
and the backward pass keeps one chunk of logits alive instead of all of them.

:class:`CompletionLogpModel` wraps a causal LM as an ``nn.Module`` so that accelerate/DDP/DeepSpeed wrap *this*
forward: their gradient hooks see every parameter the logps depend on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenLogps:
    """``token_logps`` and ``mask`` are ``[B, L-1]`` aligned with ``input_ids[:, 1:]`` (zero outside the mask)."""

    token_logps: torch.Tensor
    mask: torch.Tensor

    @property
    def sums(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def _split_model(model: torch.nn.Module):
    """(decoder body, lm head) of a Hugging Face causal LM, seen through PEFT; None when logits need extra ops."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    # Gemma-style soft-capping and Cohere-style logit scaling change logits after the head: use the full forward.
    if config is not None and (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None]).squeeze(1)


def completion_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: Optional[int] = 1024,
    position_ids: Optional[torch.Tensor] = None,
    attention_bias: Optional[torch.Tensor] = None,
) -> TokenLogps:
    """Log-probs of the completion tokens of each row. ``completion_mask`` is unshifted (marks completion tokens).

    ``chunk_size=None`` computes full logits in one pass (the reference implementation tests compare against).
    ``attention_bias``: an optional 4D boolean/additive mask that replaces ``attention_mask`` (packed sequences).
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    model_mask = attention_bias if attention_bias is not None else attention_mask
    parts = _split_model(model) if chunk_size is not None else None
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=model_mask, position_ids=position_ids, use_cache=False).logits
        logps = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, labels[..., None]).squeeze(-1)
        return TokenLogps(logps * mask, mask)

    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=model_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)  # positions t+1 holding a completion token
    selected = hidden[rows, cols]  # hidden state at t predicts token t+1
    targets = labels[rows, cols]
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        chunk = selected[start:start + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping [chunk, vocab] floats alive.
            pieces.append(checkpoint(_head_logps, head, chunk, targets[start:start + chunk_size], use_reentrant=False))
        else:
            pieces.append(_head_logps(head, chunk, targets[start:start + chunk_size]))
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    token_logps = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    token_logps = token_logps.index_put((rows, cols), flat)
    return TokenLogps(token_logps, mask)


def sequence_totals(logps: TokenLogps, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence logp sums and completion lengths of a padded or packed batch.

    A padded batch has one sequence per row. A packed batch (``data.packing``) holds several sequences per row and
    carries ``sequence_ids`` (``[rows, L]``, -1 on padding) and ``num_sequences``; sums are scattered by id.
    """
    sequence_ids = batch.get("sequence_ids")
    if sequence_ids is None:
        return logps.sums, logps.lengths
    ids = sequence_ids[:, 1:].reshape(-1)  # shifted like the labels
    count = int(batch["num_sequences"])
    valid = ids >= 0
    values = (logps.token_logps * logps.mask).reshape(-1)[valid]
    weights = logps.mask.reshape(-1)[valid]
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, ids[valid], values)
    lengths = torch.zeros(count, dtype=weights.dtype, device=weights.device).index_add(0, ids[valid], weights)
    return sums, lengths


class CompletionLogpModel(torch.nn.Module):
    """``forward(batch-like kwargs) -> TokenLogps``; the module accelerate prepares for training."""

    def __init__(self, model: torch.nn.Module, chunk_size: Optional[int] = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, attention_bias=None) -> TokenLogps:
        return completion_token_logps(
            self.model, input_ids, attention_mask, completion_mask,
            chunk_size=self.chunk_size, position_ids=position_ids, attention_bias=attention_bias,
        )
