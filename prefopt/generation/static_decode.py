"""A decoder forward for sampling: Llama-family layers over a pre-allocated key/value cache, no per-token HF layers.

On the small models prefopt trains on CPU a decode step is a few dozen tiny kernels, and the Python around them is
most of its time: the profile of an online DPO step on the benchmark's tiny Llama (``scripts/bench_online.py
--profile``, docs/performance.md) put the HF decoder's Python layers (``LlamaModel.forward``, its output-recording
and deprecation wrappers, the mask and cache plumbing, per layer ``LlamaAttention.forward`` / ``sdpa_attention_
forward`` / ``DynamicCache.update``) ahead of the matrix products themselves, and ``DynamicCache`` grows its tensors
with ``torch.cat`` at every token, copying the whole cache each step.

:class:`StaticDecoder` runs the same arithmetic as ``LlamaModel.forward`` (transformers 5, ``modeling_llama.py``:
``LlamaDecoderLayer.forward``, ``LlamaAttention.forward``, ``apply_rotary_pos_emb``, ``LlamaMLP``) by calling the
model's own submodules (embedding, RMS norms, projections, MLP, rotary embedding; PEFT LoRA layers included, since
they are those submodules), with two differences in plumbing only:

- keys and values go into one ``[B, H_kv, P + T, D]`` buffer per layer, allocated once per call and written in
  place; attention reads the filled prefix of it;
- attention is ``torch.nn.functional.scaled_dot_product_attention`` with the boolean mask the caller gives (grouped
  query attention through ``enable_gqa``, the same as repeating the key/value heads).

It is the same function of the weights as the HF forward, not the same float operations in the same order for every
kernel, so its logits agree with the HF forward's to float round-off (tested to 1e-5 on Llama, Mistral and Qwen2
configurations, prefill and every decode step, PEFT adapters on, sdpa and eager models) rather than bit for bit.

Supported: ``LlamaModel``, ``MistralModel``, ``Qwen2Model`` bodies (plain RMS-norm / rotary / gated-MLP layers;
Qwen2's q/k/v biases are in its projections) without a sliding window shorter than the sequence, no DeepSpeed
ZeRO-3 partitioned parameters. Anything else takes the HF forward (:func:`supports_static_decode`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SUPPORTED_DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model")
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")


def _sliding_window(layer: torch.nn.Module) -> int | None:
    attention = layer.self_attn
    window = getattr(attention, "sliding_window", None)
    if window is None and type(attention).__name__.startswith(
        "Mistral"
    ):  # it reads the window from its config
        window = getattr(attention.config, "sliding_window", None)
    return window


def supports_static_decode(decoder: torch.nn.Module, length: int) -> bool:
    """Whether :class:`StaticDecoder` reproduces ``decoder``'s forward for sequences up to ``length`` tokens."""
    if type(decoder).__name__ not in SUPPORTED_DECODERS:
        return False
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if any(hasattr(parameter, "ds_id") for parameter in decoder.parameters()):  # ZeRO-3 partitions
        return False
    for layer in decoder.layers:
        if not all(hasattr(layer, name) for name in _LAYER_PARTS):
            return False
        if not all(hasattr(layer.self_attn, name) for name in _ATTENTION_PARTS):
            return False
        window = _sliding_window(layer)
        if window is not None and window < length:
            return False
    return True


def _stacked(module: torch.nn.Module, names: tuple[str, ...]):
    """``(weight, bias, output sizes)`` of ``module``'s named projections stacked along their outputs, or None when
    one of them is not a plain ``nn.Linear`` without hooks (LoRA, quantised or hooked layers keep their own call)."""
    layers = [getattr(module, name, None) for name in names]
    if not all(type(layer) is torch.nn.Linear for layer in layers):
        return None
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return None
    if len({layer.bias is None for layer in layers}) != 1:
        return None
    if names[0] == "gate_proj" and not hasattr(module, "act_fn"):
        return None
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return weight, bias, [layer.out_features for layer in layers]


def _rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (``weight * x * rsqrt(mean(x^2) + eps)``, in fp32) as one ``F.rms_norm`` kernel
    for fp32 inputs instead of five; other dtypes and other norm classes call the module."""
    if (
        hidden.dtype == torch.float32
        and type(norm).__name__.endswith("RMSNorm")
        and hasattr(norm, "variance_epsilon")
        and not (norm._forward_hooks or norm._forward_pre_hooks)
    ):
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(hidden)


class StaticDecoder:
    """The decoder body of a supported model with a pre-allocated cache for ``rows`` sequences of ``length``."""

    def __init__(self, decoder: torch.nn.Module, rows: int, length: int):
        self.decoder = decoder
        config = decoder.config
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        self.gqa = self.kv_heads != self.heads
        # The model's own rotary application (each supported family defines it in its modeling module).
        self.apply_rotary = sys.modules[type(decoder).__module__].apply_rotary_pos_emb
        self.head_dim = decoder.layers[0].self_attn.head_dim
        parameter = next(decoder.parameters())
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.keys = [parameter.new_empty(shape) for _ in decoder.layers]
        self.values = [parameter.new_empty(shape) for _ in decoder.layers]
        self.filled = 0
        # Plain linear projections that read the same input are stacked into one matrix for this call (q/k/v, and
        # the MLP's gate/up): fewer, larger GEMMs, the same products. LoRA-wrapped or hooked layers keep their calls.
        self.qkv = [_stacked(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in decoder.layers]
        self.gate_up = [_stacked(layer.mlp, ("gate_proj", "up_proj")) for layer in decoder.layers]
        # Rotary tables for every position of the call, computed once by the model's own rotary module (cos and
        # sin of position x frequency are elementwise, so a row of the table is what a per-step call returns);
        # each step then gathers its rows. Length-dependent RoPE variants (dynamic, longrope) call it per step.
        rope_type = getattr(decoder.rotary_emb, "rope_type", None)
        self.rope_table = None
        if isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope":
            with torch.no_grad():
                probe = parameter.new_zeros(1, length, 1)
                cos, sin = decoder.rotary_emb(probe, torch.arange(length, device=parameter.device)[None])
            self.rope_table = (cos[0], sin[0])

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the final norm for ``input_ids [B, Q]`` placed after the ``filled`` cached positions.

        ``mask``: boolean ``[B, 1, Q, filled + Q]``, True where a query may attend (causal and padding both)."""
        decoder = self.decoder
        start, queries = self.filled, input_ids.shape[1]
        end = start + queries
        hidden = decoder.embed_tokens(input_ids)
        if self.rope_table is not None:
            cos, sin = self.rope_table[0][position_ids], self.rope_table[1][position_ids]
        else:
            cos, sin = decoder.rotary_emb(hidden, position_ids)
        rows = input_ids.shape[0]
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            residual = hidden
            normed = _rms_norm(layer.input_layernorm, hidden)
            if self.qkv[index] is not None:
                weight, bias, sizes = self.qkv[index]
                query, key, value = F.linear(normed, weight, bias).split(sizes, dim=-1)
            else:
                query, key, value = (
                    attention.q_proj(normed),
                    attention.k_proj(normed),
                    attention.v_proj(normed),
                )
            query = query.view(rows, queries, -1, self.head_dim).transpose(1, 2)
            key = key.view(rows, queries, -1, self.head_dim).transpose(1, 2)
            value = value.view(rows, queries, -1, self.head_dim).transpose(1, 2)
            query, key = self.apply_rotary(query, key, cos, sin)
            self.keys[index][:, :, start:end] = key
            self.values[index][:, :, start:end] = value
            out = F.scaled_dot_product_attention(
                query,
                self.keys[index][:, :, :end],
                self.values[index][:, :, :end],
                attn_mask=mask,
                scale=attention.scaling,
                enable_gqa=self.gqa,
            )
            hidden = residual + attention.o_proj(out.transpose(1, 2).reshape(rows, queries, -1))
            normed = _rms_norm(layer.post_attention_layernorm, hidden)
            if self.gate_up[index] is not None:
                weight, bias, sizes = self.gate_up[index]
                gate, up = F.linear(normed, weight, bias).split(sizes, dim=-1)
                hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)  # LlamaMLP.forward
            else:
                hidden = hidden + layer.mlp(normed)
        self.filled = end
        return _rms_norm(decoder.norm, hidden)
