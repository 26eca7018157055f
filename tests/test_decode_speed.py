"""Decode-loop speed work, each exact or tested to round-off: the static-cache decoder (generation/static_decode.py)
against the HF forward, the decode thread choice, the seeded sampler's block-drawn noise."""

from __future__ import annotations

import pytest
import torch

from prefopt.generation.decode import decode_threads, sample_loop, sample_tokens
from prefopt.generation.static_decode import StaticDecoder, supports_static_decode


def _model(family: str, attn: str = "sdpa", sliding_window=None):
    """A random 2-layer model of ``family`` (grouped-query attention for Mistral and Qwen2; Qwen2 has q/k/v biases)."""
    import transformers

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
    )
    if family.startswith("llama"):
        config = transformers.LlamaConfig(num_key_value_heads=4, **common)
        if family == "llama-dynamic-rope":  # a length-dependent RoPE: no precomputed table
            config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(num_key_value_heads=2, sliding_window=sliding_window, **common)
        cls = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen2Config(num_key_value_heads=2, **common)
        cls = transformers.Qwen2ForCausalLM
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed term shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def _left_padded(rows: int = 3, width: int = 7):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _static_hidden(model, ids, mask, new_tokens):
    """Last hidden state of every decode step through StaticDecoder (prefill, then one token at a time)."""
    decoder = model.get_decoder()
    rows, width = ids.shape
    steps = new_tokens.shape[1]
    full_mask = torch.cat([mask.bool(), torch.ones(rows, steps, dtype=torch.bool)], 1)
    prefill = torch.ones(width, width, dtype=torch.bool).tril()[None, None] & full_mask[:, None, None, :width]
    prefill |= torch.eye(width, dtype=torch.bool)[None, None]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    static = StaticDecoder(decoder, rows, width + steps)
    outs = [static.forward(ids, positions, prefill)[:, -1]]
    position = positions[:, -1:] + 1
    for step in range(steps - 1):
        step_mask = full_mask[:, None, None, : width + step + 1]
        outs.append(static.forward(new_tokens[:, step : step + 1], position, step_mask)[:, -1])
        position = position + 1
    return torch.stack(outs, 1)


@pytest.mark.parametrize(
    "family,attn",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("mistral", "sdpa"),
        ("qwen2", "sdpa"),
        ("llama-dynamic-rope", "sdpa"),
    ],
)
def test_static_decoder_matches_the_hf_forward(family, attn):
    """Prefill and every decode step equal the HF forward over the whole sequence to 1e-5 (left padding,
    per-row positions, grouped-query attention, biases), and the stacked q/k/v and gate/up paths are used."""
    model = _model(family, attn)
    ids, mask = _left_padded()
    new_tokens = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    decoder = model.get_decoder()
    assert supports_static_decode(decoder, ids.shape[1] + new_tokens.shape[1])
    static = StaticDecoder(decoder, 3, 12)
    assert all(entry is not None for entry in static.qkv + static.gate_up)
    assert (static.rope_table is None) == (family == "llama-dynamic-rope")
    with torch.no_grad():
        got = _static_hidden(model, ids, mask, new_tokens)
        full_ids = torch.cat([ids, new_tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        expected = decoder(
            input_ids=full_ids, attention_mask=full_mask, position_ids=positions
        ).last_hidden_state
    width = ids.shape[1]
    # Step t's hidden state predicts token t: the HF forward's position width - 1 + t.
    torch.testing.assert_close(
        got, expected[:, width - 1 : width - 1 + new_tokens.shape[1]], atol=1e-5, rtol=1e-5
    )


def test_static_decoder_with_lora_adapters_matches_the_hf_forward():
    """LoRA-wrapped projections are called as modules (not stacked) and their adapters count."""
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        ),
    ).eval()
    ids, mask = _left_padded()
    new_tokens = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(3))
    decoder = peft_model.get_base_model().get_decoder()
    static = StaticDecoder(decoder, 3, 11)
    assert static.qkv == [None, None] and static.gate_up == [None, None] and static.lean is None
    with torch.no_grad():
        got = _static_hidden(peft_model.get_base_model(), ids, mask, new_tokens)
        full_ids = torch.cat([ids, new_tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        expected = decoder(
            input_ids=full_ids, attention_mask=full_mask, position_ids=positions
        ).last_hidden_state
        with peft_model.disable_adapter():
            base = decoder(
                input_ids=full_ids, attention_mask=full_mask, position_ids=positions
            ).last_hidden_state
    width = ids.shape[1]
    torch.testing.assert_close(got, expected[:, width - 1 : width + 3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base[:, width - 1 : width + 3], atol=1e-3)  # the adapters were applied


def test_sliding_window_shorter_than_the_sequence_takes_the_hf_forward():
    model = _model("mistral", sliding_window=6)
    decoder = model.get_decoder()
    assert supports_static_decode(decoder, 6) and not supports_static_decode(decoder, 7)
    ids, mask = _left_padded()
    torch.manual_seed(5)
    kwargs = dict(max_new_tokens=6, eos_ids=[2], pad_id=0)
    a = sample_loop(model, ids, mask, static=True, **kwargs)  # falls back: 7 + 6 > 6
    torch.manual_seed(5)
    b = sample_loop(model, ids, mask, static=False, **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_and_hf_loops_sample_the_same_tokens(family):
    """Same seed, same tokens for 24 sampled steps: the logits differ by round-off only."""
    model = _model(family)
    ids, mask = _left_padded()
    kwargs = dict(max_new_tokens=24, eos_ids=[2], pad_id=0, temperature=1.0)
    torch.manual_seed(11)
    a = sample_loop(model, ids, mask, static=True, **kwargs)
    torch.manual_seed(11)
    b = sample_loop(model, ids, mask, static=False, **kwargs)
    assert torch.equal(a, b)


def test_decode_threads_small_models_decode_on_one_thread(monkeypatch):
    monkeypatch.delenv("PREFOPT_DECODE_THREADS", raising=False)
    small = _model("llama")  # 16 rows x 32 x 97: far below the threshold
    assert decode_threads(small, 16) == 1
    import transformers

    big = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32000, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    assert decode_threads(big, 8) is None  # 8 x 64 x 32000 = 16M multiply-adds: torch's setting
    monkeypatch.setenv("PREFOPT_DECODE_THREADS", "0")
    assert decode_threads(small, 16) is None
    monkeypatch.setenv("PREFOPT_DECODE_THREADS", "2")
    assert decode_threads(small, 16) == 2


def test_sample_tokens_restores_the_thread_count(monkeypatch):
    monkeypatch.delenv("PREFOPT_DECODE_THREADS", raising=False)
    model = _model("llama")
    ids, mask = _left_padded()
    seen = []
    model.lm_head.register_forward_hook(lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    sample_tokens(model, ids, mask, max_new_tokens=3, eos_ids=[2], pad_id=0)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("block_steps,block_bytes", [(16, 64 << 20), (3, 64 << 20), (16, 8 * 4 * 97 * 2)])
def test_seeded_sampler_block_noise_is_the_per_step_noise(monkeypatch, block_steps, block_bytes):
    """Noise drawn S steps at a time equals the noise of one draw per step from the same per-row generators
    (the sampler's draws before blocks existed), whatever the block size; blocks stop at max_new_tokens."""
    from prefopt.generation.base import SamplingParams
    from prefopt.generation.hf import SeededSampler

    monkeypatch.setattr(SeededSampler, "BLOCK_STEPS", block_steps)
    monkeypatch.setattr(SeededSampler, "BLOCK_BYTES", block_bytes)
    seeds, vocab, steps = [3, 4, 5, 6], 97, 7
    sampler = SeededSampler(seeds, SamplingParams(max_new_tokens=steps))
    got = torch.stack([sampler.gumbel(vocab, "cpu") for _ in range(steps)], 1)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    expected = []
    for _ in range(steps):
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
        expected.append(-torch.log(-torch.log(uniform.clamp(min=1e-300))).to(torch.float32))
    assert torch.equal(got, torch.stack(expected, 1))
    assert sampler.drawn == steps


def _without_lean(monkeypatch):
    """StaticDecoder with every layer through the module calls of its general path (the code before the lean
    forward existed)."""
    monkeypatch.setattr(StaticDecoder, "_lean_layers", lambda self, decoder: None)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rows,width", [(3, 7), (5, 4)])
def test_lean_forward_is_the_module_forward_bit_for_bit(monkeypatch, family, rows, width):
    """The lean forward (weights read once, q and k rotated together, sign-folded sin) gives the same bits as
    the module-by-module path for the prefill and every decode step: grouped-query attention, q/k/v biases,
    left padding."""
    model = _model(family)
    ids, mask = _left_padded()
    if rows != 3:
        ids = torch.randint(3, 97, (rows, width), generator=torch.Generator().manual_seed(4))
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[0, :2] = 0
    new_tokens = torch.randint(3, 97, (rows, 6), generator=torch.Generator().manual_seed(2))
    assert StaticDecoder(model.get_decoder(), rows, ids.shape[1] + 6).lean is not None
    with torch.no_grad():
        lean = _static_hidden(model, ids, mask, new_tokens)
        _without_lean(monkeypatch)
        assert StaticDecoder(model.get_decoder(), rows, ids.shape[1] + 6).lean is None
        general = _static_hidden(model, ids, mask, new_tokens)
    assert torch.equal(lean, general)


def test_lean_forward_is_not_used_for_hooked_or_dynamic_rope_layers():
    """A hooked projection or norm, or a RoPE without a table, keeps the module calls (and still matches)."""
    model = _model("llama")
    decoder = model.get_decoder()
    assert StaticDecoder(decoder, 3, 12).lean is not None
    handle = decoder.layers[1].self_attn.o_proj.register_forward_hook(
        lambda module, inputs, output: output * 2
    )
    assert StaticDecoder(decoder, 3, 12).lean is None
    handle.remove()
    handle = decoder.norm.register_forward_pre_hook(lambda module, inputs: None)
    assert StaticDecoder(decoder, 3, 12).lean is None
    handle.remove()
    assert StaticDecoder(_model("llama-dynamic-rope").get_decoder(), 3, 12).lean is None


def test_hooked_o_proj_is_applied_in_the_static_loop():
    """The o_proj hook doubles the attention output: the static loop (module path) and the HF loop agree."""
    model = _model("llama")
    model.get_decoder().layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, output: output * 2)
    ids, mask = _left_padded()
    kwargs = dict(max_new_tokens=10, eos_ids=[2], pad_id=0, temperature=0)
    assert torch.equal(
        sample_loop(model, ids, mask, static=True, **kwargs),
        sample_loop(model, ids, mask, static=False, **kwargs),
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lean_and_module_loops_sample_the_same_tokens(monkeypatch, seed):
    """Same seed, same sampled tokens through the lean forward and the module path (40 steps, 6 rows)."""
    model = _model("qwen2" if seed % 2 else "llama")
    ids = torch.randint(3, 97, (6, 5), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=40, eos_ids=[2], pad_id=0, temperature=1.0)
    torch.manual_seed(seed)
    lean = sample_loop(model, ids, mask, **kwargs)
    _without_lean(monkeypatch)
    torch.manual_seed(seed)
    assert torch.equal(lean, sample_loop(model, ids, mask, **kwargs))


def test_several_eos_ids_end_rows_like_model_generate():
    """Two EOS ids (the isin branch) and one (the compare branch) end rows where model.generate ends them."""
    model = _model("llama")
    ids, mask = _left_padded()
    free = sample_loop(model, ids, mask, max_new_tokens=12, eos_ids=[], pad_id=0, temperature=0)
    for eos_ids in ([int(free[0, 3]), int(free[1, 5])], [int(free[2, 4])]):
        got = sample_loop(model, ids, mask, max_new_tokens=12, eos_ids=eos_ids, pad_id=0, temperature=0)
        expected = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=eos_ids,
            pad_token_id=0,
        )[:, ids.shape[1] :]
        assert torch.equal(got, expected[:, : got.shape[1]])
        assert bool(torch.isin(got, torch.tensor(eos_ids)).any())


def test_seeded_sampler_skips_finished_rows_and_keeps_the_live_rows_draws(monkeypatch):
    """With ``live`` a block draws only the live rows (finished rows get 0 noise); every live row's noise is the
    noise it gets without ``live``, also in later blocks after some rows finished."""
    from prefopt.generation.base import SamplingParams
    from prefopt.generation.hf import SeededSampler

    monkeypatch.setattr(SeededSampler, "BLOCK_STEPS", 3)
    seeds, vocab = [3, 4, 5, 6], 97
    all_rows = SeededSampler(seeds, SamplingParams(max_new_tokens=9))
    skipping = SeededSampler(seeds, SamplingParams(max_new_tokens=9))
    live = torch.ones(4, dtype=torch.bool)
    for step in range(9):
        live[1] &= step < 2  # finishes inside the first block
        live[3] &= step < 6  # finishes on a block boundary
        if step % 3 == 0:
            drawn = live.clone()  # the rows live when the block was drawn
        full, got = all_rows.gumbel(vocab, "cpu"), skipping.gumbel(vocab, "cpu", live)
        assert torch.equal(got[drawn], full[drawn])
        assert not got[~drawn].any()
    assert drawn.tolist() == [True, False, True, False]
