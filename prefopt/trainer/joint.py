"""The policy and PPO's critic as one prepared module, for DeepSpeed ZeRO-2/3 and FSDP2.

accelerate prepares one model per ``Accelerator`` under DeepSpeed (``accelerate/accelerator.py`` 1483-1491,
``prepare``: "You can't use same `Accelerator()` instance with multiple models when using DeepSpeed") and under
FSDP2 (1506-1523: "Only one model is supported when using FSDP2"), and saves an FSDP optimizer with the model of
the same index (3720, ``save_state``: ``self._models[i]``), so a second optimizer for the one model would fail to
checkpoint. The PPO stage trains two models, so on those backends :class:`PolicyAndCritic` holds both (the idea
of TRL's ``PolicyAndValueWrapper`` in ``trl/trainer/ppo_trainer.py`` of the TRL releases that had PPO; the TRL
1.16 installed here has none) and one optimizer holds both parameter sets: the policy's groups, then the
critic's, each with the learning rate and weight decay it has on its own (``ppo.critic_learning_rate``), under
one schedule (the two schedules are the same function of the step, so one ``LambdaLR`` gives every group the
learning rate it would have had).

Under ZeRO-3, generation takes the engine's module hooks off while it decodes (``zero3_hooks_removed`` in
``prefopt/trainer/distributed.py``): with them on, ranks that decode different numbers of tokens hung in the
engine's parameter prefetch (seen on 2 CPU processes).

Every call goes through the prepared root's forward -- ``root(..., route="critic")`` for the critic -- so
DeepSpeed ZeRO-3's and FSDP2's hooks gather the parameters of whichever part runs.

Gradient clipping: under FSDP2 the policy and the critic are clipped separately, as with DDP and on one process
(``Accelerator.clip_grad_norm_`` over each part's ``DTensor`` parameters). A DeepSpeed engine clips the global
norm of all its parameters inside ``engine.step`` (DeepSpeed 0.19.8 ``runtime/zero/stage_1_and_2.py`` 3013-3084,
``step``: every group's ``unscale_and_clip_grads`` with ``scaled_global_norm()``; ``stage3.py`` 2873-2918 the same
with the combined norm of all groups), so under DeepSpeed the two are clipped jointly: one
``grad_norm`` over both, and ``train.max_grad_norm`` bounds that joint norm (the run logs a warning).

Single-process and DDP runs keep two prepared models, two optimizers and their checkpoint layout
(``model.safetensors`` + ``model_1.safetensors``, ``optimizer.bin`` + ``optimizer_1.bin``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


class PolicyAndCritic(torch.nn.Module):
    """``forward(*args, route="policy" | "critic", **kwargs)``: the policy's (``CompletionLogpModel``) or the critic's
    (``ValueModel``) forward. It stands in for the policy wherever the prepared policy is expected: ``.model`` is the
    policy's causal LM, and ``final/`` holds only the policy (``prefopt/trainer/checkpoint.py``)."""

    # accelerate's fsdp2_prepare_model reads these off the prepared module to carve the policy's input embedding
    # and its final norm + lm-head into their own FSDP units (see CompletionLogpModel); the critic's decoder layers
    # are sharded by class through ``_no_split_modules``.
    base_model_prefix = "decoder"

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.critic = critic

    @property
    def model(self) -> torch.nn.Module:
        """The policy's causal LM (what generation, the adapter reference and ``final/`` use)."""
        return self.policy.model

    @property
    def decoder(self) -> Optional[torch.nn.Module]:
        return getattr(self.policy, "decoder", None)

    @property
    def _no_split_modules(self) -> Optional[list[str]]:
        """The decoder-layer classes of both parts (a critic from a reward model may have other layers)."""
        names: list[str] = []
        for part in (self.policy, getattr(self.critic, "backbone", self.critic)):
            for name in getattr(part, "_no_split_modules", None) or []:
                if name not in names:
                    names.append(name)
        return names or None

    def tie_weights(self, *args, **kwargs) -> None:
        """accelerate re-ties after moving the model to meta (``fsdp_cpu_ram_efficient_loading``)."""
        if hasattr(self.policy, "tie_weights"):
            self.policy.tie_weights(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[torch.nn.Module]:
        return self.policy.get_output_embeddings()

    def forward(self, *args, route: str = "policy", **kwargs):
        if route == "critic":
            return self.critic(*args, **kwargs)
        if route != "policy":
            raise ValueError(f"PolicyAndCritic: route must be 'policy' or 'critic', got {route!r}")
        return self.policy(*args, **kwargs)


class CriticCall:
    """The critic as the PPO step calls it: through the prepared root (``root(..., route="critic")``)."""

    def __init__(self, root: torch.nn.Module):
        self.root = root

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.root(*args, route="critic", **kwargs)


def joint_optimizer(optimizers: list[torch.optim.Optimizer]) -> tuple[torch.optim.Optimizer, list[int]]:
    """One optimizer of the same class holding every group of ``optimizers`` (each keeps its lr, weight decay,
    betas, eps), and the index of each input optimizer's first group in it."""
    first = optimizers[0]
    groups, starts = [], []
    for optimizer in optimizers:
        if type(optimizer) is not type(first):
            raise TypeError("joint_optimizer: all optimizers must be of one class")
        starts.append(len(groups))
        groups.extend(dict(group) for group in optimizer.param_groups)
    # every group carries all its hyperparameters (torch fills them in from the defaults), so the constructor's
    # own defaults are never used; copy the originals for anything that adds a group later
    joint = type(first)(groups)
    joint.defaults.update(first.defaults)
    return joint, starts


def parameters_of(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def warn_joint_clipping(accelerator, config: Any) -> None:
    if config.train.max_grad_norm and accelerator.is_main_process:
        logger.warning(
            "DeepSpeed: the policy and the critic train in one engine, which clips their joint gradient norm to "
            "train.max_grad_norm=%s (one process, DDP and FSDP2 clip each separately); grad_norm is the joint "
            "norm",
            config.train.max_grad_norm,
        )


def prepare_policy_and_critic(
    accelerator, config: Any, policy: torch.nn.Module, extra: list, updates: int, sparse
):
    """Prepare the policy and the step's extra trainables (PPO's critic) as one :class:`PolicyAndCritic` with one
    optimizer and one scheduler; returns a ``TrainedModule`` per part, all sharing that root and optimizer."""
    from accelerate.utils import DistributedType

    from prefopt.trainer.setup import build_adamw, build_scheduler
    from prefopt.trainer.updates import TrainedModule

    if len(extra) != 1:
        raise ValueError(f"PolicyAndCritic holds a policy and one extra trainable, got {len(extra)}")
    (trainable,) = extra
    own = config.model_copy(
        update={"train": config.train.model_copy(update={"learning_rate": trainable.learning_rate})}
    )
    optimizer, (policy_start, critic_start) = joint_optimizer(
        [build_adamw(config, policy), build_adamw(own, trainable.module)]
    )
    del policy_start  # 0: the policy's groups come first
    root = PolicyAndCritic(policy, trainable.module)
    root, optimizer, scheduler = accelerator.prepare(
        root, optimizer, build_scheduler(config, optimizer, updates)
    )
    parts = accelerator.unwrap_model(root)
    engine_clips = accelerator.distributed_type == DistributedType.DEEPSPEED
    if engine_clips:
        warn_joint_clipping(accelerator, config)
    return [
        TrainedModule(
            "policy",
            root,
            optimizer,
            scheduler,
            sparse,
            # under DeepSpeed the engine's global norm (both parts) is what clipping reports
            parameters=None if engine_clips else parameters_of(parts.policy),
        ),
        TrainedModule(
            trainable.name,
            root,
            optimizer,
            scheduler,
            parameters=parameters_of(parts.critic),
            learning_rate_group=critic_start,
            clipped=not engine_clips,
            call=CriticCall(root),
        ),
    ]
