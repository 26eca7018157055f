"""LD-DPO (``ld_alpha``) and WPO weighting (``wpo_weighting``): worked numbers, TRL 1.16 parity, the step's inputs.

The worked inputs are the worked pair of docs/losses.md (policy -12 / -15 over 6 / 10 tokens, reference -13 / -14) plus
LD tails (the 10-token rejected completion's last 4 tokens: policy -5, reference -4) and WPO aligned sums
(chosen -3 over 6 tokens, rejected -5 over 10).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prefopt.losses import LossInputs, get_loss
from prefopt.models.logps import TokenLogps, completion_token_logps
from prefopt.models.pair_parts import aligned_sums, pair_tail_sums


def worked(**extra) -> LossInputs:
    t = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    fields = dict(
        policy_chosen_logps=t(-12.0),
        policy_rejected_logps=t(-15.0),
        reference_chosen_logps=t(-13.0),
        reference_rejected_logps=t(-14.0),
        chosen_lengths=t(6.0),
        rejected_lengths=t(10.0),
        policy_chosen_tail_logps=t(0.0),
        policy_rejected_tail_logps=t(-5.0),
        reference_chosen_tail_logps=t(0.0),
        reference_rejected_tail_logps=t(-4.0),
        chosen_aligned_logps=t(-3.0),
        rejected_aligned_logps=t(-5.0),
    )
    fields.update(extra)
    return LossInputs(**fields)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    "params, value",
    [
        # lr_w = 1; policy rejected -15 - 0.5 * -5 = -12.5, reference -14 - 0.5 * -4 = -12 -> lr_l = -0.5, h = 1.5
        ({"ld_alpha": 0.5}, 0.620957),
        ({"ld_alpha": 0.0}, 0.644397),  # tails dropped: lr_l = -10 - -10 = 0, h = 1
        ({"ld_alpha": 1.0}, 0.598139),  # plain DPO
        ({"wpo_weighting": True}, 0.220043),  # 0.598139 * exp(-3/6) * exp(-5/10) = 0.598139 * e^-1
        ({"ld_alpha": 0.5, "wpo_weighting": True}, 0.228437),  # 0.620957 * e^-1
    ],
)
def test_worked_numbers(params, value):
    out = get_loss("dpo", beta=0.1, **params)(worked())
    assert out.loss.item() == pytest.approx(value, abs=1e-6)
    assert softplus(-0.15) == pytest.approx(0.620957, abs=1e-6)  # the hand computation of the first row


def test_ld_alpha_moves_the_rewards_and_logps_like_trl():
    out = get_loss("dpo", ld_alpha=0.5)(worked())
    assert out.metrics["logps/rejected"] == pytest.approx(-12.5)
    assert out.metrics["rewards/rejected"] == pytest.approx(0.1 * -0.5)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.1)


def test_wpo_weight_is_logged_and_detached():
    inputs = worked(chosen_aligned_logps=torch.tensor([-3.0], dtype=torch.float64, requires_grad=True))
    out = get_loss("ipo", wpo_weighting=True)(inputs)
    assert out.metrics["wpo/weight"] == pytest.approx(math.exp(-1.0))
    assert not out.loss.requires_grad  # no policy leaf here: the weight carries no graph


def test_modifiers_declare_their_needs_and_refuse_bad_values():
    assert get_loss("dpo").needs == {"reference"}
    assert get_loss("dpo", ld_alpha=0.3, wpo_weighting=True).needs == {
        "reference",
        "length_tails",
        "aligned_logps",
    }
    assert "length_tails" in get_loss("cpo", ld_alpha=0.3).needs
    mix = get_loss("mix", mix=[{"name": "dpo", "ld_alpha": 0.5}, {"name": "sft", "weight": 1.0}])
    assert "length_tails" in mix.needs
    with pytest.raises(ValueError, match="ld_alpha"):
        get_loss("dpo", ld_alpha=1.5)
    with pytest.raises(ValueError, match="wpo_weighting must be true or false"):
        get_loss("dpo", wpo_weighting="yes")
    with pytest.raises(ValueError, match="unknown parameter.*wpo_weighting"):
        get_loss(
            "aot", wpo_weighting=True
        )  # sorts the batch: per-pair weights would not follow (TRL refuses)
    with pytest.raises(ValueError, match="policy_rejected_tail_logps"):
        get_loss("dpo", ld_alpha=0.5)(worked(policy_rejected_tail_logps=None))


# ----------------------------------------------------------------------------------------- the step's inputs


def _padded(lengths_chosen, lengths_rejected, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths_chosen + lengths_rejected)
    prompt = torch.randint(1, 4, (len(lengths),), generator=g)
    positions = torch.arange(seq)[None, :]
    completion = ((positions >= prompt[:, None]) & (positions < (prompt + lengths)[:, None])).long()
    mask = completion[:, 1:].float()
    token_logps = -3 * torch.rand(len(lengths), seq - 1, generator=g, dtype=torch.float64) * mask
    return TokenLogps(token_logps, mask), completion


def test_pair_tail_sums_are_the_longer_completions_excess():
    logps, _ = _padded([3, 5], [4, 2])
    tails = pair_tail_sums(logps, {})
    for row, keep in ((0, 3), (1, 2), (2, 3), (3, 2)):  # shared lengths: min(3, 4) = 3, min(5, 2) = 2
        values = logps.token_logps[row][logps.mask[row] > 0]
        assert tails[row].item() == pytest.approx(values[keep:].sum().item())
    assert tails[0].item() == 0.0 and tails[3].item() == 0.0  # the shorter side has no tail


def test_pair_tail_sums_packed_equal_padded():
    logps, _ = _padded([3, 5], [4, 2])
    # Pack the four sequences' completion tokens into one row in sequence order 0..3, each after a 1-token prompt.
    pieces, ids, masks = [], [], []
    for row in range(4):
        values = logps.token_logps[row][logps.mask[row] > 0]
        pieces += [torch.zeros(1, dtype=torch.float64), values]
        ids += [row] * (len(values) + 1)
        masks += [0.0] + [1.0] * len(values)
    packed = TokenLogps(torch.cat(pieces)[None, :], torch.tensor(masks, dtype=torch.float64)[None, :])
    batch = {"sequence_ids": torch.tensor([[-1] + ids]), "num_sequences": 4}
    assert torch.allclose(pair_tail_sums(packed, batch), pair_tail_sums(logps, {}))


def test_square_probs_is_log_sum_of_squared_softmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    attention = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        expected = torch.log((torch.softmax(logits, -1) ** 2).sum(-1)) * completion[:, 1:]
        for chunk in (None, 3):  # full logits, and the chunked head
            out = completion_token_logps(
                model, ids, attention, completion, chunk_size=chunk, square_probs=True
            )
            assert torch.allclose(out.log_sum_sq, expected, atol=1e-5)
    aligned = aligned_sums(out, {})
    assert torch.allclose(aligned, ((out.token_logps - expected) * out.mask).sum(-1), atol=1e-5)


# ------------------------------------------------------------------------------- help, recipes, gold benchmark


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ld_dpo", ["2409.06411", "loss.ld_alpha=0.5", "ipo", "rpo", "cpo"]),
        ("wpo", ["2406.11827", "loss.wpo_weighting=true", "sigmoid_norm"]),
        ("tr_dpo", ["2404.09656", "reference.sync_steps=16", "sync_mix=0.6"]),
    ],
)
def test_prefopt_losses_name_describes_each_modifier(name, expected, capsys):
    from prefopt.cli import main

    assert main(["losses", name, "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    for text in expected:
        assert text in " ".join(out.split()), text
    if name == "wpo":
        assert "aot," not in out  # AOT sorts the batch: it does not take the weighting


def test_prefopt_losses_lists_the_modifiers(capsys):
    from prefopt.cli import main

    assert main(["losses", "--width", "80"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "modifiers (prefopt losses NAME for one): ld_dpo (loss.ld_alpha=0.5)" in out and "tr_dpo" in out


def test_gold_benchmark_modifier_entries_load():
    import importlib.util

    from prefopt.config import load_config
    from tests.trainer_helpers import REPO

    spec = importlib.util.spec_from_file_location("gold_benchmark", REPO / "scripts" / "gold_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    needs = {"ld_dpo": "length_tails", "wpo": "aligned_logps", "tr_dpo": "reference"}
    for name, (recipe, overrides, kind, _) in bench.MODIFIERS.items():
        assert name in bench.METHODS and name not in bench.DEFAULT_METHODS and kind == "pairs"
        config = load_config(REPO / "recipes" / "tiny" / recipe, overrides)
        assert needs[name] in get_loss(config.loss.name, **config.loss.params()).needs
    assert (
        load_config(REPO / "recipes/tiny/dpo.yaml", bench.MODIFIERS["tr_dpo"][1]).reference.sync_steps == 16
    )


# --------------------------------------------------------------------------------------- TRL 1.16 parity

trl = pytest.importorskip("trl", reason="TRL parity tests need `trl` (pip install prefopt[test])")

from tests.test_losses_trl_parity import Batch, assert_close, fake_trainer  # noqa: E402


def _trl_loss(batch: Batch, reference_per_token=None, log_sum_sq=None, **attributes):
    """TRL's ``DPOTrainer._compute_loss`` on the batch; a live fake reference model when ``reference_per_token``."""
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = batch.masked_per_token()
    zeros = torch.zeros_like(per_token.detach())

    def outputs(log_probs, sq=None):
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), log_sum_sq_probs=sq
        )

    model = lambda **kwargs: outputs(per_token, log_sum_sq)  # noqa: E731
    inputs = {
        "input_ids": torch.ones_like(batch.completion_mask),
        "attention_mask": torch.ones_like(batch.completion_mask),
        "completion_mask": batch.completion_mask,
    }
    if reference_per_token is None:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = batch.reference.chunk(2)
    else:
        attributes.update(
            precompute_ref_logps=False,
            ref_model=lambda **kwargs: outputs(reference_per_token),
            model=SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={}),
        )
        attributes["args"] = SimpleNamespace(
            center_rewards_coefficient=None, gradient_checkpointing_kwargs=None
        )
    trainer = fake_trainer(**attributes)
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss, metrics


def _ours_inputs(batch: Batch, reference_per_token=None, log_sum_sq=None) -> LossInputs:
    """What prefopt's pair step builds from the same per-token numbers (through ``prefopt.models.pair_parts``)."""
    mask = batch.completion_mask[:, 1:].to(batch.per_token.dtype)
    policy = TokenLogps(batch.masked_per_token(), mask, log_sum_sq)
    inputs = batch.prefopt_inputs()
    b = batch.batch
    tails = pair_tail_sums(policy, {})
    inputs.policy_chosen_tail_logps, inputs.policy_rejected_tail_logps = tails[:b], tails[b:]
    if reference_per_token is None:  # TRL's precomputed reference: the given sums, no tails
        inputs.reference_chosen_tail_logps = torch.zeros_like(batch.reference[:b])
        inputs.reference_rejected_tail_logps = torch.zeros_like(batch.reference[b:])
    else:
        reference = TokenLogps(reference_per_token, mask)
        sums, ref_tails = reference.sums, pair_tail_sums(reference, {})
        inputs.reference_chosen_logps, inputs.reference_rejected_logps = sums[:b], sums[b:]
        inputs.reference_chosen_tail_logps, inputs.reference_rejected_tail_logps = (
            ref_tails[:b],
            ref_tails[b:],
        )
    if log_sum_sq is not None:
        aligned = aligned_sums(policy, {})
        inputs.chosen_aligned_logps, inputs.rejected_aligned_logps = aligned[:b], aligned[b:]
    return inputs


def _reference_per_token(batch: Batch, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    mask = batch.completion_mask[:, 1:].to(batch.per_token.dtype)
    return -3 * torch.rand(batch.per_token.shape, generator=g, dtype=batch.per_token.dtype) * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 0.8])
@pytest.mark.parametrize(
    "name, params, loss_type",
    [("dpo", {}, "sigmoid"), ("ipo", {}, "ipo"), ("hinge", {}, "hinge"), ("bco_pair", {}, "bco_pair")],
)
def test_ld_alpha_matches_trl_with_a_live_reference(name, params, loss_type, ld_alpha, seed):
    batch = Batch(6, seed, torch.float64)
    reference = _reference_per_token(batch, seed)
    ours = get_loss(name, ld_alpha=ld_alpha, **params)(_ours_inputs(batch, reference))
    theirs, metrics = _trl_loss(batch, reference, ld_alpha=ld_alpha, loss_types=[loss_type])
    assert_close(ours.loss, theirs, batch, rel=1e-6)
    if (
        name != "ipo"
    ):  # TRL logs IPO's un-normalised reward (prefopt: per token, tests/test_losses_catalogue.py)
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert ours.metrics[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("seed", [0, 1])
def test_ld_alpha_matches_trl_with_a_precomputed_reference(seed):
    batch = Batch(6, seed, torch.float32)
    ours = get_loss("dpo", ld_alpha=0.4)(_ours_inputs(batch))
    theirs, _ = _trl_loss(batch, ld_alpha=0.4)
    assert_close(ours.loss, theirs, batch, rel=1e-6)


def _log_sum_sq(batch: Batch, seed: int) -> torch.Tensor:
    # log sum_v p(v)^2 lies in [log p_max^2, log p_max]; any values below the token logps' scale do for parity
    g = torch.Generator().manual_seed(200 + seed)
    mask = batch.completion_mask[:, 1:].to(batch.per_token.dtype)
    return -2 * torch.rand(batch.per_token.shape, generator=g, dtype=batch.per_token.dtype) * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "name, params, loss_type, attributes",
    [
        ("dpo", {}, "sigmoid", {}),
        ("ipo", {}, "ipo", {}),
        ("robust", {"label_smoothing": 0.1}, "robust", {"label_smoothing": 0.1}),
        ("sigmoid_norm", {}, "sigmoid_norm", {}),
        ("dpo", {"ld_alpha": 0.5}, "sigmoid", {"ld_alpha": 0.5}),
    ],
)
def test_wpo_weighting_matches_trl_use_weighting(name, params, loss_type, attributes, seed):
    batch = Batch(6, seed, torch.float64)
    sq = _log_sum_sq(batch, seed)
    inputs = _ours_inputs(batch, log_sum_sq=sq)
    ours = get_loss(name, wpo_weighting=True, **params)(inputs)
    theirs, _ = _trl_loss(batch, log_sum_sq=sq, use_weighting=True, loss_types=[loss_type], **attributes)
    assert_close(ours.loss, theirs, batch, rel=1e-6)
    assert ours.loss.item() != pytest.approx(get_loss(name, **params)(inputs).loss.item(), rel=1e-3)


def test_mixture_with_ld_parts_matches_trl():
    batch = Batch(6, 3, torch.float64)
    reference = _reference_per_token(batch, 3)
    mix = [
        {"name": "dpo", "weight": 0.8, "ld_alpha": 0.5},
        {"name": "bco_pair", "weight": 0.2, "ld_alpha": 0.5},
    ]
    ours = get_loss("mix", mix=mix)(_ours_inputs(batch, reference))
    theirs, _ = _trl_loss(
        batch, reference, ld_alpha=0.5, loss_types=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2]
    )
    assert_close(ours.loss, theirs, batch, rel=1e-6)
