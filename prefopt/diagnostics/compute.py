"""Stream preference pairs (and optional policy samples) through the policy and the reference.

One pass over a tokenized pair dataset, ``batch_size`` pairs at a time under ``torch.inference_mode``, collects the
per-pair numbers every metric needs (log-prob sums, completion lengths, explicit rewards) and vocabulary-sized
token-reward totals, so memory does not grow with per-token data. A second, tiny pass recomputes the per-token
rewards of the few pairs shown token by token in the report.

Token-level implicit reward ("From r to Q*", Rafailov et al. 2024), with ``m_t`` the completion mask:
the loss's ``ImplicitReward.tokens`` (DPO family ``beta * (logp_policy_t - logp_ref_t) * m_t``; SimPO
``beta * logp_policy_t * m_t / |y|``). Either way they sum over a response to that response's sequence reward.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from prefopt.diagnostics import metrics as M
from prefopt.errors import UserInputError
from prefopt.losses import ImplicitReward
from prefopt.models.logps import TokenLogps, completion_token_logps

Advance = Callable[[int], None]


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class LogpModels:
    """The policy, the reference (``None`` for SimPO without ``--reference``) and the tokenizer.

    ``reference_is_base``: the policy is a PEFT adapter and the reference is its base model, scored by running
    the policy with the adapter disabled instead of holding a second copy.
    """

    policy: torch.nn.Module
    reference: Optional[torch.nn.Module]
    tokenizer: Any
    device: torch.device
    reference_is_base: bool = False
    chunk_size: Optional[int] = 1024

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.reference_is_base

    def policy_logps(self, batch: dict) -> TokenLogps:
        return self._logps(self.policy, batch)

    def reference_logps(self, batch: dict) -> TokenLogps:
        if self.reference_is_base:
            with self.policy.disable_adapter():
                return self._logps(self.policy, batch)
        if self.reference is None:
            raise RuntimeError("no reference model loaded")
        return self._logps(self.reference, batch)

    def _logps(self, model, batch: dict) -> TokenLogps:
        return completion_token_logps(
            model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch["completion_mask"].to(self.device),
            chunk_size=self.chunk_size,
        )


def adapter_base(path: str) -> Optional[str]:
    """The base model of a PEFT adapter directory (``adapter_config.json``), else None."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"{config}: unreadable adapter config: {error}") from None
    if not base:
        raise UserInputError(
            f"{config}: no base_model_name_or_path; cannot tell which model the adapter is for"
        )
    return base


def load_models(
    policy_path: str,
    reference_path: Optional[str],
    *,
    dtype: str,
    device: str,
    chunk_size: Optional[int] = 1024,
) -> LogpModels:
    from prefopt.config import ModelConfig
    from prefopt.models.loading import load_frozen_causal_lm, load_tokenizer

    target = torch.device(device)
    base = adapter_base(policy_path)
    if base is not None:
        from peft import PeftModel

        base_model = load_frozen_causal_lm(
            base,
            ModelConfig(name_or_path=base, dtype=dtype),
            key=f"--policy adapter base ({policy_path}/adapter_config.json)",
        )
        policy = PeftModel.from_pretrained(base_model, policy_path, is_trainable=False)
        policy.eval()
    else:
        policy = load_frozen_causal_lm(
            policy_path, ModelConfig(name_or_path=policy_path, dtype=dtype), key="--policy"
        )
    tokenizer = _load_tokenizer(policy_path, base, load_tokenizer)
    reference, reference_is_base = None, False
    if reference_path is not None:
        if base is not None and _same_path(reference_path, base):
            reference_is_base = True
        else:
            reference = load_frozen_causal_lm(
                reference_path, ModelConfig(name_or_path=reference_path, dtype=dtype), key="--reference"
            ).to(target)
            check_same_vocabulary(policy, reference, tokenizer, reference_path)
    return LogpModels(policy.to(target), reference, tokenizer, target, reference_is_base, chunk_size)


def check_same_vocabulary(policy, reference, tokenizer, reference_path: str) -> None:
    """The implicit reward compares the two models' log-probs of the same token ids: one vocabulary for both."""
    from prefopt.errors import UserInputError

    sizes = [model.get_input_embeddings().num_embeddings for model in (policy, reference)]
    if sizes[0] != sizes[1] or len(tokenizer) > sizes[1]:
        raise UserInputError(
            f"--reference: '{reference_path}' has a vocabulary of {sizes[1]} tokens but the policy "
            f"has {sizes[0]} (tokenizer: {len(tokenizer)}); the reference must use the policy's "
            "tokenizer (pass the model the policy was trained from)"
        )
    has_tokenizer = any(
        (Path(reference_path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if has_tokenizer:
        from transformers import AutoTokenizer

        try:
            reference_vocab = AutoTokenizer.from_pretrained(reference_path).get_vocab()
        except (
            OSError,
            ValueError,
        ):  # an unreadable reference tokenizer: the sizes above are all we can check
            return
        if reference_vocab != tokenizer.get_vocab():
            raise UserInputError(
                f"--reference: '{reference_path}' has a different tokenizer from the policy's (same "
                "size, different token ids); pass the model the policy was trained from"
            )


def _load_tokenizer(policy_path: str, base: Optional[str], load_tokenizer):
    has_own = any(
        (Path(policy_path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if has_own or base is None:
        return load_tokenizer(policy_path, key="--policy")
    return load_tokenizer(base, key="--policy adapter base")


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


# ------------------------------------------------------------------------------------------------- pair pass


@dataclass
class PairStats:
    """Everything the pair metrics need, one entry per pair (float64 numpy arrays)."""

    index: np.ndarray
    policy_chosen: np.ndarray
    policy_rejected: np.ndarray
    reference_chosen: Optional[np.ndarray]
    reference_rejected: Optional[np.ndarray]
    chosen_lengths: np.ndarray
    rejected_lengths: np.ndarray
    top5_share: np.ndarray  # share of sum |token margin contribution| carried by the pair's 5 largest
    explicit_chosen: Optional[np.ndarray] = None
    explicit_rejected: Optional[np.ndarray] = None
    token_sums: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # "chosen"/"rejected" -> [V] reward totals
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)  # -> [V] occurrences

    def rewards(self, reward: ImplicitReward) -> tuple[np.ndarray, np.ndarray]:
        chosen = M.implicit_rewards(
            self.policy_chosen, self.reference_chosen, reward=reward, lengths=self.chosen_lengths
        )
        rejected = M.implicit_rewards(
            self.policy_rejected, self.reference_rejected, reward=reward, lengths=self.rejected_lengths
        )
        return chosen, rejected


def token_rewards(
    policy: TokenLogps, reference: Optional[TokenLogps], reward: ImplicitReward
) -> torch.Tensor:
    """``[B, L-1]`` per-token implicit rewards (zero outside the completion mask); rows sum to ``r(y)``."""
    return reward.tokens(
        policy.token_logps, None if reference is None else reference.token_logps, policy.mask, policy.lengths
    )


def rows_of(dataset, start: int, end: int) -> list[dict]:
    columns = dataset[start:end]
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]


@torch.inference_mode()
def pair_pass(
    dataset,
    models: LogpModels,
    *,
    reward: ImplicitReward,
    batch_size: int,
    scorer=None,
    advance: Optional[Advance] = None,
) -> PairStats:
    from prefopt.data import PairCollator

    collate = PairCollator(models.tokenizer.pad_token_id)
    vocab = max(len(models.tokenizer), _vocab_size(models.policy))
    sums = {side: torch.zeros(vocab, dtype=torch.float64) for side in ("chosen", "rejected")}
    counts = {side: torch.zeros(vocab, dtype=torch.float64) for side in ("chosen", "rejected")}
    out: dict[str, list] = {k: [] for k in ("index", "pc", "pr", "rc", "rr", "nc", "nr", "share", "ec", "er")}
    for start in range(0, len(dataset), batch_size):
        rows = rows_of(dataset, start, min(start + batch_size, len(dataset)))
        batch = collate(rows)
        half = len(rows)
        policy = models.policy_logps(batch)
        reference = models.reference_logps(batch) if reward.uses_reference else None
        rewards = token_rewards(policy, reference, reward).double().cpu()
        labels = batch["input_ids"][:, 1:]
        mask = policy.mask.cpu() > 0
        for side, rows_slice in (("chosen", slice(0, half)), ("rejected", slice(half, 2 * half))):
            ids, keep = labels[rows_slice][mask[rows_slice]], rewards[rows_slice][mask[rows_slice]]
            sums[side] += torch.bincount(ids, weights=keep, minlength=vocab)[:vocab]
            counts[side] += torch.bincount(ids, minlength=vocab)[:vocab].double()
        contributions = torch.cat([rewards[:half], -rewards[half:]], dim=1).abs()
        top = contributions.topk(min(5, contributions.shape[1]), dim=1).values.sum(1)
        out["share"].append((top / contributions.sum(1).clamp(min=1e-30)).numpy())
        policy_sums, lengths = policy.sums.double().cpu(), policy.lengths.double().cpu()
        out["index"].append(batch["index"].numpy())
        out["pc"].append(policy_sums[:half].numpy())
        out["pr"].append(policy_sums[half:].numpy())
        out["nc"].append(lengths[:half].numpy())
        out["nr"].append(lengths[half:].numpy())
        if reference is not None:
            reference_sums = reference.sums.double().cpu()
            out["rc"].append(reference_sums[:half].numpy())
            out["rr"].append(reference_sums[half:].numpy())
        if scorer is not None:
            scores = (
                scorer.score(
                    batch["prompt_text"] * 2,
                    batch["chosen_text"] + batch["rejected_text"],
                    prompt_messages=batch["prompt_messages"] * 2,
                )
                .double()
                .cpu()
            )
            out["ec"].append(scores[:half].numpy())
            out["er"].append(scores[half:].numpy())
        if advance is not None:
            advance(half)

    def cat(key: str) -> Optional[np.ndarray]:
        return np.concatenate(out[key]).astype(np.float64) if out[key] else None

    return PairStats(
        index=np.concatenate(out["index"]).astype(np.int64),
        policy_chosen=cat("pc"),
        policy_rejected=cat("pr"),
        reference_chosen=cat("rc"),
        reference_rejected=cat("rr"),
        chosen_lengths=cat("nc"),
        rejected_lengths=cat("nr"),
        top5_share=cat("share"),
        explicit_chosen=cat("ec"),
        explicit_rejected=cat("er"),
        token_sums={k: v.numpy() for k, v in sums.items()},
        token_counts={k: v.numpy() for k, v in counts.items()},
    )


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


# ----------------------------------------------------------------------------------------- token examples


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, decoded with up to 4 tokens of left context (so multi-byte characters and
    leading-space markers come out right) without decoding the whole prefix for every token."""
    pieces = []
    for i in range(len(ids)):
        left = ids[max(0, i - 4) : i]
        before = tokenizer.decode(left, skip_special_tokens=False) if left else ""
        after = tokenizer.decode(ids[max(0, i - 4) : i + 1], skip_special_tokens=False)
        pieces.append(
            after[len(before) :]
            if after.startswith(before)
            else tokenizer.decode([ids[i]], skip_special_tokens=False)
        )
    return pieces


@torch.inference_mode()
def token_examples(
    dataset, picks: list[tuple[int, str]], models: LogpModels, *, reward: ImplicitReward, top_k: int = 5
) -> list[dict[str, Any]]:
    """Per-token rewards of the picked pairs (positions into ``dataset``) for the report's token colouring."""
    from prefopt.data import PairCollator

    if not picks:
        return []
    subset = dataset.select([position for position, _ in picks])
    rows = rows_of(subset, 0, len(subset))
    batch = PairCollator(models.tokenizer.pad_token_id)(rows)
    policy = models.policy_logps(batch)
    reference = models.reference_logps(batch) if reward.uses_reference else None
    rewards = token_rewards(policy, reference, reward).double().cpu()
    labels, mask = batch["input_ids"][:, 1:], policy.mask.cpu() > 0
    half = len(rows)
    examples = []
    for i, ((_, why), row) in enumerate(zip(picks, rows)):
        sides = {}
        for side, r in (("chosen", i), ("rejected", half + i)):
            ids = labels[r][mask[r]].tolist()
            values = rewards[r][mask[r]].tolist()
            sides[side] = {
                "tokens": token_pieces(models.tokenizer, ids),
                "token_ids": ids,
                "rewards": values,
                "reward": float(sum(values)),
            }
        margin = sides["chosen"]["reward"] - sides["rejected"]["reward"]
        top = M.top_contributions(
            sides["chosen"]["tokens"], sides["chosen"]["rewards"], +1.0, top_k
        ) + M.top_contributions(sides["rejected"]["tokens"], sides["rejected"]["rewards"], -1.0, top_k)
        for entry, side in zip(top, ["chosen"] * top_k + ["rejected"] * top_k):
            entry["side"] = side
        top.sort(key=lambda entry: -abs(entry["margin_contribution"]))
        examples.append(
            {
                "index": int(row["index"]),
                "why": why,
                "prompt": row.get("prompt_text", ""),
                "chosen_text": row.get("chosen_text", ""),
                "rejected_text": row.get("rejected_text", ""),
                "margin": margin,
                "bt_probability": float(M.bt_probabilities([margin])[0]),
                "correct": margin > 0,
                "chosen": sides["chosen"],
                "rejected": sides["rejected"],
                "top_tokens": top[:top_k],
            }
        )
    return examples


# ------------------------------------------------------------------------------------------------ samples


@dataclass
class SampleStats:
    prompts: int
    lengths: np.ndarray
    finished: np.ndarray
    k1: Optional[np.ndarray]
    k3: Optional[np.ndarray]
    policy_logps: np.ndarray
    explicit: Optional[np.ndarray]
    texts: list[str]
    prompt_texts: list[str]


def unique_prompts(dataset, limit: int) -> list[dict]:
    """The first ``limit`` distinct prompts (by token ids) of a pair dataset, in dataset order."""
    seen, picked = set(), []
    prompts = dataset.select_columns(["prompt_input_ids", "prompt_text", "prompt_messages"])
    for start in range(0, len(prompts), 256):
        for row in rows_of(prompts, start, min(start + 256, len(prompts))):
            key = tuple(row["prompt_input_ids"])
            if key not in seen:
                seen.add(key)
                picked.append(row)
                if len(picked) >= limit:
                    return picked
    return picked


@torch.inference_mode()
def sample_pass(
    prompts: list[dict],
    models: LogpModels,
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    scorer=None,
    advance: Optional[Advance] = None,
) -> SampleStats:
    """``samples`` completions for each prompt row (see :func:`unique_prompts`) from the policy, scored by the
    policy, the reference (KL terms) and ``scorer``."""
    from prefopt.config import GenerationConfig
    from prefopt.generation import SamplingParams, build_generator

    generator = build_generator(
        GenerationConfig(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size),
        models.policy,
        models.tokenizer,
    )
    pad = models.tokenizer.pad_token_id
    collected: dict[str, list] = {k: [] for k in ("len", "fin", "k1", "k3", "lp", "exp", "text", "ptext")}
    per_call = max(1, batch_size // samples)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        sampling = SamplingParams(
            n=samples,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            seed=seed + start,
        )
        rollouts = generator.generate([row["prompt_input_ids"] for row in chunk], sampling)
        sequences = {k: v.cpu() for k, v in rollouts.to_sequences(pad).items()}
        width = int(sequences["attention_mask"].sum(1).max())
        sequences = {k: v[:, :width] for k, v in sequences.items()}
        policy = models.policy_logps(sequences)
        collected["lp"].append(policy.sums.double().cpu().numpy())
        if models.has_reference:
            reference = models.reference_logps(sequences)
            k1, k3 = M.sample_kl_terms(policy.token_logps, reference.token_logps, policy.mask)
            collected["k1"].append(k1)
            collected["k3"].append(k3)
        collected["len"].append(rollouts.completion_lengths.cpu().numpy().astype(np.float64))
        collected["fin"].append(rollouts.finished.cpu().numpy())
        owners = [chunk[i] for i in rollouts.prompt_index.tolist()]
        prompt_texts = [row["prompt_text"] for row in owners]
        collected["text"].extend(rollouts.texts)
        collected["ptext"].extend(prompt_texts)
        if scorer is not None:
            scores = scorer.score(
                prompt_texts,
                list(rollouts.texts),
                prompt_messages=[row["prompt_messages"] for row in owners],
                finished=rollouts.finished,
            )
            collected["exp"].append(scores.double().cpu().numpy())
        if advance is not None:
            advance(len(chunk))

    def cat(key: str) -> Optional[np.ndarray]:
        return np.concatenate(collected[key]) if collected[key] else None

    return SampleStats(
        prompts=len(prompts),
        lengths=cat("len"),
        finished=cat("fin"),
        k1=cat("k1"),
        k3=cat("k3"),
        policy_logps=cat("lp"),
        explicit=cat("exp"),
        texts=collected["text"],
        prompt_texts=collected["ptext"],
    )


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress bar on stderr; yields ``task(description, total) -> advance``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield lambda description, total: lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:

        def task(description: str, total: int) -> Advance:
            task_id = progress.add_task(description, total=total)
            return lambda n: progress.advance(task_id, n)

        yield task
