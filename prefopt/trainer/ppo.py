"""The PPO step used by RTO (Zhong et al. 2024, "DPO Meets PPO"), reusable as plain PPO.

One iteration: sample responses for a batch of prompts, score them (token-level DPO reward from the frozen stage-1
policy and the SFT reference, KL to the rollout policy, the reward model's score on the last token), estimate
advantages with GAE against the critic, whiten them over every response token of every rank, then take
``ppo.epochs`` passes of clipped policy/value updates over minibatches. With ``loss.dpo_reward_scale=0`` this is
plain PPO with a sparse reward.

Five models can be involved: policy, reference (SFT), DPO policy, reward model, critic. Cheap layouts: with LoRA the
reference is the policy with adapters off (``reference.mode=adapter``) and the DPO policy can be a second adapter on
the same base (``ppo.dpo_adapter``); a ``function`` reward needs no model at all.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader

from prefopt.config import Config, save_config
from prefopt.data import PromptCollator, build_datasets
from prefopt.losses import LossInputs
from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer.metrics import MetricAverager, RunLogger, Throughput
from prefopt.trainer.online import sampling_params
from prefopt.trainer.ppo_setup import build_critic, check_rto_lineage, dpo_scorer
from prefopt.trainer.setup import (build_optimizer, build_policy, build_reference, load_run_tokenizer,
                                   make_accelerator, write_run_info)
from prefopt.trainer.run_dir import RunDir, run_fingerprint
from prefopt.trainer.steps import StepContext

logger = logging.getLogger(__name__)


def train_ppo(config: Config, loss):
    return PPOTrainer(config, loss).run()


class PPOTrainer:
    def __init__(self, config: Config, loss):
        from prefopt.generation import build_generator
        from prefopt.models.reward import build_reward

        self.config, self.loss = config, loss
        self.accelerator, trackers = make_accelerator(config)
        acc = self.accelerator
        self.run_dir = RunDir.plan(config)  # checks output_dir and the checkpoint; writes nothing yet
        self.resume_path, self.output_dir = self.run_dir.resume_path, self.run_dir.path
        self.tokenizer = load_run_tokenizer(config)
        self.bundle = build_datasets(config.data, self.tokenizer, "prompts", seed=config.seed)
        self.run_dir.open(acc, run_fingerprint(config, self.tokenizer, self.bundle))
        if acc.is_main_process:
            save_config(config, self.output_dir / "config.yaml")
            write_run_info(acc, self.output_dir, config)
            self.bundle.write_report(self.output_dir)
        check_rto_lineage(config, self.tokenizer, loss)

        policy = build_policy(config, "causal_lm", self.tokenizer)
        critic = build_critic(config)
        self.reference = build_reference(config, lambda: acc.unwrap_model(self.policy).model)
        if getattr(self.reference, "model", None) is not None:
            self.reference.model.to(acc.device)
        self.dpo_logps = dpo_scorer(config, policy, acc, loss)
        self.reward = build_reward(config.reward, device=acc.device, policy_tokenizer=self.tokenizer)

        world, ppo = acc.num_processes, config.ppo
        self.prompts_per_iteration = ppo.rollout_batch_size
        per_epoch = max(len(self.bundle.train) // (ppo.rollout_batch_size * world), 1)
        self.iterations_per_epoch = per_epoch
        self.total_steps = config.train.max_steps or max(math.ceil(config.train.num_epochs * per_epoch), 1)
        updates = self.total_steps * ppo.epochs * math.ceil(ppo.rollout_batch_size / ppo.minibatch_size)
        policy_opt, policy_sched = build_optimizer(config, policy, updates)
        critic_cfg = config.model_copy(deep=True)
        critic_cfg.train.learning_rate = ppo.critic_learning_rate or config.train.learning_rate
        critic_opt, critic_sched = build_optimizer(critic_cfg, critic, updates)
        (self.policy, self.critic, self.policy_opt, self.critic_opt, self.policy_sched,
         self.critic_sched) = acc.prepare(policy, critic, policy_opt, critic_opt, policy_sched, critic_sched)
        self.generator = build_generator(config.generation, acc.unwrap_model(self.policy).model, self.tokenizer, acc,
                                         seed=config.seed, max_prompt_length=config.data.max_prompt_length)
        self.ctx = StepContext(acc, self.policy, loss, self.reference, self.tokenizer, config, generator=self.generator)
        self.state = ckpt.TrainerState()
        if self.resume_path is not None:
            self.state = ckpt.load_checkpoint(acc, self.resume_path)
            if self.state.kl_coef is not None:
                self.loss.kl_coef = self.state.kl_coef
        if trackers:
            acc.init_trackers(config.logging.run_name or self.output_dir.name, config=config.model_dump(mode="json"))
        self.log = RunLogger(self.output_dir, acc, self.total_steps, progress=config.logging.progress,
                             trackers=bool(trackers), resume=self.resume_path is not None)

    # ------------------------------------------------------------------------------------------------- rollouts

    def prompt_batches(self):
        """Endless prompt batches, reshuffled every epoch with seed + epoch; resumes at the saved position."""
        while True:
            dataset = self.bundle.train
            if self.state.epoch > 0 and self.config.data.shuffle:
                dataset = dataset.shuffle(seed=self.config.seed + self.state.epoch)
            loader = DataLoader(dataset, batch_size=self.prompts_per_iteration, shuffle=False, drop_last=True,
                                collate_fn=PromptCollator())
            loader = self.accelerator.prepare_data_loader(loader)
            if self.state.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
            for batch in loader:
                self.state.batches_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        acc, loss = self.accelerator, self.loss
        rollouts = self.generator.generate(batch["prompt_input_ids"], sampling_params(self.ctx, 1))
        seqs = {k: v.to(acc.device) for k, v in rollouts.to_sequences(self.tokenizer.pad_token_id).items()}
        args = (seqs["input_ids"], seqs["attention_mask"], seqs["completion_mask"])
        old = self.policy(*args)
        mask = old.mask.bool()
        reference = self.reference.token_logps(*args).token_logps
        dpo = self.dpo_logps(*args)
        values = self.critic(seqs["input_ids"], seqs["attention_mask"])[:, :-1].float()
        prompts = [batch["prompt_text"][int(i)] for i in rollouts.prompt_index]
        messages = [batch["prompt_messages"][int(i)] for i in rollouts.prompt_index]
        scores = self.reward.score(prompts, rollouts.texts, prompt_messages=messages,
                                   finished=rollouts.finished).float().to(acc.device)
        rewards, parts = loss.token_rewards(old.token_logps, reference, dpo, scores, mask)
        reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
        if self.config.ppo.whiten_advantages:
            advantages, returns = loss.advantages(rewards, values, mask, reduce=reduce)
        else:
            from prefopt.losses.rto import gae

            advantages, returns = gae(rewards, values, mask, loss.gamma, loss.lam)
        lengths = mask.sum(-1).float()
        metrics = {
            "rto/dpo_reward": float(parts["dpo"].sum(-1).mean()),
            "rto/kl": float(parts["kl"].sum(-1).mean()),
            "rto/rm_score": float(parts["rm"].mean()),
            "rto/total_reward": float(rewards.sum(-1).mean()),
            "rto/kl_coef": float(loss.kl_coef),
            "ppo/returns": float((returns * mask).sum() / mask.sum().clamp(min=1)),
            "ppo/values": float((values * mask).sum() / mask.sum().clamp(min=1)),
            "online/response_length": float(lengths.mean()),
            "online/eos_rate": float(rollouts.finished.float().mean()),
        }
        samples = [{"prompt": p, "completion": t, "score": float(s)}
                   for p, t, s in zip(prompts, rollouts.texts, scores.tolist())]
        return {**seqs, "mask": mask, "old_logps": old.token_logps, "old_values": values, "advantages": advantages,
                "returns": returns, "metrics": metrics, "samples": samples, "tokens": float(seqs["attention_mask"].sum())}

    # -------------------------------------------------------------------------------------------------- updates

    def update(self, data: dict, averager: MetricAverager) -> None:
        acc, ppo = self.accelerator, self.config.ppo
        count = data["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(self.config.seed + self.state.global_step)
        for _ in range(ppo.epochs):
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, ppo.minibatch_size):
                rows = order[start:start + ppo.minibatch_size].to(acc.device)
                pick = {k: data[k][rows] for k in ("input_ids", "attention_mask", "completion_mask", "mask",
                                                   "old_logps", "old_values", "advantages", "returns")}
                new = self.policy(pick["input_ids"], pick["attention_mask"], pick["completion_mask"])
                values = self.critic(pick["input_ids"], pick["attention_mask"])[:, :-1].float()
                output = self.loss(LossInputs(
                    response_mask=pick["mask"], policy_token_logps=new.token_logps, old_token_logps=pick["old_logps"],
                    advantages=pick["advantages"], returns=pick["returns"], values=values,
                    old_values=pick["old_values"]))
                acc.backward(output.loss)
                norm = acc.clip_grad_norm_(list(self.policy.parameters()), self.config.train.max_grad_norm or 1e9)
                acc.clip_grad_norm_(list(self.critic.parameters()), self.config.train.max_grad_norm or 1e9)
                if norm is None or math.isfinite(float(norm)):
                    for optimizer, scheduler in ((self.policy_opt, self.policy_sched),
                                                 (self.critic_opt, self.critic_sched)):
                        optimizer.step()
                        scheduler.step()
                else:
                    self.state.skipped_steps += 1
                    logger.warning("non-finite PPO gradient; minibatch update skipped")
                self.policy_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                averager.add({**output.metrics, "loss": float(output.loss.detach())})

    def adapt_kl(self, observed_kl: float) -> None:
        """Adaptive KL controller (Ziegler et al. 2019) when ``ppo.adaptive_kl_target`` is set."""
        target = self.config.ppo.adaptive_kl_target
        if target is None:
            return
        error = max(min(observed_kl / target - 1.0, 0.2), -0.2)
        steps = self.prompts_per_iteration * self.accelerator.num_processes
        self.loss.kl_coef *= 1.0 + error * steps / self.config.ppo.adaptive_kl_horizon

    # ------------------------------------------------------------------------------------------------------ run

    def run(self):
        from prefopt.trainer.loop import TrainResult

        acc, config, state = self.accelerator, self.config, self.state
        averager, throughput = MetricAverager(), Throughput()
        batches = self.prompt_batches()
        try:
            while state.global_step < self.total_steps:
                data = self.rollout(next(batches))
                averager.add(data["metrics"])
                throughput.add(data["tokens"])
                self.update(data, averager)
                self.adapt_kl(data["metrics"]["rto/kl"])
                state.global_step += 1
                self.generator.load_weights(acc.unwrap_model(self.policy).model)
                self.log.advance(state.global_step)
                if state.global_step % config.logging.logging_steps == 0 or state.global_step == self.total_steps:
                    metrics = averager.reduce(acc)
                    self.log.log({"step": state.global_step, "epoch": state.epoch, **metrics,
                                  "learning_rate": self.policy_sched.get_last_lr()[0],
                                  "tokens_per_second": throughput.rate(acc),
                                  "train/skipped_steps": state.skipped_steps})
                every = config.logging.sample_steps
                if every and state.global_step % every == 0:
                    self.log.log_samples(state.global_step, data["samples"][:8])
                if config.train.save_steps and state.global_step % config.train.save_steps == 0:
                    state.kl_coef = float(self.loss.kl_coef)
                    ckpt.save_checkpoint(acc, self.output_dir, state, config.train.save_total_limit)
            final_dir = ckpt.save_final_model(acc, self.policy, self.tokenizer, self.output_dir)
        finally:
            self.log.close()
            acc.end_training()
        return TrainResult(self.output_dir, final_dir, state.global_step, dict(self.log.last), {})

