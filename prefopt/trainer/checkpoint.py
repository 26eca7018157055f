"""Atomic, resumable checkpoints.

A checkpoint is written into ``checkpoint-<step>.partial`` (model, optimizer, scheduler and every rank's RNG via
``accelerator.save_state``, then ``trainer_state.json`` with the data position, and the run's fingerprint, see
:mod:`prefopt.trainer.run_dir`) and renamed to ``checkpoint-<step>`` only when complete. A save killed half-way
leaves a ``.partial`` directory that ``latest`` never picks. Old checkpoints are pruned by renaming them to
``<name>.deleting`` first (atomic) and deleting that, so a kill during pruning never leaves a half-deleted
``checkpoint-<step>`` that looks complete.

Before a resume, :func:`checkpoint_problem` checks every file a checkpoint holds without loading it (safetensors
headers against the file size, the zip directories of ``torch.save`` files, ``trainer_state.json``); with
``train.resume_from=latest`` a checkpoint that fails is skipped, with a warning, for the newest one that passes.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from prefopt.errors import ConfigError
from prefopt.trainer.model_card import push_final_if_asked, write_model_card

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINGERPRINT_FILE = "run_fingerprint.json"  # written by run_dir.RunDir.open; copied into every checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TORCH_FILES = (".bin", ".pkl", ".pt")


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    step_state: dict = field(
        default_factory=dict
    )  # the step kind's own state (PPO: the adaptive KL coefficient)


def state_from_json(saved: dict) -> TrainerState:
    """``trainer_state.json`` -> :class:`TrainerState`; a top-level ``kl_coef`` (checkpoints written before step
    kinds owned their state) becomes the PPO step's ``step_state``."""
    saved = dict(saved)
    if "kl_coef" in saved:
        kl_coef = saved.pop("kl_coef")
        saved.setdefault("step_state", {} if kl_coef is None else {"kl_coef": kl_coef})
    return TrainerState(**saved)


def checkpoint_step(path: Path) -> Optional[int]:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>`` with a ``trainer_state.json``), oldest first."""
    found = []
    if not output_dir.is_dir():
        return []
    for path in output_dir.glob("checkpoint-*"):
        step = checkpoint_step(path)
        if step is not None and (path / STATE_FILE).is_file():
            found.append((step, path))
    return [path for _, path in sorted(found)]


# ------------------------------------------------------------------------------------------------ verification


def _safetensors_problem(path: Path) -> Optional[str]:
    """Compare the header's tensor extents with the file size (a truncated file fails, without reading the data)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                return f"{path.name} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as error:
        return f"{path.name} has an unreadable safetensors header ({error})"
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def _torch_file_problem(path: Path) -> Optional[str]:
    """``torch.save`` writes a zip archive whose directory sits at the end: a cut-off file has none."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path.name} is truncated (entry {info.filename} ends past byte {size})"
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"{path.name} is truncated or corrupt ({size} bytes; {error})"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when every file of the checkpoint looks complete, else what is wrong, naming the file."""
    path = Path(path)
    try:
        state_from_json(json.loads((path / STATE_FILE).read_text()))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, TypeError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    files = [p for p in sorted(path.iterdir()) if p.is_file()]
    # A DeepSpeed engine saves into a directory of its own (accelerate's save_state: engine.save_checkpoint(path,
    # "pytorch_model"), one *model_states.pt and *optim_states.pt per rank), not beside the other files.
    engine_files = [
        f
        for d in sorted(path.iterdir())
        if d.is_dir() and d.name.startswith("pytorch_model")
        for f in sorted(d.iterdir())
        if f.is_file()
    ]
    if not any(p.name.startswith(("model", "pytorch_model")) for p in files) and not any(
        f.name.endswith("model_states.pt") for f in engine_files
    ):
        return "no model weights (model.safetensors) in it"
    if not any(p.name.startswith("optimizer") for p in files) and not any(
        f.name.endswith("optim_states.pt") for f in engine_files
    ):
        return "no optimizer state (optimizer.bin) in it"
    for file in files + engine_files:
        if file.name.endswith(".safetensors"):
            problem = _safetensors_problem(file)
        elif file.name.endswith(_TORCH_FILES):
            problem = _torch_file_problem(file)
        else:
            continue
        if problem:
            return problem
    return None


def resolve_resume(resume_from: Optional[str], output_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` is the newest complete one in ``output_dir`` whose files check out
    (a broken newer one is skipped with a warning that names the file); a path must check out itself."""
    if not resume_from:
        return None
    if resume_from == "latest":
        skipped = []
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                for bad, why in skipped:
                    logger.warning(
                        "train.resume_from=latest: %s is unusable (%s); resuming from %s, the newest "
                        "complete checkpoint that loads",
                        bad,
                        why,
                        path.name,
                    )
                return path
            skipped.append((path.name, problem))
        if skipped:
            listed = "; ".join(f"{name}: {why}" for name, why in skipped)
            raise ConfigError(
                f"train.resume_from=latest: no checkpoint in {output_dir} can be loaded ({listed}); "
                "set overwrite_output_dir=true to start over"
            )
        return None  # nothing saved yet: start fresh
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"train.resume_from: '{resume_from}' is not a complete prefopt checkpoint "
            f"(no {STATE_FILE}); use 'latest' or a checkpoint-<step> directory"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(
            f"train.resume_from: checkpoint {path} cannot be loaded: {problem}; pick another "
            "checkpoint (train.resume_from=latest takes the newest one that loads)"
        )
    return path


# ----------------------------------------------------------------------------------------------- save and load


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill half-way leaves ``<name>.deleting``, never a half-deleted ``<name>``."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(output_dir: Path) -> None:
    """Remove what killed saves and prunes left behind (``*.partial``, ``*.deleting``)."""
    for pattern in ("checkpoint-*.partial", "*.deleting", "final.partial"):
        for path in output_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator,
    output_dir: Path,
    state: TrainerState,
    save_total_limit: Optional[int],
    save_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """``save_extra(directory)``: more state to write into the checkpoint on the main process (the reference's)."""
    final = output_dir / f"checkpoint-{state.global_step}"
    partial = output_dir / f"checkpoint-{state.global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fingerprint = output_dir / FINGERPRINT_FILE
        if fingerprint.is_file():
            shutil.copyfile(fingerprint, partial / FINGERPRINT_FILE)
        if save_extra is not None:
            save_extra(partial)
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        remove_tree(final)
        partial.rename(final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Load a checkpoint into the prepared objects; a checkpoint that does not fit ends as a ConfigError."""
    import torch

    _check_rng_state(path / f"random_states_{accelerator.process_index}.pkl")
    try:
        accelerator.load_state(str(path))
    except torch.OutOfMemoryError:
        raise
    except (
        RuntimeError,
        KeyError,
        ValueError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
    ) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line or "Missing key" in line), None)
        detail = detail or (lines[0] if lines else type(error).__name__)
        if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) met a non-tensor object
            raise ConfigError(
                f"train.resume_from: {path} holds objects that are not plain tensors and was refused "
                f"(weights-only loading): {detail[:200]}"
            ) from None
        raise ConfigError(
            f"train.resume_from: {path} does not fit this run's model or optimizer: {detail[:300]}; "
            "resume with the model and settings that wrote it"
        ) from None
    return state_from_json(json.loads((path / STATE_FILE).read_text()))


def _check_rng_state(file: Path) -> None:
    """accelerate's ``load_state`` logs "Could not load random states" at info level and goes on with the current
    RNG when this file fails (accelerate/checkpointing.py, ``load_accelerator_state``): the resume would silently
    stop being exact, and a refused pickle would pass unnoticed. Load it first, the same way, and stop instead."""
    from accelerate.utils.other import load

    if not file.is_file():
        raise ConfigError(
            f"train.resume_from: {file} is missing; the checkpoint cannot restore the random state"
        )
    try:
        load(file)
    except pickle.UnpicklingError as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise ConfigError(
            f"train.resume_from: {file} holds objects that are not plain tensors and was refused "
            f"(weights-only loading): {first[:200]}"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure here would be swallowed by accelerate
        raise ConfigError(
            f"train.resume_from: {file} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from None


def last_good_checkpoint_note(output_dir: Path) -> str:
    """The sentence a stopped run ends with: where to resume from, or that nothing was saved."""
    checkpoints = list_checkpoints(Path(output_dir))
    if checkpoints:
        return (
            f"The last good checkpoint, {checkpoints[-1]}, is intact; resume from it with "
            "train.resume_from=latest"
        )
    return "No checkpoint was saved in this run (set train.save_steps to keep some)"


def in_training_dtype(model, state_dict: dict) -> dict:
    """A full model's weights in the dtype it was loaded in (``model.dtype=bfloat16`` -> a bf16 ``final/``).

    Trainable weights are kept in fp32 while training (AdamW master weights: ``ensure_fp32_master_weights`` for
    DDP, accelerate's upcast in ``fsdp2_prepare_model`` under FSDP), but ``config.json`` still says bf16 and a
    user who trained a bf16 model expects a bf16 checkpoint of half the size. A PEFT adapter is left as PEFT keeps
    it (fp32 adapter weights by default, ``autocast_adapter_dtype``)."""
    if hasattr(model, "peft_config"):
        return state_dict
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if dtype not in (torch.bfloat16, torch.float16):
        return state_dict
    return {
        name: tensor.to(dtype) if tensor.dtype == torch.float32 else tensor
        for name, tensor in state_dict.items()
    }


def _saved_model(unwrapped: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The model ``final/`` holds and its prefix in the prepared module's state dict: the causal LM inside the
    ``CompletionLogpModel`` wrapper (``model.``) or inside the policy of a ``PolicyAndCritic`` (``policy.model.``,
    the critic left out); a reward model as it is."""
    from prefopt.trainer.joint import PolicyAndCritic

    if isinstance(unwrapped, PolicyAndCritic):
        return unwrapped.policy.model, "policy.model."
    if hasattr(unwrapped, "chunk_size") and hasattr(unwrapped, "model"):
        return unwrapped.model, "model."
    return unwrapped, ""


def save_final_model(accelerator, prepared_policy, tokenizer, output_dir: Path) -> Path:
    """``final/`` with ``save_pretrained`` (safetensors; the adapter alone for LoRA), written then renamed.

    ``get_state_dict`` gathers ZeRO-3 / FSDP shards; the causal LM sits inside the ``CompletionLogpModel`` wrapper
    (``model.`` prefix; ``policy.model.`` in a ``PolicyAndCritic``), a reward model is saved as it is.
    """
    final, partial = output_dir / "final", output_dir / "final.partial"
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(prepared_policy)
    model, prefix = _saved_model(unwrapped)
    # Every rank takes part: under ZeRO-3 / FSDP the full weights exist only after this gather. A LoRA policy is
    # gathered too: its own (sharded) parameters would write an empty or partial adapter; PeftModel.save_pretrained
    # keeps only the adapter entries of the state dict it is given.
    state_dict = accelerator.get_state_dict(prepared_policy)
    if state_dict is not None and prefix:
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if state_dict is not None:
        state_dict = in_training_dtype(model, state_dict)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        write_model_card(partial, output_dir)
        remove_tree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        push_final_if_asked(final, output_dir)
    return final
