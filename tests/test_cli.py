"""The prefopt command: help on every subcommand, exit status 2 with a one-line message on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefopt.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefopt", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", ["train", "losses", "tiny-model", "demo", "diagnose"])
def test_help_on_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: prefopt " + command in capsys.readouterr().out


def _expected_rows() -> dict[str, list[str]]:
    """Per loss, the texts its row must show: every parameter with its default, its needs and step kind."""
    from prefopt.losses import available_losses, loss_class, loss_parameters

    return {
        name: [f"{key}={value!r}" for key, value in loss_parameters(name).items()]
        + [*sorted(loss_class(name).needs), loss_class(name).step]
        for name in available_losses()
    }


def test_losses_table_has_one_complete_row_per_loss(capsys):
    assert main(["losses", "--width", "400"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) > 2 and cells[1]:
            rows[cells[1]] = line
    expected = _expected_rows()
    assert set(expected) <= set(rows), f"missing rows: {set(expected) - set(rows)}"
    for name, texts in expected.items():
        for text in texts:
            assert text in rows[name], (name, text)


def test_losses_in_a_narrow_terminal_prints_one_readable_block_per_loss(capsys):
    assert main(["losses", "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "│" not in out  # no squeezed table
    blocks = {block.split()[0]: " ".join(block.split()) for block in out.split("\n\n")[1:] if block.strip()}
    expected = _expected_rows()
    assert set(blocks) == set(expected)
    for name, texts in expected.items():
        for text in texts:
            assert text in blocks[name], (name, text)


def test_losses_list_is_readable_at_80_columns(capsys):
    from prefopt.losses import available_losses, loss_parameters

    assert main(["losses", "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = " ".join(out.split())
    for name in available_losses():  # every name whole, every parameter with its default
        assert f" {name} " in flat, name
        for key, default in loss_parameters(name).items():
            assert f"{key}={default!r}" in out.replace("\n", ""), (name, key)


def test_losses_name_shows_one_loss_in_full(capsys):
    assert main(["losses", "robust", "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = " ".join(out.split())
    for text in (
        "paper Chowdhury et al. 2024",
        "arXiv 2403.00409",
        "formula L = ((1-e)(-logsigmoid(z))",
        "beta = 0.1",
        "label_smoothing = 0.1",
        "divergence = 'reverse_kl'",
        "alpha = 0.5",
        "needs reference; step: pairs",
        "implicit reward beta * (logp - logp_ref)",
        "docs/losses.md#robust",
    ):
        assert text in flat, text


def test_losses_unknown_name_exits_2(capsys):
    assert main(["losses", "dpoo"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err


def test_bad_key_exits_2_without_traceback():
    result = run_cli("train", "recipes/tiny/dpo.yaml", "train.learning_rte=1")
    assert result.returncode == 2
    assert "train.learning_rte: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_loss_exits_2_listing_choices():
    result = run_cli("train", "recipes/tiny/dpo.yaml", "loss.name=nope")
    assert result.returncode == 2
    assert "unknown loss 'nope'" in result.stderr and "simpo" in result.stderr and "fdpo" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_recipe_and_missing_model_exit_2(tmp_path):
    result = run_cli("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "recipe file not found" in result.stderr
    result = run_cli(
        "train",
        "recipes/tiny/dpo.yaml",
        f"model.name_or_path={tmp_path}/no-model",
        f"output_dir={tmp_path}/out",
        "data.train=recipes/tiny/dpo.yaml",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_bad_arguments_exit_2():
    assert run_cli("train").returncode == 2
    assert run_cli("no-such-command").returncode == 2


def test_tiny_model_builds_and_loads_offline(tmp_path):
    import os

    result = run_cli("tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    code = (
        "import os; os.environ['HF_HUB_OFFLINE']='1';"
        "from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m=AutoModelForCausalLM.from_pretrained(r'{tmp_path}/tiny'); "
        f"t=AutoTokenizer.from_pretrained(r'{tmp_path}/tiny');"
        "assert m.config.model_type=='llama' and t.chat_template and t.eos_token=='<|im_end|>';"
        "print(t.apply_chat_template([{'role':'user','content':'hi'}], tokenize=False, add_generation_prompt=True))"
    )
    check = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "<|im_start|>assistant" in check.stdout
