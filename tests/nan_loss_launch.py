"""``prefopt`` whose DPO loss turns NaN from its N-th call on (``PREFOPT_NAN_FROM=N``), for launchers that start
several processes (``torchrun ... tests/nan_loss_launch.py train RECIPE ...``): the in-process tests of the
non-finite guard monkeypatch the loss the same way (``tests/test_reliability.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root


def install_nan_loss(start: int) -> None:
    from prefopt.losses.dpo import DPOLoss

    original = DPOLoss.forward
    calls = {"n": 0}

    def forward(self, inputs):
        calls["n"] += 1
        output = original(self, inputs)
        if calls["n"] >= start:
            output.loss = output.loss * float("nan")
        return output

    DPOLoss.forward = forward


if __name__ == "__main__":
    install_nan_loss(int(os.environ.get("PREFOPT_NAN_FROM", "1")))
    from prefopt.cli import main

    sys.exit(main(sys.argv[1:]))
