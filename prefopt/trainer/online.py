"""Online step kinds: the policy samples while it trains.

``pairs+samples`` (HyPO): an offline pair batch plus ``samples_per_prompt`` unlabelled policy samples for its
prompts. ``online_pairs`` (XPO): per prompt one policy sample and one reference sample, ordered by the reward
layer. ``online_policy_pairs`` (online DPO, as TRL's ``OnlineDPOTrainer``): two policy samples per prompt, ordered
by the reward layer. In both, every sequence of the step goes through ONE policy forward: DDP expects one forward per
backward, and one padded batch is faster than two.
"""

from __future__ import annotations

import torch

from prefopt.data import PairCollator, SFTCollator
from prefopt.errors import ConfigError
from prefopt.generation import SamplingParams
from prefopt.losses import LossInputs
from prefopt.models.logps import sequence_totals
from prefopt.trainer.distributed import unwrapped
from prefopt.trainer.steps import PairStep, StepContext, StepKind, StepResult, _move, register_step


def prompt_seeds(ctx: StepContext, indices, stream: str) -> list[int]:
    """One sampling seed per prompt from the run seed, the optimizer step, the stream (``policy``, ``reference``,
    ``eval``...) and the prompt's row index in the dataset: the same prompt gets the same samples whatever the
    batch, the sub-batch or the rank it lands on (1 and N processes sample alike; a resumed run samples alike)."""
    import hashlib

    head = f"{ctx.config.seed}:{ctx.global_step()}:{stream}"
    return [
        int.from_bytes(hashlib.blake2b(f"{head}:{int(i)}".encode(), digest_size=8).digest(), "little")
        & (2**63 - 1)
        for i in indices
    ]


def sampling_params(ctx: StepContext, n: int, indices=None, stream: str = "policy") -> SamplingParams:
    """The recipe's sampling settings; with ``indices`` (dataset row ids) every prompt gets its own seed."""
    gen = ctx.config.generation
    seeds = prompt_seeds(ctx, indices, stream) if indices is not None else None
    return SamplingParams(
        n=n,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        prompt_seeds=seeds,
    )


def completion_tokens(rollouts) -> list[list[int]]:
    """The generated ids of each rollout up to and including its first EOS."""
    return [row[mask.bool()].tolist() for row, mask in zip(rollouts.completion_ids, rollouts.completion_mask)]


def stack_padded(batches: list[dict], pad_token_id: int) -> dict:
    """Concatenate right-padded batches along rows, padding them to a common length."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("completion_mask", 0)):
        parts = [torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=fill) for b in batches]
        out[key] = torch.cat(parts)
    return out


def ordered_pair_batch(
    ctx: StepContext, batch: dict, first: list[list[int]], second: list[list[int]], first_wins: torch.Tensor
) -> tuple[dict, torch.Tensor, LossInputs]:
    """The pair batch of an online step, built once: per prompt ``i`` the winner of ``first[i]`` / ``second[i]``
    (by ``first_wins``) as chosen, the other as rejected; then ONE policy forward and ONE reference forward over it.

    Returns ``(pairs, per-sequence policy logp sums [2B], LossInputs)`` with the policy and reference logps and the
    lengths filled in; the caller adds its method's own fields (scores, XPO's reference-sample logps)."""
    features = []
    for i, prompt in enumerate(batch["prompt_input_ids"]):
        chosen, rejected = (first[i], second[i]) if first_wins[i] else (second[i], first[i])
        features.append(
            {
                "index": int(batch["index"][i]),
                "prompt_input_ids": prompt,
                "chosen_input_ids": chosen,
                "rejected_input_ids": rejected,
                "prompt_text": batch["prompt_text"][i],
                "prompt_messages": batch["prompt_messages"][i],
                "chosen_text": "",
                "rejected_text": "",
            }
        )
    pairs = _move(PairCollator(ctx.tokenizer.pad_token_id)(features), ctx.accelerator.device)
    logps = ctx.policy(pairs["input_ids"], pairs["attention_mask"], pairs["completion_mask"])
    sums, lengths = sequence_totals(logps, pairs)
    half = sums.shape[0] // 2
    inputs = LossInputs(
        policy_chosen_logps=sums[:half],
        policy_rejected_logps=sums[half:],
        chosen_lengths=lengths[:half],
        rejected_lengths=lengths[half:],
    )
    inputs.reference_chosen_logps, inputs.reference_rejected_logps = ctx.reference.pair_logps(pairs)
    return pairs, sums, inputs


@register_step("pairs+samples")
class HyPOStep(PairStep):
    """DPO on the offline pair plus a reverse-KL penalty on fresh policy samples (docs/losses.md, hypo)."""

    @classmethod
    def check_config(cls, config, loss) -> None:
        # The KL term's score-function gradient E_{y~pi}[(k - b) grad log pi(y)] is the KL gradient only when y is
        # drawn from pi itself: temperature, top-p or top-k sampling draws from another distribution and biases it.
        gen = config.generation
        if gen.temperature != 1.0 or gen.top_p != 1.0 or gen.top_k != 0:
            raise ConfigError(
                f"generation: loss '{loss.name}' estimates KL(pi||ref) from samples of the policy itself, so it "
                f"needs generation.temperature=1 top_p=1 top_k=0 (got temperature={gen.temperature}, "
                f"top_p={gen.top_p}, top_k={gen.top_k}); other settings bias the KL gradient"
            )

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        n = ctx.loss.online_samples_per_prompt()
        rollouts = ctx.generator.generate(batch["prompt_input_ids"], sampling_params(ctx, n, batch["index"]))
        samples = SFTCollator(ctx.tokenizer.pad_token_id)(
            [
                {"index": int(i), "prompt_input_ids": p, "completion_input_ids": c}
                for i, p, c in zip(rollouts.prompt_index, rollouts.prompt_ids, completion_tokens(rollouts))
            ]
        )
        pairs = _move(batch, ctx.accelerator.device)
        samples = _move(samples, ctx.accelerator.device)
        joint = _move(stack_padded([pairs, samples], ctx.tokenizer.pad_token_id), ctx.accelerator.device)
        logps = ctx.policy(joint["input_ids"], joint["attention_mask"], joint["completion_mask"])
        sums, lengths = sequence_totals(logps, joint)
        pair_rows = pairs["input_ids"].shape[0]
        half = pair_rows // 2
        inputs = LossInputs(
            policy_chosen_logps=sums[:half],
            policy_rejected_logps=sums[half:pair_rows],
            chosen_lengths=lengths[:half],
            rejected_lengths=lengths[half:pair_rows],
            sample_policy_logps=sums[pair_rows:],
            sample_prompt_index=rollouts.prompt_index.to(sums.device),
        )
        inputs.reference_chosen_logps, inputs.reference_rejected_logps = ctx.reference.pair_logps(pairs)
        inputs.sample_reference_logps = ctx.reference.token_logps(
            samples["input_ids"], samples["attention_mask"], samples["completion_mask"]
        ).sums
        output = ctx.loss(inputs)
        logged = [
            {"prompt": batch["prompt_text"][int(i)], "completion": text}
            for i, text in zip(rollouts.prompt_index, rollouts.texts)
        ]
        output.metrics.setdefault(
            "online/response_length", float(samples["completion_mask"].sum(-1).float().mean())
        )
        output.metrics.setdefault("online/eos_rate", float(rollouts.finished.float().mean()))
        tokens = float(joint["attention_mask"].sum())
        return StepResult(output, tokens=tokens, samples=logged)


@register_step("online_pairs")
class OnlinePairStep(StepKind):
    """Online DPO / XPO: a policy sample and a reference sample per prompt, ordered by the reward layer (raw scores
    of both samples, scored in one call) or by a pairwise judge (``reward.kind=judge``)."""

    data_kind = "prompts"

    def __init__(self, ctx: StepContext):
        super().__init__(ctx)
        self.reference_generator = build_reference_generator(ctx)

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        prompts = batch["prompt_input_ids"]
        policy_rollouts = ctx.generator.generate(prompts, sampling_params(ctx, 1, batch["index"], "policy"))
        reference_rollouts = self.reference_generator.generate(
            prompts, sampling_params(ctx, 1, batch["index"], "reference")
        )
        policy_scores, reference_scores, policy_wins = self._order(batch, policy_rollouts, reference_rollouts)
        pairs, sums, inputs = ordered_pair_batch(
            ctx, batch, completion_tokens(policy_rollouts), completion_tokens(reference_rollouts), policy_wins
        )
        half = sums.shape[0] // 2
        # The reference sample is whichever side the policy sample is not.
        inputs.reference_sample_policy_logps = torch.where(
            policy_wins.to(sums.device), sums[half:], sums[:half]
        )
        if policy_scores is not None:
            inputs.policy_sample_scores = policy_scores.to(sums.device)
            inputs.reference_sample_scores = reference_scores.to(sums.device)
        output = ctx.loss(inputs)
        output.metrics.setdefault("online/policy_win_rate", float(policy_wins.float().mean()))
        output.metrics.setdefault(
            "online/response_length", float(policy_rollouts.completion_mask.sum(-1).float().mean())
        )
        output.metrics.setdefault("online/eos_rate", float(policy_rollouts.finished.float().mean()))
        logged = []
        for i in range(len(prompts)):
            row = {
                "prompt": batch["prompt_text"][i],
                "completion": policy_rollouts.texts[i],
                "reference_completion": reference_rollouts.texts[i],
                "policy_won": bool(policy_wins[i]),
            }
            if policy_scores is not None:
                row.update(score=float(policy_scores[i]), reference_score=float(reference_scores[i]))
            logged.append(row)
        return StepResult(output, tokens=float(pairs["attention_mask"].sum()), samples=logged)

    def _order(self, batch: dict, policy, reference):
        """``(policy scores, reference scores, policy wins)``; scores are None with a pairwise judge.

        Both sample sets are scored in ONE call: a normalising reward (``reward.normalize``) then applies the same
        affine map to both, so the order is that of the raw scores. Ties go to the policy sample (docs/losses.md,
        xpo; a judge's 0.5 is a tie)."""
        prompts = [batch["prompt_text"][int(i)] for i in policy.prompt_index]
        if self.ctx.config.reward.kind == "judge":
            verdicts = self.ctx.reward.judge(prompts, policy.texts, reference.texts).float().cpu()
            return None, None, verdicts >= 0.5
        messages = [batch["prompt_messages"][int(i)] for i in policy.prompt_index]
        scores = (
            self.ctx.reward.score(
                prompts * 2,
                policy.texts + reference.texts,
                prompt_messages=messages * 2,
                finished=torch.cat([policy.finished, reference.finished]),
            )
            .float()
            .cpu()
        )
        policy_scores, reference_scores = scores[: len(prompts)], scores[len(prompts) :]
        return policy_scores, reference_scores, policy_scores >= reference_scores


@register_step("online_policy_pairs")
class OnlinePolicyPairStep(StepKind):
    """Online DPO as TRL's ``OnlineDPOTrainer`` runs it: two policy samples per prompt, drawn in ONE ``generate``
    call (``n=2``), scored in one reward call (or judged pairwise), the higher-scored one chosen, ties to the first
    sample (``trl/experimental/online_dpo/online_dpo_trainer.py``, ``training_step``). The pair batch goes through
    one policy forward and one reference forward; its two rows share their prompt, which the shared-prompt path
    (``train.share_prompt``) computes once."""

    data_kind = "prompts"

    def __call__(self, batch: dict) -> StepResult:
        ctx = self.ctx
        prompts = batch["prompt_input_ids"]
        # Prompt-major rows 2i, 2i + 1; per-prompt seeds: 1 and N processes draw the same samples.
        rollouts = ctx.generator.generate(prompts, sampling_params(ctx, 2, batch["index"]))
        texts = rollouts.texts
        if ctx.config.reward.kind == "judge":
            first_wins = (
                ctx.reward.judge(list(batch["prompt_text"]), texts[0::2], texts[1::2]).float().cpu() >= 0.5
            )
            scores = None
        else:  # both samples of every prompt scored in one call (a normalising reward maps them alike)
            rows = [int(i) for i in rollouts.prompt_index]
            scores = (
                ctx.reward.score(
                    [batch["prompt_text"][i] for i in rows],
                    texts,
                    prompt_messages=[batch["prompt_messages"][i] for i in rows],
                    finished=rollouts.finished,
                )
                .float()
                .cpu()
            )
            first_wins = (
                scores[0::2] >= scores[1::2]
            )  # ties: the first sample (TRL: first_half >= second_half)
        tokens = completion_tokens(rollouts)
        pairs, sums, inputs = ordered_pair_batch(ctx, batch, tokens[0::2], tokens[1::2], first_wins)
        if scores is not None:
            first, second = scores[0::2], scores[1::2]
            inputs.chosen_scores = torch.where(first_wins, first, second).to(sums.device)
            inputs.rejected_scores = torch.where(first_wins, second, first).to(sums.device)
        output = ctx.loss(inputs)
        eos = float(rollouts.finished.float().mean())
        output.metrics.setdefault("val/contain_eos_token", eos)  # TRL's name for it
        output.metrics.setdefault("online/eos_rate", eos)
        output.metrics.setdefault(
            "online/response_length", float(rollouts.completion_mask.sum(-1).float().mean())
        )
        logged = []
        for i in range(len(prompts)):
            row = {
                "prompt": batch["prompt_text"][i],
                "completion": texts[2 * i],
                "second_completion": texts[2 * i + 1],
                "first_won": bool(first_wins[i]),
            }
            if scores is not None:
                row.update(score=float(scores[2 * i]), second_score=float(scores[2 * i + 1]))
            logged.append(row)
        return StepResult(output, tokens=float(pairs["attention_mask"].sum()), samples=logged)


class _AdapterDisabledGenerator:
    """Samples from the reference when the reference is the LoRA policy with its adapters switched off."""

    def __init__(self, generator, peft_model_getter):
        self.generator = generator
        self.peft_model_getter = peft_model_getter

    def generate(self, prompt_ids, sampling):
        with self.peft_model_getter().disable_adapter():
            return self.generator.generate(prompt_ids, sampling)

    def load_weights(self, model) -> None:
        pass


def build_reference_generator(ctx: StepContext):
    """Reference samples always come from Hugging Face ``generate`` (the vLLM engine holds the policy)."""
    from prefopt.generation import build_generator

    hf_config = ctx.config.generation.model_copy(update={"backend": "hf"})
    reference = ctx.reference
    if getattr(reference, "mode", None) == "adapter":
        peft_getter = lambda: unwrapped(ctx.accelerator, ctx.policy).model  # noqa: E731
        return _AdapterDisabledGenerator(
            build_generator(hf_config, peft_getter(), ctx.tokenizer, ctx.accelerator), peft_getter
        )
    if getattr(reference, "model", None) is None:
        raise ValueError("online pair methods need a live reference model (reference.mode=model or adapter)")
    return build_generator(hf_config, reference.model, ctx.tokenizer, ctx.accelerator)
