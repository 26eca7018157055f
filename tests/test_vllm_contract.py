"""The vLLM generator against a stand-in engine that enforces vLLM's rules (vLLM cannot be installed here).

Each rule names where vLLM implements it (vLLM main as read for this work, ~0.20; paths in the vLLM repository):

* R1 tied embeddings -- ``vllm/model_executor/models/utils.py`` (``AutoWeightsLoader``) with the Llama/Qwen2
  ``load_weights``: for ``tie_word_embeddings`` models the ``lm_head.`` alias is skipped, and a name with no
  parameter raises ``ValueError("There is no module or parameter named ...")``. The stand-in accepts
  ``lm_head.weight`` only in the same call as ``model.embed_tokens.weight`` (what the issue observed).
* R2 sleep levels -- ``vllm/entrypoints/llm.py`` ``LLM.sleep(level)``: level 1 offloads the weights to host
  memory and discards the KV cache; level 2 discards both (weights must be reloaded before generating).
* R3 wake order -- ``LLM.wake_up(tags=["weights"])`` then the weight update, then ``wake_up(tags=["kv_cache"])``
  (vLLM's sleep-mode docs, RLHF weight updates); loading weights into a sleeping engine writes nothing.
* R4 seed -- ``LLM(seed=...)``: the worker seeds python/numpy/torch global RNGs (``set_random_seed`` in
  ``vllm/worker``); the stand-in does the same, so the trainer's streams must be protected.
* R5 max_model_len -- ``LLM(max_model_len=None)`` means the model's ``max_position_embeddings``
  (``vllm/config``), and the KV cache is sized for it.
"""

from __future__ import annotations

import importlib.machinery
import random
import sys
import types

import numpy as np
import pytest
import torch

from prefopt.generation import SamplingParams, build_generator
from prefopt.generation import vllm as vllm_backend


class _Sample:
    def __init__(self, token_ids):
        self.token_ids, self.finish_reason, self.stop_reason = token_ids, "length", None


class _Request:
    def __init__(self, samples):
        self.outputs = samples


class FakeEngineModel:
    """The model inside vLLM's worker: a parameter table with vLLM's load rules."""

    def __init__(self, state: dict[str, torch.Tensor], tied: bool, dtype: torch.dtype):
        self.tied, self.dtype = tied, dtype
        self.params = {
            k: v.to(dtype).clone() for k, v in state.items() if not (tied and k == "lm_head.weight")
        }
        self.calls: list[list[str]] = []
        self.pushed_dtypes: set[torch.dtype] = set()
        self.last_pushed: dict[str, torch.Tensor] = {}
        self.engine = None

    def load_weights(self, weights):
        weights = list(weights)
        names = [name for name, _ in weights]
        if not self.engine.awake_weights:  # R3
            raise RuntimeError("load_weights on sleeping weights: nothing is written")
        self.calls.append(names)
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tied:  # R1
                if "model.embed_tokens.weight" not in names:
                    raise ValueError("There is no module or parameter named 'lm_head' in the model")
                continue
            if name not in self.params:
                raise ValueError(f"There is no module or parameter named '{name}' in the model")
            self.pushed_dtypes.add(tensor.dtype)
            self.params[name].copy_(tensor)
            self.last_pushed[name] = tensor.clone()
            self.engine.fresh.add(name)
        return set(names)


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(
        self, *, model, dtype, gpu_memory_utilization, enable_sleep_mode, max_model_len, seed, **extra
    ):
        from transformers import AutoModelForCausalLM

        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.config = hf.config
        self.kwargs = dict(
            dtype=dtype, max_model_len=max_model_len, seed=seed, enable_sleep_mode=enable_sleep_mode
        )
        self.max_model_len = max_model_len or hf.config.max_position_embeddings  # R5
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)  # R4
        tied = bool(hf.config.tie_word_embeddings)
        self.runner_model = FakeEngineModel(hf.state_dict(), tied, torch_dtype)
        self.runner_model.engine = self
        runner = types.SimpleNamespace(model=self.runner_model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))
            )
        )
        self.awake_weights = self.awake_kv = True
        self.fresh = set(self.runner_model.params)  # parameters holding real weights
        self.sleep_levels: list[int] = []
        self.events: list[str] = []
        FakeLLM.instances.append(self)

    def sleep(self, level=1):
        assert self.awake_weights and self.awake_kv, "sleep() on a partly awake engine"
        self.sleep_levels.append(level)
        self.awake_weights = self.awake_kv = False
        if level == 2:  # R2: the weights are gone
            self.fresh = set()
            for tensor in self.runner_model.params.values():
                tensor.fill_(float("nan"))

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        if "kv_cache" in tags and not self.awake_weights and "weights" not in tags:
            raise RuntimeError("wake the weights before the KV cache")  # R3
        self.events.append("wake:" + "+".join(tags))
        self.awake_weights |= "weights" in tags
        self.awake_kv |= "kv_cache" in tags

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def generate(self, prompts, sampling_params, use_tqdm=False):
        from transformers import AutoModelForCausalLM

        assert self.awake_weights and self.awake_kv, "generate on a sleeping engine"
        stale = set(self.runner_model.params) - self.fresh
        if stale:
            raise RuntimeError(f"generating with discarded weights: {sorted(stale)[:3]}")
        model = AutoModelForCausalLM.from_config(self.config).float()
        state = {k: v.float() for k, v in self.runner_model.params.items()}
        model.load_state_dict(state, strict=not self.runner_model.tied)
        if self.runner_model.tied:
            model.tie_weights()
        outputs = []
        # LLM.generate takes one SamplingParams or one per prompt (vllm/entrypoints/llm.py; prefopt sends a list
        # when every prompt carries its own seed).
        if not isinstance(sampling_params, (list, tuple)):
            sampling_params = [sampling_params] * len(prompts)
        assert len(sampling_params) == len(prompts), "one SamplingParams per prompt"
        for prompt, params in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            budget = params.kwargs["max_tokens"]
            if len(ids) + budget > self.max_model_len:
                raise ValueError(
                    f"prompt ({len(ids)}) + max_tokens ({budget}) > max_model_len {self.max_model_len}"
                )
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=budget, do_sample=False, min_new_tokens=budget
                )
            outputs.append(_Request([_Sample(out[0, len(ids) :].tolist())]))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_backend, "check_vllm_available", lambda: None)
    FakeLLM.instances.clear()
    return module


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama with tied embeddings (like Qwen2.5-0.5B/1.5B), saved with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    out = tmp_path_factory.mktemp("tied")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _greedy(model, prompts, n_tokens):
    with torch.no_grad():
        return [
            model.generate(
                torch.tensor([p]), max_new_tokens=n_tokens, do_sample=False, min_new_tokens=n_tokens
            )[0, len(p) :].tolist()
            for p in prompts
        ]


def _setup(tied_model_dir, fake_vllm, **gen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.config import GenerationConfig

    policy = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.bfloat16).float()
    tokenizer = AutoTokenizer.from_pretrained(tied_model_dir)
    cfg = GenerationConfig(backend="vllm", max_new_tokens=6, **gen)  # the stand-in decodes greedily
    generator = build_generator(cfg, policy, tokenizer, seed=1234, max_prompt_length=16)
    generator.weight_chunk_size = 1  # the hardest case for R1: one tensor per load_weights call
    return policy, tokenizer, generator, FakeLLM.instances[-1]


PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_tied_push_in_small_chunks_and_generation_matches_the_live_policy(tied_model_dir, fake_vllm):
    policy, _, generator, engine = _setup(tied_model_dir, fake_vllm)
    assert policy.config.tie_word_embeddings and engine.runner_model.tied
    rollouts = generator.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    pushed = [name for call in engine.runner_model.calls for name in call]
    assert "lm_head.weight" not in pushed and "model.embed_tokens.weight" in pushed  # R1
    assert max(len(call) for call in engine.runner_model.calls) <= 1  # a few tensors alive per push
    assert engine.runner_model.pushed_dtypes == {torch.bfloat16}  # the engine's dtype, not the fp32 copy
    expected = _greedy(policy.to(torch.bfloat16).float(), PROMPTS, 6)
    assert [
        row[:6] for row in rollouts.completion_ids.tolist()
    ] == expected  # the engine holds the live policy


def test_updated_weights_reach_the_engine_at_the_next_generate(tied_model_dir, fake_vllm):
    """Also the resume case: weights changed in place after the engine was built, without load_weights."""
    policy, _, generator, engine = _setup(tied_model_dir, fake_vllm)
    with torch.no_grad():  # e.g. accelerator.load_state restoring a checkpoint into the same model
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    generator.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    embed = engine.runner_model.last_pushed["model.embed_tokens.weight"].float()  # (asleep now: level 2)
    torch.testing.assert_close(embed, policy.model.embed_tokens.weight.detach().to(torch.bfloat16).float())
    generator.load_weights(policy)
    generator.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))  # still consistent


def test_sleep_level_two_and_wake_order(tied_model_dir, fake_vllm):
    _, _, generator, engine = _setup(tied_model_dir, fake_vllm)
    for _ in range(2):  # level 2 discards the weights every time: each generate must push them again (R2)
        generator.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    assert engine.sleep_levels == [2, 2, 2]  # after construction and after each generation
    # R3: weights woken first, pushed, then the KV cache
    assert engine.events[:3] == ["wake:weights", "reset_prefix_cache", "wake:kv_cache"]


def test_seed_and_trainer_rng_streams(tied_model_dir, fake_vllm):
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    _, _, generator, engine = _setup(tied_model_dir, fake_vllm)
    generator.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    assert engine.kwargs["seed"] == 1234  # R4: the run's seed, not 0
    torch.testing.assert_close(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_max_model_len_defaults_to_prompt_plus_new_tokens(tied_model_dir, fake_vllm):
    _, _, _, engine = _setup(tied_model_dir, fake_vllm)
    assert engine.kwargs["max_model_len"] == 16 + 6  # R5: not the model's 4096
    _, _, _, engine = _setup(tied_model_dir, fake_vllm, vllm_max_model_len=64)
    assert engine.kwargs["max_model_len"] == 64
