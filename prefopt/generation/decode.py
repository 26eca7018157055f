"""A lean sampling loop for Hugging Face causal LMs: the same samples as ``model.generate``, less work per token.

``model.generate`` (transformers 5.x, ``GenerationMixin._sample``) does per new token: ``prepare_inputs_for_
generation`` (slicing ids, building position ids and cache positions), a 2D mask extended by one column and turned
into a 4D mask by ``create_causal_mask``, the logits-processor and stopping-criteria lists, and, on the prefill,
whatever the model's head computes. For the small models prefopt trains on CPU these Python layers are a large
share of a token's time. :func:`sample_tokens` keeps only the work a sampler needs:

- the prefill runs the decoder body once over the left-padded prompts and the lm head on the last position only;
- the attention mask of every step is a view into one boolean ``[B, 1, 1, P + T]`` tensor built up front (a 4D
  mask is passed to the attention as is), and position ids are one add;
- Llama-family bodies run through :class:`~prefopt.generation.static_decode.StaticDecoder` (a pre-allocated
  key/value cache, the layers' kernels without HF's per-token plumbing, by the weights directly where the layers
  are plain modules); other bodies run the HF decoder with a ``DynamicCache``;
- sampling is ``softmax`` + ``multinomial`` after the temperature / top-k / top-p filters, in the same order and
  with the same operations as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
  ``TopPLogitsWarper`` (``generation/logits_process.py``), so with the same RNG state the draws are the same;
- finished rows get the pad token, and the loop ends as soon as every row has emitted an EOS; a ``draw`` callback
  (per-row seeded sampling) is told which rows are still live, so it can skip drawing noise for the others.

Tested against ``model.generate`` token for token (greedy and sampled with a fixed seed, left-padded batches,
``tests/test_generation.py``); the tokens/s comparison is ``scripts/bench_generation.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from prefopt.generation.static_decode import StaticDecoder, supports_static_decode
from prefopt.models.logps import _model_attention_mask, _param_dtype, _softcap, _split_model


def filter_logits(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, top-p, as transformers' warpers apply them (each only when it changes anything)."""
    if temperature not in (0.0, 1.0):
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    return scores


def supports_lean_loop(model: torch.nn.Module) -> bool:
    """Decoder + plain head, sdpa or eager attention, a forward that takes a cache."""
    parts = _split_model(model)
    if parts is None or _softcap(model):  # soft-capped logits (Gemma-2): model.generate applies the cap
        return False
    decoder = parts[0]
    impl = str(getattr(getattr(decoder, "config", None), "_attn_implementation", None) or "sdpa")
    parameters = set(inspect.signature(decoder.forward).parameters)
    return impl in ("sdpa", "eager") and bool({"cache", "past_key_values"} & parameters)


# A decode step's GEMMs are [rows, hidden] x [hidden, out]. Below this many multiply-adds for the largest of them
# (the lm head or the MLP), splitting a GEMM over threads costs more than it saves: each of the step's few dozen
# kernels then waits for a second thread to wake. Measured on the benchmark's tiny Llama (16 rows x 64 x 853 =
# 0.9M) on a loaded 2-core box: one thread ran the decode loop 2.2x faster than two under cProfile and 1.23-1.40x
# per decode step in the online benchmark (docs/performance.md, fourth round).
SMALL_DECODE_MACS = 1 << 22


def decode_threads(model: torch.nn.Module, rows: int) -> Optional[int]:
    """1 when the decode step's largest GEMM is too small to split across threads, else None (keep torch's
    setting). ``PREFOPT_DECODE_THREADS`` overrides it (a positive count, or 0 for torch's setting)."""
    override = os.environ.get("PREFOPT_DECODE_THREADS")
    if override is not None:
        return int(override) or None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    config = get_text_config() if get_text_config is not None else config
    hidden = getattr(config, "hidden_size", None)
    widest = max(getattr(config, "intermediate_size", 0) or 0, getattr(config, "vocab_size", 0) or 0)
    if not hidden or not widest:
        return None
    return 1 if rows * hidden * widest <= SMALL_DECODE_MACS else None


@contextlib.contextmanager
def torch_threads(count: Optional[int]):
    """``torch.set_num_threads(count)`` for the block (nothing when ``count`` is None or already the setting)."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sample_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """:func:`sample_loop` with the thread count :func:`decode_threads` picks for this model and batch."""
    with torch_threads(decode_threads(model, input_ids.shape[0])):
        return sample_loop(model, input_ids, attention_mask, **kwargs)


@torch.no_grad()
def sample_loop(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    draw: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    static: bool = True,
) -> torch.Tensor:
    """``[B, T]`` new tokens for left-padded prompts (``T <= max_new_tokens``; pad after a row's EOS).

    ``temperature == 0`` is greedy decoding. ``draw`` replaces the sampler: ``draw(logits, live)`` with fp32
    ``[B, vocab]`` logits and boolean ``[B]`` ``live`` (False for rows that have emitted EOS: their tokens become
    padding, whatever is drawn) in, ``[B]`` token ids out (e.g. per-row seeded Gumbel-max sampling, which then also
    owns the filters). ``static``: run
    Llama-family bodies through :class:`~prefopt.generation.static_decode.StaticDecoder` (pre-allocated cache, no
    HF layer plumbing per token; the same logits to float round-off) instead of the HF decoder with a
    ``DynamicCache``.
    """
    from transformers import DynamicCache

    decoder, head = _split_model(model)
    cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    rows, width = input_ids.shape
    device = input_ids.device
    mask_2d = torch.cat(
        [attention_mask.bool(), torch.ones(rows, max_new_tokens, dtype=torch.bool, device=device)], 1
    )
    # Prefill: causal and left padding in one [B, 1, P, P] mask; every step then sees [B, 1, 1, P + t + 1].
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    prefill_mask = causal[None, None] & mask_2d[:, None, None, :width]
    # A fully masked query row (a left-pad position) would give NaN in sdpa: let pads see themselves.
    prefill_mask |= torch.eye(width, dtype=torch.bool, device=device)[None, None]
    step_mask = mask_2d[:, None, None, :]
    dtype = _param_dtype(model)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if static and supports_static_decode(decoder, width + max_new_tokens):
        # Llama-family bodies: the same layers over a pre-allocated cache, without HF's per-token plumbing.
        static_decoder = StaticDecoder(decoder, rows, width + max_new_tokens)

        def forward(ids, mask, position_ids):
            return static_decoder.forward(ids, position_ids, mask)[:, -1]
    else:
        cache = DynamicCache()

        def forward(ids, mask, position_ids):
            return decoder(
                input_ids=ids,
                attention_mask=_model_attention_mask(decoder, mask, dtype),
                position_ids=position_ids,
                use_cache=True,
                **{cache_kwarg: cache},
            ).last_hidden_state[:, -1]

    if type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        # A plain head by its weights: the module's own F.linear, without its call plumbing.
        head_weight, head_bias = head.weight, head.bias

        def head(hidden):
            return F.linear(hidden, head_weight, head_bias)

    hidden = forward(input_ids, prefill_mask, positions)
    position = positions[:, -1:] + 1
    eos = torch.tensor(eos_ids, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        logits = head(hidden).float()
        if draw is not None:
            next_tokens = draw(logits, unfinished)
        elif temperature == 0:
            next_tokens = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        next_tokens = next_tokens.masked_fill(~unfinished, pad_id)
        tokens.append(next_tokens)
        unfinished &= next_tokens != eos if len(eos_ids) == 1 else ~torch.isin(next_tokens, eos)
        if step + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        hidden = forward(next_tokens[:, None], step_mask[..., : width + step + 1], position)
        position = position + 1
    return torch.stack(tokens, dim=1)
