"""Parity with TRL 1.16 on random batches: values, gradients and the shared metrics.

How TRL is called, and why that way:

* ``DPOTrainer`` has no standalone loss function in TRL 1.16: the math sits inside
  ``DPOTrainer._compute_loss(self, model, inputs, return_outputs)``, which runs the model. We call that
  unbound method with a ``SimpleNamespace`` standing in for ``self`` (only the attributes the method reads)
  and a fake model whose output carries per-token log-probs we control (a leaf tensor, so gradients can be
  compared), with
  ``precompute_ref_logps=True`` so the reference log-probs come from ``inputs``. Building a real trainer would
  need a model, a tokenizer and a dataset, and would test far more than the loss.
* ``CPOTrainer.cpo_loss(self, chosen_logps, rejected_logps)`` (``trl.experimental.cpo``) is a pure function of
  the sequence log-probs; ``self`` is again a ``SimpleNamespace``.
* ``RewardTrainer.compute_loss`` runs the model; the fake model returns the scores as ``logits``.

If a TRL upgrade renames one of these attributes the test fails with an AttributeError naming it, rather than
silently comparing against something else.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="TRL parity tests need `trl` (pip install prefopt[test])")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we import trl.experimental knowingly
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

from prefopt.losses import LossInputs, get_loss  # noqa: E402

PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins"]


def identity(x):
    return x


def fake_trainer(**attributes) -> SimpleNamespace:
    """What the TRL loss methods read from ``self``, with single-process defaults."""
    defaults = dict(
        model=SimpleNamespace(training=True),
        ref_model=None,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        args=SimpleNamespace(center_rewards_coefficient=None),
        aux_loss_enabled=False,
        router_aux_loss_coef=0.0,
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=0.1,
        label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    defaults.update(attributes)
    return SimpleNamespace(**defaults)


class Batch:
    """A random padded batch of B pairs: per-token policy logps (one leaf tensor) and completion masks.

    Rows 0..B-1 are the chosen completions, B..2B-1 the rejected ones (TRL's concatenated layout). Each row is
    prompt tokens, then completion tokens, then right padding. ``per_token`` is aligned to ``input_ids[:,
    1:]``.
    """

    def __init__(self, batch: int, seed: int, dtype: torch.dtype, equal_chosen_lengths: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.batch, seq = batch, 16
        prompt = torch.randint(1, 4, (2 * batch,), generator=g)
        lengths = torch.randint(1, 11, (2 * batch,), generator=g)
        if equal_chosen_lengths:
            lengths[:batch] = 7
        positions = torch.arange(seq)[None, :]
        self.completion_mask = (
            (positions >= prompt[:, None]) & (positions < (prompt + lengths)[:, None])
        ).long()
        self.lengths = lengths
        self.per_token = (-3 * torch.rand(2 * batch, seq - 1, generator=g, dtype=dtype)).requires_grad_()
        sums = self.sums().detach()
        self.reference = sums + 2 * torch.randn(2 * batch, generator=g, dtype=dtype)

    def masked_per_token(self) -> torch.Tensor:
        # The fused LM head TRL asks for returns 0 where labels are -100 (prompt and padding).
        return self.per_token * self.completion_mask[:, 1:].to(self.per_token.dtype)

    def sums(self) -> torch.Tensor:
        return self.masked_per_token().sum(dim=1)

    def prefopt_inputs(self) -> LossInputs:
        sums, b = self.sums(), self.batch
        return LossInputs(
            policy_chosen_logps=sums[:b],
            policy_rejected_logps=sums[b:],
            reference_chosen_logps=self.reference[:b],
            reference_rejected_logps=self.reference[b:],
            chosen_lengths=self.lengths[:b],
            rejected_lengths=self.lengths[b:],
        )

    def trl_dpo(self, **attributes) -> tuple[torch.Tensor, dict[str, float]]:
        trainer = fake_trainer(**attributes)
        per_token = self.masked_per_token()
        zeros = torch.zeros_like(per_token.detach())

        def model(**kwargs):
            assert kwargs["fused_lm_head"] is True  # the output layout we emulate
            return SimpleNamespace(
                log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

        inputs = {
            "input_ids": torch.ones_like(self.completion_mask),
            "attention_mask": torch.ones_like(self.completion_mask),
            "completion_mask": self.completion_mask,
            "ref_chosen_logps": self.reference[: self.batch],
            "ref_rejected_logps": self.reference[self.batch :],
        }
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        return loss, metrics

    def grad(self, loss: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, self.per_token, retain_graph=True)
        return grad


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, batch: Batch, rel: float) -> None:
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=rel)
    assert torch.allclose(batch.grad(ours), batch.grad(theirs), rtol=rel, atol=rel)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(seed, beta):
    batch = Batch(6, seed, torch.float64)
    ours = get_loss("dpo", beta=beta)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_dpo(beta=beta, loss_types=["sigmoid"])
    assert_close(ours.loss, theirs, batch, rel=1e-12)
    for key in PAIR_METRICS + ["logps/chosen", "logps/rejected"]:
        assert ours.metrics[key] == pytest.approx(trl_metrics[key], rel=1e-12, abs=1e-12), key
    # TRL averages the accuracies in fp32
    assert ours.metrics["rewards/accuracies"] == pytest.approx(trl_metrics["rewards/accuracies"], rel=1e-7)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_matches_trl_label_smoothing(label_smoothing):
    # TRL 1.16's "sigmoid" ignores label_smoothing; its cDPO formula -(1-e)logsig(beta h) - e logsig(-beta h)
    # appears in DPOTrainer's "aot" loss, which sorts the policy and the reference log-ratio differences over
    # the batch before pairing them. Making both already ascending (sort the pairs by policy margin, then
    # assign the reference margins in the same order) makes the sort the identity, so "aot" is exactly cDPO
    # per pair.
    batch = Batch(6, 3, torch.float64)
    sums = batch.sums().detach()
    b = batch.batch
    policy_margins = sums[:b] - sums[b:]
    order = torch.argsort(policy_margins)
    wanted_ref_margins = torch.sort(
        torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    )
    ref_margins = torch.empty_like(policy_margins)
    ref_margins[order] = 3 * wanted_ref_margins.values
    batch.reference[b:] = batch.reference[:b] - ref_margins
    ours = get_loss("dpo", beta=0.2, label_smoothing=label_smoothing)(batch.prefopt_inputs())
    theirs, _ = batch.trl_dpo(beta=0.2, loss_types=["aot"], label_smoothing=label_smoothing)
    assert_close(ours.loss, theirs, batch, rel=1e-12)

    # The same formula in CPOTrainer's "sigmoid" loss, fed the log-ratios in place of log-probs.
    inputs = batch.prefopt_inputs()
    cpo = fake_trainer(alpha=0.0, beta=0.2, label_smoothing=label_smoothing, loss_type="sigmoid")
    losses, _, _ = CPOTrainer.cpo_loss(
        cpo,
        inputs.policy_chosen_logps - inputs.reference_chosen_logps,
        inputs.policy_rejected_logps - inputs.reference_rejected_logps,
    )
    assert_close(ours.loss, losses.mean(), batch, rel=1e-12)


# prefopt divergence (paper convention) -> TRL's f_divergence_type and f_alpha_divergence_coef = 1 - alpha.
FDIV_CASES = [
    ({"divergence": "reverse_kl"}, {"f_divergence_type": "reverse_kl"}, torch.float64),
    ({"divergence": "forward_kl"}, {"f_divergence_type": "forward_kl"}, torch.float64),
    ({"divergence": "js"}, {"f_divergence_type": "js_divergence"}, torch.float64),
    # TRL's alpha-divergence branch only knows fp16/bf16/fp32 clamp limits, so these run in fp32.
    *[
        (
            {"divergence": "alpha", "alpha": a},
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1 - a},
            torch.float32,
        )
        for a in (0.3, 0.5, 0.7)
    ],
]


@pytest.mark.parametrize("ours_params, trl_params, dtype", FDIV_CASES)
def test_fdpo_matches_trl_f_divergences(ours_params, trl_params, dtype):
    batch = Batch(6, 4, dtype)
    ours = get_loss("fdpo", beta=0.1, **ours_params)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_dpo(beta=0.1, loss_types=["sigmoid"], **trl_params)
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close(ours.loss, theirs, batch, rel=rel)
    for key in PAIR_METRICS:  # rewards stay beta * lr in both
        assert ours.metrics[key] == pytest.approx(trl_metrics[key], rel=rel, abs=rel), key
    assert ours.metrics["rewards/accuracies"] == pytest.approx(trl_metrics["rewards/accuracies"], rel=1e-7)


def test_alpha_convention_differs_from_trl_except_at_one_half():
    batch = Batch(6, 5, torch.float32)
    ours = get_loss("fdpo", divergence="alpha", alpha=0.3)(batch.prefopt_inputs()).loss
    same_number, _ = batch.trl_dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert abs(ours.item() - same_number.item()) > 1e-4


@pytest.mark.parametrize("nll", ["mean", "sum"])
def test_rpo_matches_trl_sigmoid_plus_sft(nll):
    # TRL 1.16 has no rpo_alpha; RPO is loss_type=["sigmoid", "sft"], loss_weights=[1, w], whose SFT term is
    # -mean(per-token logps over all chosen completion tokens of the batch). With every chosen completion n
    # tokens long that is mean_i(-logp_i / n), so: nll="mean" <-> w = eta; nll="sum" <-> w = eta * beta * n.
    batch = Batch(5, 6, torch.float64, equal_chosen_lengths=True)
    n, beta, eta = 7, 0.1, 0.3
    ours = get_loss("rpo", beta=beta, eta=eta, nll=nll)(batch.prefopt_inputs())
    weight = eta if nll == "mean" else eta * beta * n
    theirs, _ = batch.trl_dpo(beta=beta, loss_types=["sigmoid", "sft"], loss_weights=[1.0, weight])
    assert_close(ours.loss, theirs, batch, rel=1e-12)


def test_trl_rpo_with_unequal_lengths_is_dpo_plus_prefopt_sft():
    # With unequal chosen lengths TRL's SFT term is a batch token mean: exactly prefopt's "sft" loss.
    batch = Batch(5, 7, torch.float64)
    assert len(set(batch.lengths[:5].tolist())) > 1
    inputs = batch.prefopt_inputs()
    ours = get_loss("dpo")(inputs).loss + 0.4 * get_loss("sft")(inputs).loss
    theirs, _ = batch.trl_dpo(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.4])
    assert_close(ours, theirs, batch, rel=1e-12)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 1.375), (10.0, 3.0)])
def test_simpo_matches_trl_cpo_simpo_loss(beta, gamma):
    # CPOTrainer's simpo loss takes length-averaged logps and the absolute margin `simpo_gamma` (it divides by
    # beta internally); cpo_alpha=0 removes its NLL term, so the trainer's loss is losses.mean().
    batch = Batch(6, 8, torch.float64)
    inputs = batch.prefopt_inputs()
    for params in ({"gamma": gamma}, {"gamma_beta_ratio": gamma / beta}):
        ours = get_loss("simpo", beta=beta, **params)(inputs)
        cpo = fake_trainer(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo")
        chosen_avg = inputs.policy_chosen_logps / inputs.chosen_lengths
        rejected_avg = inputs.policy_rejected_logps / inputs.rejected_lengths
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, chosen_avg, rejected_avg)
        assert_close(ours.loss, losses.mean(), batch, rel=1e-12)
        assert ours.metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-12)
        assert ours.metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-12)


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_model_matches_trl_reward_trainer(center):
    g = torch.Generator().manual_seed(10)
    scores = torch.randn(8, 1, generator=g, dtype=torch.float64, requires_grad=True)
    trainer = fake_trainer(args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {
        "input_ids": torch.ones(8, 3, dtype=torch.long),
        "attention_mask": torch.ones(8, 3, dtype=torch.long),
    }
    theirs = RewardTrainer.compute_loss(trainer, lambda **_: SimpleNamespace(logits=scores), inputs)
    chosen, rejected = scores.chunk(2)
    ours = get_loss("reward_model", center_rewards_coef=center or 0.0)(
        LossInputs(chosen_scores=chosen, rejected_scores=rejected)
    )
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    (g_ours,) = torch.autograd.grad(ours.loss, scores)
    (g_theirs,) = torch.autograd.grad(theirs, scores)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-12)
    assert ours.metrics["rewards/accuracies"] == pytest.approx(trainer._metrics["train"]["accuracy"][-1])
    assert ours.metrics["rewards/margins"] == pytest.approx(trainer._metrics["train"]["margin"][-1])
