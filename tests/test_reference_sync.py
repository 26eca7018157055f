"""TR-DPO's synced reference (``reference.sync_steps`` / ``reference.sync_mix``): the update, TRL parity, the
refusals, a number through the trainer, and resume."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from prefopt.cli import main
from prefopt.errors import ConfigError
from prefopt.models.reference_sync import STATE_FILE, SyncedModelReference
from prefopt.trainer import checkpoint as ckpt
from tests.trainer_helpers import REPO, metrics, run, write_pairs


def _linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(layer.weight, value)
    return layer


def test_update_runs_every_sync_steps_with_the_mix():
    reference = SyncedModelReference(_linear(1.0), None, sync_steps=3, sync_mix=0.6)
    policy = _linear(3.0)
    for step in (1, 2):
        reference.after_optimizer_step(step, policy)
    assert torch.equal(reference.model.weight, torch.full((1, 2), 1.0))  # not a multiple of 3: untouched
    reference.after_optimizer_step(3, policy)
    assert reference.model.weight[0, 0].item() == pytest.approx(0.6 * 3.0 + 0.4 * 1.0)  # 2.2
    reference.sync_mix = 1.0  # hard update: the policy's weights exactly
    reference.after_optimizer_step(6, policy)
    assert torch.equal(reference.model.weight, policy.weight)
    assert reference.syncs == 2


def test_matches_trl_sync_ref_model_callback(tiny_model_dir, monkeypatch):
    """Same schedule and update as TRL's callback over 8 steps, the policy moving between steps."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM
    from trl.trainer.callbacks import SyncRefModelCallback

    # TRL's sync_target_model asks accelerate's global state for DeepSpeed first; without a launched accelerator
    # that lookup fails, so call the branch it takes without DeepSpeed (its own _sync_target_model).
    monkeypatch.setattr(
        SyncRefModelCallback, "sync_target_model", staticmethod(SyncRefModelCallback._sync_target_model)
    )
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = SyncedModelReference(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), None, sync_steps=3, sync_mix=0.6
    )
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    callback = SyncRefModelCallback(ref_model=theirs, accelerator=None)
    args = SimpleNamespace(ref_model_sync_steps=3, ref_model_mixup_alpha=0.6)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        with torch.no_grad():  # an "optimizer step"
            for param in policy.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        ours.after_optimizer_step(step, policy)
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=policy)
    assert ours.syncs == 2
    for (name, mine), (_, trl) in zip(ours.model.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(mine, trl, atol=1e-6), name
    assert not torch.allclose(ours.model.lm_head.weight, policy.lm_head.weight)


def test_a_reference_of_another_architecture_is_refused():
    reference = SyncedModelReference(_linear(1.0), None, sync_steps=1, sync_mix=0.5)
    with pytest.raises(ConfigError, match="same architecture"):
        reference.check_policy(torch.nn.Linear(3, 1, bias=False))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reference.mode=precomputed"], "precomputed reference is fixed"),
        (["model.peft.r=8"], "adapter reference"),
        (["model.peft.r=8", "reference.mode=model"], "LoRA policy cannot be mixed"),
        (["loss.name=simpo"], "uses no reference"),
        (["reference.sync_mix=0"], "sync_mix"),
    ],
)
def test_combinations_that_cannot_work_exit_2(overrides, message, capsys):
    code = main(["train", str(REPO / "recipes/tiny/dpo.yaml"), "reference.sync_steps=4", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_hard_sync_makes_the_next_step_start_from_ln2(tiny_model_dir, tmp_path):
    # sync_mix=1 copies the policy into the reference after steps 2 and 4: steps 3 and 5 then see policy ==
    # reference, so their DPO loss is exactly ln 2 and the reward margins 0; steps 2 and 4 have trained away.
    data = write_pairs(tmp_path / "pairs.jsonl", rows=48)
    run(
        tiny_model_dir,
        data,
        tmp_path / "hard",
        "train.max_steps=5",
        "reference.sync_steps=2",
        "reference.sync_mix=1.0",
    )
    losses = [m["loss"] for m in metrics(tmp_path / "hard") if "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[2] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[4] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[1] - math.log(2)) > 1e-3 and abs(losses[3] - math.log(2)) > 1e-3


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=48)
    # syncs after steps 2 and 4; the checkpoint at step 3 holds the reference synced at step 2
    sync = ("reference.sync_steps=2", "reference.sync_mix=0.5", "train.max_steps=5", "train.save_steps=3")
    full = tmp_path / "full"
    run(tiny_model_dir, data, full, *sync, "train.save_total_limit=null")
    assert (full / "checkpoint-3" / STATE_FILE).is_file()
    assert ckpt.checkpoint_problem(full / "checkpoint-3") is None
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run(tiny_model_dir, data, resumed, *sync, "train.resume_from=latest", "overwrite_output_dir=false")
    expected = [m["loss"] for m in metrics(full) if "loss" in m][3:]
    assert [m["loss"] for m in metrics(resumed) if "loss" in m] == pytest.approx(expected, abs=1e-6)
    # Without the synced reference (a fixed reference from the start) the resumed steps would differ:
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    shutil.copytree(full / "checkpoint-3", fixed / "checkpoint-3")
    (fixed / "checkpoint-3" / STATE_FILE).unlink()
    code = main(
        [
            "train",
            str(REPO / "recipes/tiny/dpo.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}",
            "data.eval=null",
            f"output_dir={fixed}",
            "train.resume_from=latest",
            "overwrite_output_dir=false",
            "logging.progress=false",
            *sync,
        ]
    )
    # the checkpoint lacks the reference: refused, not silently resumed from the initial one
    assert code == 2 and f"has no {STATE_FILE}" in capsys.readouterr().err


def test_sync_never_writes_the_policy():
    # The update writes into the reference only (never the policy), in place.
    policy = _linear(3.0)
    before = copy.deepcopy(policy.state_dict())
    SyncedModelReference(_linear(1.0), None, sync_steps=1, sync_mix=0.5).after_optimizer_step(1, policy)
    assert torch.equal(policy.weight, before["weight"])
