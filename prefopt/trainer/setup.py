"""Builds what a run needs from a Config: accelerator, policy, reference, data, generator, reward, optimizer."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import torch

from prefopt.config import Config
from prefopt.losses import get_loss
from prefopt.models.loading import (
    load_frozen_causal_lm,
    load_policy,
    load_tokenizer,
    model_identity,
    resolve_dtype,
)
from prefopt.models.logps import CompletionLogpModel
from prefopt.models.reference import (
    AdapterReference,
    ModelReference,
    NoReference,
    PrecomputedReference,
    cache_key,
    precompute_table,
)
from prefopt.trainer.distributed import launched_world_size
from prefopt.trainer.trackers import build_trackers

logger = logging.getLogger(__name__)


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    precision = config.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = build_trackers(config)
    plugin = None
    if config.train.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        from prefopt.errors import ConfigError

        if not Path(config.train.deepspeed).is_file():
            raise ConfigError(f"train.deepspeed: DeepSpeed config '{config.train.deepspeed}' not found")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.deepspeed: DeepSpeed is not installed; pip install 'prefopt[deepspeed]'")
        plugin = DeepSpeedPlugin(hf_ds_config=config.train.deepspeed)
    from prefopt.trainer.distributed import (
        accelerator_process_kwargs,
        build_cpu_fsdp_state,
        fresh_accelerator_state,
        fsdp_plugin,
    )

    fresh_accelerator_state()
    extra = accelerator_process_kwargs(use_deepspeed=plugin is not None)
    fsdp = None if plugin is not None else fsdp_plugin(precision)
    if extra.get("cpu") and fsdp is not None:
        build_cpu_fsdp_state(precision, fsdp)
    handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=False),
        *extra.pop("kwargs_handlers", []),
    ]
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp,
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        # The loop steps the scheduler once per optimizer step itself; accelerate's default would step it once per
        # process and change the schedule with the number of devices.
        step_scheduler_with_optimizer=False,
        log_with=trackers or None,
        project_dir=config.output_dir,
        kwargs_handlers=handlers,
        **extra,
    )
    launched = launched_world_size()
    if launched != accelerator.num_processes:
        # Seen with DeepSpeed on CPU under torchrun: every rank believes it is alone and they overwrite each other.
        from prefopt.errors import ConfigError

        raise ConfigError(
            f"the launcher started {launched} processes but accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); refusing to train N copies "
            "side by side; launch with torchrun or accelerate launch without --cpu"
        )
    if plugin is not None and accelerator.state.deepspeed_plugin is None:
        logger.warning(
            "train.deepspeed is set but accelerate runs %s without DeepSpeed (e.g. ACCELERATE_USE_CPU=1): "
            "training proceeds without ZeRO",
            accelerator.distributed_type,
        )
    _fill_deepspeed_autos(accelerator, config)
    set_seed(config.seed, device_specific=False)
    return accelerator, trackers


def _fill_deepspeed_autos(accelerator, config: Config) -> None:
    """DeepSpeed needs the micro-batch size (and clipping) before ``prepare``; the recipe knows them."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", config.train.per_device_batch_size),
        ("gradient_accumulation_steps", config.train.gradient_accumulation_steps),
        ("gradient_clipping", config.train.max_grad_norm or 0.0),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from micro batch x accumulation x world size


def load_sequence_classifier(config: Config):
    from transformers import AutoModelForSequenceClassification

    from prefopt.models.loading import _check_exists, disable_dropout

    _check_exists(config.model.name_or_path, "model.name_or_path")
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model.name_or_path,
        num_labels=1,
        dtype=resolve_dtype(config.model.dtype),
        use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code,
        revision=config.model.revision,
    )
    disable_dropout(model)
    return model


def build_policy(config: Config, model_kind: str, tokenizer) -> torch.nn.Module:
    if model_kind == "sequence_classifier":
        model = load_sequence_classifier(config)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model
    return CompletionLogpModel(
        load_policy(config.model),
        chunk_size=config.train.logps_chunk_size,
        head_impl=config.train.logps_head,
        share_prompt=config.train.share_prompt,
    )


def build_reference(config: Config, policy_getter, accelerator=None, root_getter=None) -> Any:
    """The reference of ``reference.mode``; a frozen model goes through ``prepare_frozen`` (ZeRO-3 engine).

    ``root_getter``: the prepared policy when it is an FSDP2 root (the adapter reference runs through it)."""
    mode = config.resolved_reference_mode()
    chunk = config.train.logps_chunk_size
    if mode == "none":
        return NoReference()
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    if mode == "adapter":
        return AdapterReference(
            policy_getter,
            chunk,
            autocast,
            share_prompt=config.train.share_prompt,
            get_sharded_root=root_getter,
        )
    path = config.reference.name_or_path or config.model.name_or_path
    model = load_frozen_causal_lm(path, config.model, key="reference.name_or_path")
    if accelerator is not None:
        from prefopt.trainer.distributed import prepare_frozen

        model = prepare_frozen(accelerator, model, "the reference")
    if config.reference.sync_steps is not None:  # TR-DPO: the reference follows the policy
        from prefopt.models.reference_sync import SyncedModelReference

        return SyncedModelReference(
            model,
            chunk,
            autocast,
            share_prompt=config.train.share_prompt,
            sync_steps=config.reference.sync_steps,
            sync_mix=config.reference.sync_mix,
        )
    return ModelReference(model, chunk, autocast, share_prompt=config.train.share_prompt)


def precompute_reference(
    config: Config, accelerator, live_reference, bundle, collator
) -> PrecomputedReference:
    """Fill the on-disk cache of reference logps (train and eval splits), then drop the live model."""
    from prefopt.losses.modifiers import LENGTH_TAILS

    tails = LENGTH_TAILS in loss_from_config(config).needs  # LD-DPO: cache the reference tails too
    path = config.reference.name_or_path or config.model.name_or_path
    identity = model_identity(path)
    cache_dir = Path(config.reference.cache_dir or Path(config.output_dir).parent / ".prefopt_cache")
    tables = {}
    for split, dataset in (("train", bundle.train), ("eval", bundle.eval)):
        if dataset is None:
            continue
        key = cache_key(
            identity,
            f"{bundle.fingerprint}:{split}" + (":tails" if tails else ""),
            f"{config.model.dtype}/{accelerator.mixed_precision}",
            config.train.logps_chunk_size,
        )
        cache_file = cache_dir / f"reference-{key}.safetensors"
        tables[split] = precompute_table(
            live_reference,
            dataset,
            collator,
            cache_file=cache_file,
            accelerator=accelerator,
            batch_size=config.reference.batch_size,
            tails=tails,
        )
        if accelerator.is_main_process:
            logger.info("reference logps for %s split: %s", split, cache_file)
    return PrecomputedReference(tables)


def build_optimizer(config: Config, model: torch.nn.Module, total_steps: int):
    """AdamW for ``model``'s trainable parameters and its learning-rate schedule."""
    optimizer = build_adamw(config, model)
    return optimizer, build_scheduler(config, optimizer, total_steps)


def build_adamw(config: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights, and biases / normalisation weights without weight decay."""
    from prefopt.trainer.distributed import ensure_fp32_master_weights

    ensure_fp32_master_weights(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    skip = no_weight_decay_names(model)
    decay = [p for name, p in named if name not in skip]
    no_decay = [p for name, p in named if name in skip]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.train.learning_rate,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        eps=config.train.adam_epsilon,
        fused=config.train.fused_optimizer and all(_fusable(p) for p in params) or None,
    )


def build_scheduler(config: Config, optimizer, total_steps: int):
    """``train.lr_scheduler`` with its warmup over ``total_steps`` optimizer updates (every group follows it)."""
    from transformers import get_scheduler

    warmup = config.train.warmup_steps
    if warmup is None:
        warmup = math.ceil(config.train.warmup_ratio * total_steps)
    return get_scheduler(
        config.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: biases and normalisation weights.

    Decided by name and module type, never by ``p.ndim``: under DeepSpeed's ``zero.Init`` (ZeRO-3) every parameter
    is an empty 1-D partition, and a shape test would put all of them in the no-decay group.
    """
    names = set()
    for module_name, module in model.named_modules():
        is_norm = (
            isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))
            or "norm" in type(module).__name__.lower()
        )
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _fusable(parameter: torch.Tensor) -> bool:
    return parameter.is_floating_point() and parameter.device.type in ("cpu", "cuda")


def loss_from_config(config: Config):
    return get_loss(config.loss.name, **config.loss.params())


def load_run_tokenizer(config: Config):
    return load_tokenizer(
        config.model.name_or_path,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
    )


def write_run_info(accelerator, output_dir: Path, config: Config) -> None:
    """``run_info.json``: how the run was launched (world size, precision, device, versions) for reproducibility."""
    import json
    import platform

    import accelerate
    import transformers

    if not accelerator.is_main_process:
        return
    info = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "loss": config.loss.name,
        "reference_mode": config.resolved_reference_mode(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
    }
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
