"""``prefopt`` with the vLLM stand-in engine of ``tests/test_vllm_contract.py`` installed, for launchers that start
several processes (``accelerate launch ... tests/vllm_stand_in_launch.py train RECIPE ...``).

Each process gets its own stand-in engine (vLLM colocate: one engine per training process). When the process ends,
what its engine received is written to ``$PREFOPT_STAND_IN_OUT/engine-rank<R>.safetensors`` (the last
weights) and ``engine-rank<R>.json`` (the dtypes pushed, the number of pushes).
"""

from __future__ import annotations

import atexit
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # the repository root, for `tests` and `prefopt`


def install_stand_in() -> None:
    import prefopt.config
    from prefopt.generation import vllm as vllm_backend
    from tests.test_vllm_contract import FakeLLM, FakeSamplingParams

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    sys.modules["vllm"] = module
    # No CUDA here; the stand-in needs none (the config check and the generator's own check).
    prefopt.config._check_vllm_available = lambda: None
    vllm_backend.check_vllm_available = lambda: None
    out = os.environ.get("PREFOPT_STAND_IN_OUT")
    if out:
        atexit.register(_report, Path(out), FakeLLM)


def _report(out: Path, engine_class) -> None:
    from safetensors.torch import save_file

    if not engine_class.instances:
        return
    rank = os.environ.get("RANK", "0")
    engine = engine_class.instances[-1]
    out.mkdir(parents=True, exist_ok=True)
    # the last weights pushed (a level-2 sleep has discarded the engine's own copy by now)
    params = {k: v.contiguous() for k, v in engine.runner_model.last_pushed.items()}
    save_file(params, str(out / f"engine-rank{rank}.safetensors"))
    report = {
        "pushed_dtypes": sorted(str(d) for d in engine.runner_model.pushed_dtypes),
        "load_weights_calls": len(engine.runner_model.calls),
        "engine_dtype": engine.kwargs["dtype"],
    }
    (out / f"engine-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    install_stand_in()
    from prefopt.cli import main

    sys.exit(main(sys.argv[1:]))
