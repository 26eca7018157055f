"""Loading policies, references and tokenizers from a local path or a hub name.

Safe by default: safetensors weights only, ``trust_remote_code`` off unless the recipe turns it on. The same code
path takes a directory (offline, ``HF_HUB_OFFLINE=1``) or a hub id (for users with a network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from prefopt.config import ModelConfig, PeftConfig
from prefopt.errors import ConfigError

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors is a transformers dependency
    SafetensorError = OSError

# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` picks bf16 on GPUs that support it and fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _check_exists(name_or_path: str, key: str) -> None:
    """A path-looking name that does not exist is a user error, not a hub lookup that fails offline later."""
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") > 1
    )
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"{key}: model path '{name_or_path}' does not exist")


def load_tokenizer(
    name_or_path: str,
    *,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    key: str = "model.name_or_path",
):
    from transformers import AutoTokenizer

    _check_exists(name_or_path, key)
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: '{name_or_path}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}...); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(path)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (
        OSError,
        ValueError,
        KeyError,
    ) as error:  # transformers raises ValueError for unusable tokenizer files
        raise ConfigError(
            f"{key}: cannot load a tokenizer from '{name_or_path}': {_first_line(error)}"
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out explicitly everywhere (completion masks), so reusing EOS as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, model_cfg: ModelConfig, *, key: str = "model.name_or_path", for_training: bool = True
):
    """An ``AutoModelForCausalLM`` with the recipe's dtype and attention implementation, dropout disabled.

    Dropout is off in the policy and the reference (docs/losses.md, Conventions): with it on,
    policy == reference would not give DPO's ln 2 at step 0, and the implicit reward would be noisy.
    """
    from transformers import AutoModelForCausalLM

    _check_exists(name_or_path, key)
    kwargs = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=resolve_dtype(model_cfg.dtype),
        use_safetensors=True,
    )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as error:  # missing/unknown files, unknown architecture, cut file
        raise ConfigError(
            f"{key}: cannot load a causal LM from '{name_or_path}': {_first_line(error)}"
        ) from None
    disable_dropout(model)
    if for_training and model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def apply_lora(model, peft_cfg: PeftConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=peft_cfg.target_modules,
        bias=peft_cfg.bias,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if getattr(model, "is_gradient_checkpointing", False):
        peft_model.enable_input_require_grads()
    return peft_model


def load_policy(model_cfg: ModelConfig):
    model = load_causal_lm(model_cfg.name_or_path, model_cfg)
    if model_cfg.peft is not None:
        model = apply_lora(model, model_cfg.peft)
    return model


def load_frozen_causal_lm(name_or_path: str, model_cfg: ModelConfig, *, key: str):
    model = load_causal_lm(name_or_path, model_cfg, key=key, for_training=False)
    model.eval()
    model.requires_grad_(False)
    return model


def model_identity(name_or_path: str) -> str:
    """A string that changes when the weights at ``name_or_path`` change (for cache keys), without hashing GBs."""
    path = Path(name_or_path)
    if not path.exists():
        return f"hub:{name_or_path}"
    parts = [str(path.resolve())]
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)
