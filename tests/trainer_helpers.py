"""Shared helpers for the end-to-end trainer tests: a tiny model, a small pair file, a quiet recipe runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefopt.config import load_config
from prefopt.trainer import train

REPO = Path(__file__).resolve().parents[1]
GOOD = ["wonderful", "brilliant", "delightful", "charming", "superb", "beautiful", "excellent", "moving"]
BAD = ["boring", "weak", "dull", "terrible", "awful", "poor", "rushed", "bland"]


def write_pairs(path: Path, rows: int = 128, seed: int = 0) -> Path:
    """Pairs whose chosen side uses positive words and rejected side negative ones: learnable in a few steps."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(rows):
            chosen = " ".join(rng.choices(GOOD, k=rng.randint(3, 8)))
            rejected = " ".join(rng.choices(BAD, k=rng.randint(3, 8)))
            handle.write(
                json.dumps(
                    {"prompt": f"Review {i} of the film:", "chosen": " " + chosen, "rejected": " " + rejected}
                )
                + "\n"
            )
    return path


def write_sft(path: Path, rows: int = 128, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(
                json.dumps(
                    {
                        "prompt": f"Review {i} of the film:",
                        "completion": " " + " ".join(rng.choices(GOOD, k=rng.randint(3, 8))),
                    }
                )
                + "\n"
            )
    return path


def run(model_dir: Path, data: Path, out: Path, *overrides: str, recipe: str = "recipes/tiny/dpo.yaml"):
    config = load_config(
        REPO / recipe,
        [
            f"model.name_or_path={model_dir}",
            f"data.train={data}",
            "data.eval=null",
            f"output_dir={out}",
            "overwrite_output_dir=true",
            "logging.progress=false",
            "logging.logging_steps=1",
            "train.warmup_ratio=0",
            "train.learning_rate=1e-3",
            "train.per_device_batch_size=8",
            *overrides,
        ],
    )
    return train(config)


def sft_that_ends_answers(model_dir: Path, gold_task_dir: Path, out: Path) -> Path:
    """20 SFT steps of the tiny model on the gold task: enough for it to end some answers with EOS, so ranks that
    sample one prompt per ``generate`` call decode different numbers of tokens. Returns its ``final/``."""
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.train={gold_task_dir / 'sft.jsonl'}",
        f"output_dir={out}",
        "logging.progress=false",
        "train.max_steps=20",
        "train.per_device_batch_size=16",
    ]
    train(load_config(REPO / "recipes/tiny/sft.yaml", overrides))
    return out / "final"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out) if "loss" in m]


def assert_final_matches_one_process(out: Path, single: Path, initial_dir: Path) -> None:
    """A sharded run's ``final/`` (ZeRO, FSDP2) loads with from_pretrained, every tensor full-size, trained, and
    equal to the 1-process run's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(initial_dir).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(single / "final").state_dict()
    moved = 0
    for name, tensor in model.state_dict().items():
        assert tensor.shape == initial[name].shape, name
        # Adam's first steps move each weight by about lr (1e-3) in a sign-like way; fp32 sums in a different
        # order can flip the update of a weight whose gradient is ~0, hence 2 * lr, and a mean-error check below.
        torch.testing.assert_close(tensor, reference[name], atol=2e-3, rtol=0, msg=name)
        moved += int(not torch.equal(tensor, initial[name]))
    assert moved >= len(initial) // 2
    error = [(model.state_dict()[n] - reference[n]).abs().mean().item() for n in reference]
    assert max(error) < 1e-5
