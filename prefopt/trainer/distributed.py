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

FSDP2 on CPU: accelerate only turns a GPU-family multi-process state into FSDP (``accelerate/state.py``,
``AcceleratorState.__init__``: the ``ACCELERATE_USE_FSDP`` test sits inside ``elif self.distributed_type in
[MULTI_GPU, ...]``, which leaves out ``MULTI_CPU``; accelerate 1.15 lines 985-1016), so ``accelerate launch
--config_file recipes/accelerate/fsdp2.yaml`` on a CPU machine would train N unsharded copies with DDP. prefopt
builds that state itself (:func:`build_cpu_fsdp_state`): the gloo process group accelerate makes for ``MULTI_CPU``,
then the distributed type and FSDP plugin accelerate would have set on a GPU. Everything after that -- accelerate's
``fsdp2_prepare_model`` (``fully_shard`` per decoder layer, then the root), its gradient clipping, sharded
checkpoints and the gathered ``get_state_dict`` -- is the code a GPU user runs; only the process group differs.

Frozen models (the reference, a reward model, RTO's DPO scorer) are sharded like the policy under FSDP2
(:func:`shard_frozen_fsdp2`) and wrapped by a DeepSpeed engine in eval mode under ZeRO-3: accelerate registers
the DeepSpeed config with transformers, so every ``from_pretrained`` runs under ``zero.Init`` and leaves empty
parameter partitions that only an engine's hooks gather (the same idea as TRL's ``prepare_deepspeed`` in
``trl/models/utils.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
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


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(mixed_precision: str):
    """The FSDP plugin of an FSDP launch (None otherwise), with prefopt's mixed-precision policy under FSDP2.

    accelerate's default FSDP2 policy for bf16 (``accelerate/utils/dataclasses.py``,
    ``FullyShardedDataParallelPlugin.set_mixed_precision``) is ``param_dtype=reduce_dtype=output_dtype=bf16`` with no
    autocast: gradients are averaged across ranks in bf16, and the module's outputs -- prefopt's per-token logps --
    are rounded to bf16 (seen: a DPO step-0 loss of 0.6906 instead of ln 2 against a reference under autocast).
    prefopt keeps bf16 parameters for compute, reduces gradients in fp32 (as torchtitan does) and leaves the
    outputs alone; the policy's forward runs under autocast like the reference's (:func:`autocast_forward`).
    ``set_mixed_precision`` keeps a policy that is already set, so this one survives on GPUs and on CPU.
    """
    if not fsdp_requested():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if plugin.fsdp_version == 2 and dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None
        )
    return plugin


def autocast_forward(accelerator, model: torch.nn.Module) -> None:
    """Run ``model``'s forward under the accelerator's autocast, as ``prepare`` does for DDP models
    (``accelerator.py``, ``prepare_model``: ``model.forward = autocast_context(model_forward_func)``) but not for
    FSDP2 models (``_prepare_fsdp2``). FSDP2's hooks wrap the module call, so they still run around it."""
    if not accelerator.native_amp:
        return
    forward = model.forward

    def forward_under_autocast(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast


def build_cpu_fsdp_state(mixed_precision: str, plugin) -> None:
    """Set up accelerate's FSDP state on a CPU-only, multi-process launch, as accelerate does on GPUs.

    Must run before ``Accelerator(...)`` (which then finds the state initialised and keeps it). ``plugin`` is
    :func:`fsdp_plugin`'s, the one the ``Accelerator`` gets too; it gets the mixed precision the way
    ``AcceleratorState`` gives it on a GPU (``state.py`` 1013-1016).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, TorchDynamoPlugin

    state = AcceleratorState(
        mixed_precision=mixed_precision,
        cpu=True,
        dynamo_plugin=TorchDynamoPlugin(),  # what Accelerator() passes when no dynamo backend is asked for
        _from_accelerator=True,
    )
    if state.distributed_type != DistributedType.MULTI_CPU:  # e.g. one process: nothing to shard across
        return
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies its distributed type back into PartialState's shared dict (state.py, end of __init__).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


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


def prepare_frozen(accelerator, model: torch.nn.Module, what: str = "a frozen model") -> torch.nn.Module:
    """Put a frozen model (no optimizer, eval mode) where the run can call it.

    Under ZeRO-3 the model is wrapped by its own DeepSpeed engine, so its forward gathers the partitions that
    ``zero.Init`` left empty; under FSDP2 it is sharded like the policy (:func:`shard_frozen_fsdp2`). In both
    cases every rank must call it the same number of times. Elsewhere it is moved to the device. ZeRO stage 1/2
    shard nothing of a model without an optimizer, so a plain copy per rank is what DeepSpeed would hold anyway.
    ``what`` names the model in the log line ("the reference").
    """
    model.eval()
    model.requires_grad_(False)
    if getattr(accelerator, "is_fsdp2", False):
        return shard_frozen_fsdp2(accelerator, model, what)
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
    _FROZEN_ZERO3_ENGINES[:] = [ref for ref in _FROZEN_ZERO3_ENGINES if ref() is not None]  # drop freed ones
    _FROZEN_ZERO3_ENGINES.append(weakref.ref(engine))
    return engine


# Frozen models' ZeRO-3 engines (the reference, reward models), so generation can find the engine of a model it is
# handed (XPO samples from the reference): ``zero3_engine_holding``.
_FROZEN_ZERO3_ENGINES: list = []


def zero3_engine_holding(model: torch.nn.Module, accelerator=None):
    """The ZeRO-3 DeepSpeed engine whose module contains ``model`` (the policy's, or a frozen model's), or None."""
    candidates = []
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapper is not None:
        candidates.append(wrapper.engine)
    candidates.extend(ref() for ref in _FROZEN_ZERO3_ENGINES)
    for engine in candidates:
        module = getattr(engine, "module", None)
        if module is not None and any(m is model for m in module.modules()):
            return engine
    return None


@contextlib.contextmanager
def zero3_hooks_removed(engine) -> Iterator[None]:
    """Take a ZeRO-3 engine's module hooks off for the block and put them back after (call with the parameters
    gathered, e.g. inside ``deepspeed.zero.GatheredParameters``).

    The hooks belong to the engine's ``DeepSpeedZeRoOffload`` (``deepspeed/runtime/zero/parameter_offload.py``:
    ``forward_hooks`` / ``backward_hooks``, registered by ``_register_deepspeed_module``); a stage-3 optimizer holds
    it as ``parameter_offload``, an engine built without an optimizer (a frozen model) has it as its ``optimizer``.
    Re-registering on the root invalidates the prefetch trace, so the next training forward records a fresh one
    (DeepSpeed 0.19.8, ``_register_deepspeed_module``). TRL does the same around ``generate``
    (``trl/models/utils.py``, ``remove_hooks`` / ``add_hooks``)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "forward_hooks"):
        yield
        return
    for param in offload.module.parameters(recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)


def shard_frozen_fsdp2(accelerator, model: torch.nn.Module, what: str = "a frozen model") -> torch.nn.Module:
    """Shard a frozen model over the FSDP2 processes exactly as accelerate shards the policy.

    Without it every process holds a full copy of the reference (and of a reward model): for a 70B reference in
    bf16, 140 GB per GPU. accelerate's ``Accelerator.prepare`` refuses a model without an optimizer under FSDP2
    (``accelerate/accelerator.py``, ``_prepare_fsdp2``: "if we have a model, we also have an optimizer"), so this
    calls the function ``prepare`` calls, ``fsdp2_prepare_model`` (``accelerate/utils/fsdp_utils.py``): one
    ``fully_shard`` unit per decoder layer, the embedding, the tail (final norm + lm-head) and the root, with the
    run's mixed-precision policy and, with ``fsdp_cpu_ram_efficient_loading``, rank 0's weights broadcast. (TRL
    shards its reference the same way, with its own ``fully_shard`` calls: ``trl/models/utils.py``,
    ``prepare_fsdp``.) Its trainable-parameter fp32 upcast does not apply: nothing here requires grad, so the model
    keeps the dtype it was loaded in.

    Callers run inner modules (the decoder, then the lm-head in chunks; or ``generate``), not the root's forward,
    so the root is declared FSDP's root now (``prefopt/generation/fsdp.py``, ``initialise_root``): each unit's own
    hooks then gather its parameters for its forward and free them after, and generation gathers the whole model
    once per call (``gathered_parameters``)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    from prefopt.generation.fsdp import initialise_root

    model = fsdp2_prepare_model(accelerator, model)
    initialise_root(model)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    logger.info("FSDP2: %s is sharded in %d units over %d processes", what, units, accelerator.num_processes)
    return model


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


# accelerate's ``unwrap_model`` asks ``is_deepspeed_available()`` on every call, which looks the package up in the
# installed distributions each time (``accelerate/utils/imports.py``: ``_is_package_available``): 4-5 ms a call
# on the benchmark machine, three calls per online step, 15% of a tiny online DPO step (docs/performance.md). A
# prepared wrapper never changes what it wraps, so the answer is kept per wrapper (weakly: freed with it).
_UNWRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unwrapped(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``accelerator.unwrap_model(model)``, computed once per prepared wrapper."""
    inner = _UNWRAPPED.get(model)
    if inner is None:
        inner = _UNWRAPPED[model] = accelerator.unwrap_model(model)
    return inner
