"""The ``ppo_resets`` step kind: PPO whose rollouts restart from prefixes of dataset responses (DR-PO, Chang et al.
2024, arXiv 2404.08495). Everything else is the ``ppo`` step (:class:`~prefopt.trainer.ppo.PPOStep`).

Per training rollout the loss's :meth:`~prefopt.losses.drpo.DRPOLoss.reset_lengths` hook draws k (0: no reset) for
each row's dataset response; :func:`~prefopt.generation.resets.generate_with_resets` continues ``prompt + prefix``
on the configured backend (HF or vLLM). With ``prefix_in_response()`` the prefix stays in the response and
``reset_mask`` (aligned like the per-token logps) keeps it out of the policy loss; otherwise it joins the prompt.
Evaluation samples from the prompts alone.
"""

from __future__ import annotations

import random

import torch

from prefopt.generation.base import eos_token_ids
from prefopt.generation.resets import generate_with_resets
from prefopt.trainer.online import sampling_params
from prefopt.trainer.ppo import PPOStep
from prefopt.trainer.steps import register_step


@register_step("ppo_resets")
class ResetPPOStep(PPOStep):
    data_kind = "reset_prompts"
    minibatch_keys = PPOStep.minibatch_keys + ("reset_mask",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self._resets = True

    def _sample(self, batch: dict, stream: str = "policy"):
        if not self._resets:
            return super()._sample(batch, stream)
        ctx = self.ctx
        # Per rank and step, so a resumed run draws the same resets.
        rng = random.Random(f"drpo-{ctx.config.seed}-{ctx.global_step()}-{ctx.accelerator.process_index}")
        completions = batch["completion_input_ids"]
        lengths = ctx.loss.reset_lengths([len(c) for c in completions], rng)
        prefixes = [list(c[:k]) for c, k in zip(completions, lengths)]
        model = getattr(ctx.generator, "model", None)
        out = generate_with_resets(
            ctx.generator,
            batch["prompt_input_ids"],
            prefixes,
            sampling_params(ctx, 1),
            eos_ids=eos_token_ids(ctx.tokenizer, model),
            pad_id=ctx.tokenizer.pad_token_id,
            tokenizer=ctx.tokenizer,
            prefix_in_response=ctx.loss.prefix_in_response(),
        )
        rollouts = out.rollouts
        rollouts.texts = out.texts  # the reward scores prefix + continuation in both modes
        device = ctx.accelerator.device
        seqs = {k: v.to(device) for k, v in rollouts.to_sequences(ctx.tokenizer.pad_token_id).items()}
        # reset_mask on input positions, then shifted like the per-token logps ([N, L-1], aligned to ids[:, 1:])
        full = torch.zeros_like(seqs["input_ids"], dtype=torch.bool)
        for i, prompt in enumerate(rollouts.prompt_ids):
            k = int(out.reset_mask[i].sum())
            full[i, len(prompt) : len(prompt) + k] = True
        seqs["reset_mask"] = full[:, 1:]
        self._last_resets = out.reset_lengths
        return rollouts, seqs

    def rollout(self, batch: dict) -> dict:
        data = super().rollout(batch)
        resets = getattr(self, "_last_resets", [])
        data["metrics"]["drpo/reset_share"] = sum(k > 0 for k in resets) / max(len(resets), 1)
        data["metrics"]["drpo/reset_length"] = sum(resets) / max(sum(k > 0 for k in resets), 1)
        return data

    @torch.no_grad()
    def eval_batch(self, batch: dict):
        self._resets = False
        try:
            return super().eval_batch(batch)
        finally:
            self._resets = True
