"""The reward layer: one interface scoring (prompt, completion) text pairs, whatever the reward comes from.

``build_reward(cfg.reward, device=...)`` returns, by ``reward.kind``:

* ``model``: :class:`ModelReward`, a sequence classifier (one label) scoring text re-rendered with *its own*
  tokenizer and chat template. The policy's token ids are never passed to it: the two vocabularies differ in general.
* ``function``: :class:`FunctionReward` around ``reward.function = "module:callable"``.
* ``implicit``: :class:`ImplicitReward`, DPO's ``beta * (logp_policy(y) - logp_ref(y))``, per sequence or per token.
* ``judge``: :class:`FunctionJudge`, a pairwise preference instead of a score.
* ``none``: None.

Scores are float32 ``[N]`` tensors on ``device``. ``reward.missing_eos_penalty`` and ``reward.normalize`` are applied
by :class:`ScoreTransform` on top of any scorer.

Text conventions: ``prompts[i]`` is the prompt text the policy saw; ``prompt_messages[i]`` is the JSON list of the
prompt's chat messages ("" for a plain-text prompt). A scorer with a chat template of its own re-renders from the
messages; otherwise it reads ``prompt + completion``.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from prefopt.errors import ConfigError, DataError
from prefopt.models.loading import _check_exists, load_tokenizer, resolve_dtype
from prefopt.models.logps import completion_token_logps


@runtime_checkable
class RewardScorer(Protocol):
    def score(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        prompt_messages: list[str] | None = None,
        finished: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N] float32 scores, higher is better."""
        ...


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> torch.Tensor:
        """[N] float32: 1.0 where ``a`` is preferred (ties count for ``a``), else 0.0."""
        ...


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def import_callable(spec: str | None, key: str = "reward.function") -> Callable:
    """``"package.module:name"`` -> the object; every failure is a ``ConfigError`` naming ``key``."""
    if not spec or ":" not in spec:
        raise ConfigError(f"{key}: expected 'module:callable' (e.g. data_tools.gold:reward), got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the recipe's problem to fix
        raise ConfigError(
            f"{key}: cannot import module '{module_name}' ({type(error).__name__}: {error})"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: '{spec}' is not callable")
    return target


def _messages(prompt_messages: Sequence[str] | None, index: int) -> list[dict] | None:
    if not prompt_messages or not prompt_messages[index]:
        return None
    try:
        messages = json.loads(prompt_messages[index])
    except json.JSONDecodeError as error:
        raise DataError(f"prompt_messages[{index}]: not valid JSON ({error})") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"prompt_messages[{index}]: expected a JSON list of {{'role', 'content'}} messages")
    return messages


def render_prompt(tokenizer, prompt: str, messages: list[dict] | None) -> tuple[str, bool]:
    """(prompt text for ``tokenizer``, whether its chat template rendered it). A rendered text carries its own
    special tokens, so it is encoded with ``add_special_tokens=False``."""
    if messages and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return prompt, False


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _completion_token_logps(
    model, input_ids, attention_mask, completion_mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[N, L-1]`` (label-aligned, docs/losses.md) and their mask, via the shared
    chunked implementation the trainer uses."""
    logps = completion_token_logps(model, input_ids, attention_mask, completion_mask)
    return logps.token_logps, logps.mask


class RunningMeanStd:
    """Mean and (population) std of every score seen so far, merged batch by batch (Welford/Chan), in float64.
    Per process: ranks see different scores, so their statistics differ slightly."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        if values.numel() == 0:
            return
        n, mean = values.numel(), values.mean().item()
        m2 = ((values - mean) ** 2).sum().item()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class ScoreTransform:
    """Normalise a scorer's output, then subtract ``missing_eos_penalty`` from completions with ``finished=False``.

    The penalty comes after normalisation so that it has the size the recipe states, and the running statistics
    track the scorer, not the penalty. Other methods of the scorer (``token_rewards``, ``score_ids``) pass through
    untransformed."""

    def __init__(
        self, scorer, *, missing_eos_penalty: float | None = None, normalize: str = "none", eps: float = 1e-8
    ):
        if normalize not in ("none", "batch", "running"):
            raise ConfigError(f"reward.normalize: invalid value {normalize!r}; valid: none, batch, running")
        self.scorer, self.missing_eos_penalty, self.normalize, self.eps = (
            scorer,
            missing_eos_penalty,
            normalize,
            eps,
        )
        self.running = RunningMeanStd()

    def __getattr__(self, name):  # token_rewards, score_ids, ... of the wrapped scorer
        return getattr(self.scorer, name)

    def score(self, prompts, completions, *, prompt_messages=None, finished=None) -> torch.Tensor:
        scores = self.scorer.score(
            prompts, completions, prompt_messages=prompt_messages, finished=finished
        ).float()
        if self.normalize == "batch" and scores.numel() > 0:
            scores = (scores - scores.mean()) / (scores.std(unbiased=False) + self.eps)
        elif self.normalize == "running":
            self.running.update(scores)
            scores = ((scores.double() - self.running.mean) / (self.running.std + self.eps)).float()
        if self.missing_eos_penalty is not None and finished is not None:
            unfinished = ~finished.to(device=scores.device, dtype=torch.bool)
            scores = scores - self.missing_eos_penalty * unfinished.float()
        return scores


# --------------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------------


def load_reward_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    key: str = "reward.name_or_path",
):
    """A one-label ``AutoModelForSequenceClassification`` whose head was actually trained (a checkpoint without
    one would get a random head, i.e. a random reward, so that is refused). Eval mode, no grad."""
    from transformers import AutoModelForSequenceClassification

    _check_exists(name_or_path, key)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}: cannot load a sequence-classification model from '{name_or_path}': {error}"
        ) from None
    head_missing = [
        name for name in info.get("missing_keys", []) if not name.startswith(model.base_model_prefix + ".")
    ]
    if head_missing:
        raise ConfigError(
            f"{key}: '{name_or_path}' has no trained reward head (missing: {', '.join(head_missing)}); "
            "is it a causal LM rather than a reward model?"
        )
    if model.config.num_labels != 1:
        raise ConfigError(
            f"{key}: '{name_or_path}' has {model.config.num_labels} labels; a reward model has 1"
        )
    model.eval().requires_grad_(False)
    return model


class ModelReward:
    """A sequence-classifier reward model with its own tokenizer. Right padding, the end of over-long texts kept.

    Scores come from the model's own forward, which reads the logit at the last token that is not
    ``config.pad_token_id``; we pad with exactly that id (the tokenizer's pad, or EOS when it has none), so a
    reward model whose pad is its EOS is read the way it was trained."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device,
        batch_size: int = 32,
        max_length: int = 1024,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        prepare=None,
    ):
        self.device = torch.device(device)
        model = load_reward_model(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        # ``prepare``: the trainer's frozen-model placement (a ZeRO-3 engine, see trainer/distributed.py); the
        # engine is kept alive for its hooks and calls go to its module.
        self._engine = prepare(model) if prepare is not None else model.to(self.device)
        self.model = getattr(self._engine, "module", self._engine)
        self.tokenizer = load_tokenizer(
            name_or_path, trust_remote_code=trust_remote_code, key="reward.name_or_path"
        )
        pad_id = self.model.config.pad_token_id
        if (
            pad_id is None
        ):  # the model pools at the last token that is not its pad id: pad with exactly that id
            pad_id = self.tokenizer.pad_token_id
            self.model.config.pad_token_id = pad_id
        self.pad_id, self.batch_size, self.max_length = int(pad_id), batch_size, max_length

    def encode(self, prompt: str, completion: str, messages: list[dict] | None) -> list[int]:
        if messages and getattr(self.tokenizer, "chat_template", None):
            conversation = messages + [{"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt + completion)["input_ids"]
        return ids[-self.max_length :]

    @torch.no_grad()
    def score(self, prompts, completions, *, prompt_messages=None, finished=None) -> torch.Tensor:
        rows = [
            self.encode(p, c, _messages(prompt_messages, i))
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        scores = [torch.zeros(0, device=self.device)]
        for start in range(0, len(rows), self.batch_size):
            input_ids, attention_mask = _right_pad(
                rows[start : start + self.batch_size], self.pad_id, self.device
            )
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            scores.append(logits[:, 0].float())
        return torch.cat(scores)


class FunctionReward:
    """``fn(prompt, completion) -> float``, or ``fn(prompts, completions) -> list`` when ``fn.batched`` is True."""

    def __init__(self, function: Callable, *, device="cpu", name: str = "reward.function"):
        self.function, self.device, self.name = function, torch.device(device), name

    def score(self, prompts, completions, *, prompt_messages=None, finished=None) -> torch.Tensor:
        if getattr(self.function, "batched", False):
            values = list(self.function(list(prompts), list(completions)))
            if len(values) != len(prompts):
                raise ConfigError(
                    f"{self.name}: returned {len(values)} scores for {len(prompts)} completions"
                )
        else:
            values = [self.function(p, c) for p, c in zip(prompts, completions)]
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.name}: must return numbers, got {values[:3]!r}...") from None


class FunctionJudge:
    """``fn(prompt, a, b)``: a truthy result (True, 1, or a probability >= 0.5) means ``a`` is preferred; None or
    0.5 is a tie, which goes to ``a``. ``fn.batched = True``: ``fn(prompts, as, bs) -> list``."""

    def __init__(self, function: Callable, *, device="cpu", name: str = "reward.function"):
        self.function, self.device, self.name = function, torch.device(device), name

    def judge(self, prompts, completions_a, completions_b) -> torch.Tensor:
        if getattr(self.function, "batched", False):
            results = list(self.function(list(prompts), list(completions_a), list(completions_b)))
        else:
            results = [self.function(p, a, b) for p, a, b in zip(prompts, completions_a, completions_b)]
        if len(results) != len(prompts):
            raise ConfigError(f"{self.name}: returned {len(results)} verdicts for {len(prompts)} pairs")
        try:
            verdicts = [1.0 if r is None or float(r) >= 0.5 else 0.0 for r in results]
        except (TypeError, ValueError):
            raise ConfigError(
                f"{self.name}: a judge must return a bool or a number, got {results[:3]!r}..."
            ) from None
        return torch.tensor(verdicts, dtype=torch.float32, device=self.device)


class ScorerJudge:
    """A :class:`PairwiseJudge` from any scorer: ``a`` is preferred when ``score(a) >= score(b)``."""

    def __init__(self, scorer):
        self.scorer = scorer

    def judge(self, prompts, completions_a, completions_b, *, prompt_messages=None) -> torch.Tensor:
        scores = self.scorer.score(
            list(prompts) * 2,
            list(completions_a) + list(completions_b),
            prompt_messages=list(prompt_messages) * 2 if prompt_messages else None,
        )
        return (scores[: len(prompts)] >= scores[len(prompts) :]).float()


class ImplicitReward:
    """DPO's implicit reward ``beta * (logp_policy(y) - logp_ref(y))`` (docs/losses.md), summed over the
    completion tokens including EOS, or per token (:meth:`token_rewards`; they sum to :meth:`score`).

    Texts are tokenized with the implicit policy's tokenizer; an EOS id is appended to completions marked
    ``finished`` (all, when ``finished`` is None) because decoded completion texts do not contain it. The ``*_ids``
    methods take ``to_sequences()``-style tensors directly when the tokenizers agree.
    """

    def __init__(
        self,
        policy,
        reference,
        tokenizer,
        *,
        beta: float = 0.1,
        device="cpu",
        batch_size: int = 32,
        max_length: int = 1024,
    ):
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval().requires_grad_(False)
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.beta, self.batch_size, self.max_length = tokenizer, beta, batch_size, max_length

    def _encode(self, prompts, completions, prompt_messages, finished) -> list[tuple[list[int], list[int]]]:
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            text, rendered = render_prompt(self.tokenizer, prompt, _messages(prompt_messages, i))
            prompt_ids = self.tokenizer(text, add_special_tokens=not rendered)["input_ids"]
            completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            if finished is None or bool(finished[i]):
                completion_ids = completion_ids + [self.tokenizer.eos_token_id]
            ids = (prompt_ids + completion_ids)[-self.max_length :]
            mask = ([0] * len(prompt_ids) + [1] * len(completion_ids))[-self.max_length :]
            rows.append((ids, mask))
        return rows

    @torch.no_grad()
    def token_rewards_ids(
        self, input_ids, attention_mask, completion_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-aligned per-token rewards ``[N, L-1]`` (zero off the completion) and their mask."""
        args = (input_ids.to(self.device), attention_mask.to(self.device), completion_mask.to(self.device))
        policy_logps, mask = _completion_token_logps(self.policy, *args)
        reference_logps, _ = _completion_token_logps(self.reference, *args)
        return self.beta * (policy_logps - reference_logps) * mask, mask

    def score_ids(self, input_ids, attention_mask, completion_mask) -> torch.Tensor:
        rewards, _ = self.token_rewards_ids(input_ids, attention_mask, completion_mask)
        return rewards.sum(-1)

    def _batched(self, prompts, completions, prompt_messages, finished):
        rows = self._encode(prompts, completions, prompt_messages, finished)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            input_ids, attention_mask = _right_pad(
                [ids for ids, _ in chunk], self.tokenizer.pad_token_id, self.device
            )
            completion_mask, _ = _right_pad([mask for _, mask in chunk], 0, self.device)
            yield self.token_rewards_ids(input_ids, attention_mask, completion_mask)

    def score(self, prompts, completions, *, prompt_messages=None, finished=None) -> torch.Tensor:
        parts = [
            rewards.sum(-1) for rewards, _ in self._batched(prompts, completions, prompt_messages, finished)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def token_rewards(self, prompts, completions, *, prompt_messages=None, finished=None) -> torch.Tensor:
        """``[N, T]``: the reward of each completion token (EOS included), left-aligned, zero-padded to the longest."""
        rows: list[torch.Tensor] = []
        for rewards, mask in self._batched(prompts, completions, prompt_messages, finished):
            rows.extend(rewards[i][mask[i].bool()] for i in range(rewards.shape[0]))
        width = max((row.numel() for row in rows), default=0)
        out = torch.zeros((len(rows), width), dtype=torch.float32, device=self.device)
        for i, row in enumerate(rows):
            out[i, : row.numel()] = row
        return out


# --------------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------------


def _implicit_from_config(reward_cfg, device, policy_tokenizer, prepare=None) -> ImplicitReward:
    from prefopt.config import ModelConfig
    from prefopt.models.loading import load_frozen_causal_lm

    for key in ("policy", "reference"):
        if not getattr(reward_cfg, key):
            raise ConfigError(f"reward.{key}: required for reward.kind=implicit (path of the DPO {key})")
    models = []
    for key in ("policy", "reference"):
        model_cfg = ModelConfig(
            name_or_path=getattr(reward_cfg, key),
            dtype=reward_cfg.dtype,
            trust_remote_code=reward_cfg.trust_remote_code,
        )
        models.append(load_frozen_causal_lm(model_cfg.name_or_path, model_cfg, key=f"reward.{key}"))
    engines = [prepare(model) for model in models] if prepare is not None else models
    models = [getattr(engine, "module", engine) for engine in engines]
    has_tokenizer = any(
        (Path(reward_cfg.policy) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if policy_tokenizer is not None and not has_tokenizer:
        tokenizer = policy_tokenizer
    else:
        tokenizer = load_tokenizer(
            reward_cfg.policy, trust_remote_code=reward_cfg.trust_remote_code, key="reward.policy"
        )
    reward = ImplicitReward(
        models[0],
        models[1],
        tokenizer,
        beta=reward_cfg.beta,
        device=device,
        batch_size=reward_cfg.batch_size,
        max_length=reward_cfg.max_length,
    )
    reward._engines = engines  # ZeRO-3: the engines' hooks gather the modules' partitions
    return reward


def build_reward(reward_cfg, *, device, policy_tokenizer=None, prepare=None):
    """The scorer (or judge, for ``kind=judge``) a recipe's ``reward`` section describes; None for ``kind=none``.

    ``prepare``: how the trainer places a frozen model (``partial(prepare_frozen, accelerator)``: a DeepSpeed
    engine under ZeRO-3, where ``from_pretrained`` leaves empty partitions; else a move to the device).
    """
    kind = reward_cfg.kind
    if kind == "none":
        return None
    if reward_cfg.token_level and kind != "implicit":
        raise ConfigError(
            f"reward.token_level: only reward.kind=implicit gives per-token rewards (kind is {kind})"
        )
    if kind == "judge":
        if reward_cfg.normalize != "none" or reward_cfg.missing_eos_penalty is not None:
            raise ConfigError(
                "reward.kind=judge: normalize and missing_eos_penalty apply to scores, not to a judge"
            )
        return FunctionJudge(import_callable(reward_cfg.function), device=device)
    if kind == "model":
        if not reward_cfg.name_or_path:
            raise ConfigError(
                "reward.name_or_path: required for reward.kind=model (path or hub id of a reward model)"
            )
        scorer = ModelReward(
            reward_cfg.name_or_path,
            device=device,
            batch_size=reward_cfg.batch_size,
            max_length=reward_cfg.max_length,
            dtype=reward_cfg.dtype,
            trust_remote_code=reward_cfg.trust_remote_code,
            prepare=prepare,
        )
    elif kind == "function":
        scorer = FunctionReward(import_callable(reward_cfg.function), device=device)
    elif kind == "implicit":
        scorer = _implicit_from_config(reward_cfg, device, policy_tokenizer, prepare)
    else:
        raise ConfigError(
            f"reward.kind: invalid value {kind!r}; valid: none, model, function, implicit, judge"
        )
    if reward_cfg.missing_eos_penalty is None and reward_cfg.normalize == "none":
        return scorer
    return ScoreTransform(
        scorer, missing_eos_penalty=reward_cfg.missing_eos_penalty, normalize=reward_cfg.normalize
    )
