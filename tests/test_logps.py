"""Per-token completion logps: docs/losses.md's label-shift numbers; every lm-head path vs full logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prefopt.models import logps as logps_module
from prefopt.models.logps import CompletionLogpModel, completion_token_logps, sequence_totals

# docs/losses.md, Worked numbers, label-shift check: vocab {0..3}, 3 = EOS = PAD.
SHIFT_IDS = [0, 2, 1, 3, 3]
SHIFT_COMPLETION = [0, 0, 1, 1, 0]  # prompt [0, 2], completion [1, 3]; the last 3 is padding
SHIFT_LOGITS = [[0.5, 1, -0.5, 0], [1, 2, 0, -1], [0, 0.5, 0.2, 1.5], [0.3, 0.3, 0.3, 2], [0, 0, 0, 0]]
SHIFT_SUM = -1.06267


class StubDecoder(torch.nn.Module):
    """Returns a fixed table of hidden states (one per position), as a trainable parameter."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = torch.nn.Parameter(hidden.clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.hidden[None].expand(input_ids.shape[0], -1, -1))


class StubLM(torch.nn.Module):
    """A causal LM whose logits at position t are ``SHIFT_LOGITS[t]``: identity head over a stub decoder."""

    def __init__(self):
        super().__init__()
        self.decoder = StubDecoder(torch.tensor(SHIFT_LOGITS, dtype=torch.float32))
        self.lm_head = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(4))

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        hidden = self.decoder(input_ids).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))


def _shift_batch():
    ids = torch.tensor([SHIFT_IDS])
    return ids, torch.tensor([[1, 1, 1, 1, 0]]), torch.tensor([SHIFT_COMPLETION])


@pytest.mark.parametrize(
    "chunk_size,head_impl", [(None, None), (1, "fused"), (1024, "fused"), (1, "checkpoint")]
)
def test_label_shift_worked_number(chunk_size, head_impl):
    model = StubLM()
    ids, attention, completion = _shift_batch()
    result = completion_token_logps(
        model, ids, attention, completion, chunk_size=chunk_size, head_impl=head_impl
    )
    assert result.sums.item() == pytest.approx(SHIFT_SUM, abs=1e-5)
    assert result.lengths.item() == 2
    # Token 1 (at t=2) comes from logits[1] and EOS (t=3) from logits[2]; nothing else counts.
    expected = torch.log_softmax(torch.tensor(SHIFT_LOGITS), -1)
    assert result.token_logps[0, 1].item() == pytest.approx(expected[1, 1].item(), abs=1e-6)
    assert result.token_logps[0, 2].item() == pytest.approx(expected[2, 3].item(), abs=1e-6)
    assert result.token_logps[0, [0, 3]].abs().sum().item() == 0


def test_label_shift_gradients_agree_across_paths():
    grads = []
    for chunk_size, head_impl in [(None, None), (1, "fused"), (1, "checkpoint")]:
        model = StubLM()
        completion_token_logps(
            model, *_shift_batch(), chunk_size=chunk_size, head_impl=head_impl
        ).sums.sum().backward()
        grads.append((model.decoder.hidden.grad.clone(), model.lm_head.weight.grad.clone()))
    softmax = torch.softmax(torch.tensor(SHIFT_LOGITS), -1)
    # d sum / d logits[1] = onehot(1) - softmax(logits[1]); the identity head passes it to the hidden states.
    assert torch.allclose(grads[0][0][1], torch.eye(4)[1] - softmax[1], atol=1e-6)
    assert grads[0][0][[0, 3, 4]].abs().sum() == 0
    for hidden, weight in grads[1:]:
        assert torch.allclose(hidden, grads[0][0], atol=1e-6)
        assert torch.allclose(weight, grads[0][1], atol=1e-6)


def tiny_llama(vocab: int = 97, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def padded_batch(seed: int = 0, rows: int = 4, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    lengths = [19, 12, 16, 7][:rows]
    prompts = [5, 3, 8, 2][:rows]
    width = max(lengths)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    attention = torch.zeros(rows, width, dtype=torch.long)
    completion = torch.zeros(rows, width, dtype=torch.long)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        attention[row, :length] = 1
        completion[row, prompt:length] = 1
    return ids, attention, completion


# (chunk_size, head_impl, PREFOPT_LOGPS_KEEP_MB, PREFOPT_LOGPS_BLOCK_MB): recompute / keep, one block / many.
PATHS = [
    (5, "fused", "0", "128"),
    (1024, "fused", "0", "0.001"),
    (5, "fused", "64", "128"),
    (1024, "fused", "64", "128"),
    (3, "checkpoint", "0", "128"),
]


@pytest.mark.parametrize("chunk_size,head_impl,keep_mb,block_mb", PATHS)
def test_chunked_matches_full_logits_with_gradients(monkeypatch, chunk_size, head_impl, keep_mb, block_mb):
    monkeypatch.setenv("PREFOPT_LOGPS_KEEP_MB", keep_mb)
    monkeypatch.setenv(
        "PREFOPT_LOGPS_BLOCK_MB", block_mb
    )  # 0.001 MiB: 2 rows of a 97-word vocabulary per block
    batch = padded_batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    results = []
    for chunk, impl in [(None, None), (chunk_size, head_impl)]:
        model = tiny_llama()
        out = completion_token_logps(model, *batch, chunk_size=chunk, head_impl=impl)
        (out.sums * weights).sum().backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    assert torch.equal(full.mask, chunked.mask)
    assert torch.allclose(full.token_logps, chunked.token_logps, atol=1e-5)
    assert torch.allclose(full.sums, chunked.sums, atol=1e-4)
    for name, grad in full_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5 * max(scale, 1.0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_mb", ["0", "64"])  # recompute / keep (keeping needs whole-vocabulary blocks)
def test_vocabulary_tiles_match_full_log_softmax(monkeypatch, dtype, keep_mb):
    """Blocks of (rows, vocab tile) with an online normaliser: logps and all three gradients, bias included."""
    monkeypatch.setattr(logps_module, "MIN_VOCAB_TILE", 8)
    monkeypatch.setenv("PREFOPT_LOGPS_KEEP_MB", keep_mb)
    monkeypatch.setenv("PREFOPT_LOGPS_BLOCK_MB", str(40 * 4 / 2**20))  # 40 fp32 logits: 5 rows x 8 words
    assert logps_module._block_shape(13, 1024, 97) == (5, 8)  # 13 tiles over a 97-word vocabulary
    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(13, 6, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(97, 6, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(97, generator=g).to(dtype).requires_grad_()
    targets = torch.tensor([0, 96, 8, 7, 15, 16, 50, 3, 95, 64, 1, 88, 40])  # tile edges on both sides
    upstream = torch.randn(13, generator=g)
    keep = keep_mb != "0"
    shape = logps_module._block_shape(13, 1024, 97, keep=keep)
    tiled = logps_module._FusedHeadLogps.apply(hidden, weight, bias, targets, shape, keep)
    (tiled * upstream).sum().backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    full = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float(), -1)
    expected = full.gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tiled, expected, rtol=0, atol=tolerance)
    for name, a, b in zip(("hidden", "weight", "bias"), got, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance, msg=name)


def test_block_shape_prefers_vocabulary_tiles(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOGPS_BLOCK_MB", "128")
    assert logps_module._block_shape(900, 1024, 32000) == (900, 32000)  # fits: one block
    rows, tile = logps_module._block_shape(900, 1024, 128000)  # 128k: all rows, a tile of the vocabulary
    assert rows == 900 and 4 * rows * tile <= 128 * 2**20 and tile >= logps_module.MIN_VOCAB_TILE
    assert logps_module._block_shape(900, 1024, 128000, keep=True) == (
        900,
        128000,
    )  # kept blocks are whole rows
    monkeypatch.setenv("PREFOPT_LOGPS_TILE_VOCAB", "0")
    assert logps_module._block_shape(900, 1024, 128000) == (262, 128000)  # the earlier rows-only blocks
    monkeypatch.delenv("PREFOPT_LOGPS_TILE_VOCAB")
    monkeypatch.setenv("PREFOPT_LOGPS_BLOCK_MB", "8")  # tiles would be too thin: rows are cut instead
    assert logps_module._block_shape(900, 1024, 128000) == (512, 4096)


def test_no_grad_path_matches_and_keeps_nothing():
    model = tiny_llama()
    batch = padded_batch()
    with torch.no_grad():
        full = completion_token_logps(model, *batch, chunk_size=None)
        fused = completion_token_logps(model, *batch, chunk_size=4, head_impl="fused")
    assert not fused.token_logps.requires_grad
    assert torch.allclose(full.token_logps, fused.token_logps, atol=1e-5)


def test_module_wrapper_and_sequence_totals():
    model = tiny_llama()
    ids, attention, completion = padded_batch()
    wrapped = CompletionLogpModel(model, chunk_size=8, head_impl="fused")
    out = wrapped(ids, attention, completion)
    sums, lengths = sequence_totals(out, {"input_ids": ids})
    assert lengths.tolist() == [14, 9, 8, 5]  # completion tokens after the first position
    direct = completion_token_logps(model, ids, attention, completion, chunk_size=None)
    assert torch.allclose(sums, direct.sums, atol=1e-4)


def test_no_completion_tokens_backpropagates_zero():
    model = tiny_llama()
    ids, attention, completion = padded_batch()
    out = completion_token_logps(
        model, ids, attention, torch.zeros_like(completion), chunk_size=4, head_impl="fused"
    )
    assert out.sums.abs().sum().item() == 0
    out.sums.sum().backward()  # connected to the graph, gradient zero
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum().item() == 0


def test_kept_probabilities_cannot_be_reused(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOGPS_KEEP_MB", "64")
    model = tiny_llama()
    out = completion_token_logps(model, *padded_batch(), chunk_size=4, head_impl="fused")
    out.sums.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.sums.sum().backward()


def test_unknown_head_impl_is_an_error(monkeypatch):
    model = tiny_llama()
    with pytest.raises(ValueError, match="head_impl"):
        completion_token_logps(model, *padded_batch(), chunk_size=4, head_impl="magic")
    monkeypatch.setenv("PREFOPT_LOGPS_HEAD", "magic")
    with pytest.raises(ValueError, match="PREFOPT_LOGPS_HEAD"):
        completion_token_logps(model, *padded_batch(), chunk_size=4)


def test_attention_bias_forms_per_implementation():
    bias = torch.tensor([[True, False], [True, True]])[None, None]
    for impl, expect in [
        ("sdpa", "bool"),
        ("eager", "additive"),
        ("flash_attention_2", None),
        ("flex_attention", None),
    ]:
        stub = SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))
        mask = logps_module._model_attention_mask(stub, bias, torch.float32)
        if expect is None:
            assert mask is None
        elif expect == "bool":
            assert mask is bias
        else:
            assert mask.dtype == torch.float32 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min
            assert mask[0, 0, 1].abs().sum() == 0


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """scripts/bench_offline.py end to end on the tiny config: runs both trainers and they agree step by step."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "scripts/bench_offline.py"),
            "--quick",
            "--configs",
            "tiny",
            "--steps",
            "2",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    ours = [row for row in summary if row["trainer"] == "prefopt/default"]
    assert ours and all(row["max_loss_diff"] < 1e-4 for row in ours)
