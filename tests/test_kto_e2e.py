"""KTO end to end on the tiny model: the trainer's numbers against an independent computation, the exit-2 checks,
and the reference modes."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch

from prefopt.config import load_config
from prefopt.errors import ConfigError, UserInputError
from prefopt.trainer import train
from prefopt.trainer.loop import Trainer
from tests.trainer_helpers import BAD, GOOD, REPO, metrics, run

RECIPE = "recipes/tiny/kto.yaml"


def write_unpaired(path, rows: int = 64, seed: int = 0):
    """Distinct prompts, desirable rows with positive words, undesirable ones with negative words."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(rows):
            label = rng.random() < 0.5
            words = " ".join(rng.choices(GOOD if label else BAD, k=rng.randint(2, 5)))
            handle.write(
                json.dumps({"prompt": f"Review {i}:", "completion": " " + words, "label": label}) + "\n"
            )
    return path


def completion_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt), summed over the completion tokens, computed directly (float64)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


@pytest.fixture(scope="module")
def kto_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto-e2e")
    data = write_unpaired(folder / "kto.jsonl")
    out = folder / "run"
    run(
        tiny_model_dir,
        data,
        out,
        "train.max_steps=4",
        "loss.undesirable_weight=2.0",
        f"data.eval={data}",
        "train.eval_batch_size=16",
        recipe=RECIPE,
    )
    return data, out


def test_kto_trains_and_logs_its_numbers(kto_run):
    _, out = kto_run
    records = metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    first = train_records[0]
    # step 1: policy == reference, so every sigmoid is 1/2 and z0 = 0; loss = mean weight / 2 over the batch
    fraction = first["kto/desirable_fraction"]
    assert first["kl"] == 0.0
    assert first["loss"] == pytest.approx(0.5 * (fraction * 1.0 + (1 - fraction) * 2.0), abs=1e-6)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert train_records[-1]["rewards/margins"] > 0  # desirable rewards rise above undesirable ones
    evals = [r for r in records if "eval/loss" in r]
    assert evals and all(
        math.isfinite(evals[-1][k]) for k in ("eval/loss", "eval/kl", "eval/rewards/margins")
    )
    saved = (out / "config.yaml").read_text()
    assert "undesirable_weight: 2.0" in saved and "loss_type: kto" in saved


def test_kto_step_matches_an_independent_computation(kto_run, tiny_model_dir, tmp_path):
    """The tiny model as policy against the trained one as reference (training lowered the mismatched
    likelihoods, so this way round the reference point is positive, not clamped), on the first batch of 8 rows:
    logps computed here from the raw token ids with a plain forward, mismatched pairs rotated by one, the loss
    written out."""
    from transformers import AutoModelForCausalLM

    data, out = kto_run
    config = load_config(
        REPO / RECIPE,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"reference.name_or_path={out / 'final'}",
            f"data.train={data}",
            "data.eval=null",
            "data.shuffle=false",
            f"output_dir={tmp_path / 'check'}",
            "logging.progress=false",
            "train.per_device_batch_size=8",
            "loss.beta=0.5",
            "loss.undesirable_weight=2.0",
        ],
    )
    trainer = Trainer(config)
    batch = next(iter(trainer.epoch_loader(0)))
    with torch.no_grad():
        result = trainer.step_fn(batch)

    rows = [trainer.bundle.train[i] for i in range(8)]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    prompts = [row["prompt_input_ids"] for row in rows]
    completions = [row["completion_input_ids"] for row in rows]

    def log_ratio(prompt, completion):
        return completion_logps(policy, prompt, completion) - completion_logps(reference, prompt, completion)

    mismatched_mean = sum(log_ratio(prompts[i], completions[i - 1]) for i in range(8)) / 8
    assert mismatched_mean > 0.01  # not clamped: the test sees the estimate itself
    z0 = mismatched_mean
    losses = []
    for row, prompt, completion in zip(rows, prompts, completions):
        reward = 0.5 * log_ratio(prompt, completion)
        if row["label"]:
            losses.append(1.0 * (1 - 1 / (1 + math.exp(-(reward - 0.5 * z0)))))
        else:
            losses.append(2.0 * (1 - 1 / (1 + math.exp(-(0.5 * z0 - reward)))))
    assert result.output.metrics["kl"] == pytest.approx(z0, abs=2e-4)
    assert result.output.loss.item() == pytest.approx(sum(losses) / 8, abs=2e-5)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.per_device_batch_size=1", "train.per_device_batch_size: loss 'kto' pairs each prompt"),
        ("train.eval_batch_size=1", "train.eval_batch_size: loss 'kto' pairs each prompt"),
    ],
)
def test_kto_refuses_one_row_per_device(override, key, kto_run, tiny_model_dir, tmp_path):
    data, _ = kto_run
    with pytest.raises(ConfigError, match=key):
        run(tiny_model_dir, data, tmp_path / "run", override, recipe=RECIPE)
    assert not (tmp_path / "run").exists()


def test_kto_refuses_a_precomputed_reference_but_apo_zero_unpaired_takes_it(
    kto_run, tiny_model_dir, tmp_path
):
    data, _ = kto_run
    with pytest.raises(
        UserInputError, match="reference.mode: loss 'kto' scores each prompt with another row"
    ):
        run(tiny_model_dir, data, tmp_path / "a", "reference.mode=precomputed", recipe=RECIPE)
    # Without a reference point the rows' own reference logps are all the loss needs: a precomputed table gives
    # the same training losses as a live reference.
    common = ("train.max_steps=2", "loss.loss_type=apo_zero_unpaired")
    live = run(tiny_model_dir, data, tmp_path / "live", *common, "reference.mode=model", recipe=RECIPE)
    cached = run(
        tiny_model_dir, data, tmp_path / "cached", *common, "reference.mode=precomputed", recipe=RECIPE
    )
    assert live.global_step == cached.global_step == 2
    live_losses = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    cached_losses = [r["loss"] for r in metrics(tmp_path / "cached") if "loss" in r]
    assert cached_losses == pytest.approx(live_losses, abs=1e-6)
    assert all(r["kl"] == 0.0 for r in metrics(tmp_path / "cached") if "kl" in r)


def test_kto_trains_on_pair_files_directly(tiny_model_dir, tmp_path):
    from tests.trainer_helpers import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", rows=16)
    config = load_config(
        REPO / "recipes/tiny/dpo.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={pairs}",
            "data.eval=null",
            f"output_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "train.max_steps=1",
            "loss.name=kto",
        ],
    )
    result = train(config)
    assert result.global_step == 1
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["train"]["desirable"], report["train"]["undesirable"]) == (16, 16)


def test_kto_step_gathers_the_mismatched_logps_of_every_process_in_training_only(
    kto_run, tiny_model_dir, tmp_path
):
    """Under DDP the reference point spans the global batch: the step gathers the mismatched logps (emulated here:
    a second process whose mismatched log-ratios are all +3); eval batches keep their own rows."""
    from types import SimpleNamespace

    data, out = kto_run
    config = load_config(
        REPO / RECIPE,
        [
            f"model.name_or_path={tiny_model_dir}",  # this way round the estimate is positive (see above)
            f"reference.name_or_path={out / 'final'}",
            f"data.train={data}",
            "data.eval=null",
            "data.shuffle=false",
            f"output_dir={tmp_path / 'check'}",
            "logging.progress=false",
            "train.per_device_batch_size=8",
        ],
    )
    trainer = Trainer(config)
    batch = next(iter(trainer.epoch_loader(0)))
    with torch.no_grad():
        local = trainer.step_fn(batch).output.metrics["kl"]
    gathered = []

    def gather(tensors):
        policy, reference = tensors
        gathered.append(policy.shape[0])
        return torch.cat([policy, reference + 3.0]), torch.cat([reference, reference])

    trainer.ctx.accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=2, gather=gather)
    with torch.no_grad():
        spanning = trainer.step_fn(batch).output.metrics["kl"]
        evaluated, _ = trainer.step_fn.eval_batch(batch)
    assert gathered == [8]  # once, in the training call
    # mean over 16 rows: this process's 8 log-ratios (mean m, whose clamp is `local`) and 8 of +3
    raw_local = spanning * 2 - 3.0
    assert local > 0.01 and raw_local == pytest.approx(local, abs=1e-5)
    assert evaluated["kl"] == pytest.approx(local, abs=1e-6)


@pytest.mark.multiproc
def test_kto_two_processes_match_one(tiny_model_dir, tmp_path):
    """DDP over gloo: with every row sharing one completion the mismatched pairs are the rows themselves whatever
    the rotation, so 2 processes x 4 rows must give one process x 8 rows' loss curve exactly when (and only
    when) the reference point is gathered over both processes."""
    from tests.test_multiprocess import _launch

    data = tmp_path / "same_completion.jsonl"
    rng = random.Random(3)
    with data.open("w") as handle:
        for i in range(32):
            row = {
                "prompt": f"Review {i} of the film:",
                "completion": " wonderful",
                "label": rng.random() < 0.75,
            }
            handle.write(json.dumps(row) + "\n")
    common = ("train.max_steps=4", "loss={name: kto, beta: 0.5}")
    run(tiny_model_dir, data, tmp_path / "single", *common, "train.per_device_batch_size=8")
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29511",  # a port of its own: test_sharded.py counts up from 29541
    ]
    result = _launch(
        launcher,
        tiny_model_dir,
        data,
        tmp_path / "multi",
        *common,
        "train.per_device_batch_size=4",
        use_cpu_flag=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "multi" / "run_info.json").read_text())["world_size"] == 2
    single, multi = metrics(tmp_path / "single"), metrics(tmp_path / "multi")
    assert any(record["kl"] > 0.01 for record in single)  # the reference point is in play, not clamped to 0
    assert [r["kl"] for r in multi] == pytest.approx([r["kl"] for r in single], abs=2e-5)
    assert [r["loss"] for r in multi] == pytest.approx([r["loss"] for r in single], abs=2e-5)
