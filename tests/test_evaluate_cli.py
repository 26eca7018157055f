"""``prefopt evaluate``: samples, rewards, KL, SRPO revision rounds, the training run's revision template, and
exit status 2 for user mistakes."""

from __future__ import annotations

import json
import shutil

import pytest

from prefopt.cli import main


def _prompts(gold_task_dir):
    return str(gold_task_dir / "prompts_heldout.jsonl")


def test_evaluate_writes_scored_samples_with_kl_and_revision_rounds(tmp_path, tiny_model_dir, gold_task_dir):
    from data_tools.synth import score
    from prefopt.evaluate import sample_policy

    out = tmp_path / "samples.jsonl"
    argv = ["evaluate", str(tiny_model_dir), _prompts(gold_task_dir), "--reward", "data_tools.synth:score"]
    argv += ["--reference", str(tiny_model_dir), "--samples", "2", "--max-prompts", "3"]
    argv += ["--max-new-tokens", "8", "--seed", "5", "--revisions", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] * 6 + [1] * 6
    assert [r["prompt_index"] for r in rows[:6]] == [0, 0, 1, 1, 2, 2]
    for row in rows:
        assert row["reward"] == pytest.approx(score(row["prompt"], row["completion"]))
    # The reference is the policy itself: every per-sample KL estimate is exactly zero, and only round 0 has one.
    assert all(abs(r["kl"]) < 1e-5 for r in rows[:6]) and all("kl" not in r for r in rows[6:])
    # Round 0 is the policy's own sampling with the same seed: the API gives the same answers.
    direct = sample_policy(
        str(tiny_model_dir), _prompts(gold_task_dir), score, samples_per_prompt=2, max_prompts=3,
        max_new_tokens=8, seed=5,
    )  # fmt: skip
    assert [r["completion"] for r in rows[:6]] == direct.completions
    assert not list(tmp_path.glob(".samples.jsonl.*"))  # the temporary file was renamed, not left behind


def test_evaluate_without_reward_prints_samples_unscored(tmp_path, tiny_model_dir, gold_task_dir, capsys):
    out = tmp_path / "s.jsonl"
    argv = ["evaluate", str(tiny_model_dir), _prompts(gold_task_dir), "--samples", "1", "--max-prompts", "2"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward"] is None for r in rows)
    assert "mean reward" in capsys.readouterr().out


def test_revision_template_comes_from_the_training_config(tmp_path, tiny_model_dir):
    from prefopt.config import load_config, save_config
    from prefopt.evaluate_cli import _training_revision_template

    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    assert (
        _training_revision_template(model).template
        == load_config("recipes/tiny/srpo.yaml").data.revision_template
    )
    template = "Q: {prompt}\nFirst try: {answer}\nBetter:"
    # Overrides are YAML: a double-quoted value keeps the colons and turns \\n into a newline.
    override = "data.revision_template=" + json.dumps(template)
    config = load_config("recipes/tiny/srpo.yaml", [override])
    save_config(config, model / "prefopt_config.yaml")
    assert _training_revision_template(model).template == template


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "{prompts}"], "is not a model directory"),
        (["{model}", "{missing}"], "prompts: no such file"),
        (["{model}", "{prompts}", "--reward", "no_such_module:f"], "--reward: cannot import module"),
        (["{model}", "{prompts}", "--reward", "data_tools.synth"], "--reward: expected 'module:callable'"),
        (["{model}", "{prompts}", "--reference", "{missing}"], "--reference: '"),
        (["{model}", "{prompts}", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_user_mistakes_exit_2(tmp_path, tiny_model_dir, gold_task_dir, capsys, args, message):
    paths = {
        "{missing}": str(tmp_path / "nope"),
        "{prompts}": _prompts(gold_task_dir),
        "{model}": str(tiny_model_dir),
        "{tmp}": str(tmp_path),
    }
    assert main(["evaluate", *[paths.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_negative_revisions_are_refused_by_the_parser(tiny_model_dir, gold_task_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tiny_model_dir), _prompts(gold_task_dir), "--revisions", "-1"])
    assert exit_info.value.code == 2
