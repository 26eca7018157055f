"""Generation with a colocated vLLM engine (optional extra: ``pip install prefopt[vllm]``, CUDA only).

Every training process owns one ``vllm.LLM`` on its own GPU (``gpu_memory_utilization`` of it). Before sampling,
:meth:`VLLMGenerator.load_weights` pushes the policy's current weights into the engine: PEFT adapters are merged
into freshly computed tensors (the training model is never mutated), PEFT's module prefixes are mapped back to the
checkpoint names vLLM expects, and under DeepSpeed ZeRO-3 each module's parameters are gathered while they are
copied. With ``generation.vllm_sleep`` the engine sleeps (level 2: weights and KV cache discarded) between
generation phases so the optimizer has the GPU; ``generate`` wakes the weights, pushes them, then wakes the KV
cache. The rules of vLLM this relies on are enforced by a stand-in engine in
``tests/test_vllm_contract.py``. Results go through the same
:func:`~prefopt.generation.base.build_rollouts` as the HF backend.

What was and was not exercised
------------------------------
vLLM cannot be installed where this was written (no GPU), so:

* Tested (``tests/test_generation.py``): the error path when vLLM or CUDA is missing (``ConfigError`` pointing to
  ``generation.backend=hf``); :func:`vllm_weight_name`; :func:`merged_state_dict` / :func:`iter_merged_weights` on a
  tiny PEFT model (equal to ``merge_and_unload`` of a copy, training model untouched); the conversion of vLLM-shaped
  outputs to ``Rollouts`` (shared with the HF backend).
* Written against vLLM's documented API (0.10+) but never run: ``LLM(...)`` construction and its keyword
  arguments, ``generate`` with ``TokensPrompt`` inputs, ``sleep``/``wake_up(tags=...)``, ``reset_prefix_cache``,
  the in-process weight push (``llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights``,
  falling back to ``LLM.collective_rpc``), ``distributed_executor_backend="external_launcher"`` for more than one
  training process, and the ZeRO-3 gathering. Run ``scripts``-level checks on a GPU before trusting it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Iterable, Iterator

import torch

from prefopt.errors import ConfigError
from prefopt.generation.base import Rollouts, SamplingParams, build_rollouts, eos_token_ids, pad_token_id
from prefopt.generation.hf import _device_of, _zero3_enabled, unwrap_model

_PEFT_PREFIX = "base_model.model."
_LORA_PARAM_MARKERS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",
)


def check_vllm_available() -> None:
    """Raise ``ConfigError`` unless vLLM is importable and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        why = "vLLM is not installed"
    elif not torch.cuda.is_available():
        why = "no CUDA GPU is visible"
    else:
        return
    raise ConfigError(
        f"generation.backend: 'vllm' needs vLLM and a CUDA GPU ({why}); install prefopt[vllm] on a GPU machine "
        "or use generation.backend=hf"
    )


# --------------------------------------------------------------------------------------------------------------
# Weights: PEFT merge and renaming (pure functions, tested on CPU)
# --------------------------------------------------------------------------------------------------------------


def vllm_weight_name(name: str) -> str | None:
    """Map a parameter name of the (possibly PEFT-wrapped) training model to the checkpoint name vLLM loads.

    Strips PEFT's ``base_model.model.`` prefix and ``.base_layer`` infix, maps ``modules_to_save.<adapter>.`` to
    the module itself, and returns None for names that are not model weights (LoRA factors, the frozen original of
    a ``modules_to_save`` module).
    """
    name = name.removeprefix(_PEFT_PREFIX)
    dotted = f".{name}"
    if ".original_module." in dotted or any(marker in dotted for marker in _LORA_PARAM_MARKERS):
        return None
    name = name.replace(".base_layer.", ".")
    if ".modules_to_save." in name:
        head, tail = name.split(".modules_to_save.", 1)
        name = f"{head}.{tail.split('.', 1)[1]}"  # drop the adapter name
    return name


@contextlib.contextmanager
def _gathered(parameters: list[torch.nn.Parameter], enabled: bool) -> Iterator[None]:
    if not enabled or not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def _active_lora_adapters(module) -> list[str]:
    factors = set(getattr(module, "lora_A", {}).keys()) | set(getattr(module, "lora_embedding_A", {}).keys())
    return [name for name in module.active_adapters if name in factors]


def _merged_lora_tensors(module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base layer's parameters with the active adapters merged in, computed out of place (like PEFT's
    ``safe_merge``) so the training model keeps its unmerged weights and adapters."""
    base = module.get_base_layer()
    if getattr(base, "weight", None) is None:
        raise NotImplementedError(
            f"vLLM weight sync: LoRA on {type(base).__name__} (no .weight) cannot be merged; use generation.backend=hf"
        )
    weight = base.weight.detach()
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    variants = getattr(module, "lora_variant", {})
    lora_bias = getattr(module, "lora_bias", {})
    already_merged = list(getattr(module, "merged_adapters", []))
    if module.disable_adapters:
        # A disabled layer computes with the base weights alone: take out anything merged into them.
        for name in already_merged:
            if name in variants:
                raise NotImplementedError("vLLM weight sync: a merged-then-disabled LoRA variant (e.g. DoRA)")
            weight = weight - module.get_delta_weight(name).to(weight.dtype)
            if lora_bias.get(name) and bias is not None:
                bias = bias - module.lora_B[name].bias * module.scaling[name]
        to_merge: list[str] = []
    else:
        to_merge = [name for name in _active_lora_adapters(module) if name not in already_merged]
    for name in to_merge:
        if name in variants:
            weight = variants[name].merge_safe(module, name, weight.clone())
        else:
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
        if lora_bias.get(name):
            if bias is None:
                raise ValueError("LoRA with lora_bias=True on a layer without bias cannot be merged")
            bias = bias + (module.lora_B[name].bias * module.scaling[name]).to(bias.dtype)
    yield "weight", weight
    if bias is not None:
        yield "bias", bias
    for name, parameter in base.named_parameters(recurse=False):
        if name not in ("weight", "bias"):
            yield name, parameter.detach()


def iter_merged_weights(
    model, accelerator=None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(vllm_name, tensor)`` for every weight of the model as it currently computes: plain models as they
    are, PEFT models with active LoRA adapters merged (out of place) and ``modules_to_save`` resolved.

    Under ZeRO-3 each module's parameters are gathered while its tensors are produced, and the yielded tensors are
    copies (they stay valid after the gather ends); FSDP2 ``DTensor`` shards are gathered with ``full_tensor()``.
    Elsewhere they may share storage with the model: copy them before mutating. ``dtype``: cast every tensor (the
    engine's dtype; accelerate upcasts FSDP parameters to fp32). A parameter shared by two modules (tied
    embeddings) is yielded once, under its first name (``model.embed_tokens.weight``): vLLM ties the lm head to
    it and, for tied models, skips ``lm_head.weight`` only when it comes in the same ``load_weights`` call as the
    embedding. Buffers are not yielded (vLLM recomputes rotary tables and the like).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older/newer peft layouts
        from peft.utils import ModulesToSaveWrapper

    model = unwrap_model(model, accelerator)
    zero3 = _zero3_enabled(accelerator) or any(hasattr(p, "ds_id") for p in model.parameters())
    skip_prefix: str | None = None
    seen: set[int] = (
        set()
    )  # a tied lm head is the embedding's Parameter: push it once, under the embedding's name
    for module_name, module in model.named_modules():
        if skip_prefix is not None and module_name.startswith(skip_prefix):
            continue
        skip_prefix = None
        if isinstance(module, LoraLayer):
            skip_prefix = f"{module_name}."
            produced = _merged_lora_tensors
        elif isinstance(module, ModulesToSaveWrapper):
            skip_prefix = f"{module_name}."

            def produced(wrapper):
                adapter = wrapper.active_adapter
                adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
                use_copy = not wrapper.disable_adapters and adapter in wrapper.modules_to_save
                active = wrapper.modules_to_save[adapter] if use_copy else wrapper.original_module
                for name, parameter in active.named_parameters():
                    yield name, parameter.detach()

        elif isinstance(module, BaseTunerLayer):
            raise NotImplementedError(
                f"vLLM weight sync supports LoRA and modules_to_save; {type(module).__name__} at '{module_name}' "
                "is not supported: use generation.backend=hf"
            )
        else:
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in own)
            if not own:
                continue

            def produced(_module, own=own):
                for name, parameter in own:
                    yield name, parameter.detach()

        parameters = (
            list(module.parameters())
            if skip_prefix
            else [p for _, p in module.named_parameters(recurse=False)]
        )
        with _gathered(parameters, zero3):
            for name, tensor in produced(module):
                full_name = vllm_weight_name(f"{module_name}.{name}" if module_name else name)
                if full_name is None:
                    continue
                if type(tensor).__name__ == "DTensor":  # FSDP2 shard: every rank takes part in the gather
                    tensor = tensor.full_tensor()
                    yield full_name, tensor if dtype is None else tensor.to(dtype)
                    continue
                tensor = tensor.clone() if zero3 else tensor
                yield full_name, tensor if dtype is None else tensor.to(dtype)


def merged_state_dict(model, accelerator=None) -> dict[str, torch.Tensor]:
    """:func:`iter_merged_weights` materialised as a dict of independent tensors (for tests and inspection)."""
    return {name: tensor.detach().clone() for name, tensor in iter_merged_weights(model, accelerator)}


# --------------------------------------------------------------------------------------------------------------
# The generator (GPU + vLLM only; see the module docstring for what was never run)
# --------------------------------------------------------------------------------------------------------------


def _model_path(model) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    path = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        raise ConfigError("generation.backend=vllm: cannot tell which checkpoint the policy came from")
    return str(path)


def _dtype_name(model) -> str:
    """The dtype the model was loaded in (``config.dtype``): trainable weights may have been upcast to fp32 (fp32
    master weights for DDP, accelerate's FSDP upcast), and the engine should hold the training dtype."""
    config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    loaded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if loaded in (torch.bfloat16, torch.float16, "bfloat16", "float16"):
        return str(loaded).removeprefix("torch.")
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(parameter.dtype, "float32")
    return "auto"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Keep the trainer's global RNG streams (python, numpy, torch CPU and CUDA) across a vLLM call.

    vLLM seeds the process-global generators when it builds a worker (``set_random_seed(seed)`` in its worker's
    ``init_device``/model loading) and samples with them; without this the trainer's dropout-free but still random
    data order, sampling seeds and any later torch RNG use would depend on vLLM's internals.
    """
    import random

    import numpy as np

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class VLLMGenerator:
    """``Generator`` backed by a colocated ``vllm.LLM`` (one per training process).

    Weights are pushed lazily: :meth:`load_weights` marks the engine stale and the next :meth:`generate` pushes
    the policy as it is *then* -- so a resumed run samples from the restored weights, not the ones the engine was
    built with. With sleep mode the engine sleeps at level 2 between phases (weights and KV cache discarded: the
    weights are re-pushed before every generation anyway, so level 1's copy to host and back is wasted), and wakes
    the weights first, pushes, then wakes the KV cache (vLLM's documented order for RL weight updates, which
    keeps the KV cache from being allocated while the update runs).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        gpu_memory_utilization: float = 0.3,
        sleep: bool = True,
        max_model_len: int | None = None,
        accelerator=None,
        seed: int = 0,
        model_path: str | None = None,
        weight_chunk_size: int = 4,
        sleep_level: int = 2,
    ):
        check_vllm_available()
        import vllm

        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.sleep_enabled = sleep
        self.sleep_level = sleep_level
        self.weight_chunk_size = weight_chunk_size  # tensors alive at once during a push (merged LoRA copies)
        base = unwrap_model(model, accelerator)
        self._eos_ids = eos_token_ids(tokenizer, base)
        self._pad_id = pad_token_id(tokenizer, base)
        self._device = _device_of(base, accelerator)  # where Rollouts go, as with the HF backend
        path = model_path or _model_path(base.get_base_model() if hasattr(base, "get_base_model") else base)
        self.dtype_name = _dtype_name(base)
        self._push_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype_name)
        kwargs = dict(
            model=path,
            dtype=self.dtype_name,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=sleep,
            max_model_len=max_model_len,
            seed=seed,
        )
        # The engine runs inside this process (no engine-core subprocess), so that the weight push below can reach
        # the model runner directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            # One engine per training process, launched by torchrun/accelerate: use the launcher's env://
            # rendezvous instead of spawning workers; ranks sample different streams.
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["seed"] = seed + torch.distributed.get_rank()
        with preserved_rng():
            self.llm = vllm.LLM(**kwargs)
        self._state = "awake"  # awake | asleep | weights (only the weights woken)
        self._pending = model  # the checkpoint on disk is not the live policy (LoRA, resumed training)
        self.sleep()

    # -- phases -------------------------------------------------------------------------------------------------

    def _wake(self, tags: list[str] | None) -> None:
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # vLLM without wake_up tags: wake everything
            self.llm.wake_up()
            self._state = "awake"

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next ``generate`` (no-op without sleep mode)."""
        if self.sleep_enabled and self._state != "asleep":
            if self._state == "weights":
                self._wake(["kv_cache"])  # sleep() expects a fully awake engine
            self.llm.sleep(level=self.sleep_level)
            self._state = "asleep"

    # -- weights --------------------------------------------------------------------------------------------------

    def _runner_model(self):
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        runner = getattr(worker, "model_runner", None)
        return getattr(runner, "model", None)

    def _push(self, chunk: list[tuple[str, torch.Tensor]]) -> None:
        target = self._runner_model()
        if target is not None:
            target.load_weights(weights=chunk)
            return

        def load_on_worker(worker, weights):  # runs inside each vLLM worker
            worker.model_runner.model.load_weights(weights=weights)

        self.llm.collective_rpc(load_on_worker, args=(chunk,))

    def load_weights(self, model) -> None:
        """Mark the engine stale; the next :meth:`generate` pushes ``model``'s weights as they are then."""
        self._pending = model

    def _push_weights(self, model) -> None:
        chunk: list[tuple[str, torch.Tensor]] = []
        for name, tensor in iter_merged_weights(model, self.accelerator, dtype=self._push_dtype):
            chunk.append((name, tensor))
            if len(chunk) >= self.weight_chunk_size:
                self._push(chunk)
                chunk = []
        if chunk:
            self._push(chunk)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # -- sampling -------------------------------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingParams):
        import vllm

        return vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop_token_ids=self._eos_ids,
            detokenize=False,  # texts are decoded by build_rollouts, identically to the HF backend
        )

    def _request_params(self, sampling: SamplingParams):
        """One ``SamplingParams`` for the call, or with ``prompt_seeds`` one per prompt carrying its own seed (vLLM
        seeds each request's sampler: the samples then do not depend on the batch or the rank)."""
        if sampling.prompt_seeds is None:
            return self._sampling_params(sampling)
        return [
            self._sampling_params(dataclasses.replace(sampling, seed=seed, prompt_seeds=None))
            for seed in sampling.prompt_seeds
        ]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollouts:
        with preserved_rng():
            if self._state == "asleep":
                self._wake(["weights"])
                if self._state == "asleep":
                    self._state = "weights"
            try:
                if self._pending is not None:
                    self._push_weights(self._pending)
                    self._pending = None if self.sleep_level < 2 or not self.sleep_enabled else self._pending
                if self._state == "weights":
                    self._wake(["kv_cache"])
                self._state = "awake"
                outputs = self.llm.generate(
                    _tokens_prompts(prompt_ids),
                    sampling_params=self._request_params(sampling),
                    use_tqdm=False,
                )
            finally:
                self.sleep()
        return rollouts_from_vllm_outputs(
            prompt_ids,
            outputs,
            sampling.n,
            eos_ids=self._eos_ids,
            pad_id=self._pad_id,
            tokenizer=self.tokenizer,
            device=self._device,
        )


def _tokens_prompts(prompt_ids: list[list[int]]) -> list:
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # pragma: no cover - TokensPrompt is a TypedDict; a plain dict is equivalent
        return [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
    return [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]


def rollouts_from_vllm_outputs(
    prompt_ids: list[list[int]],
    outputs: Iterable,
    n: int,
    *,
    eos_ids: list[int],
    pad_id: int,
    tokenizer,
    device="cpu",
) -> Rollouts:
    """Convert ``vllm.LLM.generate`` results (one ``RequestOutput`` per prompt, in order, each with ``n``
    ``CompletionOutput``s carrying ``token_ids``) to :class:`Rollouts`."""
    outputs = list(outputs)
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
    completions: list[list[int]] = []
    for request in outputs:
        samples = list(request.outputs)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {n}")
        for sample in samples:
            tokens = list(sample.token_ids)
            # A sample that stopped on EOS carries the EOS id in token_ids; should a vLLM version leave it out,
            # restore it so the completion mask covers it exactly as in the HF backend.
            stopped_on_eos = (
                getattr(sample, "finish_reason", None) == "stop"
                and getattr(sample, "stop_reason", None) is None
            )
            if stopped_on_eos and not any(token in eos_ids for token in tokens):
                tokens.append(eos_ids[0])
            completions.append(tokens)
    return build_rollouts(
        prompt_ids, completions, n, eos_ids=eos_ids, pad_id=pad_id, tokenizer=tokenizer, device=device
    )
