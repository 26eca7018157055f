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

When every part is the plain module it looks like (``nn.Linear`` projections and ``nn.Embedding`` without hooks, a
Llama-style RMS norm, a precomputed rotary table: no LoRA), :meth:`StaticDecoder._lean_forward` runs those kernels
on the modules' weights directly: no module calls or attribute lookups per token, q and k rotated in one go on the
stacked projection output, one gather for cos and sin. It issues the same kernels on the same operands as the
module path, so its hidden states are bit-identical to it (tested), and sampling gives the same tokens.

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


def _plain_rms_norm(norm: torch.nn.Module) -> bool:
    """A Llama-style RMS norm (``weight * x * rsqrt(mean(x^2) + eps)``) without hooks."""
    return (
        type(norm).__name__.endswith("RMSNorm")
        and hasattr(norm, "variance_epsilon")
        and not (norm._forward_hooks or norm._forward_pre_hooks)
    )


def _rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (``weight * x * rsqrt(mean(x^2) + eps)``, in fp32) as one ``F.rms_norm`` kernel
    for fp32 inputs instead of five; other dtypes and other norm classes call the module."""
    if hidden.dtype == torch.float32 and _plain_rms_norm(norm):
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
        self.lean = self._lean_layers(decoder)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the final norm for ``input_ids [B, Q]`` placed after the ``filled`` cached positions.

        ``mask``: boolean ``[B, 1, Q, filled + Q]``, True where a query may attend (causal and padding both)."""
        if self.lean is not None:
            return self._lean_forward(input_ids, position_ids, mask)
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

    def _lean_layers(self, decoder: torch.nn.Module):
        """Per-layer weight tuples for :meth:`_lean_forward`, or None when a part is not the plain module it reads
        the weights of (LoRA / hooked / quantised projections, other norm or embedding classes, no rotary table,
        non-fp32 weights): those keep the module calls of :meth:`forward`."""
        embed = decoder.embed_tokens
        if self.rope_table is None or type(embed) is not torch.nn.Embedding or embed.max_norm is not None:
            return None
        if embed._forward_hooks or embed._forward_pre_hooks or embed.weight.dtype != torch.float32:
            return None
        norms = [decoder.norm] + [
            getattr(layer, name) for layer in decoder.layers for name in _LAYER_PARTS[:2]
        ]
        if not all(_plain_rms_norm(norm) for norm in norms):
            return None
        if any(entry is None for entry in self.qkv + self.gate_up):
            return None
        layers = []
        for index, layer in enumerate(decoder.layers):
            attention, mlp = layer.self_attn, layer.mlp
            outs = (attention.o_proj, mlp.down_proj)
            if not all(type(out) is torch.nn.Linear for out in outs):
                return None
            if any(out._forward_hooks or out._forward_pre_hooks for out in outs):
                return None
            act = mlp.act_fn
            if act._forward_hooks or act._forward_pre_hooks:
                return None
            if type(act) is torch.nn.SiLU:
                act = F.silu
            qkv_weight, qkv_bias, _ = self.qkv[index]
            gate_up_weight, gate_up_bias, (gate_size, _) = self.gate_up[index]
            layers.append(
                (
                    layer.input_layernorm.weight,
                    layer.input_layernorm.variance_epsilon,
                    qkv_weight,
                    qkv_bias,
                    attention.o_proj.weight,
                    attention.o_proj.bias,
                    attention.scaling,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                    gate_up_weight,
                    gate_up_bias,
                    gate_size,
                    act,
                    mlp.down_proj.weight,
                    mlp.down_proj.bias,
                    self.keys[index],
                    self.values[index],
                )
            )
        # One table of [cos, sign-flipped sin] rows, so a step gathers both with one index. rotate_half(x) * sin
        # (HF: cat(-x2, x1) * sin) is cat(x2, x1) * cat(-sin_1, sin_2): negation is exact, so the same bits.
        cos, sin = self.rope_table
        half = self.head_dim // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        self.rope_rows = torch.stack([cos, signed_sin], -2)  # [length, 2, D]
        return layers

    def _lean_forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for plain layers, by their weights: the same kernels on the same operands (so the same
        bits, tested), less Python per token. q and k are rotated together on the stacked projection output."""
        decoder = self.decoder
        rows, queries = input_ids.shape
        start = self.filled
        end = start + queries
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        rotated_heads = heads + kv_heads
        hidden = F.embedding(input_ids, decoder.embed_tokens.weight)
        rope = self.rope_rows[position_ids]  # [B, Q, 2, D]
        cos, sin = rope[:, :, :1], rope[:, :, 1:]  # broadcast over heads: [B, Q, 1, D]
        width = (hidden.shape[-1],)
        for (
            norm_weight,
            norm_eps,
            qkv_weight,
            qkv_bias,
            o_weight,
            o_bias,
            scaling,
            post_weight,
            post_eps,
            gate_up_weight,
            gate_up_bias,
            gate_size,
            act,
            down_weight,
            down_bias,
            keys,
            values,
        ) in self.lean:
            normed = F.rms_norm(hidden, width, norm_weight, norm_eps)
            qkv = F.linear(normed, qkv_weight, qkv_bias).view(rows, queries, -1, head_dim)
            query_key = qkv[:, :, :rotated_heads]
            swapped = query_key.unflatten(-1, (2, head_dim // 2)).flip(-2).view(query_key.shape)
            query_key = query_key * cos + swapped * sin  # apply_rotary_pos_emb on q and k at once
            keys[:, :, start:end] = query_key[:, :, heads:].transpose(1, 2)
            values[:, :, start:end] = qkv[:, :, rotated_heads:].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                query_key[:, :, :heads].transpose(1, 2),
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                scale=scaling,
                enable_gqa=self.gqa,
            )
            hidden = hidden + F.linear(out.transpose(1, 2).reshape(rows, queries, -1), o_weight, o_bias)
            normed = F.rms_norm(hidden, width, post_weight, post_eps)
            gate_up = F.linear(normed, gate_up_weight, gate_up_bias)
            hidden = hidden + F.linear(
                act(gate_up[..., :gate_size]) * gate_up[..., gate_size:], down_weight, down_bias
            )
        self.filled = end
        norm = decoder.norm
        return F.rms_norm(hidden, width, norm.weight, norm.variance_epsilon)
