"""Typed recipe schema, YAML loading and dotted ``key=value`` overrides.

A recipe is a YAML file whose sections mirror the classes below. Command-line overrides use dotted keys
(``loss.name=simpo loss.beta=2.0 train.max_steps=10``); values are parsed as YAML scalars. Every unknown key,
wrong type and invalid choice raises :class:`~prefopt.errors.ConfigError` naming the key and the valid options.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefopt.data.revision import DEFAULT_REVISION_INSTRUCTION, DEFAULT_REVISION_TEMPLATE, check_template
from prefopt.errors import ConfigError
from prefopt.losses.registry import DEFAULT_LOSS

logger = logging.getLogger(__name__)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string (it wants ``1.0e-5``); recipes and overrides mean a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - SafeLoader subclass


# Range-checked numbers: the schema says what is valid, and a bad value names its key and the valid range.
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # [0, 1]
OpenFraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Probability = Annotated[float, Field(gt=0, le=1)]  # (0, 1]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PeftConfig(_Section):
    """LoRA adapters through ``peft`` (set ``model.peft`` to enable)."""

    r: Positive = 8
    alpha: Positive = 16
    dropout: OpenFraction = 0.0
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


class ModelConfig(_Section):
    name_or_path: str = "runs/tiny-model"
    revision: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"]] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    peft: Optional[PeftConfig] = None


class ReferenceConfig(_Section):
    """Where reference log-probs come from. ``auto``: ``model`` when the loss needs a reference (``adapter``
    with LoRA), ``none`` otherwise."""

    mode: Literal["auto", "model", "adapter", "precomputed", "none"] = "auto"
    name_or_path: Optional[str] = None  # default: model.name_or_path
    cache_dir: Optional[str] = None  # precomputed cache; default: <output_dir>/../.prefopt_cache
    batch_size: Positive = 16
    # TR-DPO (prefopt/models/reference_sync.py): every sync_steps optimizer steps,
    # ref <- sync_mix * policy + (1 - sync_mix) * ref (1 = hard update). None: the reference stays fixed.
    sync_steps: Optional[Positive] = None
    sync_mix: float = Field(default=0.6, gt=0.0, le=1.0)


class DataConfig(_Section):
    train: Optional[str] = None
    eval: Optional[str] = None
    format: Literal[
        "auto", "pairs", "conversational", "hh", "rated", "triples", "prompts", "sft", "unpaired"
    ] = "auto"
    split: str = "train"  # split name for hub datasets / saved DatasetDicts
    eval_split: Optional[str] = None  # split of the same source used for eval
    eval_size: NonNegative | NonNegativeFloat = 0  # carve eval out of train: fraction (<1) or row count
    max_samples: Optional[Positive] = None
    shuffle: bool = True
    max_length: Positive = 512
    max_prompt_length: Positive = 256  # < max_length; when unset and max_length <= 256: max_length // 2
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    chat_template: Optional[str] = None
    on_invalid: Literal["error", "skip"] = "error"
    rated_pairs: Literal["best_worst", "all"] = "best_worst"
    rated_min_gap: NonNegativeFloat = 0.0
    curriculum: bool = False  # rated pairs ordered easy-to-hard by score gap (Curry-DPO)
    num_proc: Optional[Positive] = None
    packing: bool = False  # padding-free packing of pairs (pays off with varlen flash attention on GPUs)
    group_by_length: bool = (
        False  # batches of similar-length pairs: less padding (changes which pairs share a step)
    )
    # SRPO's revision prompt (prefopt/data/revision.py): plain rows fill {prompt} and {answer}; conversational rows
    # add the answer as an assistant turn and the instruction as a user turn.
    revision_template: str = DEFAULT_REVISION_TEMPLATE
    revision_instruction: str = DEFAULT_REVISION_INSTRUCTION

    @model_validator(mode="after")
    def _check_revision_template(self) -> DataConfig:
        check_template(self.revision_template)
        return self

    @model_validator(mode="after")
    def _check_lengths(self) -> DataConfig:
        if "max_prompt_length" not in self.model_fields_set and self.max_prompt_length >= self.max_length:
            # Only max_length was lowered: the default prompt budget follows it (half), instead of an error.
            object.__setattr__(self, "max_prompt_length", max(self.max_length // 2, 1))
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length: {self.max_prompt_length} leaves no room for the completion in "
                f"data.max_length={self.max_length} (which counts prompt and completion); valid: 1 to "
                f"{self.max_length - 1}, or raise data.max_length"
            )
        return self


class LossConfig(BaseModel):
    """``name`` plus the loss's own hyperparameters, validated by the loss registry.

    ``loss: {mix: [{name: dpo, weight: 0.8}, ...]}`` without a name is the weighted mixture (``name: mix``).
    """

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_LOSS

    @model_validator(mode="before")
    @classmethod
    def _mixture_without_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mix" in data and "name" not in data:
            from prefopt.losses.mixture import MixtureLoss

            data = {"name": MixtureLoss.name, **data}
        return data

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(_Section):
    learning_rate: NonNegativeFloat = 5e-7
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Fraction = 0.1
    warmup_steps: Optional[NonNegative] = None
    weight_decay: NonNegativeFloat = 0.0
    adam_beta1: OpenFraction = 0.9
    adam_beta2: OpenFraction = 0.999
    adam_epsilon: NonNegativeFloat = 1e-8
    max_grad_norm: Optional[NonNegativeFloat] = 1.0  # None or 0: no clipping
    num_epochs: PositiveFloat = 1.0
    max_steps: Optional[Positive] = None  # optimizer steps; overrides num_epochs
    per_device_batch_size: Positive = 4
    gradient_accumulation_steps: Positive = 1
    eval_batch_size: Optional[Positive] = None
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_steps: Optional[Positive] = None
    save_steps: Optional[Positive] = None
    save_total_limit: Optional[Positive] = 2  # None: keep every checkpoint
    resume_from: Optional[str] = None  # "latest" or a checkpoint path
    # Parts of the run fingerprint a resume may change deliberately (trainer/run_dir.py); by default a checkpoint
    # written with another loss, model, data or tokenizer is refused.
    resume_allow: list[Literal["loss", "model", "data", "tokenizer"]] = Field(default_factory=list)
    max_skipped_steps: NonNegative = 5
    logps_chunk_size: Optional[Positive] = 1024  # positions per lm-head/log-softmax chunk; None = one pass
    logps_head: Literal["fused", "checkpoint"] = "fused"  # chunked lm-head implementation (models/logps.py)
    # Pair batches: run each prompt through the decoder once for both completions (models/prefix_sharing.py);
    # exact to the unshared forward, falls back to it where it does not apply (packing, flash attention...).
    # "auto": per batch, only where the saved decoder work outweighs a second decoder call (short prompts on tiny
    # models do not pay); true: wherever it applies.
    share_prompt: Literal["auto"] | bool = "auto"
    fused_optimizer: bool = True  # torch's fused AdamW (fewer temporaries: lower peak memory, faster)
    # Sparse input-embedding gradients with an exactly equal AdamW step (trainer/sparse_embedding.py): no dense
    # [vocab, hidden] gradient during the backward. "auto" = on for single-process runs with an untied embedding.
    # Applies to the policy of every step kind (PPO's critic keeps dense gradients).
    sparse_embedding_grad: Literal["auto"] | bool = "auto"
    # glibc only: blocks of 1 MiB or more go straight back to the OS when freed (trainer/host_memory.py); lowers
    # the host process's peak memory. A process-wide malloc setting.
    return_freed_host_memory: bool = True
    dataloader_num_workers: NonNegative = 0
    # A DeepSpeed JSON config (ZeRO stage, offload...). Lets `torchrun -m prefopt train` use DeepSpeed without an
    # accelerate config; under `accelerate launch` with a DeepSpeed config, leave it unset.
    deepspeed: Optional[str] = None
    # Upload final/ (model, tokenizer, model card) to the Hub repository hub_model_id when training ends.
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None  # "user/name" or "org/name"
    hub_private: bool = True  # a new repository is created private

    @model_validator(mode="before")
    @classmethod
    def _yaml_no(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False: `mixed_precision: no` (file or override) means the string "no".
        if isinstance(data, dict) and data.get("mixed_precision") is False:
            data = {**data, "mixed_precision": "no"}
        return data

    @model_validator(mode="after")
    def _check_push(self) -> TrainConfig:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError(
                "train.push_to_hub: set train.hub_model_id to the Hub repository, e.g. "
                "train.hub_model_id=your-name/tiny-dpo"
            )
        if self.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise ValueError(
                "train.push_to_hub: HF_HUB_OFFLINE is set, so nothing could be uploaded; run with "
                "HF_HUB_OFFLINE=0 (the Makefile sets 1), or drop train.push_to_hub and upload final/ "
                "later with `hf upload`"
            )
        return self


class GenerationConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    temperature: PositiveFloat = 1.0
    top_p: Probability = 1.0
    top_k: NonNegative = 0
    max_new_tokens: Positive = 64
    batch_size: Positive = 32
    # hf backend: "lean" = prefopt's sampling loop (generation/decode.py; same samples as model.generate, less
    # Python per token), "generate" = model.generate.
    hf_loop: Literal["lean", "generate"] = "lean"
    gpu_memory_utilization: Probability = 0.3
    vllm_sleep: bool = True
    vllm_max_model_len: Optional[Positive] = None


class RewardConfig(_Section):
    kind: Literal["none", "model", "function", "implicit", "judge"] = "none"
    name_or_path: Optional[str] = None  # reward model (kind=model)
    function: Optional[str] = None  # "module:callable" (kind=function or judge)
    policy: Optional[str] = None  # implicit reward: trained DPO policy
    reference: Optional[str] = None  # implicit reward: its reference
    beta: PositiveFloat = 0.1
    token_level: bool = False
    missing_eos_penalty: Optional[float] = None
    normalize: Literal["none", "batch", "running"] = "none"
    batch_size: Positive = 32
    max_length: Positive = 1024
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # reward / implicit-reward models
    trust_remote_code: bool = False


class IterationsConfig(_Section):
    """DNO-style iterations (prefopt/iterative/run.py): ``count > 0`` turns ``prefopt train`` into T rounds of
    sample -> score -> large-margin pairs -> one-epoch training against the previous iterate."""

    count: int = Field(0, ge=0)  # T; 0 = an ordinary single run
    prompts: Optional[str] = None  # prompt rows; sft / pair / rated rows also give a gold answer
    partition: bool = True  # each iteration its own disjoint share of the prompts (the paper's setup)
    samples_per_prompt: int = Field(5, ge=1)  # K samples from the current policy (generation.* sets sampling)
    include_gold: bool = True  # add the row's answer as a candidate when it has one
    min_positive_score: Optional[float] = None  # paper: 5 on its 6-point scale
    gold_margin: float = Field(0.0, ge=0)  # paper: 2 (a gold positive must beat its negative by this much)
    student_margin: float = Field(0.0, ge=0)  # paper: 1 (a sampled positive)
    replay: list[float] = Field(default_factory=lambda: [0.3, 0.15])  # share of pairs from t-1, t-2, ...
    # Automatic negatives (the paper's "samples with many repeated n-grams"): a sample whose share of repeated
    # word n-grams exceeds this is never a positive and is the negative of every positive, margins aside.
    repetition_negative: Optional[float] = Field(None, gt=0, lt=1)  # None: off
    repetition_ngram: int = Field(3, ge=1)  # n of those n-grams
    # Return the best of pi_1..pi_{T+1} on validation prompts (Alg. 2's last line) instead of the last iterate.
    validation: Optional[str] = None  # prompt rows; required by select_best
    validation_samples: int = Field(2, ge=1)  # samples per validation prompt and iterate
    select_best: bool = False


class PPOConfig(_Section):
    """The ``ppo`` step kind (RTO, PPO): prompts per rollout, passes over them, critic and DPO-policy locations.

    Each optimizer update accumulates ``train.gradient_accumulation_steps`` micro-batches of ``minibatch_size``
    rollouts; ``rollout_batch_size`` must be a multiple of ``minibatch_size * gradient_accumulation_steps``."""

    rollout_batch_size: Positive = 16  # prompts per rollout (per device)
    epochs: Positive = 1  # passes over each rollout batch (the RTO authors' released script: 1)
    minibatch_size: Positive = 8  # rollouts per forward/backward (micro-batch)
    dpo_policy: Optional[str] = None  # stage-1 DPO model (RTO token rewards)
    dpo_adapter: Optional[str] = None  # the DPO policy as a LoRA adapter on the policy's base model
    critic: Optional[str] = None  # default: reward.name_or_path, else the policy with a fresh value head
    # The critic's own learning rate (None: train.learning_rate). The RTO release used 9e-6 against the actor's 5e-7.
    critic_learning_rate: Optional[NonNegativeFloat] = None
    adaptive_kl_target: Optional[PositiveFloat] = None  # None: fixed kl_coef
    adaptive_kl_horizon: Positive = 10000
    whiten_advantages: bool = True


class LoggingConfig(_Section):
    logging_steps: Positive = 1
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=list)
    sample_steps: Optional[NonNegative] = 10  # None or 0: no samples.jsonl
    progress: bool = True
    run_name: Optional[str] = None  # trackers' run name; default: the output directory's name
    project: str = "prefopt"  # the wandb project


class Config(_Section):
    seed: NonNegative = 42
    output_dir: str = "runs/prefopt"
    overwrite_output_dir: bool = False
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    iterations: IterationsConfig = Field(default_factory=IterationsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_loss(self) -> Config:
        from prefopt.losses import available_losses, get_loss

        if self.loss.name not in available_losses():
            raise ValueError(
                f"loss.name: unknown loss '{self.loss.name}'; valid: {', '.join(available_losses())}"
            )
        try:
            loss = get_loss(self.loss.name, **self.loss.params())
        except (TypeError, ValueError) as error:
            raise ValueError(f"loss: {error}") from None
        # Every parameter with its resolved value (defaults included), so config.yaml reproduces the run even
        # if a default changes later. Set on the extras directly: assigning the section would re-validate.
        self.loss.__pydantic_extra__ = dict(loss.hyperparameters())
        if "reference" in loss.needs and self.reference.mode == "none":
            raise ValueError(
                f"reference.mode: loss '{self.loss.name}' needs a reference model; "
                "use reference.mode=auto, model, adapter or precomputed"
            )
        if "online" in loss.needs and self.reference.mode == "precomputed":
            raise ValueError(
                f"reference.mode: loss '{self.loss.name}' scores fresh samples with the reference, so it "
                "needs a live one; use reference.mode=model or adapter"
            )
        if "mismatched" in loss.needs and self.reference.mode == "precomputed":
            raise ValueError(
                f"reference.mode: loss '{self.loss.name}' scores each prompt with another row of its batch, "
                "pairs that change with every batch, so it needs a live reference; use reference.mode=model "
                "or adapter"
            )
        self._check_reward_needs(loss)
        self._check_reference_sync(loss)
        if self.reference.mode == "adapter" and self.model.peft is None:
            raise ValueError(
                "reference.mode=adapter needs LoRA on the policy: set model.peft (e.g. model.peft.r=8)"
            )
        if self.generation.backend == "vllm":
            _check_vllm_available()
        attn = self.model.attn_implementation or ""
        if attn.startswith("flash") and (self.model.dtype == "float32" or self.train.mixed_precision == "no"):
            raise ValueError(
                f"model.attn_implementation: {attn} takes only bf16/fp16 queries, and the reference "
                "forward and generation run outside autocast; set model.dtype=bfloat16 (trainable "
                "weights stay fp32 for AdamW) with train.mixed_precision=bf16, or "
                "model.attn_implementation=sdpa"
            )
        if self.iterations.count:
            _check_iterations(self, loss)
        return self

    def _check_reference_sync(self, loss) -> None:
        """TR-DPO mixes the policy into a reference model: only a live, separate reference model can follow."""
        if self.reference.sync_steps is None:
            return
        mode = self.resolved_reference_mode()
        why = {
            "none": f"loss '{self.loss.name}' uses no reference, so there is nothing to sync",
            "precomputed": "a precomputed reference is fixed (its cached logps would go stale); "
            "use reference.mode=model",
            "adapter": "the adapter reference is the LoRA policy with adapters off, not a second model to move; "
            "TR-DPO needs full fine-tuning (drop model.peft) with reference.mode=model",
        }
        if mode in why:
            raise ValueError(f"reference.sync_steps: {why[mode]}; or drop reference.sync_steps")
        if self.model.peft is not None:
            raise ValueError(
                "reference.sync_steps: a LoRA policy cannot be mixed into a full reference model parameter by "
                "parameter; TR-DPO needs full fine-tuning (drop model.peft) or drop reference.sync_steps"
            )

    def _check_reward_needs(self, loss) -> None:
        """What the loss declares it needs from the reward layer and the PPO section, checked before any run."""
        kind, name = self.reward.kind, self.loss.name
        if "reward" in loss.needs and kind in ("none", "judge"):
            raise ValueError(
                f"reward.kind: loss '{name}' needs a scalar reward per sample, got '{kind}'; use "
                "reward.kind=model, function or implicit"
            )
        if "preference" in loss.needs and kind == "none":
            raise ValueError(
                f"reward.kind: loss '{name}' orders its online samples with the reward layer; set "
                "reward.kind=judge (pairwise) or model, function, implicit (scores)"
            )
        if "dpo_policy" in loss.needs and not (self.ppo.dpo_policy or self.ppo.dpo_adapter):
            raise ValueError(
                f"ppo.dpo_policy: loss '{name}' needs the stage-1 DPO model (or ppo.dpo_adapter with "
                "LoRA); loss.dpo_reward_scale=0 runs plain PPO with the sparse reward instead"
            )

    def resolved_reference_mode(self) -> str:
        from prefopt.losses import get_loss

        if self.reference.mode != "auto":
            return self.reference.mode
        # the instance's needs: a mixture needs what its parts need
        if "reference" not in get_loss(self.loss.name, **self.loss.params()).needs:
            return "none"
        return "adapter" if self.model.peft is not None else "model"


def _check_iterations(config: Config, loss) -> None:
    it = config.iterations
    if not it.prompts:
        raise ValueError("iterations.prompts: the prompt file each iteration samples from is required")
    # Every iteration writes pairs with both scores, so score-aware pair losses (dno_soft, copg) train too.
    if loss.step not in ("pairs", "scored_pairs"):
        raise ValueError(
            f"iterations: each iteration trains a pairwise loss on its scored pairs (e.g. loss.name=dpo, as "
            f"DNO-Prct does, or dno_soft); loss '{config.loss.name}' runs a '{loss.step}' step"
        )
    if config.reward.kind == "none":
        raise ValueError(
            "reward.kind: iterations score their samples; set reward.kind=model, function, implicit or "
            "judge (a judge function returning P(a beats b))"
        )
    if config.reference.mode == "adapter":
        raise ValueError(
            "reference.mode=adapter: iterations refresh the reference to the previous iterate's saved "
            "model; use reference.mode=model or precomputed"
        )
    if config.train.num_epochs > 1 or config.train.max_steps:
        raise ValueError(
            "train.num_epochs: DNO trains each iteration for at most one epoch (train.num_epochs <= 1, "
            "no train.max_steps)"
        )
    if any(not 0 <= share <= 1 for share in it.replay):
        raise ValueError(f"iterations.replay: shares must lie in [0, 1], got {it.replay}")
    if it.select_best and not it.validation:
        raise ValueError(
            "iterations.select_best: choosing the best iterate needs validation prompts; set "
            "iterations.validation=FILE (prompt rows not used for training)"
        )


def _check_vllm_available() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        why = (
            "vLLM is not installed" if importlib.util.find_spec("vllm") is None else "no CUDA GPU is visible"
        )
        raise ValueError(
            f"generation.backend: 'vllm' needs vLLM and a GPU ({why}); install prefopt[vllm] on a GPU machine "
            "or use generation.backend=hf"
        )


# --------------------------------------------------------------------------------------------------------------
# Loading, overrides, saving
# --------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"loss.beta=0.1"`` -> (["loss", "beta"], 0.1). Values are YAML scalars (``null``, ``true``, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. loss.beta=0.1")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key part in '{key}'")
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            section = _section_for(item["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else ""
            lines.append(f"{key}: unknown key" + (f"; valid keys here: {valid}" if valid else ""))
        elif kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: invalid value {item.get('input')!r}; valid: {expected}")
        elif kind == "value_error":
            lines.append(str(item["msg"]).removeprefix("Value error, "))
        elif kind in _RANGE_ERRORS:
            key = _field_key(item["loc"])
            lines.append(f"{key}: {item.get('input')!r} is out of range; valid: {_valid_range(item['loc'])}")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    lines = list(dict.fromkeys(lines))  # a union reports each member's failure; say it once
    return f"{source}: invalid config\n  " + "\n  ".join(lines)


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _field_loc(loc: tuple) -> tuple:
    """The part of an error location that names a field (pydantic appends union member tags like ``int``)."""
    for end in range(len(loc), 0, -1):
        section = _section_for(loc[: end - 1])
        if section is not None and str(loc[end - 1]) in section.model_fields:
            return tuple(loc[:end])
    return tuple(loc)


def _field_key(loc: tuple) -> str:
    return ".".join(str(part) for part in _field_loc(loc))


def _valid_range(loc: tuple) -> str:
    """``> 0``, ``>= 0``, ``[0, 1)``... from the field's constraints (every member of an Optional/union)."""
    import annotated_types

    field_loc = _field_loc(loc)
    section = _section_for(field_loc[:-1])
    field = section.model_fields[str(field_loc[-1])] if section is not None else None
    bounds: dict[str, Any] = {}

    def collect(annotation: Any, metadata: list) -> None:
        for item in metadata:
            if hasattr(item, "metadata") and isinstance(item.metadata, list):  # a FieldInfo inside Annotated
                collect(None, item.metadata)
            for name in ("gt", "ge", "lt", "le"):
                if isinstance(item, getattr(annotated_types, name.capitalize())):
                    bounds[name] = getattr(item, name)
        for arg in getattr(annotation, "__args__", ()) or ():
            collect(arg, list(getattr(arg, "__metadata__", ())))

    if field is not None:
        collect(field.annotation, list(field.metadata))
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds['ge']}" if "ge" in bounds else None
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds['le']}]" if "le" in bounds else None
    if low and high:
        return f"{low}, {high}"
    if low:
        return f"> {bounds['gt']}" if "gt" in bounds else f">= {bounds['ge']}"
    if high:
        return f"< {bounds['lt']}" if "lt" in bounds else f"<= {bounds['le']}"
    return "see the schema"


def _section_for(loc: tuple) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path | None, overrides: Optional[list[str]] = None) -> Config:
    """Read a recipe (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            data = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = drop_foreign_loss_parameters(data, apply_overrides(data, overrides or []), overrides or [])
    return config_from_dict(data, source)


def drop_foreign_loss_parameters(
    recipe: dict[str, Any], data: dict[str, Any], overrides: list[str]
) -> dict[str, Any]:
    """Swapping the loss with ``loss.name=X``: drop the recipe's loss parameters that X does not take.

    One warning line names them. A parameter given on the command line is kept whatever the loss, so a
    parameter X does not take still fails validation (exit 2): only the recipe's leftovers are forgiving.
    """
    from prefopt.losses import available_losses, loss_parameters

    section = data.get("loss")
    if not isinstance(section, dict) or not isinstance(recipe.get("loss"), dict):
        return data
    try:
        name = LossConfig.model_validate(section).name
    except ValidationError:
        return data  # the validator reports it with the key
    if name not in available_losses():
        return data  # the validator names the unknown loss
    from_command_line = {
        path[1] for path, _ in map(parse_override, overrides) if len(path) >= 2 and path[0] == "loss"
    }
    valid = loss_parameters(name)
    foreign = [
        key
        for key in section
        if key != "name" and key not in valid and key not in from_command_line and key in recipe["loss"]
    ]
    if not foreign:
        return data
    logger.warning(
        "loss '%s' does not take the recipe's loss parameter(s) %s: dropped",
        name,
        ", ".join(f"{key}={section[key]!r}" for key in foreign),
    )
    data = copy.deepcopy(data)
    for key in foreign:
        del data["loss"][key]
    return data


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config_to_yaml(config))
    tmp.replace(path)
