"""The TRL-catalogue losses: hand-computed worked numbers, TRL 1.16 parity on random batches, mixtures.

Worked inputs (docs/losses.md, Conventions): policy logp -12 (6 tokens) / -15 (10 tokens), reference -13 / -14,
so lr_w = 1, lr_l = -1, h = 2, beta = 0.1 unless said otherwise. Each value below was worked out by hand from the
loss's formula (docs/losses.md has the arithmetic), not by running the module.
"""

from __future__ import annotations

import os

import pytest
import torch

from prefopt.losses import LossInputs, available_losses, get_loss, loss_class

F64 = torch.float64


def worked(pairs=((-12.0, -15.0, -13.0, -14.0, 6, 10),)) -> LossInputs:
    cols = list(zip(*pairs))
    return LossInputs(
        policy_chosen_logps=torch.tensor(cols[0], dtype=F64, requires_grad=True),
        policy_rejected_logps=torch.tensor(cols[1], dtype=F64, requires_grad=True),
        reference_chosen_logps=torch.tensor(cols[2], dtype=F64),
        reference_rejected_logps=torch.tensor(cols[3], dtype=F64),
        chosen_lengths=torch.tensor(cols[4]),
        rejected_lengths=torch.tensor(cols[5]),
    )


# second pair for batch-dependent losses (AOT): policy -20 / -18, reference -19 / -22
TWO_PAIRS = ((-12.0, -15.0, -13.0, -14.0, 6, 10), (-20.0, -18.0, -19.0, -22.0, 5, 5))

WORKED = [
    ("ipo", {}, None, 22.404444),  # (1/6 + 1/10 - 5)^2
    ("hinge", {}, None, 0.8),  # max(0, 1 - 0.2)
    ("robust", {"label_smoothing": 0.1}, None, 0.573139),  # (0.9*0.598139 - 0.1*0.798139) / 0.8
    ("exo_pair", {"label_smoothing": 1e-3}, None, 2.422015),
    ("nca_pair", {}, None, 1.338794),  # 0.644397 + 0.5*0.744397 + 0.5*0.644397
    ("bco_pair", {}, None, 1.288793),  # 2 * 0.644397
    ("sppo_hard", {}, None, 32.0),  # (1 - 5)^2 + (-1 + 5)^2
    ("apo_zero", {}, None, 0.950042),  # 1 - sigmoid(0.1) + sigmoid(-0.1)
    ("apo_down", {}, None, 0.975145),  # sigmoid(0.1) + 1 - sigmoid(0.2)
    ("discopop", {"tau": 0.05}, None, 0.814763),  # (1 - s(4)) * 0.598139 + s(4) * exp(-0.2)
    ("sigmoid_norm", {}, None, 0.679902),  # -logsigmoid(0.1 * 0.266667)
    ("orpo", {}, None, 2.104206),  # 2 - 0.1 * logsigmoid(-0.607069)
    ("cpo", {}, None, 2.554355),  # -logsigmoid(0.3) + 12/6
    ("aot", {}, TWO_PAIRS, 0.773751),  # sorted margins [-2, 3] vs [1, 3]: deltas -3, 0
    ("aot_unpaired", {}, TWO_PAIRS, 0.773751),  # sorted lr_w [-1, 1] vs lr_l [-1, 4]: deltas 0, -3
    ("dpo", {}, TWO_PAIRS, 0.786108),  # per pair: deltas 2, -5 (what AOT's sorting changes)
    ("dpo", {"divergence": "forward_kl"}, None, 0.582517),  # the f-DPO value, now an option of dpo
    ("ipo", {"divergence": "js"}, None, 23.762450),  # s = log 2 + logsigmoid(lr), per token
    (
        "mix",
        {
            "mix": [
                {"name": "dpo", "weight": 0.8},
                {"name": "bco_pair", "weight": 0.2},
                {"name": "sft", "weight": 1.0},
            ]
        },
        None,
        2.736270,
    ),  # 0.8*0.598139 + 0.2*1.288793 + 2
]


@pytest.mark.parametrize(
    "name, params, pairs, value", WORKED, ids=[f"{w[0]}-{i}" for i, w in enumerate(WORKED)]
)
def test_worked_numbers(name, params, pairs, value):
    out = get_loss(name, **params)(worked(pairs) if pairs else worked())
    assert out.loss.item() == pytest.approx(value, rel=1e-6, abs=1e-6)
    out.loss.backward()  # differentiable


def test_every_pairwise_loss_logs_its_own_implicit_reward():
    inputs = worked(TWO_PAIRS)
    for name in available_losses():
        if loss_class(name).step != "pairs":
            continue
        params = {"mix": [{"name": "simpo", "weight": 1.0}, {"name": "dpo"}]} if name == "mix" else {}
        loss = get_loss(name, **params)
        reward = loss.implicit_reward()
        metrics = loss(inputs).metrics
        chosen = reward.sequence(
            inputs.policy_chosen_logps, inputs.reference_chosen_logps, inputs.chosen_lengths
        )
        rejected = reward.sequence(
            inputs.policy_rejected_logps, inputs.reference_rejected_logps, inputs.rejected_lengths
        )
        assert metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-12), name
        assert metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-12), name


@pytest.mark.parametrize("nll", ["sum", "mean"])
def test_rpo_is_a_dpo_plus_sft_mixture_with_the_papers_weights(nll):
    g = torch.Generator().manual_seed(3)
    inputs = LossInputs(
        policy_chosen_logps=(-30 * torch.rand(7, generator=g, dtype=F64)).requires_grad_(),
        policy_rejected_logps=(-30 * torch.rand(7, generator=g, dtype=F64)).requires_grad_(),
        reference_chosen_logps=-30 * torch.rand(7, generator=g, dtype=F64),
        reference_rejected_logps=-30 * torch.rand(7, generator=g, dtype=F64),
        chosen_lengths=torch.randint(1, 20, (7,), generator=g),
        rejected_lengths=torch.randint(1, 20, (7,), generator=g),
    )
    beta, eta = 0.1, 0.005
    rpo = get_loss("rpo", beta=beta, eta=eta, nll=nll)(inputs)
    # paper (nll="sum"): L_DPO + eta * beta * (-logp(y_w)); average form: L_DPO + eta * (-logp(y_w)/|y_w|)
    sft = {
        "name": "sft",
        "reduction": "sum" if nll == "sum" else "sequence_mean",
        "weight": eta * beta if nll == "sum" else eta,
    }
    mix = get_loss("mix", mix=[{"name": "dpo", "beta": beta, "weight": 1.0}, sft])(inputs)
    assert mix.loss.item() == pytest.approx(rpo.loss.item(), rel=1e-12)
    grads = [torch.autograd.grad(x.loss, inputs.policy_chosen_logps)[0] for x in (rpo, mix)]
    assert torch.allclose(*grads, rtol=1e-12, atol=1e-15)


def test_mixture_metrics_have_one_prefix_per_part():
    out = get_loss(
        "mix",
        mix=[{"name": "dpo", "weight": 0.5}, {"name": "dpo", "beta": 0.3, "weight": 0.5}, {"name": "sft"}],
    )(worked())
    assert out.metrics["dpo/loss"] == pytest.approx(0.598139, rel=1e-6)
    assert out.metrics["dpo_2/rewards/chosen"] == pytest.approx(0.3)
    assert out.metrics["sft/sft/nll"] == pytest.approx(2.0)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.1)  # the first part's, at top level
    assert out.loss.item() == pytest.approx(0.5 * 0.598139 + 0.5 * out.metrics["dpo_2/loss"] + 2.0, rel=1e-6)


@pytest.mark.parametrize(
    "mix, message",
    [
        (None, "non-empty list"),
        ([{"weight": 1}], "'name'"),
        ([{"name": "dpo", "weight": -1}], "weight"),
        ([{"name": "dpo", "eta": 1}], "unknown parameter"),
        ([{"name": "xpo"}], "can be mixed"),
        ([{"name": "sft"}], "at least one part"),
    ],
)
def test_mixture_errors_name_the_part(mix, message):
    with pytest.raises(ValueError, match=message):
        get_loss("mix", mix=mix)


def test_mixture_needs_are_the_union_of_its_parts():
    assert get_loss("mix", mix=[{"name": "simpo"}, {"name": "sft"}]).needs == frozenset()
    assert get_loss("mix", mix=[{"name": "simpo"}, {"name": "ipo"}]).needs == {"reference"}


def test_divergence_scores_vanish_when_policy_equals_reference():
    from prefopt.losses.divergence import DIVERGENCES, divergence_score

    zero = torch.zeros(3, dtype=F64)
    for divergence in DIVERGENCES:
        assert divergence_score(zero, divergence, 0.3).abs().max().item() < 1e-15, divergence


# ---------------------------------------------------------------------------------------------- TRL parity

trl = pytest.importorskip("trl", reason="TRL parity tests need `trl` (pip install prefopt[test])")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from tests.test_losses_trl_parity import Batch, assert_close, fake_trainer  # noqa: E402

# prefopt name, prefopt params, TRL loss_type, TRL attributes
TRL_CASES = [
    ("ipo", {}, "ipo", {}),
    ("hinge", {}, "hinge", {}),
    ("robust", {"label_smoothing": 0.2}, "robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.01}, "exo_pair", {"label_smoothing": 0.01}),
    ("nca_pair", {}, "nca_pair", {}),
    ("bco_pair", {}, "bco_pair", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}, "aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}, "aot_unpaired", {}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {"tau": 0.05}, "discopop", {"args": None}),
    ("sigmoid_norm", {}, "sigmoid_norm", {}),
]
DIVERGENCE_CASES = [
    ({"divergence": "forward_kl"}, {"f_divergence_type": "forward_kl"}),
    ({"divergence": "js"}, {"f_divergence_type": "js_divergence"}),
    (
        {"divergence": "alpha", "alpha": 0.3},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7},
    ),
]
DIVERGENCE_LOSSES = ["dpo", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm"]


def _trl_attributes(attributes: dict) -> dict:
    from types import SimpleNamespace

    if "args" in attributes:  # discopop reads self.args.discopop_tau
        attributes = {
            **attributes,
            "args": SimpleNamespace(center_rewards_coefficient=None, discopop_tau=0.05),
        }
    return attributes


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, params, loss_type, attributes", TRL_CASES, ids=[c[0] for c in TRL_CASES])
def test_matches_trl_loss_type(name, params, loss_type, attributes, seed):
    batch = Batch(6, 20 + seed, F64)
    beta = 0.3
    ours = get_loss(name, beta=beta, **params)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_dpo(beta=beta, loss_types=[loss_type], **_trl_attributes(attributes))
    assert_close(ours.loss, theirs, batch, rel=1e-6)
    if not loss_class(name).uses_lengths:  # IPO / sigmoid-norm log the per-token reward they compare
        assert ours.metrics["rewards/margins"] == pytest.approx(
            trl_metrics["rewards/margins"], rel=1e-9, abs=1e-9
        )


@pytest.mark.parametrize(
    "ours_div, trl_div", DIVERGENCE_CASES, ids=[c[0]["divergence"] for c in DIVERGENCE_CASES]
)
@pytest.mark.parametrize("name", DIVERGENCE_LOSSES)
def test_f_divergence_option_matches_trl(name, ours_div, trl_div):
    # TRL's alpha-divergence branch only knows fp16/bf16/fp32 clamp limits: fp32 there, float64 elsewhere.
    dtype = torch.float32 if ours_div["divergence"] == "alpha" else F64
    batch = Batch(6, 30, dtype)
    case = {"dpo": ({}, "sigmoid", {})} | {c[0]: (c[1], c[2], c[3]) for c in TRL_CASES}
    params, loss_type, attributes = case[name]
    ours = get_loss(name, beta=0.2, **params, **ours_div)(batch.prefopt_inputs())
    theirs, _ = batch.trl_dpo(beta=0.2, loss_types=[loss_type], **_trl_attributes(attributes), **trl_div)
    assert_close(ours.loss, theirs, batch, rel=1e-6 if dtype == F64 else 3e-5)


def test_mixture_matches_trl_loss_weights():
    # MPO's mixture: sigmoid 0.8 + bco_pair 0.2 + sft 1.0 (TRL's sft = prefopt's token-mean sft)
    batch = Batch(6, 40, F64)
    mix = [
        {"name": "dpo", "beta": 0.2, "weight": 0.8},
        {"name": "bco_pair", "beta": 0.2, "weight": 0.2},
        {"name": "sft", "weight": 1.0},
    ]
    ours = get_loss("mix", mix=mix)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_dpo(
        beta=0.2, loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]
    )
    assert_close(ours.loss, theirs, batch, rel=1e-6)
    assert ours.metrics["rewards/margins"] == pytest.approx(trl_metrics["rewards/margins"], rel=1e-9)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch = Batch(6, 50, F64)
    inputs = batch.prefopt_inputs()
    ours = get_loss("orpo", beta=0.25)(inputs)
    chosen_avg = inputs.policy_chosen_logps / inputs.chosen_lengths
    rejected_avg = inputs.policy_rejected_logps / inputs.rejected_lengths
    trainer = fake_trainer(beta=0.25)
    losses, chosen_rewards, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        trainer, chosen_avg, rejected_avg
    )
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean(), where the NLL is the token-mean
    # cross-entropy of the chosen half: -(sum of chosen token logps) / (number of chosen tokens).
    nll = -inputs.policy_chosen_logps.sum() / inputs.chosen_lengths.sum()
    assert_close(ours.loss, nll - losses.mean(), batch, rel=1e-6)
    assert ours.metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)
    assert ours.metrics["orpo/log_odds"] == pytest.approx(log_odds.item(), rel=1e-6)


@pytest.mark.parametrize("label_smoothing, cpo_alpha", [(0.0, 1.0), (0.1, 0.5), (0.0, 0.0)])
def test_cpo_matches_trl_cpo_loss(label_smoothing, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    batch = Batch(6, 60, F64)
    inputs = batch.prefopt_inputs()
    ours = get_loss("cpo", beta=0.2, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)(inputs)
    trainer = fake_trainer(alpha=0.0, beta=0.2, label_smoothing=label_smoothing, loss_type="sigmoid")
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(
        trainer, inputs.policy_chosen_logps, inputs.policy_rejected_logps
    )
    # CPOTrainer: loss = losses.mean() + cpo_alpha * nll_loss (token-mean cross-entropy of the chosen half)
    nll = -inputs.policy_chosen_logps.sum() / inputs.chosen_lengths.sum()
    assert_close(ours.loss, losses.mean() + cpo_alpha * nll, batch, rel=1e-6)
    assert ours.metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-9)
