"""Typed recipe schema, YAML loading and dotted ``key=value`` overrides.

A recipe is a YAML file whose sections mirror the classes below. Command-line overrides use dotted keys
(``loss.name=simpo loss.beta=2.0 train.max_steps=10``); values are parsed as YAML scalars. Every unknown key,
wrong type and invalid choice raises :class:`~prefopt.errors.ConfigError` naming the key and the valid options.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PeftConfig(_Section):
    """LoRA adapters through ``peft`` (set ``model.peft`` to enable)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
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
    batch_size: int = 16


class DataConfig(_Section):
    train: Optional[str] = None
    eval: Optional[str] = None
    format: Literal["auto", "pairs", "conversational", "hh", "rated", "prompts", "sft"] = "auto"
    split: str = "train"  # split name for hub datasets / saved DatasetDicts
    eval_split: Optional[str] = None  # split of the same source used for eval
    eval_size: float | int = 0  # carve eval out of train: fraction (<1) or row count
    max_samples: Optional[int] = None
    shuffle: bool = True
    max_length: int = 512
    max_prompt_length: int = 256
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    chat_template: Optional[str] = None
    on_invalid: Literal["error", "skip"] = "error"
    rated_pairs: Literal["best_worst", "all"] = "best_worst"
    rated_min_gap: float = 0.0
    curriculum: bool = False  # rated pairs ordered easy-to-hard by score gap (Curry-DPO)
    num_proc: Optional[int] = None
    packing: bool = False  # padding-free packing of pairs (pays off with varlen flash attention on GPUs)
    group_by_length: bool = False  # batches of similar-length pairs: less padding (changes which pairs share a step)


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
    learning_rate: float = 5e-7
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    num_epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides num_epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    eval_batch_size: Optional[int] = None
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = 2
    resume_from: Optional[str] = None  # "latest" or a checkpoint path
    max_skipped_steps: int = 5
    logps_chunk_size: Optional[int] = 1024  # positions per lm-head/log-softmax chunk; None = one pass
    logps_head: Literal["fused", "checkpoint"] = "fused"  # chunked lm-head implementation (models/logps.py)
    fused_optimizer: bool = True  # torch's fused AdamW (fewer temporaries: lower peak memory, faster)
    # Sparse input-embedding gradients with an exactly equal AdamW step (trainer/sparse_embedding.py): no dense
    # [vocab, hidden] gradient during the backward. "auto" = on for single-process runs with an untied embedding.
    # Applies to the main loop (offline losses, HyPO, XPO, SFT, reward model); RTO's PPO stage keeps dense grads.
    sparse_embedding_grad: Literal["auto"] | bool = "auto"
    # glibc only: blocks of 1 MiB or more go straight back to the OS when freed (trainer/host_memory.py); lowers
    # the host process's peak memory. A process-wide malloc setting.
    return_freed_host_memory: bool = True
    dataloader_num_workers: int = 0
    # A DeepSpeed JSON config (ZeRO stage, offload...). Lets `torchrun -m prefopt train` use DeepSpeed without an
    # accelerate config; under `accelerate launch` with a DeepSpeed config, leave it unset.
    deepspeed: Optional[str] = None


class GenerationConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 32
    gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = True
    vllm_max_model_len: Optional[int] = None


class RewardConfig(_Section):
    kind: Literal["none", "model", "function", "implicit", "judge"] = "none"
    name_or_path: Optional[str] = None  # reward model (kind=model)
    function: Optional[str] = None  # "module:callable" (kind=function or judge)
    policy: Optional[str] = None  # implicit reward: trained DPO policy
    reference: Optional[str] = None  # implicit reward: its reference
    beta: float = 0.1
    token_level: bool = False
    missing_eos_penalty: Optional[float] = None
    normalize: Literal["none", "batch", "running"] = "none"
    batch_size: int = 32
    max_length: int = 1024
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # reward / implicit-reward models
    trust_remote_code: bool = False


class PPOConfig(_Section):
    """The PPO step used by RTO: rollouts per step, passes over them, critic and DPO-policy locations."""

    rollout_batch_size: int = 16  # prompts per rollout (per device)
    epochs: int = 2
    minibatch_size: int = 8
    dpo_policy: Optional[str] = None  # stage-1 DPO model (RTO token rewards)
    dpo_adapter: Optional[str] = None  # the DPO policy as a LoRA adapter on the policy's base model
    critic: Optional[str] = None  # default: reward.name_or_path, else the policy with a fresh value head
    critic_learning_rate: Optional[float] = None
    adaptive_kl_target: Optional[float] = None  # None: fixed kl_coef
    adaptive_kl_horizon: int = 10000
    whiten_advantages: bool = True


class LoggingConfig(_Section):
    logging_steps: int = 1
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=list)
    sample_steps: Optional[int] = 10
    progress: bool = True
    run_name: Optional[str] = None


class Config(_Section):
    seed: int = 42
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
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_loss(self) -> "Config":
        from prefopt.losses import available_losses, get_loss

        if self.loss.name not in available_losses():
            raise ValueError(f"loss.name: unknown loss '{self.loss.name}'; valid: {', '.join(available_losses())}")
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
            raise ValueError(f"reference.mode: loss '{self.loss.name}' scores fresh samples with the reference, so it "
                             "needs a live one; use reference.mode=model or adapter")
        if self.reference.mode == "adapter" and self.model.peft is None:
            raise ValueError("reference.mode=adapter needs LoRA on the policy: set model.peft (e.g. model.peft.r=8)")
        if self.generation.backend == "vllm":
            _check_vllm_available()
        return self

    def resolved_reference_mode(self) -> str:
        from prefopt.losses import get_loss

        if self.reference.mode != "auto":
            return self.reference.mode
        # the instance's needs: a mixture needs what its parts need
        if "reference" not in get_loss(self.loss.name, **self.loss.params()).needs:
            return "none"
        return "adapter" if self.model.peft is not None else "model"


def _check_vllm_available() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        why = "vLLM is not installed" if importlib.util.find_spec("vllm") is None else "no CUDA GPU is visible"
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
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return f"{source}: invalid config\n  " + "\n  ".join(lines)


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


def drop_foreign_loss_parameters(recipe: dict[str, Any], data: dict[str, Any], overrides: list[str]
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
    from_command_line = {path[1] for path, _ in map(parse_override, overrides) if len(path) >= 2
                         and path[0] == "loss"}
    valid = loss_parameters(name)
    foreign = [key for key in section if key != "name" and key not in valid and key not in from_command_line
               and key in recipe["loss"]]
    if not foreign:
        return data
    logger.warning("loss '%s' does not take the recipe's loss parameter(s) %s: dropped", name,
                   ", ".join(f"{key}={section[key]!r}" for key in foreign))
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
