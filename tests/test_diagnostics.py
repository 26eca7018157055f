"""`prefopt diagnose` on the tiny model: numbers against an independent brute-force computation, token rewards,
the output files and their documented keys, run-directory defaults, PEFT adapters, `--run`, and user errors."""

from __future__ import annotations

import json
import random
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prefopt.diagnostics as diagnostics_package
from prefopt.cli import main

BETA = 0.3
WORDS = [
    "good",
    "bad",
    "great",
    "poor",
    "fine",
    "nice",
    "the",
    "movie",
    "was",
    "boring",
    "wonderful",
    "story",
    "acting",
    "brilliant",
    "awful",
    "dull",
    "charming",
    "superb",
    "weak",
]
REWARDS_MODULE = """
def length_reward(prompt, completion):
    return float(len(completion.split()))

def broken(prompt, completion):
    return "not a number"
"""


def _pairs(path, count, seed):
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(count):
            row = {
                "prompt": f"Review {i} of the film number {seed}:",
                "chosen": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
                "rejected": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
            }
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from prefopt.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("diagnostics")
    (root / "diag_rewards.py").write_text(REWARDS_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        reference = build_tiny_model(root / "reference", seed=3)
        data_a, data_b = _pairs(root / "reviews.jsonl", 12, 0), _pairs(root / "other.jsonl", 5, 1)
        out = root / "out"
        code = main(
            [
                "diagnose",
                "--policy",
                str(tiny_model_dir),
                "--reference",
                str(reference),
                "--data",
                str(data_a),
                "--data",
                str(data_b),
                "--out",
                str(out),
                "--beta",
                str(BETA),
                "--reward-function",
                "diag_rewards:length_reward",
                "--samples",
                "2",
                "--max-prompts",
                "3",
                "--max-new-tokens",
                "8",
                "--token-examples",
                "4",
                "--batch-size",
                "5",
                "--no-progress",
            ]
        )
        assert code == 0
        yield {
            "root": root,
            "policy": tiny_model_dir,
            "reference": reference,
            "data": [data_a, data_b],
            "out": out,
            "result": json.loads((out / "diagnostics.json").read_text()),
        }


def _brute_force(model_dirs, pairs_file, adapter=None):
    """Per pair, per model: (chosen, rejected) token log-prob vectors of the completion (EOS included), from one
    full unpadded forward, fp32 log_softmax of logits[:-1] gathered at ids[1:]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in model_dirs]
    if adapter is not None:
        from peft import PeftModel

        models[0] = PeftModel.from_pretrained(models[0], adapter).eval()
    out = []
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer(row["prompt"])["input_ids"]
        per_side = []
        for text in (row["chosen"], row["rejected"]):
            ids = torch.tensor(
                [prompt + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
            )
            vectors = []
            with torch.no_grad():
                for model in models:
                    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                    vectors.append(
                        logps.gather(1, ids[0, 1:, None]).squeeze(1)[len(prompt) - 1 :].double().numpy()
                    )
            per_side.append(vectors)
        out.append(per_side)
    return out


def _ece(margins):
    p = 1.0 / (1.0 + np.exp(-margins))
    conf, correct = np.maximum(p, 1 - p), p > 0.5
    total = 0.0
    for b in range(10):
        members = np.minimum(np.floor(conf * 10), 9) == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - conf[members].mean())
    return total


def _per_pair(out, section):
    return [json.loads(line) for line in (out / section["per_pair_file"]).read_text().splitlines()]


@pytest.fixture(scope="module")
def independent(env):
    return [_brute_force([env["policy"], env["reference"]], path) for path in env["data"]]


def test_numbers_match_an_independent_computation(env, independent):
    result = env["result"]
    assert list(result["datasets"]) == ["reviews", "other"]
    for (_name, section), brute in zip(result["datasets"].items(), independent):
        chosen = np.array([BETA * (c[0].sum() - c[1].sum()) for c, _ in brute])
        rejected = np.array([BETA * (r[0].sum() - r[1].sum()) for _, r in brute])
        margins = chosen - rejected
        rows = _per_pair(env["out"], section)
        assert section["pairs"] == len(rows) == len(margins)
        assert [r["margin"] for r in rows] == pytest.approx(margins.tolist(), abs=2e-5)
        assert [r["chosen_length"] for r in rows] == [len(c[0]) for c, _ in brute]
        assert section["accuracy"] == pytest.approx(float((margins > 0).mean()))
        assert section["margin"]["mean"] == pytest.approx(margins.mean(), abs=2e-5)
        assert section["margin"]["std"] == pytest.approx(margins.std(), abs=2e-5)
        assert section["margin"]["quantiles"]["p50"] == pytest.approx(np.median(margins), abs=2e-5)
        assert section["rewards"]["rejected"]["mean"] == pytest.approx(rejected.mean(), abs=2e-5)
        assert section["calibration"]["ece"] == pytest.approx(_ece(margins), abs=1e-5)
        longer = [
            (c > r) if len(cb[0]) > len(rb[0]) else (r > c)
            for c, r, (cb, rb) in zip(chosen, rejected, brute)
            if len(cb[0]) != len(rb[0])
        ]
        assert section["length"]["longer_wins_rate"] == pytest.approx(float(np.mean(longer)))
    summary = {row["dataset"]: row for row in result["summary"]}
    assert summary["other"]["accuracy"] == result["datasets"]["other"]["accuracy"]


def test_token_rewards_sum_to_sequence_rewards(env, independent):
    section = env["result"]["datasets"]["reviews"]
    rows = {r["index"]: r for r in _per_pair(env["out"], section)}
    examples = section["tokens"]["examples"]
    assert len(examples) == 4
    assert examples[0]["why"] == "largest-margin correct" and examples[0]["margin"] == pytest.approx(
        max(r["margin"] for r in rows.values()), abs=1e-5
    )  # float32 token sums vs sequence sums
    for example in examples:
        row = rows[example["index"]]
        for side in ("chosen", "rejected"):
            assert sum(example[side]["rewards"]) == pytest.approx(row[f"{side}_reward"], abs=1e-5)
            assert len(example[side]["tokens"]) == len(example[side]["rewards"]) == row[f"{side}_length"]
            brute = independent[0][example["index"]][0 if side == "chosen" else 1]
            assert example[side]["rewards"] == pytest.approx(
                (BETA * (brute[0] - brute[1])).tolist(), abs=2e-5
            )
        assert example["margin"] == pytest.approx(row["margin"], abs=1e-5)
        assert example["top_tokens"] and all(
            t["side"] in ("chosen", "rejected") for t in example["top_tokens"]
        )
    table = section["tokens"]
    assert table["highest"][0]["mean_reward"] >= table["lowest"][0]["mean_reward"]
    assert 0 < section["tokens"]["top5_share"]["mean"] <= 1


def _keys(value, skip_children=False):
    if isinstance(value, dict):
        for key, child in value.items():
            if not skip_children:
                yield key
            yield from _keys(child, skip_children=key in ("datasets", "sources"))
    elif isinstance(value, list):
        for child in value:
            yield from _keys(child)


def test_outputs_exist_and_every_key_is_documented(env):
    out, result = env["out"], env["result"]
    assert {"format_version", "created_at", "settings", "notes", "summary", "datasets", "plots"} <= set(
        result
    )
    section = result["datasets"]["reviews"]
    assert {
        "path",
        "pairs",
        "accuracy",
        "margin",
        "rewards",
        "logps",
        "calibration",
        "length",
        "tokens",
        "explicit",
        "samples",
        "per_pair_file",
        "plots",
    } <= set(section)
    documentation = diagnostics_package.__doc__
    undocumented = sorted({key for key in _keys(result) if f"{key}" not in documentation})
    assert not undocumented, f"keys missing from the prefopt.diagnostics docstring: {undocumented}"
    pngs = sorted(p.name for p in out.glob("*.png"))
    for section in result["datasets"].values():
        assert set(section["plots"]) == {"margins", "reliability", "length", "tokens", "explicit", "samples"}
        assert all((out / file).is_file() for file in section["plots"].values())
    assert result["plots"]["datasets"] in pngs
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "class=tok style='background:rgb(" in html and ("reward +" in html or "reward -" in html)
    assert "src='http" not in html and "<script" not in html  # self-contained
    assert not [p for p in env["root"].iterdir() if p.name.startswith(".out.tmp")]


def test_explicit_reward_and_samples(env):
    section = env["result"]["datasets"]["reviews"]
    rows = _per_pair(env["out"], section)
    lines = [json.loads(line) for line in env["data"][0].read_text().splitlines()]
    explicit_margins = np.array([len(r["chosen"].split()) - len(r["rejected"].split()) for r in lines], float)
    assert [r["explicit_chosen"] - r["explicit_rejected"] for r in rows] == pytest.approx(
        explicit_margins.tolist()
    )
    implicit_margins = np.array([r["margin"] for r in rows])
    explicit = section["explicit"]
    assert explicit["source"] == "function diag_rewards:length_reward"
    assert explicit["explicit_accuracy"] == pytest.approx(float((explicit_margins > 0).mean()))
    assert explicit["agreement_rate"] == pytest.approx(
        float(((implicit_margins > 0) == (explicit_margins > 0)).mean())
    )
    for pair in explicit["disagreements"]:
        assert (pair["implicit_margin"] > 0) != (pair["explicit_margin"] > 0)
        assert pair["chosen_text"] == lines[pair["index"]]["chosen"]
    samples = section["samples"]
    assert samples["count"] == 6 and samples["prompts"] == 3 and samples["samples_per_prompt"] == 2
    assert 0.0 <= samples["eos_rate"] <= 1.0 and samples["length"]["max"] <= 8
    kl = samples["kl"]
    assert kl["samples"] == 6 and kl["k3"] >= 0.0
    assert samples["implicit_reward"]["mean"] == pytest.approx(BETA * kl["k1"], rel=1e-6)
    assert np.isfinite(samples["explicit_reward"]["mean"])


def _fake_run(root, policy, loss_yaml):
    run = root / "run"
    shutil.copytree(policy, run / "final")
    (run / "config.yaml").write_text(loss_yaml)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    return run


def test_simpo_defaults_come_from_the_run_config(env, tmp_path):
    run = _fake_run(
        tmp_path,
        env["policy"],
        "loss:\n  name: simpo\n  beta: 2.5\n  gamma_beta_ratio: 0.5\n"
        "data:\n  max_length: 300\n  max_prompt_length: 100\nreference:\n  mode: none\n",
    )
    out = tmp_path / "simpo"
    assert (
        main(
            [
                "diagnose",
                "--policy",
                str(run),
                "--data",
                str(env["data"][1]),
                "--out",
                str(out),
                "--token-examples",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "diagnostics.json").read_text())
    settings = result["settings"]
    assert settings["loss"] == "simpo" and settings["beta"] == 2.5 and settings["reference"] is None
    assert settings["policy"] == str(run / "final") and settings["max_length"] == 300
    assert settings["sources"]["beta"].endswith("config.yaml") and settings["sources"]["loss"].endswith(
        "config.yaml"
    )
    brute = _brute_force([env["policy"]], env["data"][1])
    margins = np.array([2.5 * (c[0].mean() - r[0].mean()) for c, r in brute])
    section = result["datasets"]["other"]
    assert [r["margin"] for r in _per_pair(out, section)] == pytest.approx(margins.tolist(), abs=2e-5)
    assert section["accuracy"] == pytest.approx(float((margins > 0).mean()))
    for example in section["tokens"]["examples"]:
        assert sum(example["chosen"]["rewards"]) - sum(example["rejected"]["rewards"]) == pytest.approx(
            example["margin"], abs=1e-5
        )


def test_peft_adapter_policy_uses_its_base_as_reference(env, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(env["policy"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)  # a non-trivial adapter (B starts at zero)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "peft"
    assert (
        main(
            [
                "diagnose",
                "--policy",
                str(adapter),
                "--data",
                str(env["data"][1]),
                "--out",
                str(out),
                "--beta",
                "0.1",
                "--token-examples",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "diagnostics.json").read_text())
    assert (
        result["settings"]["policy_is_adapter"] and result["settings"]["reference_is_adapter_disabled_policy"]
    )
    brute = _brute_force([str(env["policy"]), str(env["policy"])], env["data"][1], adapter=adapter)
    rows = _per_pair(out, result["datasets"]["other"])
    assert [r["policy_chosen_logp"] for r in rows] == pytest.approx([c[0].sum() for c, _ in brute], abs=1e-4)
    assert [r["reference_chosen_logp"] for r in rows] == pytest.approx(
        [c[1].sum() for c, _ in brute], abs=1e-4
    )
    assert any(abs(r["margin"]) > 1e-4 for r in rows)


def test_run_mode_plots_train_eval_and_online_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("loss:\n  name: hypo\n")
    with (run / "metrics.jsonl").open("w") as handle:
        for step in range(1, 21):
            handle.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 0.69 - 0.01 * step,
                        "rewards/chosen": -0.01 * step,
                        "rewards/rejected": -0.04 * step,
                        "rewards/margins": 0.03 * step,
                        "rewards/accuracies": 0.5,
                        "logps/chosen": -40.0 - step,
                        "logps/rejected": -50.0 - 4 * step,
                        "online/kl": 0.02 * step,
                        "ppo/policy_loss": 0.1,
                        "learning_rate": 1e-4,
                    }
                )
                + "\n"
            )
            if step % 5 == 0:
                handle.write(
                    json.dumps(
                        {
                            "step": step,
                            "eval/loss": 0.7,
                            "eval/rewards/chosen": 0.01 * step,
                            "eval/rewards/rejected": -0.02 * step,
                        }
                    )
                    + "\n"
                )
        handle.write('{"step": 21, "lo')  # a live run's half-written line
    for _ in range(2):  # a second run replaces the first output in place
        assert main(["diagnose", "--run", str(run)]) == 0
    out = run / "diagnostics"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["records"] == 24 and summary["skipped_lines"] == 1 and summary["loss"] == "hypo"
    assert summary["both_rewards_fell"]["train"]["fell"] is True
    assert summary["both_rewards_fell"]["eval"]["fell"] is False  # eval chosen reward rose
    assert summary["metrics"]["eval/loss"]["points"] == 4 and summary["metrics"]["loss"][
        "last"
    ] == pytest.approx(0.49)
    assert {"loss", "rewards", "logps", "online", "ppo", "training"} <= set(summary["plots"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(summary["plots"]) and "Both rewards fell" in html


def test_bad_input_exits_2_naming_the_path(env, tmp_path, capsys):
    policy, reference, data = str(env["policy"]), str(env["reference"]), str(env["data"][1])
    missing = str(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "metrics.jsonl").write_text("\n")
    cases = [
        (
            ["--policy", missing, "--reference", reference, "--data", data, "--out", str(tmp_path / "o")],
            missing,
        ),
        (["--policy", policy, "--reference", missing, "--data", data, "--out", str(tmp_path / "o")], missing),
        (
            [
                "--policy",
                policy,
                "--reference",
                reference,
                "--data",
                missing + ".jsonl",
                "--out",
                str(tmp_path / "o"),
            ],
            missing + ".jsonl",
        ),
        (
            ["--policy", policy, "--reference", reference, "--data", data, "--out", str(tmp_path / "file")],
            str(tmp_path / "file"),
        ),
        (
            [
                "--policy",
                policy,
                "--reference",
                reference,
                "--data",
                data,
                "--out",
                str(tmp_path / "o"),
                "--reward-model",
                missing,
            ],
            missing,
        ),
        (["--policy", policy, "--data", data, "--out", str(tmp_path / "o")], "--reference"),
        (["--run", missing], missing),
        (["--run", str(tmp_path)], str(tmp_path / "metrics.jsonl")),
        (["--run", str(tmp_path / "empty-run")], "no metric records"),
    ]
    for arguments, expected in cases:
        assert (
            main(
                ["diagnose", *arguments, "--no-progress"]
                if "--run" not in arguments
                else ["diagnose", *arguments]
            )
            == 2
        ), arguments
        err = capsys.readouterr().err
        assert err.startswith("error:") and expected in err and "Traceback" not in err, (arguments, err)
    assert not (tmp_path / "o").exists()


def test_failure_mid_run_leaves_no_output(env, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(env["root"]))
        sys.modules.pop("diag_rewards", None)
        code = main(
            [
                "diagnose",
                "--policy",
                str(env["policy"]),
                "--reference",
                str(env["reference"]),
                "--data",
                str(env["data"][1]),
                "--out",
                str(out),
                "--reward-function",
                "diag_rewards:broken",
                "--no-progress",
            ]
        )
    assert code == 2 and "--reward-function" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_diagnose_a_real_training_run(env, tmp_path, lora):
    """Train DPO for a few steps, then diagnose the run directory: beta, reference and lengths come from its
    config.yaml, the numbers agree with the run's own last logged rewards direction, and --run plots it."""
    from tests.trainer_helpers import run, write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", rows=32)
    extra = ["model.peft.r=4", "model.peft.alpha=8"] if lora else []
    result = run(
        env["policy"],
        pairs,
        tmp_path / "run",
        "train.max_steps=6",
        "loss.beta=0.2",
        "data.max_length=64",
        "data.max_prompt_length=24",
        *extra,
    )
    out = tmp_path / "diag"
    assert (
        main(
            [
                "diagnose",
                "--policy",
                str(result.output_dir),
                "--data",
                str(pairs),
                "--out",
                str(out),
                "--max-pairs",
                "16",
                "--samples",
                "2",
                "--max-prompts",
                "2",
                "--max-new-tokens",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    settings = diagnostics["settings"]
    assert (
        settings["beta"] == 0.2
        and settings["max_length"] == 64
        and settings["run_dir"] == str(result.output_dir)
    )
    assert settings["policy_is_adapter"] is lora and settings["reference_is_adapter_disabled_policy"] is lora
    section = diagnostics["datasets"]["pairs"]
    assert section["pairs"] == 16 and section["accuracy"] > 0.5  # the training pairs were learned
    assert section["samples"]["kl"]["k3"] >= 0
    assert main(["diagnose", "--run", str(result.output_dir)]) == 0
    summary = json.loads((result.output_dir / "diagnostics" / "run_summary.json").read_text())
    assert summary["metrics"]["loss"]["points"] >= 6
