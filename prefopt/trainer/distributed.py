"""How prefopt sets up distribution on top of accelerate: the process group, DeepSpeed on CPU, frozen models.

accelerate decides the distributed type from the environment. Two of its decisions are wrong for prefopt's users:

* ``torchrun --nproc_per_node 2 -m prefopt train ...`` on a machine without GPUs: accelerate 1.15 only builds a
  multi-CPU (gloo) state when it is told ``cpu=True`` (``accelerate/state.py``, ``PartialState._prepare_backend``:
  the ``MULTI_CPU`` branch needs ``cpu``); otherwise every rank sets up a one-process state and trains its own copy.
  The transformers Trainer passes ``cpu`` from ``use_cpu``; prefopt passes it when a multi-process launcher started
  it and there is no accelerator, so the README's command works as written.
* DeepSpeed on CPU: with ``cpu=True`` accelerate never selects DeepSpeed (``AcceleratorState.__init__``:
  ``ACCELERATE_USE_DEEPSPEED ... and not cpu``), and without it the backend is ``None`` and the state is one
  process (``PartialState.__init__``: ``if self.backend is None: ... num_processes = 1``). Passing the backend
  explicitly (``gloo``) keeps ``cpu=False``, lets DeepSpeed initialise the process group, and gives a DEEPSPEED
  state with the launcher's world size -- the same route the transformers Trainer takes with ``deepspeed=...``
  (``TrainingArguments._setup_devices`` sets ``ACCELERATE_USE_DEEPSPEED`` and builds ``PartialState`` itself).

Frozen models (the reference, a reward model, RTO's DPO scorer) are wrapped by a DeepSpeed engine in eval mode
under ZeRO-3: accelerate registers the DeepSpeed config with transformers, so every ``from_pretrained`` runs
under ``zero.Init`` and leaves empty parameter partitions that only an engine's hooks gather (the same idea as
TRL's ``prepare_deepspeed`` in ``trl/models/utils.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return 1


def has_accelerator() -> bool:
    """True when torch sees a GPU (or another device accelerate would pick over the CPU)."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def accelerator_process_kwargs(use_deepspeed: bool) -> dict[str, Any]:
    """Extra ``Accelerator(...)`` arguments that make a CPU-only, multi-process launch set up every process.

    Returns ``{}`` on machines with an accelerator and for single-process runs: accelerate's defaults are right.
    """
    from accelerate.utils import InitProcessGroupKwargs

    if has_accelerator() or launched_world_size() <= 1:
        return {}
    if not use_deepspeed:
        return {"cpu": True}
    disable_deepspeed_shm_kernel()
    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def disable_deepspeed_shm_kernel() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (``deepspeed/comm/torch.py``,
    ``build_shm_op``) when its process group starts: minutes with ninja and a C++ compiler, and a hang on a stale
    build lock. gloo performs the same collectives; DeepSpeed reads the op table that ``deepspeed.ops``
    caches (``deepspeed/ops/__init__.py``: "edits to it persist") and falls back when the op is not compatible.
    Set ``PREFOPT_DEEPSPEED_SHM=1`` to keep the kernel (faster CPU collectives once built)."""
    if os.environ.get("PREFOPT_DEEPSPEED_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_plugin(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None)


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the run (0 without DeepSpeed)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Put a frozen model (no optimizer, eval mode) where the run can call it.

    Under ZeRO-3 the model is wrapped by its own DeepSpeed engine, so its forward gathers the partitions that
    ``zero.Init`` left empty; every rank must then call it the same number of times. Elsewhere it is moved to the
    device. Stage 1/2 shard nothing of a model without an optimizer, so a plain copy per rank is what DeepSpeed
    would hold anyway.
    """
    model.eval()
    model.requires_grad_(False)
    if zero_stage(accelerator) != 3:
        return model.to(accelerator.device)
    import deepspeed

    ds = deepspeed_plugin(accelerator).deepspeed_config
    config = {
        "train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu", 1),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": ds.get("bf16", {"enabled": False}),
        "fp16": ds.get("fp16", {"enabled": False}),
    }
    if config["fp16"].get("enabled") == "auto":
        config["fp16"] = {"enabled": False}
    if config["bf16"].get("enabled") == "auto":
        config["bf16"] = {"enabled": False}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def frozen_module(model: torch.nn.Module) -> torch.nn.Module:
    """The ``nn.Module`` inside a frozen model's DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def engine_applied_step(accelerator) -> bool | None:
    """Whether DeepSpeed already applied this optimizer step (None without DeepSpeed).

    Under DeepSpeed accelerate's ``backward`` runs ``engine.step()`` itself (``accelerate/utils/deepspeed.py``,
    ``DeepSpeedEngineWrapper.backward``), so by the time the loop sees a non-finite gradient norm the update is
    done, unless DeepSpeed's own fp16 loss scaler skipped it (``DeepSpeedEngine.was_step_applied``).
    """
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapper is None:
        return None
    return bool(wrapper.engine.was_step_applied())


def ensure_fp32_master_weights(model: torch.nn.Module) -> int:
    """Upcast trainable half-precision parameters to fp32 (returns how many) when no engine keeps fp32 masters.

    AdamW on bf16 weights rounds every update to bf16: at lr 5e-7 a weight of magnitude ~0.01 has a bf16 spacing
    of ~6e-5, so 200 steps leave it exactly unchanged and training silently does nothing. DeepSpeed (bf16 enabled)
    and accelerate's FSDP keep fp32 master weights themselves; for DDP and single-device runs prefopt keeps the
    trainable parameters in fp32 and computes in bf16 under ``train.mixed_precision=bf16`` (autocast). Frozen
    parameters (a LoRA base model) stay in the dtype they were loaded in.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    if state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return 0
    count = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
            count += 1
    if count:
        logger.info(
            "%d trainable half-precision parameters kept in fp32 for AdamW (master weights); compute "
            "precision follows train.mixed_precision",
            count,
        )
    return count


def fresh_accelerator_state() -> None:
    """Forget the accelerate state a previous run in this process left behind (tests, notebooks, iterative rounds).

    accelerate keeps its state in process-wide singletons and refuses a second ``Accelerator`` with another mixed
    precision ("AcceleratorState has already been initialized and cannot be changed"). The transformers Trainer
    resets it the same way for every ``TrainingArguments`` (``training_args.py``, ``_setup_devices``:
    ``AcceleratorState._reset_state(reset_partial_state=True)``). The process-group part is kept while a
    process group is up: it cannot be initialised twice.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
