"""KTO (``prefopt/losses/kto.py``): worked numbers, parameter checks, and parity with TRL 1.16's ``KTOTrainer``.

TRL 1.16 has no standalone KTO loss function: the math sits in ``KTOTrainer._compute_loss(self, model, inputs,
return_outputs)`` (``trl/trainer/kto_trainer.py``), which runs the model on the batch and, through
``_compute_kl_logps``, on the KL batch of mismatched prompt/completion pairs. As in
``tests/test_losses_trl_parity.py`` we call the unbound method with a ``SimpleNamespace`` standing in for ``self``
and a fake model whose per-token log-probs we control (a leaf tensor, so gradients compare too), with
``precompute_ref_logps=True`` so the reference log-probs come from the inputs.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt.losses import LossInputs, get_loss

pytest.importorskip("trl", reason="TRL parity tests need `trl` (pip install prefopt[test])")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

# Worked example (float64): four rows, lr = [1, -1, -0.5, 1]; mismatched log-ratios [1, 0.5, -1, 1.5] -> z0 0.5.
POLICY = [-12.0, -15.0, -20.0, -8.0]
REFERENCE = [-13.0, -14.0, -19.5, -9.0]
DESIRABLE = [True, False, False, True]
MISMATCHED_POLICY = [-30.0, -25.0, -28.0, -22.0]
MISMATCHED_REFERENCE = [-31.0, -25.5, -27.0, -23.5]


def worked_inputs(mismatched_reference=MISMATCHED_REFERENCE) -> LossInputs:
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return LossInputs(
        policy_logps=t(POLICY).requires_grad_(),
        reference_logps=t(REFERENCE),
        desirable=torch.tensor(DESIRABLE),
        mismatched_policy_logps=t(MISMATCHED_POLICY),
        mismatched_reference_logps=t(mismatched_reference),
    )


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_worked_number():
    # beta 0.1, w_D 1, w_U 1.5, z0 = mean(1, 0.5, -1, 1.5) = 0.5 (beta z0 = 0.05), r = 0.1 * lr:
    #   row 0 (D, r  0.1):  1.0 * (1 - sigmoid( 0.1  - 0.05)) = 0.487503
    #   row 1 (U, r -0.1):  1.5 * (1 - sigmoid( 0.05 + 0.1 )) = 0.693855
    #   row 2 (U, r -0.05): 1.5 * (1 - sigmoid( 0.05 + 0.05)) = 0.712531
    #   row 3 (D, r  0.1):  same as row 0                     = 0.487503
    #   mean = 0.595348
    assert 1.0 * (1 - sigmoid(0.05)) == pytest.approx(0.487503, abs=1e-6)
    inputs = worked_inputs()
    out = get_loss("kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)(inputs)
    assert out.loss.item() == pytest.approx(0.595348, abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(0.5)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.1)
    assert out.metrics["rewards/rejected"] == pytest.approx(-0.075)
    assert out.metrics["rewards/margins"] == pytest.approx(0.175)
    assert out.metrics["logps/chosen"] == pytest.approx(-10.0)
    assert out.metrics["logps/rejected"] == pytest.approx(-17.5)
    assert out.metrics["kto/desirable_fraction"] == pytest.approx(0.5)
    # d L / d logp_0 = -w_D * beta * s (1 - s) / 4 with s = sigmoid(0.05); z0 carries no gradient
    (grad,) = torch.autograd.grad(out.loss, inputs.policy_logps)
    assert grad[0].item() == pytest.approx(-0.00624610, abs=1e-8)


def test_kto_reference_point_is_clamped_at_zero_and_then_equals_apo_zero_unpaired():
    # mismatched log-ratios [-1, -1, 0.5, -1]: mean -0.625 -> z0 = 0; 1 - sigmoid(-x) = sigmoid(x), so KTO with
    # z0 = 0 is APO-zero on unpaired rows: 0.598457 for both.
    inputs = worked_inputs(mismatched_reference=[-29.0, -24.0, -28.5, -21.0])
    kto = get_loss("kto", desirable_weight=1.0, undesirable_weight=1.5)(inputs)
    apo = get_loss("kto", loss_type="apo_zero_unpaired", desirable_weight=1.0, undesirable_weight=1.5)(inputs)
    assert kto.metrics["kl"] == 0.0
    assert kto.loss.item() == pytest.approx(0.598457, abs=1e-6)
    assert apo.loss.item() == pytest.approx(0.598457, abs=1e-6)


def test_kto_at_policy_equal_to_reference_is_half_the_mean_weight():
    zeros = torch.zeros(4, dtype=torch.float64)
    inputs = LossInputs(
        policy_logps=zeros,
        reference_logps=zeros,
        desirable=torch.tensor(DESIRABLE),
        mismatched_policy_logps=zeros,
        mismatched_reference_logps=zeros,
    )
    out = get_loss("kto", desirable_weight=1.0, undesirable_weight=2.0)(inputs)
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 2.0) / 2)


def test_kto_declares_its_needs_step_and_implicit_reward():
    kto = get_loss("kto", beta=0.2)
    assert kto.step == "unpaired" and kto.needs == {"reference", "mismatched"}
    assert get_loss("kto", loss_type="apo_zero_unpaired").needs == {"reference"}
    reward = kto.implicit_reward()
    assert (reward.scale, reward.uses_reference, reward.length_normalized) == (0.2, True, False)
    assert kto.hyperparameters() == {
        "beta": 0.2,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "loss_type": "kto",
    }


@pytest.mark.parametrize(
    "params, message",
    [
        ({"beta": 0}, "beta must be in (0, inf], got 0"),
        ({"desirable_weight": -1}, "desirable_weight must be in [0, inf], got -1"),
        ({"undesirable_weight": "x"}, "undesirable_weight must be a number"),
        ({"loss_type": "sigmoid"}, "unknown loss_type 'sigmoid'; choose one of kto, apo_zero_unpaired"),
    ],
)
def test_kto_rejects_bad_parameters(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_loss("kto", **params)


def test_kto_without_mismatched_logps_names_the_missing_fields():
    inputs = worked_inputs()
    inputs.mismatched_policy_logps = None
    with pytest.raises(ValueError, match="mismatched_policy_logps"):
        get_loss("kto")(inputs)
    get_loss("kto", loss_type="apo_zero_unpaired")(inputs)  # needs none


def test_label_balance_warning_follows_the_papers_eq_8():
    kto = get_loss("kto")
    assert kto.label_balance_warning(100, 100) is None
    assert kto.label_balance_warning(120, 100) is None  # ratio 1.2 in [1, 4/3]
    message = kto.label_balance_warning(100, 300)  # ratio 1/3
    # TRL 1.16's bounds for the same counts: desirable_weight in [3, 4] (it rounds 3.99), undesirable in
    # [0.25, 0.333]
    assert "100 desirable and 300 undesirable" in message
    assert "loss.desirable_weight in [3, 4]" in message
    assert "loss.undesirable_weight in [0.25, 0.333]" in message
    assert get_loss("kto", desirable_weight=3.5).label_balance_warning(100, 300) is None
    assert get_loss("kto", loss_type="apo_zero_unpaired").label_balance_warning(100, 300) is None
    assert kto.label_balance_warning(100, 0) is None


# ------------------------------------------------------------------------------------------------ TRL parity


class UnpairedBatch:
    """B random rows: per-token policy logps (a leaf tensor) and masks for the rows and their KL rows."""

    def __init__(self, rows: int, seed: int, desirable: list[bool] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.rows, width = rows, 14
        self.masks = [self._mask(g, width) for _ in range(2)]  # rows, then KL rows
        self.per_token = (
            -3 * torch.rand(2, rows, width - 1, generator=g, dtype=torch.float64)
        ).requires_grad_()
        sums = self.sums().detach()
        self.reference = sums + 2 * torch.randn(2, rows, generator=g, dtype=torch.float64)
        if desirable is None:
            desirable = (torch.rand(rows, generator=g) < 0.5).tolist()
        self.desirable = torch.tensor(desirable)

    def _mask(self, g, width):
        prompt = torch.randint(1, 4, (self.rows,), generator=g)
        lengths = torch.randint(1, 9, (self.rows,), generator=g)
        positions = torch.arange(width)[None, :]
        return ((positions >= prompt[:, None]) & (positions < (prompt + lengths)[:, None])).long()

    def masked(self, which: int) -> torch.Tensor:  # TRL's fused LM head returns 0 where labels are -100
        return self.per_token[which] * self.masks[which][:, 1:].to(torch.float64)

    def sums(self) -> torch.Tensor:
        return torch.stack([self.masked(0).sum(-1), self.masked(1).sum(-1)])

    def prefopt_inputs(self, other_process: UnpairedBatch | None = None) -> LossInputs:
        sums = self.sums()
        mismatched_policy, mismatched_reference = sums[1].detach(), self.reference[1]
        if other_process is not None:  # what the unpaired step gathers from a second process
            mismatched_policy = torch.cat([mismatched_policy, other_process.sums()[1].detach()])
            mismatched_reference = torch.cat([mismatched_reference, other_process.reference[1]])
        return LossInputs(
            policy_logps=sums[0],
            reference_logps=self.reference[0],
            desirable=self.desirable,
            mismatched_policy_logps=mismatched_policy,
            mismatched_reference_logps=mismatched_reference,
        )

    def trl_loss(self, other_process_kl=None, **attributes) -> tuple[torch.Tensor, dict[str, float]]:
        main_ids, kl_ids = torch.ones_like(self.masks[0]), torch.ones_like(self.masks[1])
        zeros = torch.zeros_like(self.per_token[0].detach())

        def model(**kwargs):
            assert kwargs["fused_lm_head"] is True  # the output layout we emulate
            which = 1 if kwargs["input_ids"] is kl_ids else 0
            return SimpleNamespace(log_probs=self.masked(which), entropy=zeros, mean_logits=zeros)

        def gather_for_metrics(tensor):
            # A second process: its KL estimate joins the first call (TRL gathers kl first); the other metric
            # gathers are left single-process.
            if other_process_kl is not None and not calls:
                calls.append(1)
                return torch.stack([tensor, other_process_kl])
            return tensor

        calls: list[int] = []
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True),
            accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather_for_metrics),
            aux_loss_enabled=False,
            precompute_ref_logps=True,
            calculate_KL=attributes.get("loss_type", "kto") == "kto",
            beta=0.1,
            desirable_weight=1.0,
            undesirable_weight=1.0,
            loss_type="kto",
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
        )
        for key, value in attributes.items():
            setattr(trainer, key, value)
        trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
        inputs = {
            "input_ids": main_ids,
            "attention_mask": torch.ones_like(main_ids),
            "completion_mask": self.masks[0],
            "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones_like(kl_ids),
            "KL_completion_mask": self.masks[1],
            "label": self.desirable,
            "ref_logps": self.reference[0],
            "ref_KL_logps": self.reference[1],
        }
        loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        return loss, metrics

    def grad(self, loss: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, self.per_token, retain_graph=True)
        return grad


def assert_parity(ours, theirs: torch.Tensor, batch: UnpairedBatch, trl_metrics: dict) -> None:
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(batch.grad(ours.loss), batch.grad(theirs), rtol=1e-6, atol=1e-9)
    for key in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        if key in trl_metrics:
            assert ours.metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-9), key
        else:
            assert key not in ours.metrics, key


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7},
        {"loss_type": "apo_zero_unpaired", "beta": 0.3, "undesirable_weight": 2.0},
    ],
    ids=["defaults", "weights", "apo_zero_unpaired"],
)
def test_kto_matches_trl_kto_trainer(seed, params):
    batch = UnpairedBatch(8, seed)
    ours = get_loss("kto", **params)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_loss(**params)
    assert_parity(ours, theirs, batch, trl_metrics)


@pytest.mark.parametrize("desirable", [[True] * 5, [False] * 5], ids=["all_desirable", "all_undesirable"])
def test_kto_matches_trl_with_one_label_only(desirable):
    batch = UnpairedBatch(5, 3, desirable)
    ours = get_loss("kto", beta=0.2)(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_loss(beta=0.2)
    assert_parity(ours, theirs, batch, trl_metrics)


def test_kto_reference_point_clamped_as_trl():
    batch = UnpairedBatch(6, 4)
    batch.reference[1] = batch.sums()[1].detach() + 1.0  # mismatched log-ratios all -1: z0 clamps to 0
    ours = get_loss("kto")(batch.prefopt_inputs())
    theirs, trl_metrics = batch.trl_loss()
    assert ours.metrics["kl"] == 0.0 == trl_metrics["kl"]
    assert_parity(ours, theirs, batch, trl_metrics)


@pytest.mark.parametrize("seed", [5, 6])
def test_kto_reference_point_over_two_processes_matches_trl(seed):
    # Under DDP TRL averages the per-process KL means (then clamps); the unpaired step gathers the mismatched
    # logps of every process, whose mean is the same number with equal per-process batches.
    batch, other = UnpairedBatch(6, seed), UnpairedBatch(6, seed + 100)
    g = torch.Generator().manual_seed(seed)
    for rows, shift in ((batch, 0.3), (other, 1.1)):  # positive KL estimates, so the clamp keeps both
        noise = 0.2 * torch.randn(6, generator=g, dtype=torch.float64)
        rows.reference[1] = rows.sums()[1].detach() - shift + noise - noise.mean()
    other_kl = (other.sums()[1] - other.reference[1]).mean().detach()
    ours = get_loss("kto", beta=0.5)(batch.prefopt_inputs(other_process=other))
    theirs, trl_metrics = batch.trl_loss(other_process_kl=other_kl, beta=0.5)
    single, _ = batch.trl_loss(beta=0.5)
    assert abs(theirs.item() - single.item()) > 1e-4  # the second process changes the number
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(batch.grad(ours.loss), batch.grad(theirs), rtol=1e-6, atol=1e-9)
    assert ours.metrics["kl"] == pytest.approx(max(trl_metrics["kl"], 0.0), rel=1e-6)
