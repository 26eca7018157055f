"""Generation with Hugging Face ``model.generate`` on the live training model (always available).

Prompts arrive as token ids; the generator left-pads them itself (the tokenizer's padding side, which training
relies on, is never touched), samples in sub-batches of ``generation.batch_size`` prompts with the KV cache on,
and hands the raw tokens to :func:`~prefopt.generation.base.build_rollouts`. The model is put in eval mode (no
dropout) for the call and every module's previous mode is restored afterwards. Each data-parallel rank generates
for the prompts it is given; nothing is gathered across ranks here.

Sampling is exactly what :class:`SamplingParams` says: a fresh ``GenerationConfig`` sets every filter explicitly,
because ``generate`` otherwise fills unset values from the checkpoint's ``generation_config.json`` and from
library defaults (``top_k=50``), which would silently make the samples off-policy for the log-prob computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from prefopt.generation.base import (
    Rollouts,
    SamplingParams,
    build_rollouts,
    eos_token_ids,
    pad_token_id,
    sample_seed,
)
from prefopt.generation.decode import sample_tokens, supports_lean_loop


def unwrap_model(model, accelerator=None):
    """The plain model under accelerate/DDP/DeepSpeed wrappers (a PEFT model stays a PEFT model)."""
    if accelerator is not None:
        from prefopt.trainer.distributed import unwrapped

        return unwrapped(accelerator, model)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def gathered_parameters(model, accelerator=None) -> Iterator[None]:
    """Gather the full parameters for the duration of generation so that each forward step does not all-gather
    (and ranks with different completion lengths cannot deadlock): DeepSpeed ZeRO-3 partitions, or FSDP2 shards
    (``prefopt/generation/fsdp.py``, which also makes sure the prepared root, not an inner layer, is FSDP's root).
    Elsewhere a no-op.

    Under ZeRO-3 the engine's module hooks are also taken off for the call (:func:`zero3_hooks_removed`): with the
    parameters gathered they would have nothing to fetch, but their prefetcher still issues all-gathers, and two
    ranks that decode a different number of tokens then pair mismatched collectives (seen on 2 CPU processes:
    gloo's "Received data size doesn't match expected size" within the first steps of XPO)."""
    if not _zero3_enabled(accelerator):
        from prefopt.generation.fsdp import fsdp_full_parameters

        with fsdp_full_parameters(model, accelerator):
            yield
        return
    import deepspeed

    from prefopt.trainer.distributed import zero3_engine_holding, zero3_hooks_removed

    engine = zero3_engine_holding(model, accelerator)
    gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gathered, zero3_hooks_removed(engine):
        yield


def _zero3_enabled(accelerator) -> bool:
    if accelerator is None:
        return False
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets back its own previous mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model, accelerator=None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for a batch of unpadded prompts."""
    width = max(len(prompt) for prompt in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class SeededSampler:
    """A logits processor that samples each row from its own ``torch.Generator`` by the Gumbel-max trick.

    ``generate`` runs greedy search over ``log_softmax(filtered logits / T) + Gumbel noise``; the argmax of that is
    an exact draw from the filtered, tempered distribution (Gumbel 1954; e.g. Maddison et al. 2014). Every row
    draws one noise vector per decoding step from its own generator, so a row's tokens depend only on its seed and
    its prompt, not on the other rows of the batch (up to float round-off in the logits of a padded batch)."""

    # Noise is drawn for several decoding steps per generator call: one ``torch.rand`` per row per block instead
    # of per token (a CPU generator's stream is sequential, so ``rand(S, V)`` equals S successive ``rand(V)``:
    # the same draws, tested). A block holds at most this many steps and this many bytes of float64 noise.
    BLOCK_STEPS = 16
    BLOCK_BYTES = 64 << 20

    def __init__(self, seeds: list[int], sampling: SamplingParams):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.sampling = sampling
        self.noise: torch.Tensor | None = None  # [B, S, V] Gumbel noise of the current block
        self.used = 0  # steps of the block handed out
        self.drawn = 0  # steps drawn so far (never more than max_new_tokens)

    def gumbel(self, vocab: int, device, live: torch.Tensor | None = None) -> torch.Tensor:
        """The next step's ``[B, V]`` Gumbel noise, ``-log(-log(U))`` with ``U`` uniform in float64.

        ``live``: optional boolean ``[B]``, False for rows that have finished (emitted EOS). A block drawn then
        skips those rows (their noise is 0): a finished row's tokens are padding whatever is drawn, and its
        generator is never read again, so every live row gets the same draws as without ``live``."""
        if self.noise is None or self.used == self.noise.shape[1]:
            rows = len(self.generators)
            budget = self.BLOCK_BYTES // (8 * vocab * max(rows, 1))
            left = max(self.sampling.max_new_tokens - self.drawn, 1)
            steps = max(1, min(self.BLOCK_STEPS, budget, left))
            drawing = range(rows) if live is None else live.nonzero().flatten().tolist()
            # One float64 buffer, filled by each row's generator in place and transformed in place: the same
            # values and float64 operations as -log(-log(clamp(U))), without a stacked copy and four temporaries.
            uniform = torch.empty(len(drawing), steps, vocab, dtype=torch.float64)
            for slot, row in enumerate(drawing):
                torch.rand(
                    steps, vocab, generator=self.generators[row], dtype=torch.float64, out=uniform[slot]
                )
            noise = uniform.clamp_(min=1e-300).log_().neg_().log_().neg_().to(device, torch.float32)
            if len(drawing) < rows:
                block = torch.zeros(rows, steps, vocab, dtype=torch.float32, device=device)
                block[torch.tensor(drawing, dtype=torch.long, device=device)] = noise
                noise = block
            self.noise = noise
            self.used, self.drawn = 0, self.drawn + steps
        noise = self.noise[:, self.used]
        self.used += 1
        return noise

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The logits-processor call of ``model.generate`` (which checks that it takes exactly these two)."""
        return self.perturbed(input_ids, scores)

    def perturbed(
        self, input_ids: torch.Tensor | None, scores: torch.Tensor, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gumbel-perturbed ``log_softmax`` of the filtered, tempered ``scores``; its argmax is the draw.
        ``live``: see :meth:`gumbel` (the lean loop passes it; ``model.generate`` cannot)."""
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        scores = scores.float()
        if self.sampling.temperature != 1.0:  # x / 1.0 is x: one kernel less per token at T=1
            scores = scores / self.sampling.temperature
        if self.sampling.top_k > 0:
            scores = TopKLogitsWarper(self.sampling.top_k)(input_ids, scores)
        if self.sampling.top_p < 1.0:
            scores = TopPLogitsWarper(self.sampling.top_p)(input_ids, scores)
        return torch.log_softmax(scores, dim=-1).add_(self.gumbel(scores.shape[-1], scores.device, live))


class HFGenerator:
    """``Generator`` backed by ``model.generate`` on the (unwrapped) live policy, PEFT adapters active."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, accelerator=None, loop: str = "lean"):
        if batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {batch_size}")
        if loop not in ("lean", "generate"):
            raise ValueError(f"generation.hf_loop must be 'lean' or 'generate', got {loop!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.accelerator = accelerator
        # "lean": prefopt's sampling loop (generation/decode.py: the same samples, less work per token) where the
        # model allows it; "generate": always model.generate.
        self.loop = loop

    def load_weights(self, model) -> None:
        """Generation uses the live model; follow ``model`` if the trainer hands over a different object."""
        self.model = model

    def _generation_config(self, sampling: SamplingParams, eos_ids: list[int], pad_id: int, n: int):
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            num_beams=1,
            num_return_sequences=n,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
        )
        if sampling.greedy:
            return GenerationConfig(
                do_sample=False, **common
            )  # sampling filters are ignored by greedy search
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 must be explicit: an unset top_k falls back to the library default of 50
            **common,
        )

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollouts:
        model = unwrap_model(self.model, self.accelerator)
        device = _device_of(model, self.accelerator)
        eos_ids = eos_token_ids(self.tokenizer, model)
        pad_id = pad_token_id(self.tokenizer, model)
        if sampling.prompt_seeds is not None and not sampling.greedy:
            return self._generate_seeded(model, device, prompt_ids, sampling, eos_ids, pad_id)
        # Greedy decoding gives n identical samples; generate once and repeat (generate refuses
        # num_return_sequences > 1 without sampling).
        per_call_n = 1 if sampling.greedy else sampling.n
        config = self._generation_config(sampling, eos_ids, pad_id, per_call_n)

        completions: list[list[int]] = []
        lean = self.loop == "lean" and supports_lean_loop(model)
        with contextlib.ExitStack() as stack:
            if sampling.seed is not None:
                devices = [device] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(sampling.seed)
            stack.enter_context(eval_mode(model))
            stack.enter_context(gathered_parameters(model, self.accelerator))
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start : start + self.batch_size]
                input_ids, attention_mask = left_pad(chunk, pad_id, device)
                if lean:
                    rows = (
                        input_ids.repeat_interleave(per_call_n, 0),
                        attention_mask.repeat_interleave(per_call_n, 0),
                    )
                    generated = sample_tokens(
                        model,
                        *rows,
                        max_new_tokens=sampling.max_new_tokens,
                        eos_ids=eos_ids,
                        pad_id=pad_id,
                        temperature=sampling.temperature,
                        top_k=sampling.top_k,
                        top_p=sampling.top_p,
                    ).tolist()
                else:
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                    )
                    generated = output[:, input_ids.shape[1] :].tolist()
                if per_call_n != sampling.n:
                    generated = [tokens for tokens in generated for _ in range(sampling.n)]
                completions.extend(generated)
        return build_rollouts(
            prompt_ids,
            completions,
            sampling.n,
            eos_ids=eos_ids,
            pad_id=pad_id,
            tokenizer=self.tokenizer,
            device=device,
        )

    def _generate_seeded(
        self, model, device, prompt_ids, sampling: SamplingParams, eos_ids, pad_id
    ) -> Rollouts:
        """Per-prompt seeded sampling: greedy search over :class:`SeededSampler`'s Gumbel-perturbed scores."""
        from transformers import LogitsProcessorList

        if len(sampling.prompt_seeds) != len(prompt_ids):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt seeds for {len(prompt_ids)} prompts")
        rows = [prompt for prompt in prompt_ids for _ in range(sampling.n)]  # prompt-major, like Rollouts
        seeds = [sample_seed(seed, j) for seed in sampling.prompt_seeds for j in range(sampling.n)]
        greedy = SamplingParams(temperature=0, max_new_tokens=sampling.max_new_tokens)
        config = self._generation_config(greedy, eos_ids, pad_id, 1)
        completions: list[list[int]] = []
        with eval_mode(model), gathered_parameters(model, self.accelerator):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                input_ids, attention_mask = left_pad(chunk, pad_id, device)
                sampler = SeededSampler(seeds[start : start + self.batch_size], sampling)
                if self.loop == "lean" and supports_lean_loop(model):  # the same draws, less work per token
                    completions.extend(
                        sample_tokens(
                            model,
                            input_ids,
                            attention_mask,
                            max_new_tokens=sampling.max_new_tokens,
                            eos_ids=eos_ids,
                            pad_id=pad_id,
                            draw=lambda logits, live, sampler=sampler: sampler.perturbed(
                                None, logits, live
                            ).argmax(-1),
                        ).tolist()
                    )
                    continue
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                )
                completions.extend(output[:, input_ids.shape[1] :].tolist())
        return build_rollouts(
            prompt_ids,
            completions,
            sampling.n,
            eos_ids=eos_ids,
            pad_id=pad_id,
            tokenizer=self.tokenizer,
            device=device,
        )
