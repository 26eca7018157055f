"""Online generation: ``build_generator(cfg.generation, model, tokenizer, accelerator)`` -> a ``Generator``.

``hf`` (default, always available) samples with ``model.generate`` on the live policy; ``vllm`` runs a colocated
vLLM engine per training process (GPU + ``prefopt[vllm]``). Both return the same :class:`Rollouts`.
"""

from __future__ import annotations

from prefopt.generation.base import Generator, Rollouts, SamplingParams, build_rollouts
from prefopt.generation.hf import HFGenerator


def sampling_from_config(gen_cfg, *, n: int = 1, seed: int | None = None) -> SamplingParams:
    """The ``SamplingParams`` a recipe's ``generation`` section describes, with ``n`` samples per prompt."""
    return SamplingParams(
        n=n,
        temperature=gen_cfg.temperature,
        top_p=gen_cfg.top_p,
        top_k=gen_cfg.top_k,
        max_new_tokens=gen_cfg.max_new_tokens,
        seed=seed,
    )


def build_generator(
    gen_cfg, model, tokenizer, accelerator=None, *, seed: int = 0, max_prompt_length: int | None = None
) -> Generator:
    """Build the generator ``gen_cfg.backend`` names. ``vllm`` without vLLM or CUDA raises ``ConfigError``.

    ``seed``: the run's seed (vLLM's sampling streams). ``max_prompt_length``: with ``max_new_tokens`` the
    default ``vllm_max_model_len`` -- the model's own maximum (32k for Qwen2.5) would reserve KV cache for
    sequences the run never makes, inside ``gpu_memory_utilization``.
    """
    if gen_cfg.backend == "hf":
        return HFGenerator(
            model,
            tokenizer,
            batch_size=gen_cfg.batch_size,
            accelerator=accelerator,
            loop=getattr(gen_cfg, "hf_loop", "lean"),
        )
    if gen_cfg.backend == "vllm":
        from prefopt.generation.vllm import VLLMGenerator, check_vllm_available

        check_vllm_available()
        return VLLMGenerator(
            model,
            tokenizer,
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization,
            sleep=gen_cfg.vllm_sleep,
            max_model_len=gen_cfg.vllm_max_model_len
            or (max_prompt_length + gen_cfg.max_new_tokens if max_prompt_length else None),
            accelerator=accelerator,
            seed=seed,
        )
    from prefopt.errors import ConfigError

    raise ConfigError(f"generation.backend: unknown backend '{gen_cfg.backend}'; valid: hf, vllm")


__all__ = [
    "Generator",
    "HFGenerator",
    "Rollouts",
    "SamplingParams",
    "build_generator",
    "build_rollouts",
    "sampling_from_config",
]
