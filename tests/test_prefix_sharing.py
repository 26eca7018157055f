"""The prompt once per pair (``prefopt/models/prefix_sharing.py``): the same logps and gradients as the unshared
forward, fallbacks where it does not apply, and the switch end to end in training."""

from __future__ import annotations

import pytest
import torch

from prefopt.data import PairCollator
from prefopt.models.logps import CompletionLogpModel, completion_token_logps, sequence_totals
from prefopt.models.prefix_sharing import interleaved_rows, pair_layout
from tests.test_logps import tiny_llama


def pair_batch(seed: int = 0, vocab: int = 97, empty_completion: bool = False) -> dict:
    """Three pairs with different prompt and completion lengths (one completion longer than its twin's prompt)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    rows = [
        {"index": 0, "prompt_input_ids": ids(6), "chosen_input_ids": ids(9), "rejected_input_ids": ids(3)},
        {
            "index": 1,
            "prompt_input_ids": ids(1),
            "chosen_input_ids": ids(4),
            "rejected_input_ids": [] if empty_completion else ids(12),
        },
        {"index": 2, "prompt_input_ids": ids(11), "chosen_input_ids": ids(2), "rejected_input_ids": ids(5)},
    ]
    return PairCollator(pad_token_id=0)(rows)


def _run(batch, share: bool, impl: str | None = "fused", chunk: int = 1024, attn: str = "sdpa"):
    model = tiny_llama()
    model.config._attn_implementation = attn
    model.train()  # dropout is 0 in the tiny config; training mode is what the step runs in
    out = completion_token_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        chunk_size=chunk,
        head_impl=impl,
        share_prompt=share,
    )
    weights = torch.linspace(-1.5, 2.0, out.sums.shape[0])
    (out.sums * weights).sum().backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "impl,chunk,keep_mb,attn",
    [
        ("fused", 1024, "256", "sdpa"),
        ("fused", 4, "0", "sdpa"),
        ("checkpoint", 5, "256", "sdpa"),
        ("fused", 1024, "0", "eager"),
    ],
)
def test_shared_prompt_matches_unshared_logps_and_gradients(monkeypatch, impl, chunk, keep_mb, attn):
    import prefopt.models.prefix_sharing as sharing

    monkeypatch.setenv("PREFOPT_LOGPS_KEEP_MB", keep_mb)
    calls = []
    original = sharing.shared_prompt_token_logps
    monkeypatch.setattr(
        sharing, "shared_prompt_token_logps", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    batch = pair_batch()
    (plain, plain_grads), (shared, shared_grads) = (
        _run(batch, share, impl, chunk, attn) for share in (False, True)
    )
    assert calls == [1]  # the shared path ran (once), not the fallback
    assert torch.equal(plain.mask, shared.mask)
    assert (shared.token_logps != 0).sum() == batch["completion_mask"][:, 1:].sum()  # every token scored once
    assert torch.allclose(plain.token_logps, shared.token_logps, atol=1e-5)
    assert torch.allclose(plain.sums, shared.sums, atol=1e-5)
    assert set(plain_grads) == set(shared_grads)
    for name, grad in plain_grads.items():
        assert (shared_grads[name] - grad).abs().max().item() <= 1e-5 * max(grad.abs().max().item(), 1.0), (
            name
        )


def test_shared_prompt_no_grad_path_and_empty_completion():
    """The reference path (no grad) and a pair whose rejected completion is empty."""
    batch = pair_batch(seed=1, empty_completion=True)
    model = tiny_llama()
    with torch.no_grad():
        outs = [
            completion_token_logps(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                share_prompt=share,
            )
            for share in (False, True)
        ]
    assert torch.allclose(outs[0].token_logps, outs[1].token_logps, atol=1e-5)
    assert outs[1].lengths[4] == 0 and outs[1].sums[4] == 0


def test_layout_refuses_what_it_cannot_share():
    batch = pair_batch()
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    layout = pair_layout(ids, attention, completion)
    assert layout.prompt_lengths.tolist() == [6, 1, 11]
    assert interleaved_rows(3, "cpu").tolist() == [0, 3, 1, 4, 2, 5]
    assert layout.completion_valid.sum(-1).tolist() == [9, 3, 4, 12, 2, 5]
    other = ids.clone()
    other[4, 0] = (other[1, 0] + 1) % 97  # pair 1's rejected row no longer has pair 1's prompt
    assert pair_layout(other, attention, completion) is None
    assert pair_layout(ids[:5], attention[:5], completion[:5]) is None  # odd row count: not a pair batch
    no_prompt = completion.clone()
    no_prompt[1, 0] = no_prompt[4, 0] = 1  # pair 1's prompt token marked as completion: empty prompt
    assert pair_layout(ids, attention, no_prompt) is None
    left = attention.flip(-1)  # left padding is not the pair layout
    assert pair_layout(ids, left, completion & left) is None


def test_fallback_when_the_rows_do_not_share_a_prompt():
    """share_prompt on a batch that is not a pair batch gives the plain forward's numbers (no error, no sharing)."""
    batch = pair_batch()
    ids = batch["input_ids"].clone()
    ids[5, 2] = (ids[2, 2] + 1) % 97
    model = tiny_llama()
    with torch.no_grad():
        a = completion_token_logps(
            model, ids, batch["attention_mask"], batch["completion_mask"], share_prompt=True
        )
        b = completion_token_logps(model, ids, batch["attention_mask"], batch["completion_mask"])
    assert torch.equal(a.token_logps, b.token_logps)


def test_module_wrapper_passes_the_switch():
    batch = pair_batch()
    wrapper = CompletionLogpModel(tiny_llama(), chunk_size=1024)
    with torch.no_grad():
        shared = wrapper(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], share_prompt=True
        )
        plain = wrapper(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    sums_shared, _ = sequence_totals(shared, batch)
    sums_plain, _ = sequence_totals(plain, batch)
    assert torch.allclose(sums_shared, sums_plain, atol=1e-5)


def test_training_with_and_without_sharing_gives_the_same_losses(tmp_path, monkeypatch):
    """`train.share_prompt` end to end (policy and live reference): the same 4 DPO losses and grad norms."""
    import json
    import random

    from prefopt.models.tiny import build_tiny_model
    from tests.test_packing import _train_losses

    corpus = ["the film was good", "the film was bad", "a great movie", "a poor movie"]
    model = build_tiny_model(
        tmp_path / "model", corpus=corpus, vocab_size=300, hidden_size=32, intermediate_size=64
    )
    g = random.Random(0)
    words = ["good", "bad", "great", "poor", "fine", "film", "movie", "story", "the", "a", "was"]
    with (tmp_path / "pairs.jsonl").open("w") as handle:
        for _ in range(16):

            def text(low, high):
                return " " + " ".join(g.choice(words) for _ in range(g.randint(low, high)))

            handle.write(
                json.dumps({"prompt": text(2, 8), "chosen": text(1, 9), "rejected": text(1, 9)}) + "\n"
            )
    import prefopt.models.prefix_sharing as sharing

    calls = []
    original = sharing.shared_prompt_token_logps
    monkeypatch.setattr(
        sharing, "shared_prompt_token_logps", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    shared = _train_losses(tmp_path, model, "shared", "train.share_prompt=true")
    assert len(calls) == 8  # 4 steps x (policy + reference)
    plain = _train_losses(tmp_path, model, "plain", "train.share_prompt=false")
    assert len(calls) == 8
    assert len(shared) == len(plain) == 4
    assert max(abs(a - b) for a, b in zip(shared, plain)) < 1e-5
    assert abs(plain[-1] - plain[0]) > 1e-4  # the steps did move the policy


def _layer_parameters(model) -> int:
    """One decoder layer's parameters of ``tiny_llama``: q/k/v/o 4 x 32 x 32, gate/up/down 3 x 32 x 64, two norms."""
    return 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32


def test_auto_shares_only_where_the_saved_work_pays(monkeypatch):
    """``share_prompt="auto"``: the bar is duplicated prompt tokens x one layer's parameters >= 32 Mi multiply-adds.
    The tiny pair batch (18 prompt tokens x 10,304 parameters = 0.19M) stays below it and takes the plain forward
    (no layout check either); with the bar lowered below 0.19M it shares; both give the plain forward's numbers."""
    import prefopt.models.prefix_sharing as sharing

    batch = pair_batch()
    model = tiny_llama()
    assert _layer_parameters(model) == 10304
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == 10304
    calls = {"layout": 0, "shared": 0}
    layout, shared = sharing.pair_layout, sharing.shared_prompt_token_logps
    monkeypatch.setattr(
        sharing, "pair_layout", lambda *a: calls.__setitem__("layout", calls["layout"] + 1) or layout(*a)
    )
    monkeypatch.setattr(
        sharing,
        "shared_prompt_token_logps",
        lambda *a, **k: calls.__setitem__("shared", calls["shared"] + 1) or shared(*a, **k),
    )
    args = (model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        plain = completion_token_logps(*args)
        auto = completion_token_logps(*args, share_prompt="auto")
        assert calls == {"layout": 0, "shared": 0}  # 3 pairs x width 20 x 10,304 = 0.62M: below the bar
        assert torch.equal(auto.token_logps, plain.token_logps)
        assert not sharing.sharing_pays_off(model, 18)
        monkeypatch.setattr(sharing, "SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER", 18 * 10304)
        assert sharing.sharing_pays_off(model, 18) and not sharing.sharing_pays_off(model, 17)
        auto = completion_token_logps(*args, share_prompt="auto")
        assert calls == {"layout": 1, "shared": 1}
        torch.testing.assert_close(auto.token_logps, plain.token_logps, atol=1e-5, rtol=0)
        monkeypatch.setattr(sharing, "SHARE_PROMPT_MIN_SAVED_MACS_PER_LAYER", 18 * 10304 + 1)
        completion_token_logps(*args, share_prompt="auto")  # the bound passes, the real 18 tokens do not
        assert calls == {"layout": 2, "shared": 1}
        completion_token_logps(*args, share_prompt=True)  # true: wherever it applies
        assert calls == {"layout": 3, "shared": 2}


def test_the_default_is_auto_and_the_config_takes_all_three():
    from prefopt.config import TrainConfig

    assert TrainConfig().share_prompt == "auto"
    assert TrainConfig(share_prompt=True).share_prompt is True
    assert TrainConfig(share_prompt=False).share_prompt is False
    with pytest.raises(Exception, match="share_prompt"):
        TrainConfig(share_prompt="sometimes")


def _agree_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from prefopt.models.prefix_sharing import agreed_across_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = torch.nn.Linear(2, 2)
        plain = agreed_across_ranks(model, rank == 0, torch.device("cpu"))  # not sharded: each keeps its own
        model.weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
        sharded = [
            agreed_across_ranks(model, rank == 0, torch.device("cpu")),
            agreed_across_ranks(model, True, torch.device("cpu")),
        ]
        results[rank] = (plain, *sharded)
    finally:
        dist.destroy_process_group()


def test_sharded_processes_agree_on_sharing():
    """Under ZeRO-3/FSDP2 every decoder call gathers parameters, so one process sharing (two decoder calls) while
    another does not would pair mismatched collectives: sharded runs share only where every process can."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False, True), 1: (False, False, True)}
