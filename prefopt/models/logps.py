"""Per-token completion log-probabilities, without materialising ``[batch, seq, vocab]`` fp32 log-softmax.

Convention (docs/losses.md): the log-prob of token ``t`` comes from ``log_softmax(logits[t-1])`` in fp32,
gathered at ``input_ids[t]``; the completion mask is shifted with the labels. We run the decoder body once, pick
the hidden states of the positions that predict a completion token, and apply the lm head + log-softmax to those
rows only, a block of rows at a time. Prompt and padding positions never reach the lm head.

:class:`CompletionLogpModel` wraps a causal LM as an ``nn.Module`` so that accelerate/DDP/DeepSpeed wrap *this*
forward: their gradient hooks see every parameter the logps depend on.

Two implementations of the chunked head (``head_impl``; default from ``PREFOPT_LOGPS_HEAD``, else ``"fused"``):

``fused``       one autograd function over all completion rows. The forward normalises each ``[rows, vocab]``
                logits block in place and keeps the hidden states and one log-normaliser per row; the backward
                rebuilds a block, turns it into ``g * (onehot - softmax)`` in place and accumulates the hidden and
                weight gradients: one block alive at a time. Blocks are ``chunk_size`` rows by as much of the
                vocabulary as fits in ``PREFOPT_LOGPS_BLOCK_MB`` (32 MiB) of fp32 logits; over several
                vocabulary tiles the normaliser is accumulated online (running max and sum of exp). When the
                softmax of *all* rows fits in ``PREFOPT_LOGPS_KEEP_MB`` (256 MiB) the forward keeps it and the
                backward skips the recompute.
``checkpoint``  ``lm_head`` + ``log_softmax`` + gather per ``chunk_size`` rows under activation checkpointing
                (several ``[chunk, vocab]`` tensors alive in backward). Always used when the head is not a plain
                ``nn.Linear`` with a materialised weight (LoRA on the head, ZeRO-3 / FSDP2 shards).

Numbers (CPU, fp32) are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
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
    # WPO (``square_probs=True``): log sum_v p(v)^2 of each position's next-token distribution, no grad; else None
    log_sum_sq: Optional[torch.Tensor] = None

    @property
    def sums(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _split_model(model: torch.nn.Module):
    """(decoder body, lm head) of a Hugging Face causal LM, seen through PEFT; None when logits need extra ops."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    # Cohere-style logit scaling changes logits after the head in model code we do not mirror: full forward.
    # Gemma-2-style soft-capping (cap * tanh(logits / cap)) is applied per chunk (``_softcap``).
    if config is not None and getattr(config, "logit_scale", None):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _softcap(model: torch.nn.Module) -> Optional[float]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "final_logit_softcapping", None) or None


def _head_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float] = None
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma-2 (transformers Gemma2ForCausalLM.forward): cap * tanh(logits / cap), in fp32 here
        logits = torch.tanh(logits / softcap) * softcap
    return torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None]).squeeze(1)


HEAD_IMPLS = ("fused", "checkpoint")


def _default_head_impl() -> str:
    impl = os.environ.get("PREFOPT_LOGPS_HEAD", "fused")
    if impl not in HEAD_IMPLS:
        raise ValueError(f"PREFOPT_LOGPS_HEAD={impl!r}: expected one of {', '.join(HEAD_IMPLS)}")
    return impl


def is_sharded_parameter(parameter: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partition or an FSDP2 ``DTensor`` shard."""
    return hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor"


def _plain_linear_weight(head: torch.nn.Module) -> bool:
    """True when ``head`` is an ``nn.Linear`` whose weight we may use directly (not LoRA-wrapped, not sharded)."""
    if type(head) is not torch.nn.Linear:
        return False
    weight = head.weight
    return not is_sharded_parameter(weight) and weight.dim() == 2 and weight.numel() > 0


def _zero3_frozen(head: torch.nn.Module) -> bool:
    """A frozen ZeRO-3 head (LoRA leaves the head frozen; often tied to the embedding). Activation checkpointing
    recomputes the head in backward, where DeepSpeed does not re-gather a frozen module's partitions (recomputed
    weight of shape [0], seen with deepspeed 0.19.8), so its chunks run without checkpointing: correct, at the
    cost of keeping each chunk's fp32 softmax for backward."""
    weight = getattr(head, "weight", None)
    return weight is not None and hasattr(weight, "ds_id") and not weight.requires_grad


def _env_mib(name: str, default: float) -> int:
    return int(float(os.environ.get(name, default)) * 2**20)


def _keep_budget_bytes() -> int:
    """``PREFOPT_LOGPS_KEEP_MB`` (default 256): when the fp32 softmax of all completion rows fits in this many MiB,
    the fused forward keeps it and the backward skips recomputing the logits (one ``[n, vocab]`` GEMM less).
    0 always recomputes."""
    return _env_mib("PREFOPT_LOGPS_KEEP_MB", 256)


MIN_VOCAB_TILE = 4096  # narrower tiles make the head's GEMMs too thin to run at full speed
BLOCK_MB = (
    32  # default cap on one fp32 logits block (PREFOPT_LOGPS_BLOCK_MB); docs/performance.md has the A/B
)


def _block_shape(rows: int, chunk_size: int, vocab: int, keep: bool = False) -> tuple[int, int]:
    """(rows per block, vocabulary columns per tile) of the fp32 logits the fused head holds at a time.

    A block spans ``chunk_size`` rows (or all ``rows``, if fewer) and is capped at ``PREFOPT_LOGPS_BLOCK_MB``
    (default ``BLOCK_MB`` = 32 MiB) of fp32 logits by taking a tile of the vocabulary rather than fewer rows
    (1,024 rows x 8k words per tile): cutting the vocabulary keeps the GEMMs fat where cutting rows makes them thin.
    Rows are cut only when a tile would be narrower than ``MIN_VOCAB_TILE``, or always with
    ``PREFOPT_LOGPS_TILE_VOCAB=0`` (the earlier behaviour). ``keep``: whole-vocabulary blocks of ``chunk_size`` rows,
    since every block's softmax is kept anyway (the keep budget bounds that memory).
    """
    block_rows = max(1, min(chunk_size, rows))
    if keep:
        return block_rows, vocab
    budget = max(1, _env_mib("PREFOPT_LOGPS_BLOCK_MB", BLOCK_MB) // 4)  # fp32 elements
    if block_rows * vocab <= budget:
        return block_rows, vocab
    if os.environ.get("PREFOPT_LOGPS_TILE_VOCAB", "1") == "0":
        return max(1, budget // vocab), vocab
    tile = budget // block_rows
    if tile < MIN_VOCAB_TILE:
        block_rows = max(1, budget // MIN_VOCAB_TILE)
        tile = budget // block_rows
    return block_rows, max(1, min(vocab, tile))


def _tiles(vocab: int, tile: int):
    return [(start, min(start + tile, vocab)) for start in range(0, vocab, tile)]


def _logits_tile(hidden, weight, bias, lo: int, hi: int) -> torch.Tensor:
    """fp32 logits of vocabulary rows ``lo:hi`` (slices are views: the whole vocabulary costs no copy)."""
    return F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()


def _fused_head_forward(hidden, weight, bias, targets, shape, keep=False):
    """(logps ``[n]``, log-normalisers ``[n]``, kept softmax blocks or None) of ``hidden @ W.T + b``.

    ``shape = (rows, tile)`` from :func:`_block_shape`. Each block is normalised in place; over several vocabulary
    tiles the log-normaliser is a running (max, sum of exp) pair, rescaled when the max grows, as in online
    softmax. ``keep`` (whole-vocabulary blocks only) keeps each block's softmax for the backward.
    """
    chunk, tile = shape
    vocab = weight.shape[0]
    tiles = _tiles(vocab, tile)
    keep = keep and len(tiles) == 1
    log_norm = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    out = torch.empty_like(log_norm)
    kept = [] if keep else None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        row_targets = targets[rows]
        top = torch.full_like(log_norm[rows], float("-inf"))
        total = torch.zeros_like(top)
        target_logit = torch.zeros_like(top)
        for lo, hi in tiles:
            block = _logits_tile(hidden[rows], weight, bias, lo, hi)
            inside = (row_targets >= lo) & (row_targets < hi)
            local = (row_targets - lo).clamp(0, hi - lo - 1)
            target_logit = torch.where(inside, block.gather(1, local[:, None]).squeeze(1), target_logit)
            new_top = torch.maximum(top, block.amax(dim=-1))
            block_sum = block.sub_(new_top[:, None]).exp_().sum(dim=-1)
            total = total * (top - new_top).exp() + block_sum  # exp(-inf) = 0 on the first tile
            top = new_top
            if keep:
                kept.append(block.div_(total[:, None]))  # softmax probabilities of these rows
            del block
        log_norm[rows] = top + total.log()
        out[rows] = target_logit - log_norm[rows]
    return out, log_norm, kept


class _FusedHeadLogps(torch.autograd.Function):
    """``log_softmax(hidden @ W.T + b)[target]`` for ``[n, H]`` rows, one ``(rows, vocab tile)`` block at a time.

    Logits are computed in the weight's dtype and normalised in fp32, as in ``_head_logps``. The backward uses
    ``d logp / d logits = onehot - softmax``, built in place in the recomputed (or kept) block; the hidden-state
    gradient of a row block is summed over the vocabulary tiles in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shape, keep, fp32_weight_grad=False):
        out, log_norm, kept = _fused_head_forward(hidden, weight, bias, targets, shape, keep)
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.shape, ctx.kept, ctx.consumed = shape, kept, False
        ctx.fp32_weight_grad = fp32_weight_grad  # the weight is an autocast copy of an fp32 parameter
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        if ctx.consumed:
            raise RuntimeError(
                "the fused lm-head backward ran twice: its kept probabilities were consumed; "
                "set PREFOPT_LOGPS_KEEP_MB=0 to backpropagate through it more than once"
            )
        chunk, tile = ctx.shape
        tiles = _tiles(weight.shape[0], tile)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        grad_out = grad_out.float()
        for number, start in enumerate(range(0, hidden.shape[0], chunk)):
            rows = slice(start, start + chunk)
            row_hidden, row_grad, row_targets = hidden[rows], grad_out[rows], targets[rows]
            hidden_sum = None  # fp32 sum over vocabulary tiles of this row block's hidden-state gradient
            for lo, hi in tiles:
                if kept is not None:
                    block = kept[number]
                    kept[number] = None
                else:
                    block = _logits_tile(row_hidden, weight, bias, lo, hi).sub_(log_norm[rows, None]).exp_()
                # block <- g * (onehot - softmax), in place: one block alive at a time.
                inside = ((row_targets >= lo) & (row_targets < hi)).to(row_grad.dtype)
                local = (row_targets - lo).clamp(0, hi - lo - 1)
                block.mul_(-row_grad[:, None]).scatter_add_(1, local[:, None], (row_grad * inside)[:, None])
                grad_block = block.to(weight.dtype)
                if need_hidden and len(tiles) == 1:
                    grad_hidden[rows] = grad_block @ weight
                elif need_hidden:
                    part = (grad_block @ weight[lo:hi]).float()
                    hidden_sum = part if hidden_sum is None else hidden_sum.add_(part)
                if need_weight and (weight.dtype == torch.float32 or ctx.fp32_weight_grad):
                    # fp32 master weight under autocast: one fp32 GEMM, no bf16 rounding of per-block partials
                    grad_weight[lo:hi].addmm_(block.t(), row_hidden.float())
                elif need_weight:
                    grad_weight[lo:hi] += (
                        grad_block.t() @ row_hidden
                    ).float()  # half GEMM, fp32 accumulation
                if grad_bias is not None:
                    grad_bias[lo:hi] += block.sum(0)
                del block, grad_block
            if hidden_sum is not None:
                grad_hidden[rows] = hidden_sum
        ctx.consumed = kept is not None
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


@contextlib.contextmanager
def _head_precision(hidden: torch.Tensor):
    """Under autocast, run the fused head in the autocast dtype *explicitly*, with autocast off inside.

    The fused head's backward recomputes logits; autograd runs it outside the forward's autocast region, so an
    autocast-dependent recompute would produce fp32 logits against the bf16 normaliser of the forward. Casting the
    inputs once (as ``torch.amp.custom_fwd(cast_inputs=...)`` does) makes forward and backward use the same bf16
    GEMMs; the casts are autograd ops, so gradients reach fp32 weights in fp32. Yields ``cast(*tensors)``.
    """
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        yield lambda *tensors: tensors
        return
    dtype = torch.get_autocast_dtype(device)

    def cast(*tensors):
        return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)

    with torch.autocast(device, enabled=False):
        yield cast


def _fused_head_autocast(hidden, weight, bias, targets, shape, keep):
    fp32_weight = weight.dtype == torch.float32
    with _head_precision(hidden) as cast:
        hidden, weight, bias = cast(hidden, weight, bias)
        return _FusedHeadLogps.apply(hidden, weight, bias, targets, shape, keep, fp32_weight)


def _model_attention_mask(model: torch.nn.Module, attention_bias: torch.Tensor, dtype: torch.dtype):
    """The packed 4D mask in the form the model's attention implementation takes (see ``prefopt/data/packing.py``).

    sdpa: the boolean mask as is. eager: additive (0 / dtype min), since eager adds the mask to the scores.
    flash / flex attention: no mask; transformers derives the sequences from the restarting ``position_ids``.
    """
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "sdpa")
    if "flash" in impl or impl.startswith("flex"):
        return None
    if impl == "eager" and attention_bias.dtype == torch.bool:
        return torch.zeros(attention_bias.shape, dtype=dtype, device=attention_bias.device).masked_fill_(
            ~attention_bias, torch.finfo(dtype).min
        )
    return attention_bias


def completion_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: Optional[int] = 1024,
    position_ids: Optional[torch.Tensor] = None,
    attention_bias: Optional[torch.Tensor] = None,
    head_impl: Optional[str] = None,
    share_prompt: bool | str = False,
    square_probs: bool = False,
) -> TokenLogps:
    """Log-probs of the completion tokens of each row. ``completion_mask`` is unshifted (marks completion tokens).

    ``chunk_size=None`` computes full logits in one pass (the reference implementation tests compare against).
    ``attention_bias``: an optional 4D boolean/additive mask that replaces ``attention_mask`` (packed sequences).
    ``head_impl``: ``"fused"`` or ``"checkpoint"`` (module docstring); None reads ``PREFOPT_LOGPS_HEAD``.
    ``share_prompt``: the batch is a pair batch (rows ``i`` and ``i + B`` share a prompt): run each prompt through
    the decoder once (``prefopt/models/prefix_sharing.py``); falls back to the plain forward where that does not
    apply (packed rows, flash attention, gradient checkpointing, an empty prompt, rows that differ in the prompt).
    ``"auto"``: only where the saved work outweighs the second decoder call (``sharing_pays_off``).
    ``square_probs``: also return ``log sum_v p(v)^2`` per completion position (WPO's weight alignment), from one
    extra no-grad pass of the lm head over the completion rows (the plain forward then; no prompt sharing).
    """
    if (
        share_prompt
        and not square_probs
        and chunk_size is not None
        and attention_bias is None
        and position_ids is None
    ):
        from prefopt.models.prefix_sharing import shared_layout, shared_prompt_token_logps

        layout = shared_layout(model, input_ids, attention_mask, completion_mask, share_prompt)
        if layout is not None:
            return shared_prompt_token_logps(
                model,
                input_ids,
                attention_mask,
                completion_mask,
                layout,
                chunk_size=chunk_size,
                head_impl=head_impl,
            )
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    model_mask = attention_mask
    if attention_bias is not None:
        model_mask = _model_attention_mask(model, attention_bias, _param_dtype(model))
    parts = _split_model(model) if chunk_size is not None else None
    if parts is None:
        logits = model(
            input_ids=input_ids, attention_mask=model_mask, position_ids=position_ids, use_cache=False
        ).logits
        all_logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
        logps = torch.gather(all_logps, 2, labels[..., None]).squeeze(-1)
        log_sum_sq = torch.logsumexp(2.0 * all_logps.detach(), dim=-1) * mask if square_probs else None
        return TokenLogps(logps * mask, mask, log_sum_sq)

    decoder, head = parts
    hidden = decoder(
        input_ids=input_ids, attention_mask=model_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)  # positions t+1 holding a completion token
    selected = hidden[rows, cols]  # hidden state at t predicts token t+1
    flat = head_token_logps(head, selected, labels[rows, cols], chunk_size, head_impl, _softcap(model))
    token_logps = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    log_sum_sq = None
    if square_probs:
        squares = head_log_sum_sq(head, selected.detach(), chunk_size, _softcap(model))
        log_sum_sq = torch.zeros_like(token_logps).index_put((rows, cols), squares)
    return TokenLogps(token_logps.index_put((rows, cols), flat), mask, log_sum_sq)


@torch.no_grad()
def head_log_sum_sq(
    head: torch.nn.Module, selected: torch.Tensor, chunk_size: int, softcap: Optional[float] = None
) -> torch.Tensor:
    """``log sum_v softmax(head(selected))_v^2`` in fp32 per ``[n, H]`` row, ``chunk_size`` rows at a time (WPO)."""
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        logits = head(selected[start : start + chunk_size]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        pieces.append(torch.logsumexp(2.0 * F.log_softmax(logits, dim=-1), dim=-1))
    return torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)


def head_token_logps(
    head: torch.nn.Module,
    selected: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    head_impl: Optional[str] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``log_softmax(head(selected))[targets]`` in fp32 for ``[n, H]`` predictor rows, ``[n]``, block by block.

    The chunked lm head shared by :func:`completion_token_logps` and the shared-prompt path
    (``prefopt/models/prefix_sharing.py``): the fused autograd function when the head is a plain linear layer,
    else checkpointed ``lm_head`` + ``log_softmax`` per ``chunk_size`` rows.
    """
    impl = head_impl or _default_head_impl()
    if impl not in HEAD_IMPLS:
        raise ValueError(f"head_impl={impl!r}: expected one of {', '.join(HEAD_IMPLS)}")
    if impl == "fused" and _plain_linear_weight(head) and not softcap:  # soft-capping: the per-chunk path
        vocab, count = head.weight.shape[0], selected.shape[0]
        if torch.is_grad_enabled() and (selected.requires_grad or head.weight.requires_grad):
            keep = 0 < count * vocab * 4 <= _keep_budget_bytes()
            shape = _block_shape(count, chunk_size, vocab, keep=keep)
            return _fused_head_autocast(selected, head.weight, head.bias, targets, shape, keep)
        # reference model / evaluation: nothing to keep for backward
        with _head_precision(selected) as cast:
            return _fused_head_forward(
                *cast(selected, head.weight, head.bias), targets, _block_shape(count, chunk_size, vocab)
            )[0]
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        chunk = selected[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad and not _zero3_frozen(head):
            # Recompute this chunk's logits in backward instead of keeping [chunk, vocab] floats alive.
            pieces.append(
                checkpoint(
                    _head_logps,
                    head,
                    chunk,
                    targets[start : start + chunk_size],
                    softcap,
                    use_reentrant=False,
                )
            )
        else:
            pieces.append(_head_logps(head, chunk, targets[start : start + chunk_size], softcap))
    return torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)


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

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: Optional[int] = 1024,
        head_impl: Optional[str] = None,
        share_prompt: bool | str = False,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.head_impl = head_impl
        # Exact whenever it applies (rows i and i + B share their prompt, checked per batch), so it can be a
        # property of the module: SFT or mixed batches simply fail the check and take the plain forward.
        self.share_prompt = share_prompt

    # accelerate's FSDP2 preparation (``accelerate/utils/fsdp_utils.py``, ``fsdp2_prepare_model``) reads these off
    # the prepared module -- this wrapper -- to shard the input embedding and the tail (final norm + lm-head) as
    # their own units; without them both stay in the root unit, gathered from forward to the end of backward.
    base_model_prefix = "decoder"  # ``_find_final_norm``: getattr(model, model.base_model_prefix)

    def _causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def decoder(self) -> Optional[torch.nn.Module]:
        """The decoder stack (e.g. ``LlamaModel``), whose direct children include the final norm."""
        return getattr(self._causal_lm(), "base_model", None)

    def tie_weights(self, *args, **kwargs) -> None:
        """Re-tie the wrapped model's tied embeddings. accelerate's ``fsdp2_prepare_model`` moves the model to the
        meta device (``fsdp_cpu_ram_efficient_loading``), which unties them, and re-ties only through
        ``model.tie_weights()``; without this the embedding and the lm-head of a tied model (Qwen2.5-0.5B/1.5B)
        would train as two separate tensors."""
        self._causal_lm().tie_weights(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._causal_lm().get_input_embeddings()

    def get_output_embeddings(self) -> Optional[torch.nn.Module]:
        return self._causal_lm().get_output_embeddings()

    @property
    def _no_split_modules(self):
        """The wrapped model's decoder-layer classes: accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` with no layer
        class reads ``model._no_split_modules`` of the prepared module (this wrapper); without it only the root
        would be sharded, i.e. no sharding at all."""
        return getattr(self._causal_lm(), "_no_split_modules", None)

    def forward(
        self,
        input_ids,
        attention_mask,
        completion_mask,
        position_ids=None,
        attention_bias=None,
        share_prompt: Optional[bool | str] = None,
        square_probs: bool = False,
    ) -> TokenLogps:
        return completion_token_logps(
            self.model,
            input_ids,
            attention_mask,
            completion_mask,
            chunk_size=self.chunk_size,
            position_ids=position_ids,
            attention_bias=attention_bias,
            head_impl=self.head_impl,
            share_prompt=self.share_prompt if share_prompt is None else share_prompt,
            square_probs=square_probs,
        )
