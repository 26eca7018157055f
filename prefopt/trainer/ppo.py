"""The ``ppo`` step kind: RTO (Zhong et al. 2024, "DPO Meets PPO") and plain PPO, on the shared run scaffold.

One global step = one rollout batch of ``ppo.rollout_batch_size`` prompts per device: sample responses, score them
(the loss's :meth:`~prefopt.losses.ppo.PPOLoss.token_rewards` hook turns rollout logps, reference logps, the DPO
policy's logps when the loss needs ``"dpo_policy"``, and the reward layer's scores into per-token rewards), estimate
advantages with GAE against the critic (whitened over every response token of every rank), then ``ppo.epochs``
passes of clipped policy/value updates over shuffled minibatches; each optimizer update accumulates
``train.gradient_accumulation_steps`` micro-batches of ``ppo.minibatch_size`` rollouts and goes through the
scaffold's :class:`~prefopt.trainer.updates.Updater` (clipping, the non-finite guard, schedulers).

The adaptive KL coefficient (Ziegler et al. 2019) is this step's state: it starts from the loss's
``initial_kl_coef()``, adapts to the KL averaged over *all* ranks (so every rank keeps the same coefficient), is
passed to ``token_rewards`` and is saved in every checkpoint.

Five models can be involved: policy, reference (SFT), DPO policy, reward model, critic. Cheap layouts: with LoRA the
reference is the policy with adapters off (``reference.mode=adapter``) and the DPO policy can be a second adapter on
the same base (``ppo.dpo_adapter``); a ``function`` reward needs no model at all.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from prefopt.errors import ConfigError
from prefopt.losses import LossInputs
from prefopt.losses.ppo import RolloutTokens
from prefopt.trainer.online import sampling_params
from prefopt.trainer.ppo_setup import build_critic, check_critic_tokenizer, check_rto_lineage, dpo_scorer
from prefopt.trainer.steps import StepKind, StepResult, Trainable, register_step

logger = logging.getLogger(__name__)

_MINIBATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "completion_mask",
    "mask",
    "old_logps",
    "old_values",
    "advantages",
    "returns",
)


class AdaptiveKL:
    """Ziegler et al. 2019's proportional controller: ``kl_coef *= 1 + clip(KL / target - 1, +-0.2) * n / horizon``
    with ``n`` the rollouts of the step over all ranks. Without a target the coefficient stays fixed."""

    def __init__(self, initial: float, target: Optional[float], horizon: int, rollouts_per_step: int):
        self.value, self.target, self.horizon, self.rollouts = (
            float(initial),
            target,
            horizon,
            rollouts_per_step,
        )

    def update(self, observed_kl: float) -> None:
        if self.target is None:
            return
        error = max(min(observed_kl / self.target - 1.0, 0.2), -0.2)
        self.value *= 1.0 + error * self.rollouts / self.horizon


@register_step("ppo")
class PPOStep(StepKind):
    data_kind = "prompts"
    batch_size_key = "ppo.rollout_batch_size"
    minibatch_keys = _MINIBATCH_KEYS  # rollout fields a minibatch carries (subclasses add theirs)

    # ------------------------------------------------------------------------------------------ class hooks

    @classmethod
    def check_config(cls, config, loss) -> None:
        ppo, accum = config.ppo, config.train.gradient_accumulation_steps
        if ppo.rollout_batch_size % (ppo.minibatch_size * accum):
            raise ConfigError(
                f"ppo.rollout_batch_size: {ppo.rollout_batch_size} rollouts do not split into whole optimizer "
                f"updates of ppo.minibatch_size={ppo.minibatch_size} x train.gradient_accumulation_steps={accum}; "
                "make it a multiple of their product"
            )
        if not hasattr(loss, "token_rewards"):
            raise ConfigError(
                f"loss.name: '{loss.name}' declares step 'ppo' but has no PPO rollout hooks "
                "(subclass prefopt.losses.ppo.PPOLoss)"
            )

    @classmethod
    def check_models(cls, config, tokenizer) -> None:
        check_rto_lineage(config, tokenizer)
        check_critic_tokenizer(config, tokenizer)

    @classmethod
    def loader_batch_size(cls, config) -> int:
        return config.ppo.rollout_batch_size

    @classmethod
    def batches_per_step(cls, config) -> int:
        return 1

    @classmethod
    def updates_per_step(cls, config) -> int:
        per_update = config.ppo.minibatch_size * config.train.gradient_accumulation_steps
        return config.ppo.epochs * (config.ppo.rollout_batch_size // per_update)

    @classmethod
    def trainables(
        cls, config, tokenizer, policy, accelerator, loss, extras: dict[str, Any]
    ) -> list[Trainable]:
        if "dpo_policy" in loss.needs:
            extras["dpo_logps"] = dpo_scorer(config, policy, accelerator)
        learning_rate = config.ppo.critic_learning_rate or config.train.learning_rate
        return [Trainable("critic", build_critic(config), learning_rate)]

    # --------------------------------------------------------------------------------------------- instance

    def __init__(self, ctx):
        super().__init__(ctx)
        ppo = ctx.config.ppo
        self.critic = ctx.modules["critic"]
        self.dpo_logps = ctx.extras.get("dpo_logps")
        self.kl = AdaptiveKL(
            ctx.loss.initial_kl_coef(),
            ppo.adaptive_kl_target,
            ppo.adaptive_kl_horizon,
            ppo.rollout_batch_size * ctx.accelerator.num_processes,
        )

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kl_coef") is not None:
            self.kl.value = float(state["kl_coef"])

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        acc = self.ctx.accelerator
        return acc.reduce(tensor, reduction="sum") if acc.num_processes > 1 else tensor

    def _sample(self, batch: dict, stream: str = "policy"):
        """Rollouts for the batch's prompts (a seed per prompt) and their sequences on the device."""
        ctx = self.ctx
        rollouts = ctx.generator.generate(
            batch["prompt_input_ids"], sampling_params(ctx, 1, batch["index"], stream)
        )
        seqs = {
            k: v.to(ctx.accelerator.device)
            for k, v in rollouts.to_sequences(ctx.tokenizer.pad_token_id).items()
        }
        return rollouts, seqs

    def _scores(self, batch: dict, rollouts) -> torch.Tensor:
        prompts = [batch["prompt_text"][int(i)] for i in rollouts.prompt_index]
        messages = [batch["prompt_messages"][int(i)] for i in rollouts.prompt_index]
        return (
            self.ctx.reward.score(
                prompts, rollouts.texts, prompt_messages=messages, finished=rollouts.finished
            )
            .float()
            .to(self.ctx.accelerator.device)
        )

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        ctx = self.ctx
        rollouts, seqs = self._sample(batch)
        args = (seqs["input_ids"], seqs["attention_mask"], seqs["completion_mask"])
        old = ctx.policy(*args)
        mask = old.mask.bool()
        values = self.critic(seqs["input_ids"], seqs["attention_mask"])[:, :-1].float()
        scores = self._scores(batch, rollouts)
        tokens = RolloutTokens(
            policy_logps=old.token_logps,
            reference_logps=ctx.reference.token_logps(*args).token_logps,
            scores=scores,
            mask=mask,
            dpo_logps=self.dpo_logps(*args) if self.dpo_logps is not None else None,
        )
        shaped = ctx.loss.token_rewards(tokens, self.kl.value)
        reduce = self._sum_over_ranks if ctx.accelerator.num_processes > 1 else None
        advantages, returns = ctx.loss.advantages(
            shaped.rewards, values, mask, reduce=reduce, whiten=ctx.config.ppo.whiten_advantages
        )
        # The controller's KL is the mean sequence KL over every rank's rollouts: each rank adapts identically.
        kl_totals = self._sum_over_ranks(
            torch.stack([shaped.kl.sum().double(), mask.new_tensor(len(mask)).double()])
        )
        observed_kl = float(kl_totals[0] / kl_totals[1].clamp(min=1))
        token_count = mask.sum().clamp(min=1)
        metrics = {key: float(value.float().mean()) for key, value in shaped.metrics.items()}
        metrics.update(
            {
                "ppo/kl_coef": self.kl.value,
                "ppo/returns": float((returns * mask).sum() / token_count),
                "ppo/values": float((values * mask).sum() / token_count),
                "online/response_length": float(mask.sum(-1).float().mean()),
                "online/eos_rate": float(rollouts.finished.float().mean()),
            }
        )
        samples = [
            {"prompt": batch["prompt_text"][int(i)], "completion": t, "score": float(s)}
            for i, t, s in zip(rollouts.prompt_index, rollouts.texts, scores.tolist())
        ]
        return {
            **seqs,
            "mask": mask,
            "old_logps": old.token_logps,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "rewards": shaped.rewards,
            "metrics": metrics,
            "samples": samples,
            "observed_kl": observed_kl,
            "tokens": float(seqs["attention_mask"].sum()),
        }

    def __call__(self, minibatch: dict) -> StepResult:
        """The PPO loss of one micro-batch of rollouts (rows of :meth:`rollout`'s output)."""
        new = self.ctx.policy(
            minibatch["input_ids"], minibatch["attention_mask"], minibatch["completion_mask"]
        )
        values = self.critic(minibatch["input_ids"], minibatch["attention_mask"])[:, :-1].float()
        output = self.ctx.loss(
            LossInputs(
                response_mask=minibatch["mask"],
                policy_token_logps=new.token_logps,
                old_token_logps=minibatch["old_logps"],
                advantages=minibatch["advantages"],
                returns=minibatch["returns"],
                values=values,
                old_values=minibatch["old_values"],
                # tokens forced from a dataset prefix (DR-PO's resets, ppo_resets.py); absent for plain PPO
                reset_mask=minibatch.get("reset_mask"),
            )
        )
        return StepResult(output, tokens=0.0)

    def train_batch(self, batch: dict, updater) -> StepResult:
        ctx, ppo = self.ctx, self.ctx.config.ppo
        data = self.rollout(batch)
        updater.record(metrics=data["metrics"], tokens=data["tokens"])
        accum = ctx.config.train.gradient_accumulation_steps
        count = data["input_ids"].shape[0]
        # Minibatch order: a fixed function of the seed and the step, so a resumed run replays it exactly.
        generator = torch.Generator().manual_seed(ctx.config.seed + updater.state.global_step)
        last = None
        for _ in range(ppo.epochs):
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, ppo.minibatch_size * accum):
                for k in range(accum):
                    begin = start + k * ppo.minibatch_size
                    rows = order[begin : begin + ppo.minibatch_size].to(ctx.accelerator.device)
                    with updater.micro_batch(last=k == accum - 1):
                        last = self({key: data[key][rows] for key in self.minibatch_keys})
                        updater.backward(last.output.loss)
                    updater.record(last)
                updater.optimizer_step()
        self.kl.update(data["observed_kl"])
        return StepResult(last.output, tokens=data["tokens"], samples=data["samples"])

    @torch.no_grad()
    def eval_batch(self, batch: dict) -> tuple[dict[str, float], float]:
        """Mean reward and mean sequence KL(pi || ref) of policy samples for the eval prompts."""
        ctx = self.ctx
        rollouts, seqs = self._sample(batch, "eval")
        args = (seqs["input_ids"], seqs["attention_mask"], seqs["completion_mask"])
        policy = ctx.policy(*args)
        kl = torch.where(
            policy.mask.bool(),
            policy.token_logps - ctx.reference.token_logps(*args).token_logps,
            torch.zeros((), device=policy.token_logps.device),
        ).sum(-1)
        scores = self._scores(batch, rollouts)
        metrics = {
            "reward": float(scores.mean()),
            "kl": float(kl.float().mean()),
            "response_length": float(policy.mask.sum(-1).float().mean()),
        }
        return metrics, float(len(rollouts))
