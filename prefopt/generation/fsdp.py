"""FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters for calls that bypass the root module.

accelerate's ``fsdp2_prepare_model`` shards each decoder layer, the input embedding and the tail (final norm +
lm-head) as their own groups and the prepared module (prefopt's ``CompletionLogpModel``) as the root. Training calls
the root's forward; HF ``generate`` runs the inner causal LM many times and never enters the root, so:

* if no root forward ran yet (an online step generates before its first policy forward), the first FSDP module
  ``generate`` reaches declares itself the root of the whole tree (``torch/distributed/fsdp/_fully_shard/
  _fsdp_state.py``, ``FSDPState._lazy_init``: "the 1st state to run forward" is the root), and the next real root
  forward fails with "FSDP requires running forward through the root module first";
* parameters the root group holds stay sharded ``DTensor``s in a plain module call ("got mixed torch.Tensor and
  DTensor" from ``F.embedding``, seen on 2 CPU processes with torch 2.13).

:func:`fsdp_full_parameters` initialises the real root first, then all-gathers every group once for the whole
call and keeps it gathered (``reshard_after_forward`` off for the duration), as the ZeRO-3 path gathers once for
generation (``prefopt/generation/hf.py``, ``gathered_parameters``): one all-gather per call instead of one per
layer per decoded token, and no rank can wait on another's decode step. It costs one full copy of the model's
parameters in the compute dtype while it lasts. Afterwards every group is resharded and gets back its own
reshard-after-forward setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def fsdp_root(model: torch.nn.Module, accelerator=None) -> torch.nn.Module | None:
    """The FSDP2 root that holds ``model`` (the prepared model itself, or the prepared model containing it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return None
    candidates = [
        model,
        *getattr(accelerator, "_models", []),
    ]  # accelerate keeps the prepared models in order
    for candidate in candidates:
        if isinstance(candidate, FSDPModule) and any(m is model for m in candidate.modules()):
            return candidate
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return model  # sharded, but no prepared root known: its own top FSDP modules act as roots
    return None


def initialise_root(root: torch.nn.Module) -> None:
    """Make ``root`` the FSDP root before any inner module runs a forward (see the module docstring)."""
    state = root._get_fsdp_state()
    state._lazy_init()  # no-op once a root forward has run


@contextlib.contextmanager
def fsdp_full_parameters(model: torch.nn.Module, accelerator=None) -> Iterator[bool]:
    """Gather every FSDP2 group under the root holding ``model`` for the block; yields whether anything was sharded.

    Every rank must enter the block (each group's all-gather is a collective), as under ZeRO-3."""
    root = fsdp_root(model, accelerator)
    if root is None:
        yield False
        return
    from torch.distributed.fsdp import FSDPModule

    if hasattr(root, "_get_fsdp_state"):
        initialise_root(root)
    groups = []
    for module in root.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                # ``post_forward_mesh_info`` None = keep the parameters gathered after forward; it is what
                # ``FSDPModule.set_reshard_after_forward`` sets, read back here so each group's own value returns.
                groups.append((group, group.post_forward_mesh_info))
                group.post_forward_mesh_info = None
            module.unshard()
    try:
        yield True
    finally:
        for group, mesh_info in groups:
            group.post_forward_mesh_info = mesh_info
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
