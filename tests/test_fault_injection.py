"""SIGKILL at seeded random points, then ``train.resume_from=latest`` until the run finishes: the result must be
bit-identical to the uninterrupted run (metrics.jsonl without the wall-clock throughput, samples.jsonl, final/, and
the checkpoints left on disk).

Kill points come from the events of a real uninterrupted run (``tests/fault_harness.py``): optimizer steps, metrics
lines (also half-written), every save of model/optimizer/scheduler/RNG/state files (before it, or cut to half its
bytes), renames, and each file removal — those of checkpoint pruning included. The default suite runs one short
case (a kill in the middle of pruning); ``-m slow`` runs many kills per run for DPO, XPO and RTO.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.trainer import checkpoint as ckpt
from tests.trainer_helpers import REPO, write_pairs

TIMING_KEYS = ("tokens_per_second",)
KILLED = -9  # subprocess return code of a SIGKILLed process


def harness(kill_at: int, events: Path, args: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "tests.fault_harness", str(kill_at), str(events), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode not in (0, KILLED):
        raise AssertionError(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.returncode


def steady_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    # final/prefopt_config.yaml is the resolved recipe: it records how the run was started (resume_from,
    # output_dir), not what it computed, so it is the one file a resumed run may write differently.
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "prefopt_config.yaml"
    }


def assert_same_run(reference: Path, resumed: Path) -> None:
    assert steady_lines(resumed / "metrics.jsonl") == steady_lines(reference / "metrics.jsonl")
    assert steady_lines(resumed / "samples.jsonl") == steady_lines(reference / "samples.jsonl")
    assert tree_bytes(resumed / "final") == tree_bytes(reference / "final")
    names = [p.name for p in ckpt.list_checkpoints(resumed)]
    assert names == [p.name for p in ckpt.list_checkpoints(reference)]
    for name in names:
        for file in ("model.safetensors", ckpt.STATE_FILE):
            assert (resumed / name / file).read_bytes() == (reference / name / file).read_bytes(), (
                name,
                file,
            )
    assert not list(resumed.glob("*.partial")) and not list(resumed.glob("*.deleting"))


def kill_and_resume(args: list[str], tmp_path: Path, seed: int, kills: int, first_in: str = "") -> list[str]:
    """Reference run, then a run killed ``kills`` times at seeded events (the first one among events whose label
    contains ``first_in``), resumed with ``train.resume_from=latest`` each time. Returns the labels killed at."""
    # Both runs are named "run" (in different folders): the model card in final/ names the run after its folder.
    reference, events = tmp_path / "reference" / "run", tmp_path / "events.json"
    assert harness(0, events, [*args, f"output_dir={reference}"]) == 0
    labels = json.loads(events.read_text())
    rng = random.Random(seed)
    resumed, killed_at = tmp_path / "resumed" / "run", []
    candidates = [i + 1 for i, label in enumerate(labels) if first_in in label]
    assert candidates, f"no event matches {first_in!r}"
    point = rng.choice(candidates)
    for attempt in range(kills):
        code = harness(point, tmp_path / "unused.json", [*args, f"output_dir={resumed}"])
        if code == 0:  # the resumed run had fewer events than the kill point: it finished
            break
        killed_at.append(f"attempt {attempt}: event {point}")
        point = rng.randint(1, len(labels))
    else:
        assert harness(0, tmp_path / "unused.json", [*args, f"output_dir={resumed}"]) == 0
    assert_same_run(reference, resumed)
    return killed_at


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows=32)


def dpo_args(model: Path, data: Path, steps: int, save_steps: int, limit: int) -> list[str]:
    return [
        "train",
        str(REPO / "recipes/tiny/dpo.yaml"),
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval=null",
        "logging.progress=false",
        "logging.logging_steps=1",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-3",
        "train.per_device_batch_size=8",
        f"train.max_steps={steps}",
        f"train.save_steps={save_steps}",
        f"train.save_total_limit={limit}",
        "train.resume_from=latest",
    ]


def test_kill_during_checkpoint_pruning_resumes_bit_identically(tiny_model_dir, pairs, tmp_path):
    """The short default case: 4 steps, a checkpoint every 2, keep 1 -> checkpoint-2 is pruned at step 4; the kill
    lands inside that pruning (seeded choice among its events)."""
    killed = kill_and_resume(
        dpo_args(tiny_model_dir, pairs, 4, 2, 1), tmp_path, seed=0, kills=1, first_in="prune/"
    )
    assert len(killed) == 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dpo_survives_many_random_kills(tiny_model_dir, pairs, tmp_path, seed):
    killed = kill_and_resume(
        dpo_args(tiny_model_dir, pairs, 12, 2, 2),
        tmp_path,
        seed=seed,
        kills=6,
        first_in="prune/" if seed == 1 else ":cut",
    )
    assert len(killed) >= 2


@pytest.fixture(scope="module")
def gold_prompts(tmp_path_factory) -> Path:
    from data_tools.synth import write_task

    out = tmp_path_factory.mktemp("gold")
    write_task(out, seed=0, n_sft=16, n_pairs=16, n_eval=8, n_heldout=8, n_prompts=32)
    return out / "prompts_train.jsonl"


def online_args(recipe: str, model: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / recipe),
        f"model.name_or_path={model}",
        f"data.train={prompts}",
        "logging.progress=false",
        "logging.logging_steps=1",
        "logging.sample_steps=1",
        "generation.max_new_tokens=8",
        "train.max_steps=6",
        "train.save_steps=2",
        "train.save_total_limit=2",
        "train.resume_from=latest",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_xpo_survives_many_random_kills(tiny_model_dir, gold_prompts, tmp_path, seed):
    args = online_args("recipes/tiny/xpo.yaml", tiny_model_dir, gold_prompts, "train.per_device_batch_size=4")
    killed = kill_and_resume(args, tmp_path, seed=seed, kills=4, first_in="prune/" if seed == 1 else "step")
    assert len(killed) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_rto_survives_many_random_kills(tiny_model_dir, gold_prompts, tmp_path, seed):
    args = online_args(
        "recipes/tiny/rto.yaml",
        tiny_model_dir,
        gold_prompts,
        f"ppo.dpo_policy={tiny_model_dir}",
        "ppo.rollout_batch_size=4",
        "ppo.minibatch_size=2",
        "ppo.adaptive_kl_target=0.5",
    )
    killed = kill_and_resume(args, tmp_path, seed=seed, kills=4, first_in="prune/" if seed == 1 else "step")
    assert len(killed) >= 1
