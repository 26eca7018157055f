"""Sparse input-embedding gradients give the same clipping and AdamW step as dense ones.

See prefopt/trainer/sparse_embedding.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from prefopt.trainer import sparse_embedding
from tests.trainer_helpers import losses, metrics, run, write_pairs


class TinyLM(torch.nn.Module):
    """An embedding table, a body and an untied (or tied) head, with the transformers accessors."""

    def __init__(self, vocab: int = 50, hidden: int = 8, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return torch.log_softmax(self.head(torch.tanh(self.body(self.embed(ids)))), -1)


def _train(model, sparse: bool, fused: bool, max_norm: float, steps: int = 4, micro_batches: int = 2):
    sparse_params = sparse_embedding.enable_sparse_embedding_grad(
        model, sparse, distributed=False, fp16=False
    )
    assert bool(sparse_params) == sparse
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=0.05, fused=fused
    )
    generator = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(steps):
        for _ in range(micro_batches):  # accumulation: sparse gradients add up like dense ones
            ids = torch.randint(0, 12, (3, 7), generator=generator)  # rows 12.. never get a gradient; repeats
            targets = torch.randint(0, model.head.out_features, (3, 7), generator=generator)
            loss = -model(ids).gather(-1, targets[..., None]).mean()
            loss.backward()
        if sparse:
            assert model.embed.weight.grad.is_sparse
            norms.append(float(sparse_embedding.clip_grad_norm(model.parameters(), max_norm)))
            sparse_embedding.optimizer_step(optimizer, sparse_params)
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, norms


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, float("inf")])  # clipping active / off
def test_sparse_step_equals_dense_step(fused, max_norm):
    torch.manual_seed(0)
    start = TinyLM()
    dense, dense_opt, dense_norms = _train(copy.deepcopy(start), False, fused, max_norm)
    sparse, sparse_opt, sparse_norms = _train(copy.deepcopy(start), True, fused, max_norm)
    assert sparse_norms == pytest.approx(dense_norms, rel=1e-6)
    if max_norm < 1:
        assert min(dense_norms) > max_norm  # the clip really scaled every step
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    # Rows that never received a gradient still moved (decayed moments, weight decay): the dense AdamW semantics.
    assert not torch.equal(sparse.embed.weight[20], start.embed.weight[20])
    for p_dense, p_sparse in zip(dense.parameters(), sparse.parameters()):
        a, b = dense_opt.state[p_dense], sparse_opt.state[p_sparse]
        assert float(a["step"]) == float(b["step"]) == 4
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=0, atol=1e-7)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=0, atol=1e-8)


def test_norm_of_uncoalesced_sparse_gradient():
    embedding = torch.nn.Embedding(6, 3, sparse=True)
    embedding(torch.tensor([1, 1, 1, 4])).pow(2).sum().backward()
    assert not embedding.weight.grad.is_coalesced()  # three entries for row 1
    expected = embedding.weight.grad.to_dense().norm()
    assert float(sparse_embedding.clip_grad_norm([embedding.weight], float("inf"))) == pytest.approx(
        float(expected)
    )
    sparse_embedding.clip_grad_norm([embedding.weight], 1.0)
    assert float(embedding.weight.grad.to_dense().norm()) == pytest.approx(1.0, rel=1e-5)


def test_where_it_stays_off(caplog):
    assert (
        sparse_embedding.enable_sparse_embedding_grad(
            TinyLM(tied=True), "auto", distributed=False, fp16=False
        )
        == []
    )
    assert sparse_embedding.enable_sparse_embedding_grad(TinyLM(), "auto", distributed=True, fp16=False) == []
    assert sparse_embedding.enable_sparse_embedding_grad(TinyLM(), "auto", distributed=False, fp16=True) == []
    assert sparse_embedding.enable_sparse_embedding_grad(TinyLM(), False, distributed=False, fp16=False) == []
    frozen = TinyLM()
    frozen.embed.weight.requires_grad_(False)
    assert sparse_embedding.enable_sparse_embedding_grad(frozen, "auto", distributed=False, fp16=False) == []
    with caplog.at_level("WARNING"):
        assert (
            sparse_embedding.enable_sparse_embedding_grad(
                TinyLM(tied=True), True, distributed=False, fp16=False
            )
            == []
        )
    assert "tied" in caplog.text  # an explicit request that cannot be honoured says why
    model = TinyLM()
    assert sparse_embedding.enable_sparse_embedding_grad(model, "auto", distributed=False, fp16=False) == [
        model.embed.weight
    ]
    assert model.embed.sparse


def test_trainer_runs_match_with_and_without(tiny_model_dir, tmp_path):
    """End to end on the tiny model (untied): same losses, grad norms and final weights either way."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows=48)
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "sparse",
        "train.max_steps=4",
        "train.max_grad_norm=0.5",
        "train.weight_decay=0.01",
        "train.gradient_accumulation_steps=2",
        "train.per_device_batch_size=4",
    )
    run(
        tiny_model_dir,
        pairs,
        tmp_path / "dense",
        "train.max_steps=4",
        "train.max_grad_norm=0.5",
        "train.weight_decay=0.01",
        "train.gradient_accumulation_steps=2",
        "train.per_device_batch_size=4",
        "train.sparse_embedding_grad=false",
    )
    assert losses(tmp_path / "sparse") == pytest.approx(losses(tmp_path / "dense"), abs=1e-6)
    norms = [m["grad_norm"] for m in metrics(tmp_path / "sparse")]
    assert norms == pytest.approx([m["grad_norm"] for m in metrics(tmp_path / "dense")], rel=1e-5)
    assert max(norms) > 0.5  # clipping was active
    a = load_file(tmp_path / "sparse" / "final" / "model.safetensors")
    b = load_file(tmp_path / "dense" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(
        a["model.embed_tokens.weight"],
        load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"],
    )
