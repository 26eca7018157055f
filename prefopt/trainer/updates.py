"""Optimizer updates for every step kind: backward, gradient accumulation, clipping, the non-finite guard.

One :class:`Updater` serves the policy and any extra trainable a step kind declares (PPO's critic). An update
with a non-finite gradient norm on any trained module is skipped for all of them; more than
``train.max_skipped_steps`` skipped updates in a row stop the run with :class:`TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer import sparse_embedding
from prefopt.trainer.distributed import engine_applied_step
from prefopt.trainer.metrics import MetricAverager, Throughput

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


@dataclass
class TrainedModule:
    """A prepared module with its optimizer and scheduler (``sparse_params``: see ``sparse_embedding``).

    Under DeepSpeed / FSDP2 the policy and PPO's critic are parts of one prepared module with one optimizer
    (``prefopt/trainer/joint.py``): then ``module`` is that root for both, ``parameters`` the part's own (what its
    clipping covers), ``learning_rate_group`` the optimizer group whose learning rate is the part's, ``clipped``
    False for a part whose gradient the DeepSpeed engine clips together with the policy's, and ``call`` how a step
    calls the part (through the root's forward)."""

    name: str
    module: torch.nn.Module
    optimizer: Any
    scheduler: Any
    sparse_params: Any = ()
    parameters: Optional[list] = None  # None: every trainable parameter of ``module``
    learning_rate_group: int = 0
    clipped: bool = True
    call: Optional[Callable] = None  # how a step calls this part (None: the module itself)

    def trainable_parameters(self) -> list:
        if self.parameters is not None:
            return self.parameters
        return [p for p in self.module.parameters() if p.requires_grad]

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[self.learning_rate_group]


def _distinct(items) -> list:
    """``items`` without repeats (by identity), in order: a shared root, optimizer or scheduler counts once."""
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


class Updater:
    """What a step kind's ``train_batch`` uses to turn losses into optimizer updates."""

    def __init__(self, accelerator, modules: list[TrainedModule], state, config, output_dir):
        self.accelerator = accelerator
        self.modules = modules
        self.state = state
        self.config = config
        self.output_dir = output_dir
        self.averager = MetricAverager()
        self.throughput = Throughput()

    @property
    def policy(self) -> torch.nn.Module:
        return self.modules[0].module

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """accelerate's gradient accumulation over loader batches (DDP no_sync / DeepSpeed boundaries)."""
        with self.accelerator.accumulate(*_distinct(m.module for m in self.modules)):
            yield

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Accumulation inside one global step (PPO minibatches): skip the DDP all-reduce unless ``last``, and
        tell accelerate (optimizer wrappers, DeepSpeed) whether this micro-batch ends an update."""
        acc = self.accelerator
        acc.sync_gradients = last
        try:
            with contextlib.ExitStack() as stack:
                if not last and acc.num_processes > 1:
                    for module in _distinct(m.module for m in self.modules):
                        stack.enter_context(acc.no_sync(module))
                yield
        finally:
            acc.sync_gradients = True

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` (divides by ``train.gradient_accumulation_steps``)."""
        self.accelerator.backward(loss)

    def record(self, result=None, *, metrics: dict | None = None, tokens: float = 0.0) -> None:
        """Add a step result's (or plain) metrics and token count to the running averages."""
        if result is not None:
            from prefopt.trainer.steps import step_metrics

            metrics = {**step_metrics(result), **(metrics or {})}
            tokens = tokens or result.tokens
        if metrics:
            self.averager.add(metrics)
        if tokens:
            self.throughput.add(tokens)

    def optimizer_step(self) -> bool:
        """Clip every trained module, then step all optimizers and schedulers, or skip them all when any
        gradient norm is non-finite. Returns whether the update was applied."""
        state, config = self.state, self.config
        max_norm = config.train.max_grad_norm or float("inf")
        norms = {}
        for trained in self.modules:
            if not trained.clipped:
                continue
            params = trained.trainable_parameters()
            if trained.sparse_params:  # exact clipping and AdamW step without a dense embedding gradient
                norms[trained.name] = sparse_embedding.clip_grad_norm(params, max_norm)
            else:
                norms[trained.name] = self.accelerator.clip_grad_norm_(params, max_norm)
        finite = all(norm is None or math.isfinite(float(norm)) for norm in norms.values())
        if finite:
            for trained in _distinct_updates(self.modules):
                sparse_embedding.optimizer_step(trained.optimizer, trained.sparse_params)
                trained.scheduler.step()
            state.consecutive_skipped = 0
            for name, norm in norms.items():
                if norm is not None:
                    self.averager.add({"grad_norm" if name == "policy" else f"{name}/grad_norm": float(norm)})
        elif engine_applied_step(self.accelerator):
            raise TrainingDiverged(
                f"step {state.global_step + 1}: non-finite loss or gradient, and DeepSpeed has already applied the "
                "update (it steps inside backward); the weights may now be non-finite. "
                f"{ckpt.last_good_checkpoint_note(self.output_dir)}; lower train.learning_rate or check the data."
            )
        else:
            state.skipped_steps += 1
            state.consecutive_skipped += 1
            logger.warning(
                "step %d: non-finite loss or gradient; optimizer step skipped (%d in a row)",
                state.global_step + 1,
                state.consecutive_skipped,
            )
            if state.consecutive_skipped > config.train.max_skipped_steps:
                raise TrainingDiverged(
                    f"{state.consecutive_skipped} consecutive optimizer steps had a non-finite loss or gradient "
                    f"(train.max_skipped_steps={config.train.max_skipped_steps}); stopping. "
                    f"{ckpt.last_good_checkpoint_note(self.output_dir)}; lower train.learning_rate or check the data."
                )
        for optimizer in _distinct(m.optimizer for m in self.modules):
            optimizer.zero_grad(set_to_none=True)
        return finite

    def learning_rate(self) -> float:
        return self.modules[0].learning_rate()


def _distinct_updates(modules: list[TrainedModule]) -> list[TrainedModule]:
    """The first module of each optimizer: a shared optimizer (and its scheduler) steps once per update."""
    first: dict[int, TrainedModule] = {}
    for trained in modules:
        first.setdefault(id(trained.optimizer), trained)
    return list(first.values())
