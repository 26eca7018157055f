"""Atomic, resumable checkpoints.

A checkpoint is written into ``checkpoint-<step>.partial`` (model, optimizer, scheduler and every rank's RNG via
``accelerator.save_state``, then ``trainer_state.json`` with the data position) and renamed to ``checkpoint-<step>``
only when complete. A save killed half-way leaves a ``.partial`` directory that ``latest`` never picks.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from prefopt.errors import ConfigError

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    step_state: dict = field(default_factory=dict)  # the step kind's own state (PPO: the adaptive KL coefficient)


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: Optional[str], output_dir: Path) -> Optional[Path]:
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None  # nothing saved yet: start fresh
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from: '{resume_from}' is not a complete prefopt checkpoint "
                          f"(no {STATE_FILE}); use 'latest' or a checkpoint-<step> directory")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, save_total_limit: Optional[int]) -> Path:
    final = output_dir / f"checkpoint-{state.global_step}"
    partial = output_dir / f"checkpoint-{state.global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    saved = json.loads((path / STATE_FILE).read_text())
    if "kl_coef" in saved:  # checkpoints written before step kinds owned their state
        kl_coef = saved.pop("kl_coef")
        saved.setdefault("step_state", {} if kl_coef is None else {"kl_coef": kl_coef})
    return TrainerState(**saved)


def save_final_model(accelerator, prepared_policy, tokenizer, output_dir: Path) -> Path:
    """``final/`` with ``save_pretrained`` (safetensors; the adapter alone for LoRA), written then renamed.

    ``get_state_dict`` gathers ZeRO-3 / FSDP shards; the causal LM sits inside the ``CompletionLogpModel`` wrapper
    (``model.`` prefix), a reward model is saved as it is.
    """
    final, partial = output_dir / "final", output_dir / "final.partial"
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(prepared_policy)
    wrapped_lm = hasattr(unwrapped, "chunk_size") and hasattr(unwrapped, "model")
    model = unwrapped.model if wrapped_lm else unwrapped
    is_peft = hasattr(model, "peft_config")
    state_dict = None if is_peft else accelerator.get_state_dict(prepared_policy)
    if state_dict is not None and wrapped_lm:
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        if is_peft:
            model.save_pretrained(partial, safe_serialization=True)
        else:
            model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final
