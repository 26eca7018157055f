"""Sparse gradients for the input embedding: the same AdamW step without a dense ``[vocab, hidden]`` gradient.

A batch touches a few hundred of the embedding's rows, yet ``nn.Embedding``'s backward writes a dense fp32
``[vocab, hidden]`` gradient (500 MiB for a 128k x 1024 table, 2 GiB for Llama-3-8B's 128k x 4096) that lives from
the end of the backward to the end of the optimizer step, next to every other gradient. With
``embedding.sparse = True`` autograd produces a sparse COO gradient instead (rows x hidden), and this module
keeps the optimizer step *exactly* the same:

- gradient clipping: the global L2 norm over dense gradients and the coalesced values of sparse ones, equal to the
  norm of the densified gradient; every gradient is then scaled by ``min(1, max_norm / (norm + 1e-6))`` as
  ``torch.nn.utils.clip_grad_norm_`` does;
- the AdamW step is split in two calls of the same optimizer: first every parameter with a dense gradient (the
  sparse ones are set aside, and torch's optimizers skip parameters whose ``grad`` is None), then those gradients
  are freed and each sparse gradient is densified in turn and stepped. AdamW's update is per parameter (its moments
  and step count are per-parameter state; weight decay is decoupled), so given the same gradients two calls give
  the parameters and optimizer state of one call, rows without a gradient included (their moments still decay and
  they still move by ``lr * m / (sqrt(v) + eps)``, which a sparse optimizer such as ``SparseAdam`` would skip).
  The gradients themselves can differ in the last bit: coalescing sums repeated tokens in its own order.

So the dense embedding gradient exists only for the last part of the optimizer step, when no other gradient is
alive: the peak drops by one embedding table. Single-process runs only (DDP's reducer, DeepSpeed and FSDP expect
dense gradients); untied embeddings only (a tied table also receives the lm head's dense gradient).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch

logger = logging.getLogger(__name__)


def input_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The model's trainable, untied ``nn.Embedding`` input table, or None."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    if not isinstance(embedding, torch.nn.Embedding) or not embedding.weight.requires_grad:
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None  # tied: the lm head's dense gradient lands in the same tensor
    return embedding


def enable_sparse_embedding_grad(
    model: torch.nn.Module, setting: bool | str, *, distributed: bool, fp16: bool
) -> list[torch.nn.Parameter]:
    """Switch the input embedding to sparse gradients when ``setting`` allows it; returns the affected parameters.

    ``setting`` is ``train.sparse_embedding_grad``: ``"auto"`` turns it on where it is exact and supported (one
    process, no fp16 loss scaling, an untied trainable embedding), ``True`` asks for it and says why when it cannot,
    ``False`` leaves the model alone.
    """
    if setting is False:
        return []
    embedding = input_embedding(model)
    reason = None
    if embedding is None:
        reason = "the input embedding is frozen, tied to the lm head, or not an nn.Embedding"
    elif distributed:
        reason = "more than one process (DDP, DeepSpeed and FSDP reduce dense gradients)"
    elif fp16:
        reason = "fp16 loss scaling unscales dense gradients only"
    if reason is not None:
        if setting is True:
            logger.warning("train.sparse_embedding_grad=true ignored: %s", reason)
        return []
    embedding.sparse = True
    return [embedding.weight]


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) for a mix of dense and sparse COO gradients; returns the norm."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    for p in params:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = (
                p.grad.coalesce()
            )  # duplicate indices must be summed before their values' norm means anything
    values = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    total = torch.nn.utils.get_total_norm(values, norm_type=2.0)
    if math.isfinite(max_norm):
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for value in values:
            value.mul_(coefficient.to(value.device, value.dtype))
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, sparse_params: Sequence[torch.nn.Parameter]) -> None:
    """One optimizer step, dense gradients first, then each sparse gradient densified on its own (see module doc)."""
    held = {}
    for p in sparse_params:
        if p.grad is not None:
            held[p] = p.grad
            p.grad = None
    optimizer.step()
    if not held:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None  # free the dense gradients before the embedding's dense copy exists
    for p, grad in held.items():
        p.grad = grad.to_dense()
        del grad
        optimizer.step()
        p.grad = None
