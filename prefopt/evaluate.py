"""Sample a policy on held-out prompts and measure what training did: explicit (e.g. gold) reward, KL to a
reference estimated from the samples, response length, EOS rate.

Used by ``prefopt demo``, the online methods' end-to-end tests and ``scripts/gold_benchmark.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from prefopt.config import DataConfig, ModelConfig
from prefopt.generation import HFGenerator, SamplingParams
from prefopt.models.loading import load_frozen_causal_lm, load_tokenizer
from prefopt.models.logps import completion_token_logps


@dataclass
class PolicySamples:
    prompts: list[str]
    completions: list[str]
    prompt_index: list[int]  # which prompt each sample answers (prompt-major, n per prompt)
    rewards: list[float]
    lengths: list[int]
    finished: list[bool]
    kl_per_sample: list[float] = field(default_factory=list)  # sum_t log pi/ref on the policy's own samples

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / max(len(self.rewards), 1)

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / max(len(self.lengths), 1)

    @property
    def eos_rate(self) -> float:
        return sum(self.finished) / max(len(self.finished), 1)

    @property
    def kl(self) -> Optional[float]:
        return sum(self.kl_per_sample) / len(self.kl_per_sample) if self.kl_per_sample else None

    def summary(self) -> dict:
        return {
            "mean_reward": self.mean_reward,
            "mean_length": self.mean_length,
            "eos_rate": self.eos_rate,
            "kl": self.kl,
            "samples": len(self.rewards),
        }


def load_prompts(path: str, tokenizer, *, max_prompts: Optional[int] = None, max_prompt_length: int = 64):
    """Prompt ids/texts of a prefopt-readable file, tokenized exactly as training tokenizes them."""
    prompt_ids, texts, _ = _prompt_columns(path, tokenizer, max_prompts, max_prompt_length)
    return prompt_ids, texts


def _prompt_columns(path: str, tokenizer, max_prompts: Optional[int], max_prompt_length: int):
    """Token ids, texts and chat messages (JSON, "" for plain rows) of the prompts in ``path``."""
    from prefopt.data import build_datasets

    config = DataConfig(
        train=path,
        shuffle=False,
        max_samples=max_prompts,
        max_prompt_length=max_prompt_length,
        max_length=max_prompt_length + 1,
    )
    bundle = build_datasets(config, tokenizer, "prompts", seed=0)
    return tuple(list(bundle.train[c]) for c in ("prompt_input_ids", "prompt_text", "prompt_messages"))


def _load(model_or_path, dtype: str = "float32"):
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    return load_frozen_causal_lm(
        str(model_or_path), ModelConfig(name_or_path=str(model_or_path), dtype=dtype), key="model"
    )


@torch.no_grad()
def sample_policy(
    policy,
    prompts_path: str,
    reward_fn: Callable[[str, str], float],
    *,
    reference=None,
    samples_per_prompt: int = 2,
    max_prompts: Optional[int] = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> PolicySamples:
    """Draw ``samples_per_prompt`` samples per prompt, score each with ``reward_fn(prompt, completion)``, and
    (with ``reference``) estimate KL(policy || reference) as the mean over samples of ``log pi(y) - log ref(y)``."""
    if isinstance(policy, torch.nn.Module):
        raise ValueError("pass the policy as a path so its tokenizer can be loaded")
    # Round 0 of the revision loop is exactly this: one sampling pass over the prompts, scored.
    (samples,) = sample_with_revisions(
        policy,
        prompts_path,
        reward_fn,
        revisions=0,
        reference=reference,
        samples_per_prompt=samples_per_prompt,
        max_prompts=max_prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    return samples


def _kl_per_sample(model, ref_model, rollouts, tokenizer, batch_size: int) -> list[float]:
    """``log pi(y|x) - log ref(y|x)`` summed over each sampled completion (its mean estimates KL(pi || ref))."""
    seqs = rollouts.to_sequences(tokenizer.pad_token_id)
    kl = []
    for start in range(0, len(rollouts.texts), batch_size):
        rows = slice(start, start + batch_size)
        args = (seqs["input_ids"][rows], seqs["attention_mask"][rows], seqs["completion_mask"][rows])
        policy_logps = completion_token_logps(model, *args).sums
        reference_logps = completion_token_logps(ref_model, *args).sums
        kl.extend((policy_logps - reference_logps).tolist())
    return kl


def win_rate(candidate: PolicySamples, baseline: PolicySamples) -> float:
    """Share of (prompt, sample) slots where the candidate's reward beats the baseline's; ties count half."""
    pairs = list(zip(candidate.rewards, baseline.rewards))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(len(pairs), 1)


@torch.no_grad()
def sample_with_revisions(
    policy,
    prompts_path: str,
    reward_fn: Callable[[str, str], float],
    *,
    revisions: int = 1,
    template=None,
    samples_per_prompt: int = 1,
    max_prompts: Optional[int] = None,
    max_new_tokens: int = 48,
    max_revision_prompt_length: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    reference=None,
) -> list[PolicySamples]:
    """SRPO's inference: ``y_0 ~ pi(. | x)``, then ``y_{n+1} ~ pi(. | x, y_n)`` for ``revisions`` rounds.

    The revision prompt is ``template`` (a :class:`prefopt.data.revision.RevisionTemplate`; the training run's
    ``data.revision_template`` / ``revision_instruction``) rendered and tokenized as training does it, keeping its
    last ``max_revision_prompt_length`` tokens. Returns one :class:`PolicySamples` per round (index 0: no revision),
    each scored with ``reward_fn(prompt, completion)``; sample ``j`` of round ``n+1`` revises sample ``j`` of round n.
    With ``reference``, round 0 carries the per-sample KL(policy || reference) estimate, as :func:`sample_policy`.
    """
    from prefopt.data.revision import RevisionTemplate

    if revisions < 0:
        raise ValueError(f"revisions must be >= 0, got {revisions}")
    template = template or RevisionTemplate()
    tokenizer = load_tokenizer(str(policy))
    model = _load(policy)
    prompt_ids, texts, messages = _prompt_columns(prompts_path, tokenizer, max_prompts, 64)
    generator = HFGenerator(model, tokenizer, batch_size=batch_size)
    rollouts = generator.generate(
        prompt_ids,
        SamplingParams(
            n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
        ),
    )
    index = [int(i) for i in rollouts.prompt_index]
    rounds = []
    for round_number in range(revisions + 1):
        prompts = [texts[i] for i in index]
        rounds.append(
            PolicySamples(
                prompts=prompts,
                completions=list(rollouts.texts),
                prompt_index=index,
                rewards=[float(reward_fn(p, c)) for p, c in zip(prompts, rollouts.texts)],
                lengths=[int(n) for n in rollouts.completion_mask.sum(-1)],
                finished=[bool(f) for f in rollouts.finished],
            )
        )
        if round_number == 0 and reference is not None:
            rounds[0].kl_per_sample = _kl_per_sample(model, _load(reference), rollouts, tokenizer, batch_size)
        if round_number == revisions:
            break
        revision_ids = []
        for i, answer in zip(index, rollouts.texts):
            text = template.render(texts[i], messages[i], answer, tokenizer)
            ids = tokenizer(text, add_special_tokens=not messages[i])["input_ids"]
            revision_ids.append(ids[-max_revision_prompt_length:])
        rollouts = generator.generate(
            revision_ids,
            SamplingParams(
                n=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + round_number + 1
            ),
        )
    return rounds
