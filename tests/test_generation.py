"""Generators: rollout layout, EOS masking, left padding, PEFT, modes, seeds; vLLM's testable parts."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from prefopt.config import GenerationConfig
from prefopt.errors import ConfigError
from prefopt.generation import HFGenerator, Rollouts, SamplingParams, build_generator, build_rollouts
from prefopt.generation.vllm import merged_state_dict, rollouts_from_vllm_outputs, vllm_weight_name

PROMPTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus three?",
    "a",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from prefopt.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("generation") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture()
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture()
def prompt_ids(tokenizer):
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def _boost_eos(model, eos_id: int, bias: float = 5.0):
    """Make EOS likely enough that sampled completions both finish and run out of tokens."""
    boost = torch.zeros(model.config.vocab_size)
    boost[eos_id] = bias
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    return model


# ------------------------------------------------------------------------------------------------------------


class _Tok:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(t) for t in row if not (skip_special_tokens and t in (0, 3))) for row in rows]


def test_build_rollouts_cuts_after_first_eos_and_lays_out_sequences():
    rollouts = build_rollouts(
        [[5, 6], [7]],
        [[10, 3, 11, 3], [10, 11, 12], [3], [12, 3, 0, 0]],
        2,
        eos_ids=[3],
        pad_id=0,
        tokenizer=_Tok(),
    )
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1]
    assert rollouts.prompt_ids == [[5, 6], [5, 6], [7], [7]]
    assert rollouts.completion_ids.tolist() == [[10, 3, 0], [10, 11, 12], [3, 0, 0], [12, 3, 0]]
    assert rollouts.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert rollouts.finished.tolist() == [True, False, True, True]
    assert rollouts.texts == ["10", "10 11 12", "", "12"]
    assert rollouts.completion_lengths.tolist() == [2, 3, 1, 2]

    seq = rollouts.to_sequences(pad_token_id=0)
    assert seq["input_ids"].tolist() == [
        [5, 6, 10, 3, 0],
        [5, 6, 10, 11, 12],
        [7, 3, 0, 0, 0],
        [7, 12, 3, 0, 0],
    ]
    assert seq["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert seq["completion_mask"].tolist() == [
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
    ]


def test_shapes_prompt_major_grouping_and_sub_batches(model, tokenizer, prompt_ids):
    generator = HFGenerator(model, tokenizer, batch_size=3)  # 4 prompts -> sub-batches of 3 and 1
    rollouts = generator.generate(prompt_ids, SamplingParams(n=3, max_new_tokens=5, seed=0))
    assert isinstance(rollouts, Rollouts)
    assert len(rollouts) == 12
    assert rollouts.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert rollouts.prompt_ids == [prompt_ids[i] for i in rollouts.prompt_index.tolist()]
    assert rollouts.completion_ids.shape == rollouts.completion_mask.shape
    assert rollouts.completion_ids.shape[0] == 12 and rollouts.completion_ids.shape[1] <= 5
    assert rollouts.finished.dtype == torch.bool and rollouts.finished.shape == (12,)
    assert len(rollouts.texts) == 12
    # n samples of one prompt are distinct draws, not copies
    assert len({tuple(row) for row in rollouts.completion_ids[:3].tolist()}) > 1


def test_completion_mask_covers_up_to_first_eos(model, tokenizer, prompt_ids):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generator = HFGenerator(_boost_eos(model, eos), tokenizer, batch_size=4)
    rollouts = generator.generate(prompt_ids, SamplingParams(n=4, max_new_tokens=6, seed=3))
    finished = rollouts.finished.tolist()
    assert any(finished) and not all(finished), "the EOS boost should give both outcomes"
    for row, mask, done, text in zip(
        rollouts.completion_ids.tolist(), rollouts.completion_mask.tolist(), finished, rollouts.texts
    ):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)
        if done:
            assert row.index(eos) == length - 1  # first EOS is the last masked token
            assert all(token == pad for token in row[length:])
        else:
            assert length == 6 and eos not in row
        assert text == tokenizer.decode(row[:length], skip_special_tokens=True)
        assert "<|im_end|>" not in text and "<|pad|>" not in text


def test_left_padding_matches_one_prompt_at_a_time(model, tokenizer, prompt_ids):
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    batched = HFGenerator(model, tokenizer, batch_size=8).generate(prompt_ids, greedy)
    single = [HFGenerator(model, tokenizer).generate([ids], greedy) for ids in prompt_ids]
    for i in range(len(prompt_ids)):
        for j in range(2):
            row = 2 * i + j
            length = int(batched.completion_mask[row].sum())
            reference = single[i].completion_ids[j, : int(single[i].completion_mask[j].sum())]
            assert batched.completion_ids[row, :length].tolist() == reference.tolist()
    assert torch.equal(batched.completion_ids[0], batched.completion_ids[1])  # greedy n copies


def test_seed_reproducible_and_leaves_global_rng_alone(model, tokenizer, prompt_ids):
    generator = HFGenerator(model, tokenizer)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=123)
    torch.manual_seed(0)
    first = generator.generate(prompt_ids, sampling)
    after_first = torch.rand(3)
    torch.manual_seed(0)
    second = generator.generate(prompt_ids, sampling)
    after_second = torch.rand(3)
    assert torch.equal(first.completion_ids, second.completion_ids)
    torch.manual_seed(0)
    assert torch.equal(after_first, torch.rand(3)) and torch.equal(after_first, after_second)
    other = generator.generate(prompt_ids, SamplingParams(n=2, max_new_tokens=6, seed=124))
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_sampling_filters_are_explicit(model, tokenizer):
    config = HFGenerator(model, tokenizer)._generation_config(SamplingParams(top_k=0, top_p=0.9), [3], 0, 2)
    assert config.do_sample and config.top_k == 0 and config.top_p == 0.9 and config.num_return_sequences == 2
    greedy = HFGenerator(model, tokenizer)._generation_config(SamplingParams(temperature=0), [3], 0, 1)
    assert not greedy.do_sample


def _peft_model(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # non-zero adapters so that they change the outputs
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return peft_model


def test_peft_model_generates_with_adapters_and_restores_modes(model, tokenizer, prompt_ids):
    base_copy = copy.deepcopy(model)
    peft_model = _peft_model(model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    peft_model.train()
    peft_model.base_model.model.model.layers[0].mlp.eval()  # a deliberately different submodule mode
    modes = {name: module.training for name, module in peft_model.named_modules()}
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=8)

    with_adapters = build_generator(GenerationConfig(batch_size=2), peft_model, tokenizer).generate(
        prompt_ids, greedy
    )
    assert {name: module.training for name, module in peft_model.named_modules()} == modes
    expected = HFGenerator(merged, tokenizer).generate(prompt_ids, greedy)
    without = HFGenerator(base_copy, tokenizer).generate(prompt_ids, greedy)
    assert torch.equal(with_adapters.completion_ids, expected.completion_ids)
    assert not torch.equal(with_adapters.completion_ids, without.completion_ids)


def test_unwraps_module_wrappers(model, tokenizer, prompt_ids):
    wrapper = torch.nn.Module()
    wrapper.module = model  # shaped like DDP / DeepSpeedEngine
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    wrapped = HFGenerator(wrapper, tokenizer).generate(prompt_ids, greedy)
    plain = HFGenerator(model, tokenizer).generate(prompt_ids, greedy)
    assert torch.equal(wrapped.completion_ids, plain.completion_ids)


def test_sampling_params_validation():
    for bad in (dict(n=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- vLLM: what can run without vLLM and a GPU --------------------------------------------------------------


def test_vllm_backend_without_vllm_says_use_hf(model, tokenizer, monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="generation.backend=hf"):
        build_generator(GenerationConfig(backend="vllm"), model, tokenizer)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU.*generation.backend=hf"):
        build_generator(GenerationConfig(backend="vllm"), model, tokenizer)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", None),
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector.default.weight", None),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        ("base_model.model.lm_head.original_module.weight", None),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_vllm_weight_name(name, expected):
    assert vllm_weight_name(name) == expected


def test_merged_weights_equal_merge_and_unload_without_touching_the_model(model):
    plain = merged_state_dict(model)
    assert plain.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(plain[name], parameter) for name, parameter in model.named_parameters())

    peft_model = _peft_model(model)
    before = {name: parameter.detach().clone() for name, parameter in peft_model.named_parameters()}
    merged = merged_state_dict(peft_model)
    reference = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    changed = [n for n in reference if not torch.equal(reference[n], plain[n])]
    assert any("q_proj" in n for n in changed) and "lm_head.weight" in changed
    # the training model is untouched: no merge, same tensors
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(getattr(module, "merged", False) for module in peft_model.modules())
    # adapters disabled: the base weights
    with peft_model.disable_adapter():
        disabled = merged_state_dict(peft_model)
    assert all(torch.equal(disabled[name], plain[name]) for name in plain)


def test_rollouts_from_vllm_shaped_outputs(tokenizer):
    eos = tokenizer.eos_token_id

    def sample(tokens, reason, stop_reason=None):
        return types.SimpleNamespace(token_ids=tokens, finish_reason=reason, stop_reason=stop_reason)

    outputs = [
        types.SimpleNamespace(outputs=[sample([40, 41, eos], "stop"), sample([42, 43, 44], "length")]),
        types.SimpleNamespace(outputs=[sample([45], "stop"), sample([46, eos], "stop", stop_reason=eos)]),
    ]
    rollouts = rollouts_from_vllm_outputs(
        [[1, 2], [3]], outputs, 2, eos_ids=[eos], pad_id=0, tokenizer=tokenizer
    )
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1]
    assert rollouts.finished.tolist() == [True, False, True, True]
    assert rollouts.completion_mask.sum(1).tolist() == [3, 3, 2, 2]  # EOS restored for the third sample
    assert rollouts.completion_ids[2, :2].tolist() == [45, eos]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)]
)
def test_lean_loop_gives_model_generate_tokens(model, tokenizer, prompt_ids, temperature, top_k, top_p):
    """prefopt's sampling loop (generation/decode.py) against model.generate: the same tokens, token for token,
    with the same seed (left-padded batch, n=2, EOS reached by some rows and not by others)."""
    _boost_eos(model, tokenizer.eos_token_id, bias=3.0)
    sampling = SamplingParams(
        n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=7
    )
    lean = HFGenerator(model, tokenizer, loop="lean").generate(prompt_ids, sampling)
    plain = HFGenerator(model, tokenizer, loop="generate").generate(prompt_ids, sampling)
    assert torch.equal(lean.completion_mask, plain.completion_mask)
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    assert lean.texts == plain.texts and torch.equal(lean.finished, plain.finished)
    if temperature == 1.0:
        assert 0 < int(lean.finished.sum()) < len(lean)  # both kinds of rows were exercised


def test_lean_loop_with_peft_adapters_matches_generate(model, tokenizer, prompt_ids):
    peft_model = _peft_model(model)
    sampling = SamplingParams(n=1, max_new_tokens=8, seed=3)
    lean = HFGenerator(peft_model, tokenizer, loop="lean").generate(prompt_ids, sampling)
    plain = HFGenerator(peft_model, tokenizer, loop="generate").generate(prompt_ids, sampling)
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    with peft_model.disable_adapter():
        off = HFGenerator(peft_model, tokenizer, loop="lean").generate(prompt_ids, sampling)
    assert not torch.equal(off.completion_ids, lean.completion_ids)


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from prefopt.generation.decode import filter_logits

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    expected = TopPLogitsWarper(0.7)(
        None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.5)(None, scores))
    )
    assert torch.equal(filter_logits(scores, 0.5, 10, 0.7), expected)


def test_lean_loop_gives_the_seeded_samples_of_model_generate(model, tokenizer, prompt_ids):
    """Per-prompt seeded sampling (Gumbel-max over per-row generators) through the lean loop and model.generate."""
    _boost_eos(model, tokenizer.eos_token_id, bias=3.0)
    sampling = SamplingParams(n=2, temperature=0.9, top_k=20, max_new_tokens=10, prompt_seeds=[5, 6, 7, 8])
    lean = HFGenerator(model, tokenizer, loop="lean").generate(prompt_ids, sampling)
    plain = HFGenerator(model, tokenizer, loop="generate").generate(prompt_ids, sampling)
    assert torch.equal(lean.completion_ids, plain.completion_ids) and lean.texts == plain.texts


@pytest.mark.parametrize("block_steps", [1, 3])
def test_lean_loop_skipping_finished_rows_keeps_the_seeded_samples(
    model, tokenizer, prompt_ids, monkeypatch, block_steps
):
    """The lean loop draws noise blocks only for rows still live (SeededSampler ``live``); model.generate draws
    for every row. Small blocks, so rows finish before later blocks: the same tokens either way."""
    from prefopt.generation.hf import SeededSampler

    monkeypatch.setattr(SeededSampler, "BLOCK_STEPS", block_steps)
    _boost_eos(model, tokenizer.eos_token_id, bias=3.0)
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=14, prompt_seeds=[11, 12, 13, 14])
    lean = HFGenerator(model, tokenizer, loop="lean").generate(prompt_ids, sampling)
    plain = HFGenerator(model, tokenizer, loop="generate").generate(prompt_ids, sampling)
    lengths = lean.completion_mask.sum(1)
    assert int(lengths.min()) < 10 and 0 < int(lean.finished.sum()) < len(
        lean
    )  # rows finished at different steps
    assert torch.equal(lean.completion_ids, plain.completion_ids) and lean.texts == plain.texts
