"""TR-DPO's reference: a frozen model that moves toward the policy every ``reference.sync_steps`` optimizer steps.

Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment" (TR-DPO, arXiv 2404.09656). Every
``tau = reference.sync_steps`` steps the reference becomes a mixture of itself and the current policy::

    theta_ref <- alpha * theta_policy + (1 - alpha) * theta_ref        (alpha = reference.sync_mix)

``alpha = 1`` is the paper's hard update (the reference is replaced by the policy), ``alpha < 1`` its soft update.
prefopt's default mix is 0.6 (TRL's ``ref_model_mixup_alpha`` default) and syncing is off until ``sync_steps`` is set
(TRL: ``sync_ref_model=True``, ``ref_model_sync_steps=512``; a tiny run of ~50 steps wants a much smaller value).
Any loss with a live reference model takes it (DPO and every reference-based loss, HyPO, XPO, RTO's KL...): the
trainer calls :meth:`SyncedModelReference.after_optimizer_step` after each step, as it does for every reference
mode, and the state travels with the checkpoints.

Differences from TRL's ``SyncRefModelCallback`` (``trl/trainer/callbacks.py``): the same update at the same steps
(``global_step % sync_steps == 0``, after the optimizer step), computed in fp32 and cast to the reference's dtype,
matched by parameter name (TRL zips ``parameters()``), and checkpointed: TRL saves no reference, so a resumed TRL run
restarts from the initial reference, while a resumed prefopt run continues exactly as the uninterrupted one.
Refused (exit 2, ``prefopt/config.py``): a precomputed reference (its logps would go stale), the adapter reference
of a LoRA policy (there is no second model to move), no reference. ZeRO-3 and FSDP shard the weights this update
reads; they are refused when the reference is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from prefopt.errors import ConfigError
from prefopt.models.reference import ModelReference

logger = logging.getLogger(__name__)

STATE_FILE = "reference.safetensors"  # in each checkpoint directory


class SyncedModelReference(ModelReference):
    """A :class:`ModelReference` whose weights follow the policy (module docstring)."""

    mode = "synced"

    def __init__(self, model: torch.nn.Module, *args, sync_steps: int, sync_mix: float, **kwargs):
        super().__init__(model, *args, **kwargs)
        if getattr(model, "module", None) is not None and model is not self.model:
            raise ConfigError(
                "reference.sync_steps: TR-DPO's reference update needs whole weights on every rank; ZeRO-3 shards "
                "them (use ZeRO-1/2 or DDP, or drop reference.sync_steps)"
            )
        self.sync_steps = sync_steps
        self.sync_mix = sync_mix
        self.syncs = 0

    def check_policy(self, policy: torch.nn.Module) -> None:
        """The policy must have the reference's parameters (same names and shapes) to be mixed into it."""
        ours = {name: p.shape for name, p in self.model.named_parameters()}
        theirs = {name: p.shape for name, p in policy.named_parameters()}
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise ConfigError(
                "reference.sync_steps: the reference model's parameters differ from the policy's "
                f"(e.g. {', '.join(name for name, _ in differing)}); TR-DPO mixes the policy into the reference, so "
                "reference.name_or_path must be the same architecture as the policy (default: the policy's start)"
            )
        if any(type(p).__name__ == "DTensor" for p in policy.parameters()):
            raise ConfigError(
                "reference.sync_steps: FSDP shards the policy's weights, which TR-DPO's reference update reads "
                "whole; use DDP or ZeRO-1/2, or drop reference.sync_steps"
            )

    @torch.no_grad()
    def after_optimizer_step(self, global_step: int, policy: torch.nn.Module) -> None:
        if global_step % self.sync_steps:
            return
        policy_params = dict(policy.named_parameters())
        for name, param in self.model.named_parameters():
            source = policy_params[name].detach().to(device=param.device, dtype=torch.float32)
            param.copy_(torch.lerp(param.float(), source, self.sync_mix))
        self.syncs += 1
        logger.info("reference synced with the policy at step %d (mix %.3g)", global_step, self.sync_mix)

    def save_state(self, directory: Path) -> None:
        save_model(self.model, str(Path(directory) / STATE_FILE))

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(
                f"train.resume_from: {directory} has no {STATE_FILE}: it was written without reference.sync_steps, "
                "so the synced reference cannot be restored; resume with the settings that wrote it"
            )
        load_model(self.model, str(path), device=str(next(self.model.parameters()).device))
