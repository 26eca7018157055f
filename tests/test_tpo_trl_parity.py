"""TPO parity with TRL 1.16's experimental ``TPOTrainer`` on random batches: loss, gradients, shared metrics.

TRL computes the TPO loss inside ``TPOTrainer._compute_loss(self, model, inputs, return_outputs)`` from the
model's logits (``[chosen, rejected, gold]`` stacked on the batch axis; two branches when ``tpo_alpha=0``). We
call that unbound method with a ``SimpleNamespace`` for ``self`` and a fake model whose logits are a leaf
tensor,
and build prefopt's ``LossInputs`` from the same logits, so values and gradients can be compared.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prefopt.losses import LossInputs, get_loss

D = torch.float64

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we import trl.experimental knowingly
trl_tpo = pytest.importorskip(
    "trl.experimental.tpo.tpo_trainer", reason="TRL parity needs `trl` (prefopt[test])"
)


class TripleBatch:
    def __init__(self, batch: int, seed: int, branches: int = 3, seq: int = 14, vocab: int = 11):
        g = torch.Generator().manual_seed(seed)
        rows = branches * batch
        self.batch, self.branches = batch, branches
        self.input_ids = torch.randint(0, vocab, (rows, seq), generator=g)
        prompt = torch.randint(1, 5, (rows,), generator=g)
        lengths = torch.randint(1, 9, (rows,), generator=g)
        positions = torch.arange(seq)[None, :]
        self.completion_mask = (
            (positions >= prompt[:, None]) & (positions < (prompt + lengths)[:, None])
        ).long()
        self.logits = (2 * torch.randn(rows, seq, vocab, generator=g, dtype=D)).requires_grad_()

    def prefopt_inputs(self) -> LossInputs:
        logps = torch.gather(F.log_softmax(self.logits[:, :-1], -1), 2, self.input_ids[:, 1:, None]).squeeze(
            2
        )
        mask = self.completion_mask[:, 1:].to(D)
        sums, lengths = (logps * mask).sum(1), mask.sum(1)
        b = self.batch
        inputs = LossInputs(
            policy_chosen_logps=sums[:b],
            policy_rejected_logps=sums[b : 2 * b],
            chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b : 2 * b],
        )
        if self.branches == 3:
            inputs.gold_logps, inputs.gold_lengths = sums[2 * b :], lengths[2 * b :]
        return inputs

    def trl_loss(self, **attributes):
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True),
            tpo_alpha=1.0,
            loss_type="sigmoid",
            beta=0.01,
            label_smoothing=0.0,
            tpo_l_gamma=0.5,
            _total_train_tokens=0,
            _tp_size=1,
            accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
            _metrics=defaultdict(lambda: defaultdict(list)),
        )
        for key, value in attributes.items():
            setattr(trainer, key, value)
        logits = self.logits

        def model(**kwargs):
            return SimpleNamespace(logits=logits)

        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "completion_mask": self.completion_mask,
        }
        loss = trl_tpo.TPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
        return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


TPO_CASES = [
    ({"beta": 0.01, "alpha": 1.0}, {"beta": 0.01, "tpo_alpha": 1.0}),
    (
        {"beta": 0.5, "alpha": 0.3, "label_smoothing": 0.1},
        {"beta": 0.5, "tpo_alpha": 0.3, "label_smoothing": 0.1},
    ),
    ({"beta": 0.2, "loss_type": "hinge"}, {"beta": 0.2, "loss_type": "hinge"}),
    ({"beta": 0.4, "loss_type": "ipo", "alpha": 0.5}, {"beta": 0.4, "loss_type": "ipo", "tpo_alpha": 0.5}),
    (
        {"beta": 2.0, "loss_type": "tpo-l", "gamma": 0.7},
        {"beta": 2.0, "loss_type": "tpo-l", "tpo_l_gamma": 0.7},
    ),
    ({"beta": 0.1, "alpha": 0.0}, {"beta": 0.1, "tpo_alpha": 0.0}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours,theirs", TPO_CASES)
def test_tpo_matches_trl(ours, theirs, seed):
    batch = TripleBatch(5, seed, branches=3 if theirs.get("tpo_alpha", 1.0) else 2)
    out = get_loss("tpo", **ours)(batch.prefopt_inputs())
    trl_loss, trl_metrics = batch.trl_loss(**theirs)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-6)
    (ours_grad,) = torch.autograd.grad(out.loss, batch.logits, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, batch.logits)
    assert torch.allclose(ours_grad, trl_grad, atol=1e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert out.metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6, rel=1e-6), key
