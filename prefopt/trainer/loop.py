"""The run scaffold every step kind shares: one screen that says what a run does.

Accelerator, output dir, data, policy, reference, optimizers (the policy's and any extra trainable the step kind
declares, e.g. PPO's critic), the non-finite guard (``train.max_skipped_steps``), checkpoint/resume (step state
included), eval, logging and the final save live here; what a step does with a batch lives in its step kind
(``prefopt/trainer/steps.py`` explains how to add one). The scaffold looks the step kind up by ``loss.step``, never
by the loss's name. Distribution comes from the launcher (accelerate).
"""

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
from prefopt.data.collate import (
    ResetPromptCollator,
    RevisionPairCollator,
    ScoredPairCollator,
    TripleCollator,
    UnpairedCollator,
)
from prefopt.errors import ConfigError
from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer import sparse_embedding
from prefopt.trainer.distributed import unwrapped
from prefopt.trainer.host_memory import return_freed_memory_to_os
from prefopt.trainer.kinds import step_kind_for
from prefopt.trainer.metrics import MetricAverager, RunLogger
from prefopt.trainer.run_dir import RunDir, run_fingerprint
from prefopt.trainer.setup import (
    build_optimizer,
    build_policy,
    build_reference,
    load_run_tokenizer,
    loss_from_config,
    make_accelerator,
    precompute_reference,
    write_run_info,
)
from prefopt.trainer.steps import StepContext
from prefopt.trainer.trackers import start_trackers
from prefopt.trainer.updates import TrainedModule, TrainingDiverged, Updater

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Optional[Path]
    global_step: int
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)


def collator_for(
    data_kind: str,
    pad_token_id: int,
    packing: bool = False,
    attn_implementation: str | None = None,
    max_length: int | None = None,
):
    if packing and data_kind == "pairs":
        from prefopt.data.packing import PackedPairCollator

        # flash / flex attention take the sequences from the restarting position_ids and ignore a 4D mask:
        # building the [N, N] mask (and moving it to the GPU) would only cost memory.
        uses_mask = not (attn_implementation or "").startswith(("flash", "flex"))
        return PackedPairCollator(pad_token_id, attention_bias=uses_mask)
    variants = {
        "scored_pairs": ScoredPairCollator,
        "triples": TripleCollator,
        "revision_pairs": RevisionPairCollator,
    }
    if data_kind in variants:
        return variants[data_kind](pad_token_id)
    if data_kind == "unpaired":  # KTO: max_length cuts the mismatched prompt/completion sequences
        return UnpairedCollator(pad_token_id, max_length=max_length)
    if data_kind == "reset_prompts":  # DR-PO: prompts plus the dataset responses rollouts restart from
        return ResetPromptCollator()
    return {
        "pairs": PairCollator(pad_token_id),
        "sft": SFTCollator(pad_token_id),
        "prompts": PromptCollator(),
    }[data_kind]


def train(config: Config) -> TrainResult:
    """Run a recipe end to end with the step kind its loss declares (``iterations.count > 0``: DNO-style rounds)."""
    if config.iterations.count:
        from prefopt.iterative.run import train_iterations

        return train_iterations(config)
    loss = loss_from_config(config)
    if loss.step == "scored_pairs":  # per-completion rewards from the reward layer when the data has none
        from prefopt.trainer.pair_scores import with_scored_pairs

        config = with_scored_pairs(config)
    return Trainer(config, loss).run()


def _hf_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The outermost transformers model inside prefopt's wrappers (logps head, value head)."""
    from transformers import PreTrainedModel

    return next((m for m in policy.modules() if isinstance(m, PreTrainedModel)), policy)


class Trainer:
    def __init__(self, config: Config, loss=None):
        self.config = config
        self.loss = loss = loss if loss is not None else loss_from_config(config)
        step_cls = step_kind_for(loss)
        step_cls.check_config(config, loss)  # before anything is written
        if config.train.return_freed_host_memory:
            return_freed_memory_to_os()
        self.accelerator, trackers = make_accelerator(config)
        acc = self.accelerator
        out_dir = Path(config.output_dir)
        self.run_dir = RunDir.plan(config)  # checks output_dir and the checkpoint; writes nothing yet
        self.resume_path, self.output_dir = self.run_dir.resume_path, self.run_dir.path
        self.tokenizer = load_run_tokenizer(config)
        step_cls.check_models(config, self.tokenizer)
        self.bundle = build_datasets(
            config.data,
            self.tokenizer,
            step_cls.data_kind,
            seed=config.seed,
            cache_dir=str(out_dir.parent / ".prefopt_cache" / "data"),
        )
        step_cls.check_data(config, loss, self.bundle)
        self.run_dir.open(acc, run_fingerprint(config, self.tokenizer, self.bundle))
        if acc.is_main_process:
            save_config(config, self.output_dir / "config.yaml")
            write_run_info(acc, self.output_dir, config)
            self.bundle.write_report(self.output_dir)
            for line in self.bundle.report.summary_lines():
                logger.info(line)
        self.collator = collator_for(
            step_cls.data_kind,
            self.tokenizer.pad_token_id,
            config.data.packing,
            config.model.attn_implementation,
            config.data.max_length,
        )
        policy = build_policy(config, step_cls.model_kind, self.tokenizer)
        reference = build_reference(
            config,
            lambda: unwrapped(self.accelerator, self.policy).model,
            acc,
            root_getter=lambda: self.policy if acc.is_fsdp2 else None,
        )
        if config.resolved_reference_mode() == "precomputed":
            reference = precompute_reference(config, acc, reference, self.bundle, self.collator)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        self.reference = reference

        self.batch_size = step_cls.loader_batch_size(config)
        batches_per_step = step_cls.batches_per_step(config)
        rows_per_step = self.batch_size * acc.num_processes * batches_per_step
        # Each epoch is trimmed to whole steps so that every step sees the same number of rows.
        self.rows_per_epoch = len(self.bundle.train) // rows_per_step * rows_per_step
        if self.rows_per_epoch == 0:
            raise ConfigError(
                f"{step_cls.batch_size_key}: {len(self.bundle.train)} training rows cannot fill one "
                f"step of {self.batch_size} rows x {acc.num_processes} processes x {batches_per_step} "
                "accumulation steps"
            )
        self.batches_per_epoch = self.rows_per_epoch // (self.batch_size * acc.num_processes)
        steps_per_epoch = self.batches_per_epoch // batches_per_step
        self.total_steps = config.train.max_steps or max(
            math.ceil(config.train.num_epochs * steps_per_epoch), 1
        )
        self.modules = self._prepare(step_cls, policy)
        self.policy = self.modules[0].module
        self.state = ckpt.TrainerState()
        self.ctx = StepContext(
            acc,
            self.policy,
            loss,
            self.reference,
            self.tokenizer,
            config,
            modules={m.name: m.call or m.module for m in self.modules[1:]},
            extras=self._extras,
            global_step=lambda: self.state.global_step,
        )
        self._setup_online()
        self.step_fn = step_cls(self.ctx)
        self.reference.check_policy(self._policy_model())
        if self.resume_path is not None:
            self.state = ckpt.load_checkpoint(acc, self.resume_path)
            self.step_fn.load_state_dict(self.state.step_state)
            self.reference.load_state(self.resume_path)
            logger.info("resumed from %s at step %d", self.resume_path, self.state.global_step)
        self.updater = Updater(acc, self.modules, self.state, config, self.output_dir)
        if trackers:
            start_trackers(acc, config)
        self.log = RunLogger(
            self.output_dir,
            acc,
            self.total_steps,
            progress=config.logging.progress,
            trackers=bool(trackers),
            resume=self.resume_path is not None,
        )

    def _prepare(self, step_cls, policy) -> list[TrainedModule]:
        """Optimizers and schedulers for the policy and the step's extra trainables, all through ``prepare``."""
        acc, config = self.accelerator, self.config
        distributed = acc.num_processes > 1 or acc.distributed_type != DistributedType.NO
        sparse = sparse_embedding.enable_sparse_embedding_grad(
            _hf_model(policy),
            config.train.sparse_embedding_grad,
            distributed=distributed,
            fp16=acc.mixed_precision == "fp16",
        )
        self._extras: dict = {}
        extra = step_cls.trainables(config, self.tokenizer, policy, acc, self.loss, self._extras)
        updates = self.total_steps * step_cls.updates_per_step(config)
        if extra and (acc.distributed_type == DistributedType.DEEPSPEED or acc.is_fsdp2):
            from prefopt.trainer.joint import prepare_policy_and_critic

            # one model per Accelerator on these backends: the policy and the critic as one module
            trained = prepare_policy_and_critic(acc, config, policy, extra, updates, sparse)
            self._after_prepare(trained[0].module)
            return trained
        modules, optimizers, schedulers = [policy], [], []
        optimizer, scheduler = build_optimizer(config, policy, updates)
        optimizers.append(optimizer)
        schedulers.append(scheduler)
        for trainable in extra:
            own = config.model_copy(
                update={"train": config.train.model_copy(update={"learning_rate": trainable.learning_rate})}
            )
            optimizer, scheduler = build_optimizer(own, trainable.module, updates)
            modules.append(trainable.module)
            optimizers.append(optimizer)
            schedulers.append(scheduler)
        count = len(modules)
        prepared = acc.prepare(*modules, *optimizers, *schedulers)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        self._after_prepare(prepared[0])
        names = ["policy", *(t.name for t in extra)]
        return [
            TrainedModule(
                names[i], prepared[i], prepared[count + i], prepared[2 * count + i], sparse if i == 0 else []
            )
            for i in range(count)
        ]

    def _after_prepare(self, root: torch.nn.Module) -> None:
        """FSDP2: the prepared root's forward under autocast, and how finely it is sharded."""
        acc = self.accelerator
        if not acc.is_fsdp2:
            return
        from torch.distributed.fsdp import FSDPModule

        from prefopt.trainer.distributed import autocast_forward

        autocast_forward(acc, root)  # as accelerate does for DDP: the reference runs under it too
        units = sum(isinstance(m, FSDPModule) for m in root.modules())
        what = "the policy and the critic are" if hasattr(root, "critic") else "the policy is"
        logger.info("FSDP2: %s sharded in %d units over %d processes", what, units, acc.num_processes)

    def _setup_online(self) -> None:
        """A generator when the loss samples online; the reward layer when it needs scores or a judge."""
        needs = self.loss.needs
        if "online" in needs:
            from prefopt.generation import build_generator

            inner = unwrapped(self.accelerator, self.policy).model
            self.ctx.generator = build_generator(
                self.config.generation,
                inner,
                self.tokenizer,
                self.accelerator,
                seed=self.config.seed,
                max_prompt_length=self.config.data.max_prompt_length,
            )
        if needs & {"reward", "preference"}:
            from prefopt.models.reward import build_reward
            from prefopt.trainer.distributed import prepare_frozen

            self.ctx.reward = build_reward(
                self.config.reward,
                device=self.accelerator.device,
                policy_tokenizer=self.tokenizer,
                prepare=lambda model: prepare_frozen(self.accelerator, model, "a reward model"),
            )

    def epoch_loader(self, epoch: int) -> DataLoader:
        dataset = self.bundle.train
        if epoch > 0 and self.config.data.shuffle and not self.config.data.curriculum:
            dataset = dataset.shuffle(seed=self.config.seed + epoch)
        if self.config.data.group_by_length and "chosen_input_ids" in dataset.column_names:
            from prefopt.data.packing import length_grouped_order, pair_lengths

            order = length_grouped_order(
                pair_lengths(dataset), self.batch_size, seed=self.config.seed + epoch
            )
            dataset = dataset.select(order)
        dataset = dataset.select(range(self.rows_per_epoch))
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            collate_fn=self.collator,
            num_workers=self.config.train.dataloader_num_workers,
        )
        return self.accelerator.prepare_data_loader(loader)

    def run(self) -> TrainResult:
        acc, config, state = self.accelerator, self.config, self.state
        eval_metrics: dict = {}
        try:
            while state.global_step < self.total_steps:
                loader = self.epoch_loader(state.epoch)
                if state.batches_in_epoch:
                    loader = acc.skip_first_batches(loader, state.batches_in_epoch)
                for batch in loader:
                    state.batches_in_epoch += 1
                    result = self.step_fn.train_batch(batch, self.updater)
                    if result is None:  # inside a gradient-accumulation window
                        continue
                    state.global_step += 1
                    self.reference.after_optimizer_step(state.global_step, self._policy_model())
                    self.log.advance(state.global_step)
                    if self.ctx.generator is not None:
                        self.ctx.generator.load_weights(unwrapped(acc, self.policy).model)
                    if (
                        state.global_step % config.logging.logging_steps == 0
                        or state.global_step == self.total_steps
                    ):
                        self._log_train()
                    sample_every = config.logging.sample_steps
                    if result.samples and sample_every and state.global_step % sample_every == 0:
                        self.log.log_samples(state.global_step, result.samples[:8])
                    if config.train.eval_steps and state.global_step % config.train.eval_steps == 0:
                        eval_metrics = self.evaluate()
                    if config.train.save_steps and state.global_step % config.train.save_steps == 0:
                        self.save_checkpoint()
                    if state.global_step >= self.total_steps:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0
            evaluated_last_step = (
                bool(config.train.eval_steps) and state.global_step % config.train.eval_steps == 0
            )
            if self.bundle.eval is not None and not evaluated_last_step:
                eval_metrics = self.evaluate()
            final_dir = self.save_final()
        finally:
            self.log.close()
            acc.end_training()
        return TrainResult(self.output_dir, final_dir, state.global_step, dict(self.log.last), eval_metrics)

    def save_checkpoint(self) -> Path:
        self.state.step_state = self.step_fn.state_dict()
        return ckpt.save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state,
            self.config.train.save_total_limit,
            save_extra=self.reference.save_state,
        )

    def _policy_model(self) -> torch.nn.Module:
        """The policy's transformers model, unwrapped (what the reference hooks compare and read)."""
        return _hf_model(unwrapped(self.accelerator, self.policy))

    def _log_train(self) -> None:
        updater = self.updater
        metrics = updater.averager.reduce(self.accelerator)
        record = {
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            **metrics,
            "learning_rate": updater.learning_rate(),
            "tokens_per_second": updater.throughput.rate(self.accelerator),
            "train/skipped_steps": self.state.skipped_steps,
        }
        for trained in self.modules[1:]:  # extra trainables (PPO's critic) have their own learning rate
            record[f"{trained.name}/learning_rate"] = trained.learning_rate()
        self.log.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The step's eval metrics on the eval split (every rank takes rows rank, rank+W, ...), prefixed ``eval/``."""
        acc = self.accelerator
        if self.bundle.eval is None:
            return {}
        shard = self.bundle.eval.shard(
            num_shards=acc.num_processes, index=acc.process_index, contiguous=False
        )
        size = self.config.train.eval_batch_size or self.batch_size
        averager = MetricAverager()
        split = getattr(self.reference, "use_split", None)
        context = split("eval") if split else contextlib.nullcontext()
        # Every rank runs the same number of eval forwards: under FSDP2 / ZeRO-3 each forward gathers parameters
        # collectively, and a rank with one batch fewer fails or hangs the others. A rank that runs out repeats a
        # batch and drops its metrics.
        batches = math.ceil(math.ceil(len(self.bundle.eval) / acc.num_processes) / size)
        loader = iter(DataLoader(shard, batch_size=size, shuffle=False, collate_fn=self.collator))
        with context:
            for _ in range(batches):
                batch = next(loader, None)
                if batch is None:
                    self.step_fn.eval_batch(self.collator([self.bundle.eval[0]]))
                    continue
                metrics, weight = self.step_fn.eval_batch(batch)
                averager.add(metrics, weight=weight)
        metrics = {f"eval/{k}": v for k, v in averager.reduce(self.accelerator, keys=None).items()}
        self.log.log({"step": self.state.global_step, **metrics})
        return metrics

    def save_final(self) -> Path:
        return ckpt.save_final_model(self.accelerator, self.policy, self.tokenizer, self.output_dir)
