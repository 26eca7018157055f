"""bf16 on CPU (autocast): the fused lm head, the reference under the policy's autocast, fp32 master weights, and
the configurations that cannot work (flash attention in fp32)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer_helpers import REPO, losses, run, write_pairs


def _head_grads(fn, hidden, weight, targets, g, amp: bool):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = fn(h, w)
    (out.float() * g).sum().backward()
    return h.grad, w.grad


@pytest.mark.parametrize("rows_per_block", [16, 1024])
def test_fused_head_under_autocast_is_as_close_to_fp32_as_plain_autograd(rows_per_block):
    """Before: the backward recomputed fp32 logits against the forward's bf16 normaliser (rel. error 2-3x plain)."""
    from prefopt.models.logps import _block_shape, _fused_head_autocast

    torch.manual_seed(0)
    n, hidden_size, vocab = 64, 32, 500
    hidden, weight = torch.randn(n, hidden_size) * 2, torch.randn(vocab, hidden_size) * 0.5
    targets, g = torch.randint(0, vocab, (n,)), torch.randn(n)

    def plain(h, w):
        return torch.gather(torch.log_softmax((h @ w.T).float(), -1), 1, targets[:, None]).squeeze(1)

    def fused(h, w):
        return _fused_head_autocast(h, w, None, targets, _block_shape(n, rows_per_block, vocab), False)

    exact = _head_grads(plain, hidden, weight, targets, g, amp=False)
    plain_amp = _head_grads(plain, hidden, weight, targets, g, amp=True)
    fused_amp = _head_grads(fused, hidden, weight, targets, g, amp=True)
    for index, name in enumerate(("hidden", "weight")):

        def rel(grads, index=index):
            return ((grads[index] - exact[index]).norm() / exact[index].norm()).item()

        assert rel(fused_amp) <= rel(plain_amp) * 1.0001 + 1e-7, name
        assert rel(fused_amp) < 0.02, name  # bf16 GEMMs: ~0.7% here
    # and the forward values are the autocast ones
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(hidden, weight), plain(hidden, weight), atol=1e-5, rtol=0)


@pytest.mark.parametrize("reference", ["model", "adapter"])
def test_bf16_autocast_dpo_starts_at_ln2_with_a_live_reference(tiny_model_dir, tmp_path, reference):
    """The reference runs under the same autocast as the policy, so policy == reference at step 0 exactly."""
    data = write_pairs(tmp_path / "pairs.jsonl", rows=16)
    extra = ["model.peft.r=4", "model.peft.alpha=8"] if reference == "adapter" else []
    run(
        tiny_model_dir,
        data,
        tmp_path / "out",
        "train.mixed_precision=bf16",
        "train.max_steps=1",
        f"reference.mode={reference}",
        *extra,
    )
    assert losses(tmp_path / "out")[0] == pytest.approx(math.log(2), abs=1e-6)


def test_bf16_loaded_model_trains_at_small_learning_rate(tiny_model_dir, tmp_path):
    """model.dtype=bfloat16 at lr 5e-7: AdamW on bf16 weights would round every update away; fp32 masters move.
    final/ is written in bf16, the dtype the model was loaded in (item 22); the checkpoint keeps the fp32 masters."""
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", rows=24)
    result = run(
        tiny_model_dir,
        data,
        tmp_path / "out",
        "model.dtype=bfloat16",
        "train.mixed_precision=bf16",
        "train.learning_rate=5e-7",
        "train.max_steps=3",
        "train.save_steps=3",
        "train.lr_scheduler=constant",
    )
    masters = load_file(str(tmp_path / "out" / "checkpoint-3" / "model.safetensors"))
    masters = {k.removeprefix("model."): v for k, v in masters.items()}
    final = load_file(str(result.final_dir / "model.safetensors"))
    initial = {
        k: v.to(torch.bfloat16).float()
        for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()
    }
    assert all(t.dtype == torch.float32 for t in masters.values())  # the master weights are what was trained
    changed = sum(int((masters[k] != initial[k]).sum()) for k in initial)
    total = sum(v.numel() for v in initial.values())
    assert changed > total // 2
    # an update of ~lr per step, far below bf16 spacing (which would have rounded it away)
    step = max((masters[k] - initial[k]).abs().max().item() for k in initial)
    assert 1e-7 < step < 3 * 3 * 5e-7
    assert sorted(final) == sorted(initial)
    for name, tensor in final.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, masters[name].to(torch.bfloat16)), name


def test_flash_attention_with_fp32_is_a_config_error(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt",
            "train",
            str(REPO / "recipes/tiny/dpo.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            "model.attn_implementation=flash_attention_2",
            f"output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.attn_implementation" in result.stderr and "model.dtype=bfloat16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_weight_decay_groups_by_name_survive_zero_init(tiny_model_dir):
    """Under zero.Init every parameter is an empty 1-D partition; the grouping must not change."""
    from transformers import AutoModelForCausalLM

    from prefopt.trainer.setup import no_weight_decay_names

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    by_shape = {name for name, p in model.named_parameters() if p.ndim < 2}
    assert no_weight_decay_names(model) == by_shape and by_shape  # the norms of the tiny Llama
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(
                module, name, torch.nn.Parameter(parameter.new_empty(0))
            )  # what a ZeRO-3 partition looks like
    assert no_weight_decay_names(model) == by_shape


def test_fsdp_auto_wrap_sees_the_decoder_layers_through_the_wrapper(tiny_model_dir):
    """recipes/accelerate/fsdp2.yaml wraps by transformer layer with no class named: accelerate reads
    ``_no_split_modules`` from the prepared module, which is prefopt's wrapper."""
    from transformers import AutoModelForCausalLM

    from prefopt.config import PeftConfig
    from prefopt.models.loading import apply_lora
    from prefopt.models.logps import CompletionLogpModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert set(CompletionLogpModel(model)._no_split_modules) == {"LlamaDecoderLayer"}
    assert set(CompletionLogpModel(apply_lora(model, PeftConfig(r=4)))._no_split_modules) == {
        "LlamaDecoderLayer"
    }


def test_packed_batches_build_no_4d_mask_for_flash_attention():
    from prefopt.trainer.loop import collator_for

    rows = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 9], "rejected_input_ids": [10], "index": 0}
    ]
    assert "attention_bias" in collator_for("pairs", 0, packing=True, attn_implementation="sdpa")(rows)
    flash = collator_for("pairs", 0, packing=True, attn_implementation="flash_attention_2")(rows)
    assert "attention_bias" not in flash and "position_ids" in flash


def test_soft_capped_logits_are_chunked_and_equal_the_full_forward():
    """Gemma-2-style final_logit_softcapping: chunked head (no [B, L, V] fp32 logits) equals the model's forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from prefopt.models.logps import completion_token_logps

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well beyond the cap, so capping matters
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 6:] = 1
    full = completion_token_logps(model, ids, mask, completion, chunk_size=None)
    chunked = completion_token_logps(model, ids, mask, completion, chunk_size=3)
    torch.testing.assert_close(chunked.token_logps, full.token_logps, atol=1e-5, rtol=1e-5)
    uncapped = torch.log_softmax(
        model.lm_head(model.model(ids).last_hidden_state), -1
    )  # the cap matters here
    assert not torch.allclose(
        full.token_logps[:, 5:], uncapped[:, 5:-1].gather(-1, ids[:, 6:, None]).squeeze(-1)
    )
