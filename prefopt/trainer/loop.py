"""The training loop: one screen that says what a run does. Distribution comes from the launcher (accelerate)."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from prefopt.config import Config, save_config
from prefopt.data import PairCollator, PromptCollator, SFTCollator, build_datasets
from prefopt.data.collate import RevisionPairCollator, ScoredPairCollator, TripleCollator
from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer.metrics import MetricAverager, RunLogger, Throughput
from prefopt.trainer.run_dir import RunDir, run_fingerprint
from prefopt.trainer.setup import (build_optimizer, build_policy, build_reference, load_run_tokenizer,
                                   loss_from_config, make_accelerator, precompute_reference, total_optimizer_steps,
                                   write_run_info)
from prefopt.trainer import sparse_embedding
from prefopt.trainer.distributed import engine_applied_step
from prefopt.trainer.host_memory import return_freed_memory_to_os
from prefopt.trainer.steps import StepContext, step_registry

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Optional[Path]
    global_step: int
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)


def collator_for(data_kind: str, pad_token_id: int, packing: bool = False):
    if packing and data_kind == "pairs":
        from prefopt.data.packing import PackedPairCollator

        return PackedPairCollator(pad_token_id)
    variants = {"scored_pairs": ScoredPairCollator, "triples": TripleCollator, "revision_pairs": RevisionPairCollator}
    if data_kind in variants:
        return variants[data_kind](pad_token_id)
    return {"pairs": PairCollator(pad_token_id), "sft": SFTCollator(pad_token_id), "prompts": PromptCollator()}[data_kind]


def train(config: Config) -> TrainResult:
    if config.iterations.count:
        from prefopt.iterative.run import train_iterations

        return train_iterations(config)
    loss = loss_from_config(config)
    if loss.step == "ppo":
        from prefopt.trainer.ppo import train_ppo

        return train_ppo(config, loss)
    return Trainer(config, loss).run()


def _hf_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The outermost transformers model inside prefopt's wrappers (logps head, value head)."""
    from transformers import PreTrainedModel

    return next((m for m in policy.modules() if isinstance(m, PreTrainedModel)), policy)


class Trainer:
    def __init__(self, config: Config, loss):
        self.config = config
        self.loss = loss
        if config.train.return_freed_host_memory:
            return_freed_memory_to_os()
        self.accelerator, trackers = make_accelerator(config)
        acc = self.accelerator
        out_dir = Path(config.output_dir)
        self.run_dir = RunDir.plan(config)  # checks output_dir and the checkpoint; writes nothing yet
        self.resume_path, self.output_dir = self.run_dir.resume_path, self.run_dir.path
        step_cls = step_registry()[loss.step]
        self.tokenizer = load_run_tokenizer(config)
        self.bundle = build_datasets(config.data, self.tokenizer, step_cls.data_kind, seed=config.seed,
                                     cache_dir=str(out_dir.parent / ".prefopt_cache" / "data"))
        self.run_dir.open(acc, run_fingerprint(config, self.tokenizer, self.bundle))
        if acc.is_main_process:
            save_config(config, self.output_dir / "config.yaml")
            write_run_info(acc, self.output_dir, config)
            self.bundle.write_report(self.output_dir)
            for line in self.bundle.report.summary_lines():
                logger.info(line)
        self.collator = collator_for(step_cls.data_kind, self.tokenizer.pad_token_id, config.data.packing)
        model_kind = getattr(step_cls, "model_kind", "causal_lm")
        policy = build_policy(config, model_kind, self.tokenizer)
        reference = build_reference(config, lambda: self.accelerator.unwrap_model(self.policy).model, acc)
        if config.resolved_reference_mode() == "precomputed":
            reference = precompute_reference(config, acc, reference, self.bundle, self.collator)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        self.reference = reference

        world = acc.num_processes
        batch = config.train.per_device_batch_size
        accum = config.train.gradient_accumulation_steps
        # Each epoch is trimmed to whole optimizer steps so that every step sees the same number of pairs.
        self.rows_per_epoch = len(self.bundle.train) // (batch * world * accum) * (batch * world * accum)
        if self.rows_per_epoch == 0:
            from prefopt.errors import ConfigError

            raise ConfigError(f"train.per_device_batch_size: {len(self.bundle.train)} training rows cannot fill one "
                              f"optimizer step of {batch} x {world} processes x {accum} accumulation steps")
        self.batches_per_epoch = self.rows_per_epoch // (batch * world)
        self.total_steps = total_optimizer_steps(config, self.batches_per_epoch)
        distributed = acc.num_processes > 1 or acc.distributed_type != DistributedType.NO
        self.sparse_params = sparse_embedding.enable_sparse_embedding_grad(
            _hf_model(policy), config.train.sparse_embedding_grad, distributed=distributed,
            fp16=acc.mixed_precision == "fp16")
        optimizer, scheduler = build_optimizer(config, policy, self.total_steps)
        self.policy, self.optimizer, self.scheduler = acc.prepare(policy, optimizer, scheduler)
        self.ctx = StepContext(acc, self.policy, loss, self.reference, self.tokenizer, config)
        self._setup_online(model_kind)
        self.step_fn = step_cls(self.ctx)
        self.state = ckpt.TrainerState()
        if self.resume_path is not None:
            self.state = ckpt.load_checkpoint(acc, self.resume_path)
            logger.info("resumed from %s at step %d", self.resume_path, self.state.global_step)
        if trackers:
            acc.init_trackers(config.logging.run_name or self.output_dir.name, config=config.model_dump(mode="json"))
        self.log = RunLogger(self.output_dir, acc, self.total_steps, progress=config.logging.progress,
                             trackers=bool(trackers), resume=self.resume_path is not None)

    def _setup_online(self, model_kind: str) -> None:
        if "online" not in self.loss.needs:
            return
        from prefopt.generation import build_generator
        from prefopt.models.reward import build_reward
        from prefopt.trainer.online import build_reference_generator

        inner = self.accelerator.unwrap_model(self.policy).model
        self.ctx.generator = build_generator(self.config.generation, inner, self.tokenizer, self.accelerator,
                                             seed=self.config.seed, max_prompt_length=self.config.data.max_prompt_length)
        if "reward" in self.loss.needs:
            self.ctx.reward = build_reward(self.config.reward, device=self.accelerator.device,
                                           policy_tokenizer=self.tokenizer)
            self.ctx.reference_generator = build_reference_generator(self.ctx)

    def epoch_loader(self, epoch: int) -> DataLoader:
        dataset = self.bundle.train
        if epoch > 0 and self.config.data.shuffle and not self.config.data.curriculum:
            dataset = dataset.shuffle(seed=self.config.seed + epoch)
        if self.config.data.group_by_length and "chosen_input_ids" in dataset.column_names:
            from prefopt.data.packing import length_grouped_order, pair_lengths

            order = length_grouped_order(pair_lengths(dataset), self.config.train.per_device_batch_size,
                                         seed=self.config.seed + epoch)
            dataset = dataset.select(order)
        dataset = dataset.select(range(self.rows_per_epoch))
        loader = DataLoader(dataset, batch_size=self.config.train.per_device_batch_size, shuffle=False,
                            drop_last=True, collate_fn=self.collator,
                            num_workers=self.config.train.dataloader_num_workers)
        return self.accelerator.prepare_data_loader(loader)

    def run(self) -> TrainResult:
        acc, config, state = self.accelerator, self.config, self.state
        averager, throughput = MetricAverager(), Throughput()
        eval_metrics: dict = {}
        try:
            while state.global_step < self.total_steps:
                loader = self.epoch_loader(state.epoch)
                if state.batches_in_epoch:
                    loader = acc.skip_first_batches(loader, state.batches_in_epoch)
                for batch in loader:
                    with acc.accumulate(self.policy):
                        result = self.step_fn(batch)
                        acc.backward(result.output.loss)
                        state.batches_in_epoch += 1
                        averager.add(self._step_metrics(result))
                        throughput.add(result.tokens)
                        if acc.sync_gradients:
                            self._optimizer_step(averager)
                    if not acc.sync_gradients:
                        continue
                    state.global_step += 1
                    self.log.advance(state.global_step)
                    if self.ctx.generator is not None:
                        self.ctx.generator.load_weights(acc.unwrap_model(self.policy).model)
                    if state.global_step % config.logging.logging_steps == 0 or state.global_step == self.total_steps:
                        self._log_train(averager, throughput)
                    sample_every = config.logging.sample_steps
                    if result.samples and sample_every and state.global_step % sample_every == 0:
                        self.log.log_samples(state.global_step, result.samples[:8])
                    if config.train.eval_steps and state.global_step % config.train.eval_steps == 0:
                        eval_metrics = self.evaluate()
                    if config.train.save_steps and state.global_step % config.train.save_steps == 0:
                        ckpt.save_checkpoint(acc, self.output_dir, state, config.train.save_total_limit)
                    if state.global_step >= self.total_steps:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0
            evaluated_last_step = bool(config.train.eval_steps) and state.global_step % config.train.eval_steps == 0
            if self.bundle.eval is not None and not evaluated_last_step:
                eval_metrics = self.evaluate()
            final_dir = self.save_final()
        finally:
            self.log.close()
            acc.end_training()
        return TrainResult(self.output_dir, final_dir, state.global_step, dict(self.log.last), eval_metrics)

    def _step_metrics(self, result) -> dict:
        metrics = dict(result.output.metrics)
        reported = result.output.reported_loss
        metrics["loss"] = float(reported if reported is not None else result.output.loss.detach())
        return metrics

    def _optimizer_step(self, averager: MetricAverager) -> None:
        acc, state = self.accelerator, self.state
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.config.train.max_grad_norm or float("inf")
        if self.sparse_params:  # exact clipping and AdamW step without a dense embedding gradient
            grad_norm = sparse_embedding.clip_grad_norm(params, max_norm)
        else:
            grad_norm = acc.clip_grad_norm_(params, max_norm)
        finite = grad_norm is None or math.isfinite(float(grad_norm))
        if finite:
            sparse_embedding.optimizer_step(self.optimizer, self.sparse_params)
            self.scheduler.step()
            state.consecutive_skipped = 0
            if grad_norm is not None:
                averager.add({"grad_norm": float(grad_norm)})
        elif engine_applied_step(acc):
            raise TrainingDiverged(
                f"step {state.global_step + 1}: non-finite loss or gradient, and DeepSpeed has already applied the "
                "update (it steps inside backward); the weights may now be non-finite. The last good checkpoint in "
                f"{self.output_dir} is intact; lower train.learning_rate or check the data.")
        else:
            state.skipped_steps += 1
            state.consecutive_skipped += 1
            logger.warning("step %d: non-finite loss or gradient; optimizer step skipped (%d in a row)",
                           state.global_step + 1, state.consecutive_skipped)
            if state.consecutive_skipped > self.config.train.max_skipped_steps:
                raise TrainingDiverged(
                    f"{state.consecutive_skipped} consecutive optimizer steps had a non-finite loss or gradient "
                    f"(train.max_skipped_steps={self.config.train.max_skipped_steps}); stopping. "
                    f"{ckpt.last_good_checkpoint_note(self.output_dir)}; lower train.learning_rate or check the data.")
        self.optimizer.zero_grad(set_to_none=True)

    def _log_train(self, averager: MetricAverager, throughput: Throughput) -> None:
        metrics = averager.reduce(self.accelerator)
        record = {"step": self.state.global_step, "epoch": self.state.epoch, **metrics,
                  "learning_rate": self.scheduler.get_last_lr()[0],
                  "tokens_per_second": throughput.rate(self.accelerator),
                  "train/skipped_steps": self.state.skipped_steps}
        self.log.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Same step and metrics on the eval split (every rank takes rows rank, rank+W, ...), prefixed ``eval/``."""
        acc = self.accelerator
        if self.bundle.eval is None:
            return {}
        shard = self.bundle.eval.shard(num_shards=acc.num_processes, index=acc.process_index, contiguous=False)
        size = self.config.train.eval_batch_size or self.config.train.per_device_batch_size
        averager = MetricAverager()
        split = getattr(self.reference, "use_split", None)
        context = split("eval") if split else contextlib.nullcontext()
        with context:
            for batch in DataLoader(shard, batch_size=size, shuffle=False, collate_fn=self.collator):
                result = self.step_fn(batch)
                averager.add(self._step_metrics(result), weight=len(batch["index"]))
        metrics = {f"eval/{k}": v for k, v in averager.reduce(self.accelerator, keys=None).items()}
        self.log.log({"step": self.state.global_step, **metrics})
        return metrics

    def save_final(self) -> Path:
        return ckpt.save_final_model(self.accelerator, self.policy, self.tokenizer, self.output_dir)
