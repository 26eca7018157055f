"""The prompt once per pair: completion logps of a pair batch with each shared prompt run through the decoder once.

A pair batch (``PairCollator``) holds ``prompt + chosen`` in rows ``0..B-1`` and ``prompt + rejected`` in rows
``B..2B-1``: the unshared forward runs every prompt twice. Here the decoder runs

1. the ``B`` prompts once (right-padded to the longest prompt ``P``), keeping their keys/values in a
   ``DynamicCache``, repeated for the two completions of each pair (``Cache.batch_repeat_interleave(2)``: rows
   ``2i`` and ``2i+1`` are pair ``i``'s chosen and rejected completion), and
2. the ``2B`` completions (right-padded to ``C``) on top of that cache, with ``position_ids`` continuing each
   prompt's own length and an explicit boolean mask ``[2B, 1, C, P + C]``: a completion token attends to its
   prompt's real tokens and causally to its own completion.

The first completion token is predicted by the prompt's last hidden state (from pass 1), every later one by the
previous completion position (pass 2). Gradients flow through the cached keys/values into the prompt pass, where
the two completions' contributions add up: the same function as the unshared forward, so losses and gradients
agree to float rounding (``tests/test_prefix_sharing.py``: 1e-5). The decoder's work drops from ``2B (P + C)``
token positions to ``B P + 2B C``, and the attention of a completion over its prompt is computed once per
completion, not once per prompt copy (the same prefix-caching idea as vLLM's automatic prefix caching and
SGLang's RadixAttention, here inside one training step).

It applies when the batch has the pair layout (the two rows of a pair share their prompt tokens, right padding,
no packing), every prompt has at least one token, the attention is sdpa or eager (they take the explicit mask;
flash/flex would need varlen cache support) and the decoder is not gradient-checkpointed (transformers turns the
cache off then). Otherwise :func:`pair_layout` returns None and the caller takes the unshared path. Turned on by
``train.share_prompt``; measured in docs/performance.md.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch

from prefopt.models.logps import (
    TokenLogps,
    _model_attention_mask,
    _param_dtype,
    _softcap,
    _split_model,
    head_token_logps,
    is_sharded_parameter,
)


@dataclass
class PairLayout:
    """Where the prompt and completion of every row of a ``[2B, L]`` pair batch sit."""

    prompt_lengths: torch.Tensor  # [B]
    completion_lengths: torch.Tensor  # [2B], unshared row order (chosen rows, then rejected rows)
    prompt_ids: torch.Tensor  # [B, P] right-padded
    completion_ids: torch.Tensor  # [2B', C], interleaved order: row 2i = chosen i, 2i+1 = rejected i
    completion_valid: torch.Tensor  # [2B', C] bool, interleaved order


def pair_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> PairLayout | None:
    """The shared-prompt layout of a right-padded pair batch, or None when rows ``i`` and ``i + B`` do not share
    their prompt, a prompt is empty, or the rows are not ``prompt, completion, padding`` in that order."""
    rows, width = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    half = rows // 2
    attention = attention_mask.bool()
    completion = completion_mask.bool() & attention
    lengths = attention.sum(-1)
    completion_lengths = completion.sum(-1)
    prompt_lengths = lengths - completion_lengths
    if not torch.equal(prompt_lengths[:half], prompt_lengths[half:]) or bool(
        (prompt_lengths[:half] < 1).any()
    ):
        return None
    positions = torch.arange(width, device=input_ids.device)
    expected_attention = positions[None, :] < lengths[:, None]
    expected_completion = expected_attention & (positions[None, :] >= prompt_lengths[:, None])
    if not (torch.equal(attention, expected_attention) and torch.equal(completion, expected_completion)):
        return None
    prompt_width = int(prompt_lengths.max())
    in_prompt = positions[None, :prompt_width] < prompt_lengths[:half, None]
    chosen_prompts, rejected_prompts = input_ids[:half, :prompt_width], input_ids[half:, :prompt_width]
    if not bool(((chosen_prompts == rejected_prompts) | ~in_prompt).all()):
        return None
    completion_width = max(int(completion_lengths.max()), 1)
    order = interleaved_rows(half, input_ids.device)  # interleaved row r <- unshared row order[r]
    offsets = torch.arange(completion_width, device=input_ids.device)
    gather_at = (prompt_lengths[order, None] + offsets[None, :]).clamp(max=width - 1)
    return PairLayout(
        prompt_lengths=prompt_lengths[:half],
        completion_lengths=completion_lengths,
        prompt_ids=chosen_prompts,
        completion_ids=input_ids[order].gather(1, gather_at),
        completion_valid=offsets[None, :] < completion_lengths[order, None],
    )


def interleaved_rows(half: int, device) -> torch.Tensor:
    """Unshared row of each interleaved row: ``[0, B, 1, B+1, ...]`` (chosen i, rejected i)."""
    pairs = torch.arange(half, device=device)
    return torch.stack([pairs, pairs + half], dim=1).reshape(-1)


def can_share_prompt(model: torch.nn.Module) -> bool:
    """True when the model can take the shared-prompt forward (split body/head, sdpa or eager, no checkpointing)."""
    parts = _split_model(model)
    if parts is None:
        return False
    decoder = parts[0]
    config = getattr(decoder, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "sdpa")
    if impl not in ("sdpa", "eager"):
        return False
    if decoder.training and any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules()):
        return False
    return "cache" in _forward_parameters(decoder) or "past_key_values" in _forward_parameters(decoder)


# ``train.share_prompt=auto`` shares a batch's prompts when the decoder work it saves, per layer, is at least this
# many multiply-adds: the duplicated prompt tokens times one layer's parameters. The shared path costs a second
# decoder call plus the cache plumbing, a fixed cost per layer that outweighs the saving on short prompts and tiny
# models. Calibrated on CPU with ``scripts/bench_share_prompt.py`` (a no-grad reference forward plus a forward and
# backward, shared against plain, four model widths; docs/performance.md, fifth round): 11.6M saved per layer ran
# 0.84x shared, 46-49M 0.94-1.12x, 132M and more 1.04-1.43x; end to end, the online benchmark's steps (12M) spent
# 30% less outside generation unshared. On a GPU any realistic model and batch is far above the bar (a 0.5B
# model's layer holds 15M parameters: three prompt tokens suffice).
SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER = 32 * 2**20


def _numel(parameter: torch.nn.Parameter) -> int:
    return int(getattr(parameter, "ds_numel", 0) or parameter.numel())  # ZeRO-3 partitions hold ds_numel


def sharing_pays_off(model: torch.nn.Module, saved_tokens: int) -> bool:
    """Whether running ``saved_tokens`` duplicated prompt tokens once instead of twice is worth the shared forward's
    fixed cost (``train.share_prompt=auto``): ``saved_tokens`` x one layer's parameters against the bar above."""
    decoder = _split_model(model)[0]
    layers = getattr(decoder, "layers", None)
    if not layers:
        return True
    per_layer = _LAYER_PARAMETERS.get(layers)
    if per_layer is None:  # counted once per model (a forward-time walk over every parameter adds up)
        per_layer = sum(_numel(p) for p in layers.parameters()) // len(layers)
        _LAYER_PARAMETERS[layers] = per_layer
    return saved_tokens * per_layer >= SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER


_LAYER_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def agreed_across_ranks(model: torch.nn.Module, share: bool, device: torch.device) -> bool:
    """``share`` where every process of a sharded run (FSDP2, ZeRO-3) decided the same, else False everywhere.

    Under sharding each decoder call all-gathers every layer's parameters, so one process taking the two-call shared
    path while another takes the one-call plain path would pair mismatched collectives (a hang or wrong weights).
    The decision depends on each process's own batch, so sharded runs agree on it with one tiny all-reduce. DDP
    and single processes need no agreement: both paths use the same parameters and give the same gradients."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return share
    parameter = next(model.parameters(), None)
    if parameter is None or not is_sharded_parameter(parameter):
        return share
    flag = torch.tensor([1 if share else 0], device=device)  # the batch's device: NCCL needs a GPU tensor
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def shared_layout(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    share_prompt: bool | str,
) -> PairLayout | None:
    """The layout to run the shared-prompt forward on, or None for the plain forward (``train.share_prompt``:
    true shares wherever the layout applies, ``"auto"`` only where :func:`sharing_pays_off`; sharded processes
    agree first)."""
    auto = share_prompt == "auto"
    layout = None
    # Half the rows times the width bounds the saved prompt tokens: below the bar, skip the layout check too.
    if can_share_prompt(model) and (not auto or sharing_pays_off(model, input_ids.numel() // 2)):
        layout = pair_layout(input_ids, attention_mask, completion_mask)
    if layout is not None and auto and not sharing_pays_off(model, int(layout.prompt_lengths.sum())):
        layout = None
    return layout if agreed_across_ranks(model, layout is not None, input_ids.device) else None


def _forward_parameters(decoder: torch.nn.Module) -> frozenset[str]:
    return _class_forward_parameters(type(decoder))


@functools.cache
def _class_forward_parameters(decoder_class: type) -> frozenset[str]:
    # Read once per class: ``inspect.signature`` costs ~0.3 ms, and this is asked at every forward.
    return frozenset(inspect.signature(decoder_class.forward).parameters)


def _completion_mask_4d(layout: PairLayout, prompt_width: int) -> torch.Tensor:
    """``[2B, 1, C, P + C]`` boolean (True = attend): the row's real prompt tokens, then causal over its completion."""
    completion_width = layout.completion_ids.shape[1]
    device = layout.completion_ids.device
    prompt_lengths = layout.prompt_lengths.repeat_interleave(2)  # interleaved rows share pair i's prompt
    prompt_part = torch.arange(prompt_width, device=device)[None, :] < prompt_lengths[:, None]  # [2B, P]
    causal = torch.ones(completion_width, completion_width, dtype=torch.bool, device=device).tril()
    mask = torch.cat(
        [
            prompt_part[:, None, :].expand(-1, completion_width, -1),
            causal[None].expand(prompt_lengths.shape[0], -1, -1),
        ],
        dim=2,
    )
    return mask[:, None]


def shared_prompt_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    layout: PairLayout,
    *,
    chunk_size: int,
    head_impl: str | None = None,
) -> TokenLogps:
    """Per-token completion logps of a pair batch, in the unshared ``[2B, L-1]`` layout of
    :func:`~prefopt.models.logps.completion_token_logps`, computed with one decoder pass per prompt."""
    from transformers import DynamicCache

    decoder, head = _split_model(model)
    cache_kwarg = "cache" if "cache" in _forward_parameters(decoder) else "past_key_values"
    half = layout.prompt_ids.shape[0]
    prompt_width = layout.prompt_ids.shape[1]
    device = input_ids.device
    prompt_positions = torch.arange(prompt_width, device=device)
    prompt_attention = (prompt_positions[None, :] < layout.prompt_lengths[:, None]).long()
    cache = DynamicCache()
    prompt_hidden = decoder(
        input_ids=layout.prompt_ids, attention_mask=prompt_attention, use_cache=True, **{cache_kwarg: cache}
    ).last_hidden_state  # [B, P, H]
    cache.batch_repeat_interleave(
        2
    )  # pair i's keys/values for its chosen (row 2i) and rejected (2i+1) completion
    completion_width = layout.completion_ids.shape[1]
    prompt_lengths = layout.prompt_lengths.repeat_interleave(2)
    position_ids = prompt_lengths[:, None] + torch.arange(completion_width, device=device)[None, :]
    mask = _model_attention_mask(decoder, _completion_mask_4d(layout, prompt_width), _param_dtype(model))
    completion_hidden = decoder(
        input_ids=layout.completion_ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kwarg: cache},
    ).last_hidden_state  # [2B, C, H]
    del cache

    # Predictors: token 0 of a completion <- its prompt's last hidden state; token j >= 1 <- completion j - 1.
    rows, cols = layout.completion_valid.nonzero(as_tuple=True)  # interleaved row, completion offset
    first = cols == 0
    rows, cols = torch.cat([rows[first], rows[~first]]), torch.cat([cols[first], cols[~first]])
    count = int(first.sum())
    pair = torch.div(rows[:count], 2, rounding_mode="floor")
    selected = torch.cat(
        [
            prompt_hidden[pair, layout.prompt_lengths[pair] - 1],
            completion_hidden[rows[count:], cols[count:] - 1],
        ]
    )
    targets = layout.completion_ids[rows, cols]
    flat = head_token_logps(head, selected, targets, chunk_size, head_impl, _softcap(model))

    # Back to the unshared layout: token j of unshared row u sits at label column prompt_length(u) + j - 1.
    unshared_rows = interleaved_rows(half, device)[rows]
    label_cols = prompt_lengths[rows] + cols - 1
    labels_shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    token_logps = torch.zeros(labels_shape, dtype=torch.float32, device=device)
    token_logps = token_logps.index_put((unshared_rows, label_cols), flat)
    return TokenLogps(token_logps, completion_mask[:, 1:].to(torch.float32))
