"""`prefopt diagnose` end to end: numbers against an independent computation, the report files, `--run`, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefopt.cli import main
from prefopt.diagnostics.metrics import bt_probabilities, calibration


def test_ece_worked_example():
    """docs/losses.md, Worked numbers: margins -> accuracy 0.75, ECE 0.218972 (top-label, 10 equal bins)."""
    margins = [2.0, 0.5, -0.3, 1.2, 0.05, -1.5, 3.0, 0.8]
    result = calibration(bt_probabilities(margins))
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["ece"] == pytest.approx(0.218972, abs=1e-6)


def _independent_rewards(policy_dir, reference_dir, pairs_file, beta):
    """Implicit rewards by brute force: full logits, fp32 log-softmax, label shift, tokens as prefopt feeds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (policy_dir, reference_dir)]
    margins, chosen_rewards = [], []
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        rewards = []
        for completion in (row["chosen"], row["rejected"]):
            ids = (
                prompt
                + tokenizer(completion, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]
            )
            x = torch.tensor([ids])
            logps = []
            with torch.no_grad():
                for model in models:
                    logits = model(x).logits[0, :-1].float()
                    token = F.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)
                    logps.append(token[len(prompt) - 1 :].sum().item())
            rewards.append(beta * (logps[0] - logps[1]))
        margins.append(rewards[0] - rewards[1])
        chosen_rewards.append(rewards[0])
    return np.array(margins), np.array(chosen_rewards)


def _ece(margins):
    p = 1 / (1 + np.exp(-margins))
    conf = np.maximum(p, 1 - p)
    correct = (p > 0.5).astype(float)
    bins = np.minimum(np.floor(conf * 10), 9)
    return sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean()) for b in np.unique(bins)
    )


def test_diagnose_matches_an_independent_computation(tiny_model_dir, gold_task_dir, tmp_path):
    from prefopt.models.tiny import build_tiny_model

    reference = build_tiny_model(tmp_path / "reference", seed=7)  # same tokenizer recipe, other weights
    out = tmp_path / "diag"
    pairs = gold_task_dir / "pairs_eval.jsonl"
    code = main(
        [
            "diagnose",
            "--policy",
            str(tiny_model_dir),
            "--reference",
            str(reference),
            "--data",
            str(pairs),
            "--out",
            str(out),
            "--beta",
            "0.5",
            "--samples",
            "2",
            "--max-prompts",
            "4",
            "--reward-function",
            "data_tools.synth:score",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((out / "diagnostics.json").read_text())
    dataset = next(iter(result["datasets"].values()))
    margins, chosen = _independent_rewards(tiny_model_dir, reference, pairs, beta=0.5)
    assert dataset["pairs"] == len(margins)
    assert dataset["accuracy"] == pytest.approx(float((margins > 0).mean()))
    assert dataset["margin"]["mean"] == pytest.approx(float(margins.mean()), abs=1e-4)
    assert dataset["calibration"]["ece"] == pytest.approx(float(_ece(margins)), abs=1e-4)
    samples = dataset["samples"]
    assert samples["count"] == 8 and math.isfinite(samples["kl"]["k1"]) and math.isfinite(samples["kl"]["k3"])
    assert math.isfinite(samples["explicit_reward"]["mean"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "background" in html and "<span" in html  # token colouring
    assert len(list(out.glob("*.png"))) >= 3
    assert not list(tmp_path.glob("diag.*"))  # no temporary leftovers beside the output


def test_diagnose_run_plots_a_metrics_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as handle:
        for step in range(1, 11):
            handle.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 0.69 - 0.02 * step,
                        "rewards/chosen": -0.01 * step,
                        "rewards/rejected": -0.03 * step,
                        "rewards/margins": 0.02 * step,
                        "rewards/accuracies": 0.5 + 0.03 * step,
                    }
                )
                + "\n"
            )
    assert main(["diagnose", "--run", str(run)]) == 0
    out = run / "diagnostics"
    assert (out / "report.html").is_file() and list(out.glob("*.png"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["both_rewards_fell"]["train"]["fell"] is True  # chosen and rejected rewards both went down
    assert summary["records"] == 10


def test_diagnose_bad_paths_exit_2(tmp_path, capsys):
    assert main(["diagnose", "--run", str(tmp_path / "nope")]) == 2
    assert (
        main(
            [
                "diagnose",
                "--policy",
                str(tmp_path / "missing"),
                "--data",
                str(tmp_path / "x.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
