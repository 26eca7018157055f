"""Reliability (issue 15): user mistakes end in exit 2 with one line and no files; no run is lost or mixed.

Every case listed in the issue has a test here; SIGKILL fault injection lives in ``test_fault_injection.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.trainer import checkpoint as ckpt
from tests.trainer_helpers import REPO, metrics, write_pairs

TIMING_KEYS = ("tokens_per_second",)


def cli_args(
    model: Path, data: Path, out: Path, *overrides: str, recipe: str = "recipes/tiny/dpo.yaml"
) -> list:
    return [
        "train",
        str(REPO / recipe),
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={out}",
        "logging.progress=false",
        "logging.logging_steps=1",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        "train.per_device_batch_size=8",
        *overrides,
    ]


def train_cli(capsys, *args, **kwargs) -> tuple[int, str]:
    code = main(cli_args(*args, **kwargs))
    return code, capsys.readouterr().err


def steady(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput, which no two runs share."""
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in metrics(out)]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    # final/prefopt_config.yaml is the resolved recipe: it records how the run was started (resume_from,
    # output_dir), not what it computed, so it is the one file a resumed run may write differently.
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "prefopt_config.yaml"
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows=32)


# The base run's schedule: 4 steps, a checkpoint every 2, all kept.
BASE_SCHEDULE = ("train.max_steps=4", "train.save_steps=2", "train.save_total_limit=null")


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, pairs, tmp_path_factory) -> Path:
    """The run the resume tests continue or damage (copies of it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(cli_args(tiny_model_dir, pairs, out, *BASE_SCHEDULE)) == 0
    return out


def resume_latest(capsys, tiny_model_dir, pairs, run: Path) -> int:
    """Continue ``run`` with the base run's schedule from its latest usable checkpoint; the exit status."""
    code, _ = train_cli(capsys, tiny_model_dir, pairs, run, *BASE_SCHEDULE, "train.resume_from=latest")
    return code


def assert_same_as_base(run: Path, base_run: Path) -> None:
    """Same final weights and the same metrics lines (no duplicates) as the uninterrupted base run."""
    assert tree_bytes(run / "final") == tree_bytes(base_run / "final")
    assert steady(run) == steady(base_run)


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------------------------ exit 2, nothing written


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.learning_rate=-1e-4", "train.learning_rate: -0.0001 is out of range; valid: >= 0"),
        ("train.per_device_batch_size=0", "train.per_device_batch_size: 0 is out of range; valid: > 0"),
        ("train.num_epochs=-1", "train.num_epochs: -1 is out of range; valid: > 0"),
        (
            "data.max_prompt_length=32",
            "data.max_prompt_length: 32 leaves no room for the completion in data.max_length=16",
        ),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 is out of range; valid: [0, 1]"),
        ("generation.top_p=0", "generation.top_p: 0 is out of range; valid: (0, 1]"),
        ("train.save_total_limit=0", "train.save_total_limit: 0 is out of range; valid: > 0"),
    ],
)
def test_out_of_range_values_exit_2_before_any_file(tiny_model_dir, pairs, tmp_path, capsys, override, says):
    extra = ["data.max_length=16"] if override.startswith("data.max_prompt") else []
    code, err = train_cli(capsys, tiny_model_dir, pairs, tmp_path / "out", override, *extra)
    assert code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_max_length_alone_lowers_the_default_prompt_budget():
    from prefopt.config import load_config

    config = load_config(None, ["data.max_length=64"])
    assert (config.data.max_length, config.data.max_prompt_length) == (64, 32)


def test_output_dir_that_is_a_file_exits_2(tiny_model_dir, pairs, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, err = train_cli(capsys, tiny_model_dir, pairs, target, "train.max_steps=1")
    assert code == 2 and f"output_dir: '{target}' is an existing file, not a directory" in err
    assert target.read_text() == "keep me"
    code, err = train_cli(capsys, tiny_model_dir, pairs, target / "run", "train.max_steps=1")
    assert code == 2 and "is a file, not a directory" in err


def test_model_without_tokenizer_files_exits_2(tiny_model_dir, pairs, tmp_path, capsys):
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    code, err = train_cli(capsys, model, pairs, tmp_path / "out", "train.max_steps=1")
    assert code == 2 and f"model.name_or_path: '{model}' has no tokenizer files" in err
    assert not (tmp_path / "out").exists()


def test_early_data_error_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys, write_jsonl):
    data = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}]
    )
    code, err = train_cli(capsys, tiny_model_dir, data, tmp_path / "out", "train.max_steps=1")
    assert code == 2 and "bad.jsonl line 2" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ overwrite: no data loss


def test_overwrite_replaces_the_old_run_so_resume_cannot_mix(tiny_model_dir, pairs, tmp_path, capsys):
    """The issue's repro (30 steps there, 6 here, same mechanism): the old checkpoint-4/6 used to survive."""
    out = tmp_path / "D"
    assert train_cli(capsys, tiny_model_dir, pairs, out, "train.max_steps=6", "train.save_steps=2")[0] == 0
    assert (
        train_cli(
            capsys,
            tiny_model_dir,
            pairs,
            out,
            "train.max_steps=4",
            "train.save_steps=2",
            "overwrite_output_dir=true",
        )[0]
        == 0
    )
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".D.overwritten-*"))  # moved aside, then deleted
    new_final, new_metrics = tree_bytes(out / "final"), steady(out)
    # Resuming "latest" now continues the NEW run: nothing to do at max_steps=4, and final/ keeps its weights.
    assert (
        train_cli(
            capsys,
            tiny_model_dir,
            pairs,
            out,
            "train.max_steps=4",
            "train.save_steps=2",
            "train.resume_from=latest",
        )[0]
        == 0
    )
    assert tree_bytes(out / "final") == new_final and steady(out) == new_metrics


def test_overwrite_refuses_a_directory_holding_the_inputs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "D"
    out.mkdir()
    data = write_pairs(out / "pairs.jsonl", rows=16)
    (out / "metrics.jsonl").write_text("")  # an old run's leftovers
    code, err = train_cli(capsys, tiny_model_dir, data, out, "train.max_steps=1", "overwrite_output_dir=true")
    assert code == 2 and "overwrite_output_dir=true would delete" in err and "data.train" in err
    assert data.is_file()


def test_existing_run_without_overwrite_or_resume_is_refused(
    base_run, tiny_model_dir, pairs, tmp_path, capsys
):
    run = copy_run(base_run, tmp_path)
    before = tree_bytes(run)
    code, err = train_cli(capsys, tiny_model_dir, pairs, run, "train.max_steps=4")
    assert code == 2 and "already holds a run" in err and "train.resume_from=latest" in err
    assert tree_bytes(run) == before


# ------------------------------------------------------------------------------------------ resume: same run


def test_resume_after_a_kill_truncates_metrics_and_is_exact(
    base_run, tiny_model_dir, pairs, tmp_path, capsys
):
    """A run killed after logging step 3 (checkpoint-2 saved): its step-3 line, a half-written line and a
    .partial save are dropped, and the resumed run ends bit-identical to the uninterrupted one."""
    run = copy_run(base_run, tmp_path)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4.partial")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    assert resume_latest(capsys, tiny_model_dir, pairs, run) == 0
    assert_same_as_base(run, base_run)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert not (run / "checkpoint-4.partial").exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("loss.name=simpo", "loss dpo -> simpo"),
        ("loss.beta=0.5", "loss.beta 0.1 -> 0.5"),
        ("data.max_length=80", "data fingerprint"),
    ],
)
def test_resume_of_another_run_is_refused(base_run, tiny_model_dir, pairs, tmp_path, capsys, override, says):
    run = copy_run(base_run, tmp_path)
    before = tree_bytes(run)
    code, err = train_cli(
        capsys, tiny_model_dir, pairs, run, "train.max_steps=6", "train.resume_from=latest", override
    )
    assert code == 2 and "belongs to a different run" in err and says in err
    assert "train.resume_allow=[" in err
    assert tree_bytes(run) == before  # refused before any file is written


def test_resume_with_other_data_is_refused_unless_allowed(base_run, tiny_model_dir, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    other = write_pairs(tmp_path / "other.jsonl", rows=32, seed=7)
    code, err = train_cli(capsys, tiny_model_dir, other, run, "train.max_steps=6", "train.resume_from=latest")
    assert code == 2 and "data fingerprint" in err and "train.resume_allow=[data]" in err
    code, _ = train_cli(
        capsys,
        tiny_model_dir,
        other,
        run,
        "train.max_steps=5",
        "train.resume_from=latest",
        "train.resume_allow=[data]",
    )
    assert code == 0 and [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_with_another_tokenizer_is_refused(base_run, tiny_model_dir, pairs, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    code, err = train_cli(
        capsys,
        tiny_model_dir,
        pairs,
        run,
        "train.max_steps=6",
        "train.resume_from=latest",
        f"data.chat_template={template}",
    )
    assert code == 2 and "tokenizer fingerprint" in err


def test_resume_with_a_different_size_model_exits_2(base_run, pairs, tmp_path, capsys):
    from prefopt.models.tiny import build_tiny_model

    small = build_tiny_model(tmp_path / "small-model", hidden_size=32)
    run = copy_run(base_run, tmp_path)
    before = tree_bytes(run)
    code, err = train_cli(capsys, small, pairs, run, "train.max_steps=6", "train.resume_from=latest")
    assert code == 2 and "belongs to a different run" in err and "model.policy" in err
    assert tree_bytes(run) == before
    # Told to ignore the model change, the checkpoint still cannot fit: one line, no traceback.
    code, err = train_cli(
        capsys,
        small,
        pairs,
        run,
        "train.max_steps=6",
        "train.resume_from=latest",
        "train.resume_allow=[model]",
    )
    assert code == 2 and "does not fit this run's model" in err and "size mismatch" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------- damaged checkpoint files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin"])
def test_damaged_latest_checkpoint_falls_back_and_says_so(
    base_run, tiny_model_dir, pairs, tmp_path, capsys, caplog, damaged
):
    run = copy_run(base_run, tmp_path)
    _truncate(run / "checkpoint-4" / damaged)
    shutil.rmtree(run / "final")
    explicit = run / "checkpoint-4"
    code, err = train_cli(
        capsys, tiny_model_dir, pairs, run, "train.max_steps=4", f"train.resume_from={explicit}"
    )
    assert code == 2 and f"{damaged} is truncated" in err and str(explicit) in err
    with caplog.at_level(logging.WARNING, logger="prefopt.trainer.checkpoint"):
        code = resume_latest(capsys, tiny_model_dir, pairs, run)
    assert code == 0
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-4 is unusable" in warning and f"{damaged} is truncated" in warning
    assert "resuming from checkpoint-2" in warning
    # Resumed from step 2, the run redoes steps 3-4 exactly.
    assert_same_as_base(run, base_run)


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned: a checkpoint ran code",))


def test_a_pickle_that_runs_code_is_refused(base_run, tiny_model_dir, pairs, tmp_path, capsys):
    import torch

    run = copy_run(base_run, tmp_path)
    torch.save({"payload": _RunsCode()}, run / "checkpoint-4" / "random_states_0.pkl")
    code, err = train_cli(capsys, tiny_model_dir, pairs, run, "train.max_steps=4", "train.resume_from=latest")
    assert code == 2 and "was refused (weights-only loading)" in err and "Traceback" not in err
    assert "pwned" not in capsys.readouterr().out + err


def test_checkpoint_problem_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint-2"
    path.mkdir()
    (path / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 2}))
    save_file({"w": torch.zeros(64)}, path / "model.safetensors")
    torch.save({"state": {}}, path / "optimizer.bin")
    assert ckpt.checkpoint_problem(path) is None
    (path / "scheduler.bin").write_bytes(b"PK\x03\x04 cut")
    assert ckpt.checkpoint_problem(path).startswith("scheduler.bin is truncated or corrupt")
    (path / "scheduler.bin").unlink()
    _truncate(path / "model.safetensors")
    assert ckpt.checkpoint_problem(path).startswith("model.safetensors is truncated")


def test_checkpoint_problem_reads_a_deepspeed_engine_directory(tmp_path):
    """accelerate's save_state under DeepSpeed writes the engine's files into ``pytorch_model/`` (one model and one
    optimizer file per rank): such a checkpoint is complete, and a cut-off rank file is named."""
    import torch

    path = tmp_path / "checkpoint-2"
    engine = path / "pytorch_model"
    engine.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 2}))
    (path / "latest").write_text("pytorch_model")
    for rank in (0, 1):
        torch.save({"module": {}}, engine / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    assert ckpt.checkpoint_problem(path) == "no optimizer state (optimizer.bin) in it"
    for rank in (0, 1):
        torch.save({"optimizer_state_dict": {}}, engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    assert ckpt.checkpoint_problem(path) is None
    (engine / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 cut")
    assert ckpt.checkpoint_problem(path).startswith("zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated")


# ------------------------------------------------------------------------------------------- the stop message


def test_non_finite_stop_message_is_true_without_a_checkpoint(tiny_model_dir, pairs, tmp_path, monkeypatch):
    from prefopt.losses.dpo import DPOLoss
    from prefopt.trainer import TrainingDiverged
    from tests.trainer_helpers import run

    original = DPOLoss.forward
    monkeypatch.setattr(
        DPOLoss,
        "forward",
        lambda self, i: type(original(self, i))(loss=original(self, i).loss * float("nan"), metrics={}),
    )
    with pytest.raises(TrainingDiverged) as stopped:
        run(tiny_model_dir, pairs, tmp_path / "none", "train.max_steps=6", "train.max_skipped_steps=1")
    assert "No checkpoint was saved in this run" in str(stopped.value)
    assert "is intact" not in str(stopped.value)
    calls = {"n": 0}

    def nan_after_two_steps(self, inputs):
        calls["n"] += 1
        output = original(self, inputs)
        if calls["n"] > 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(DPOLoss, "forward", nan_after_two_steps)
    with pytest.raises(TrainingDiverged) as stopped:
        run(
            tiny_model_dir,
            pairs,
            tmp_path / "some",
            "train.max_steps=6",
            "train.max_skipped_steps=1",
            "train.save_steps=1",
        )
    last = ckpt.list_checkpoints(tmp_path / "some")[-1]  # a skipped step changes no weight: still a good one
    assert f"The last good checkpoint, {last}, is intact" in str(stopped.value)


# -------------------------------------------------------------------------------------------------- data rows


def test_every_source_counts_from_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefopt.data.sources import Source, load_rows

    good, bad = {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([good, bad]))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\np,a,b\np,a,\n")
    pq.write_table(pa.Table.from_pylist([good, {**bad, "rejected": None}]), tmp_path / "d.parquet")
    where = {
        name: load_rows(Source(str(tmp_path / name))).reasons[0].split(":")[0]
        for name in ("d.jsonl", "d.json", "d.csv", "d.parquet")
    }
    assert where == {
        "d.jsonl": f"{tmp_path / 'd.jsonl'} line 2",
        "d.json": f"{tmp_path / 'd.json'} row 2",
        "d.csv": f"{tmp_path / 'd.csv'} line 3",
        "d.parquet": f"{tmp_path / 'd.parquet'} row 2",
    }


@pytest.mark.parametrize(
    "prompt, says",
    [
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            'message 2: role "user" follows another "user" message',
        ),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            'message 1: the conversation starts with an "assistant" turn',
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            'message 2: a "system" message is only allowed first',
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            'the prompt ends with an "assistant" turn',
        ),
    ],
)
def test_conversational_roles_must_alternate(prompt, says):
    from prefopt.data.formats import RowError, normalize_row

    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    with pytest.raises(RowError, match=says):
        normalize_row(row, "conversational")
    fine = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert normalize_row({**row, "prompt": fine}, "conversational").prompt == fine


# --------------------------------------------------------------------------------------------------- diagnose


def test_diagnose_hint_names_its_own_flag(tiny_model_dir, tmp_path, capsys, write_jsonl):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}, {"prompt": "q"}],
    )
    code = main(
        [
            "diagnose",
            "--policy",
            str(tiny_model_dir),
            "--reference",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "diag"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "bad.jsonl line 2" in err
        and "--on-invalid skip" in err
        and "data.on_invalid" not in err
    )


def test_diagnose_reference_with_another_vocabulary_exits_2(tiny_model_dir, tmp_path, capsys, write_jsonl):
    from prefopt.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "small-vocab", vocab_size=512)
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)
    code = main(
        [
            "diagnose",
            "--policy",
            str(tiny_model_dir),
            "--reference",
            str(other),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "diag"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--reference" in err and "vocabulary of" in err and "Traceback" not in err
    assert not (tmp_path / "diag").exists()
