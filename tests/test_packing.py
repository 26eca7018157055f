"""Padding-free packing: layout, block-causal isolation, packed == padded logps and training, length grouping."""

from __future__ import annotations

import json
import random

import pytest
import torch

from prefopt.data import PairCollator
from prefopt.data.packing import (
    PackedPairCollator,
    block_causal_mask,
    length_grouped_order,
    padding_fraction,
    pair_lengths,
)
from prefopt.models.logps import completion_token_logps, sequence_totals

PAD = 0


def rows(seed: int = 0, count: int = 3, vocab: int = 97, empty_prompt: bool = False):
    g = random.Random(seed)
    out = []
    for i in range(count):
        prompt = [] if empty_prompt and i == 1 else [g.randrange(1, vocab) for _ in range(g.randint(2, 9))]
        out.append(
            {
                "index": 10 + i,
                "prompt_input_ids": prompt,
                "chosen_input_ids": [g.randrange(1, vocab) for _ in range(g.randint(1, 11))],
                "rejected_input_ids": [g.randrange(1, vocab) for _ in range(g.randint(1, 11))],
                "prompt_text": f"p{i}",
                "chosen_text": f"c{i}",
                "rejected_text": f"r{i}",
            }
        )
    return out


def test_layout_of_a_packed_batch():
    batch_rows = [
        {"index": 4, "prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8], "rejected_input_ids": [9]},
        {"index": 2, "prompt_input_ids": [1], "chosen_input_ids": [3], "rejected_input_ids": [4, 4, 4]},
    ]
    batch = PackedPairCollator(PAD, pad_to_multiple_of=8)(batch_rows)
    # order: chosen 0, chosen 1, rejected 0, rejected 1; then tail padding to 16
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1, 3, 5, 6, 9, 1, 4, 4, 4, 0, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 13 + [0] * 3]
    assert batch["num_sequences"] == 4
    assert batch["index"].tolist() == [4, 2]
    assert batch["prompt_input_ids"] == [[5, 6], [1]]
    assert batch["chosen_text"] == ["", ""]
    bias = batch["attention_bias"]
    assert bias.shape == (1, 1, 16, 16) and bias.dtype == torch.bool
    ids = batch["sequence_ids"][0]
    expected = (ids[:, None] == ids[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(bias[0, 0], expected)
    assert bias[0, 0].any(dim=-1).all()  # every query (padding included) sees at least itself
    assert not bias[0, 0, 6, :6].any()  # rejected 0 sees neither chosen 0 nor chosen 1


def test_first_token_of_a_sequence_is_never_scored():
    batch = PackedPairCollator(PAD)(
        [{"index": 0, "prompt_input_ids": [], "chosen_input_ids": [7, 8], "rejected_input_ids": [9, 9]}]
    )
    # Without a prompt the first completion token would be "predicted" by the previous sequence's last token.
    assert batch["completion_mask"].tolist() == [[0, 1, 0, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 1, 1]]


def test_block_causal_mask_keeps_padding_separate():
    mask = block_causal_mask(torch.tensor([[0, 0, -1, -1]]))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]


def tiny_llama(attn: str = "sdpa", vocab: int = 97, seed: int = 0):
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
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _sequence_logps(model, batch, chunk_size=4):
    out = completion_token_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        chunk_size=chunk_size,
        position_ids=batch.get("position_ids"),
        attention_bias=batch.get("attention_bias"),
    )
    return sequence_totals(out, batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_packed_logps_equal_padded(attn, chunk_size, empty_prompt):
    model = tiny_llama(attn)
    data = rows(empty_prompt=empty_prompt)
    padded = PairCollator(PAD)(data)
    packed = PackedPairCollator(PAD, pad_to_multiple_of=16)(data)
    with torch.no_grad():
        padded_sums, padded_lengths = _sequence_logps(model, padded, chunk_size)
        packed_sums, packed_lengths = _sequence_logps(model, packed, chunk_size)
    assert torch.equal(padded_lengths, packed_lengths)
    assert torch.allclose(padded_sums, packed_sums, atol=1e-5)


def test_packed_gradients_equal_padded():
    grads = []
    for collate in (PairCollator(PAD), PackedPairCollator(PAD)):
        model = tiny_llama()
        sums, _ = _sequence_logps(model, collate(rows()))
        (sums * torch.arange(1.0, 7.0)).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5), name


def test_flash_style_position_ids_alone_separate_sequences():
    """Without the 4D mask (what flash/flex attention get), transformers 5 derives the blocks from position_ids."""
    model = tiny_llama()
    data = rows()
    packed = PackedPairCollator(PAD, attention_bias=False)(data)
    assert "attention_bias" not in packed
    with torch.no_grad():
        out = completion_token_logps(
            model,
            packed["input_ids"],
            None,
            packed["completion_mask"],
            chunk_size=4,
            position_ids=packed["position_ids"],
        )
        sums, _ = sequence_totals(out, packed)
        reference, _ = _sequence_logps(model, PairCollator(PAD)(data))
    assert torch.allclose(sums, reference, atol=1e-5)


def test_rejected_tokens_do_not_leak_into_chosen():
    model = tiny_llama()
    data = rows()
    changed = [
        dict(r, rejected_input_ids=[(t * 7 + 3) % 96 + 1 for t in r["rejected_input_ids"]]) for r in data
    ]
    collate = PackedPairCollator(PAD)
    with torch.no_grad():
        before, _ = _sequence_logps(model, collate(data))
        after, _ = _sequence_logps(model, collate(changed))
    assert torch.allclose(before[:3], after[:3], atol=1e-6)  # chosen: unchanged
    assert not torch.allclose(before[3:], after[3:], atol=1e-3)  # rejected: changed


def test_length_grouped_order_is_a_permutation_with_less_padding():
    g = random.Random(1)
    lengths = [g.randint(10, 500) for _ in range(203)]
    order = length_grouped_order(lengths, 4, seed=3, mega_batches=10)
    assert sorted(order) == list(range(203))
    shuffled = list(range(203))
    g.shuffle(shuffled)
    assert padding_fraction(lengths, order, 4) < 0.5 * padding_fraction(lengths, shuffled, 4)
    assert length_grouped_order(lengths, 4, seed=3, mega_batches=10) == order  # deterministic
    assert pair_lengths(
        {"prompt_input_ids": [[1, 2]], "chosen_input_ids": [[3]], "rejected_input_ids": [[4, 5, 6]]}
    ) == [5]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from prefopt.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("packing")
    corpus = ["the film was good", "the film was bad", "a great movie", "a poor movie"]
    model = build_tiny_model(
        root / "model", corpus=corpus, vocab_size=300, hidden_size=32, intermediate_size=64
    )
    g = random.Random(0)
    words = ["good", "bad", "great", "poor", "fine", "film", "movie", "story", "the", "a", "was"]
    with (root / "pairs.jsonl").open("w") as handle:
        for _ in range(24):

            def text(low, high):
                return " " + " ".join(g.choice(words) for _ in range(g.randint(low, high)))

            handle.write(
                json.dumps({"prompt": text(2, 8), "chosen": text(1, 9), "rejected": text(1, 9)}) + "\n"
            )
    return root, model


def _train_losses(root, model, out, *overrides):
    from prefopt.config import load_config
    from prefopt.trainer import train

    config = load_config(
        "recipes/tiny/dpo.yaml",
        [
            f"model.name_or_path={model}",
            f"data.train={root / 'pairs.jsonl'}",
            "data.eval=null",
            "data.shuffle=false",
            f"output_dir={root / out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "train.learning_rate=1e-2",
            "train.warmup_ratio=0",
            "train.per_device_batch_size=4",
            "train.max_steps=4",
            "train.eval_steps=null",
            f"reference.cache_dir={root / 'cache'}",
            *overrides,
        ],
    )
    train(config)
    lines = (root / out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_packed_training_matches_padded(tiny_run, reference):
    root, model = tiny_run
    padded = _train_losses(root, model, f"padded-{reference}", f"reference.mode={reference}")
    packed = _train_losses(
        root, model, f"packed-{reference}", f"reference.mode={reference}", "data.packing=true"
    )
    assert len(padded) == len(packed) == 4
    assert padded[0] == pytest.approx(0.693147, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(padded, packed)) < 1e-5
    assert abs(padded[-1] - padded[0]) > 1e-4  # the steps did move the policy
