"""`prefopt demo` end to end (capped steps): every stage runs offline and the summary names the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.trainer_helpers import REPO


def test_demo_runs_offline_and_summarises(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "prefopt", "demo", "--out", str(tmp_path / "demo"),
                             "--max-steps", "4", "--eval-prompts", "16"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for text in ("rewards/accuracies", "rewards/margins", "gold reward: SFT -> DPO", "outputs:", "finished in"):
        assert text in out
    demo = tmp_path / "demo"
    for path in ("tiny-model/config.json", "gold-task/pairs_train.jsonl", "sft/final/model.safetensors",
                 "dpo/final/model.safetensors", "dpo/config.yaml"):
        assert (demo / path).is_file(), path
    records = [json.loads(line) for line in (demo / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
    assert REPO.exists()
