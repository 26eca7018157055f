"""The run directory: what a run may write where, and whether a resume continues the same run.

Two calls bracket the start of a run:

* :meth:`RunDir.plan` (first thing, every rank) checks ``output_dir`` and picks the checkpoint to resume from. It
  writes nothing, so a bad key, a missing model or a bad data row found afterwards leaves no directory behind.
* :meth:`RunDir.open` (once data and tokenizer are loaded, before the first file is written) refuses a resume whose
  checkpoint came from a different run (its *fingerprint*: loss and its parameters, policy and reference model,
  data fingerprint, tokenizer), then makes the directory hold exactly one run:

  - ``overwrite_output_dir=true`` over an old run renames the old directory aside in one step (``os.rename``) and
    deletes it; a kill half-way leaves a hidden ``.<name>.overwritten-<pid>`` sibling, never a mix of two runs.
    It refuses when the directory holds the data, the model or the working directory.
  - a resume drops ``metrics.jsonl`` / ``samples.jsonl`` lines past the resumed step, and renames checkpoints newer
    than it (and an old ``final/``) to ``*.superseded`` so that a later ``latest`` cannot pick them.
  - ``run_fingerprint.json`` is written; :func:`prefopt.trainer.checkpoint.save_checkpoint` copies it into every
    checkpoint.

``train.resume_allow=[loss, model, data, tokenizer]`` (any subset) continues a checkpoint across a deliberate change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefopt.errors import ConfigError
from prefopt.trainer import checkpoint as ckpt

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = ckpt.FINGERPRINT_FILE
FINGERPRINT_PARTS = ("loss", "model", "data", "tokenizer")
LOG_FILES = ("metrics.jsonl", "samples.jsonl")
# What a run writes at its top level; any of these means the directory already holds a run.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "run_info.json", "final", FINGERPRINT_FILE)


def run_leftovers(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name in RUN_ENTRIES or ckpt.checkpoint_step(p) is not None
    )


@dataclass
class RunDir:
    path: Path
    resume_path: Optional[Path] = None
    overwrite: bool = False  # an old run is moved aside and deleted by open()
    restart: bool = (
        False  # resume_from=latest found no checkpoint: the killed run's logs are cleared by open()
    )
    allow: tuple[str, ...] = ()

    # ---------------------------------------------------------------------------------------------------- plan

    @classmethod
    def plan(cls, config) -> RunDir:
        """Check ``output_dir`` and resolve ``train.resume_from`` without writing anything."""
        out = Path(config.output_dir)
        _check_directory_path(out)
        resume_from = config.train.resume_from
        resume = ckpt.resolve_resume(resume_from, out)
        leftovers = run_leftovers(out)
        plan = cls(out, resume, allow=tuple(getattr(config.train, "resume_allow", ()) or ()))
        inside = resume is not None and _same(resume.parent, out)
        if resume is not None and not inside and leftovers:
            if not config.overwrite_output_dir:
                raise ConfigError(
                    f"output_dir: '{out}' already holds another run ({', '.join(leftovers)}); "
                    f"resuming {resume} into it would mix the two runs. Choose another output_dir, "
                    "or set overwrite_output_dir=true to replace it"
                )
            plan.overwrite = True
        elif resume is None and leftovers:
            if resume_from == "latest" and "final" not in leftovers and not config.overwrite_output_dir:
                plan.restart = True  # killed before its first checkpoint: nothing to continue, start over
                logger.info("train.resume_from=latest: no checkpoint in %s yet; starting from step 0", out)
            elif config.overwrite_output_dir:
                plan.overwrite = True
            elif resume_from == "latest":
                raise ConfigError(
                    f"train.resume_from=latest: '{out}' holds a finished run without checkpoints "
                    "(final/ but no checkpoint-*), so there is nothing to resume; set "
                    "overwrite_output_dir=true to train it again, or choose another output_dir"
                )
            else:
                raise ConfigError(
                    f"output_dir: '{out}' already holds a run ({', '.join(leftovers)}); set "
                    "train.resume_from=latest to continue it, overwrite_output_dir=true to replace "
                    "it, or choose another output_dir"
                )
        if plan.overwrite:
            _check_safe_to_clear(out, config)
        return plan

    # ---------------------------------------------------------------------------------------------------- open

    def open(self, accelerator, fingerprint: dict[str, Any]) -> Path:
        """Refuse a resume from another run, then clear / truncate / create the directory (main process)."""
        step = None
        if self.resume_path is not None:
            check_resume(self.resume_path, fingerprint, self.allow)
            step = json.loads((self.resume_path / ckpt.STATE_FILE).read_text())["global_step"]
        if accelerator.is_main_process:
            if self.overwrite:
                _move_aside_and_delete(self.path)
                logger.info("overwrite_output_dir: the previous run in %s was removed", self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            _delete_stale_overwrites(self.path)
            ckpt.clean_leftovers(self.path)
            if self.restart or (step is not None and _same(self.resume_path.parent, self.path)):
                keep = step or 0
                for name in LOG_FILES:
                    truncate_log(self.path / name, keep)
                _supersede_after(self.path, keep)
            _write_json(self.path / FINGERPRINT_FILE, fingerprint)
        accelerator.wait_for_everyone()
        return self.path


# ------------------------------------------------------------------------------------------------- fingerprint


def _sha256_file(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def model_fingerprint(name_or_path: Optional[str], revision: Optional[str] = None) -> dict[str, Any]:
    """Where the weights come from and their architecture (``config.json``), without hashing gigabytes."""
    if not name_or_path:
        return {}
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), "config_sha256": _sha256_file(path / "config.json")}
    return {"hub": name_or_path, "revision": revision}


def run_fingerprint(config, tokenizer, bundle) -> dict[str, Any]:
    """What makes two runs the same run: loss (+ reward for online losses), models, data, tokenizer."""
    from prefopt.data.tokenize import resolve_chat_template, tokenizer_fingerprint
    from prefopt.losses import loss_class, loss_parameters

    loss: dict[str, Any] = config.loss.model_dump(mode="json")
    try:
        loss = {"name": config.loss.name, **loss_parameters(config.loss.name), **loss}
        needs = loss_class(config.loss.name).needs
    except ValueError:
        needs = ()
    if "reward" in needs:
        loss["reward"] = config.reward.model_dump(
            mode="json", include={"kind", "name_or_path", "function", "policy", "reference", "beta"}
        )
    mode = config.resolved_reference_mode()
    reference = {"mode": mode}
    if mode in ("model", "precomputed"):
        reference.update(
            model_fingerprint(
                config.reference.name_or_path or config.model.name_or_path, config.model.revision
            )
        )
    model = {
        "policy": model_fingerprint(config.model.name_or_path, config.model.revision),
        "peft": config.model.peft.model_dump(mode="json") if config.model.peft else None,
        "reference": reference,
    }
    template = resolve_chat_template(tokenizer, config.data.chat_template)
    fingerprint = {
        "loss": loss,
        "model": model,
        "data": bundle.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer, template),
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # the form it has once saved


def check_resume(checkpoint: Path, current: dict[str, Any], allow: tuple[str, ...] = ()) -> None:
    """Raise ConfigError when ``checkpoint`` was written by a run that differs in a part not in ``allow``."""
    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.is_file():
        logger.warning(
            "train.resume_from: %s has no %s (written by an older prefopt); cannot check that it "
            "belongs to this run",
            checkpoint,
            FINGERPRINT_FILE,
        )
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(
            f"train.resume_from: {path} is unreadable; cannot check that the checkpoint belongs to "
            "this run (set train.resume_allow=[loss,model,data,tokenizer] to resume anyway)"
        ) from None
    differ = [
        part for part in FINGERPRINT_PARTS if saved.get(part) != current.get(part) and part not in allow
    ]
    for part in FINGERPRINT_PARTS:
        if part in allow and saved.get(part) != current.get(part):
            logger.warning(
                "train.resume_allow: resuming %s although its %s differs: %s",
                checkpoint,
                part,
                describe_change(part, saved.get(part), current.get(part)),
            )
    if differ:
        changes = "; ".join(describe_change(part, saved.get(part), current.get(part)) for part in differ)
        raise ConfigError(
            f"train.resume_from: {checkpoint} belongs to a different run ({changes}). Resume with the "
            f"settings that wrote it, or set train.resume_allow=[{','.join(differ)}] to continue "
            "it deliberately"
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def describe_change(part: str, saved: Any, current: Any) -> str:
    """One short clause: which values of ``part`` changed (hashes shortened to 12 characters)."""
    if isinstance(saved, str) and isinstance(current, str):
        return f"{part} fingerprint {saved[:12]} -> {current[:12]}"
    old, new = _flatten(saved or {}), _flatten(current or {})
    if part == "loss" and old.get("name") != new.get("name"):
        return f"loss {old.get('name')} -> {new.get('name')}"
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]

    def show(value: Any) -> str:
        text = str(value)
        return text[:12] if len(text) == 64 else text

    parts = [f"{part}.{key} {show(old.get(key))} -> {show(new.get(key))}" for key in changed[:3]]
    return ", ".join(parts) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")


# ------------------------------------------------------------------------------------------------ file helpers


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (a line cut off by a kill is dropped); atomic replace."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _supersede_after(out: Path, step: int) -> None:
    """Checkpoints past the resumed step (and an old final/) belong to an abandoned future of this run."""
    doomed = [p for p in out.iterdir() if (ckpt.checkpoint_step(p) or -1) > step]
    if (out / "final").is_dir():
        doomed.append(out / "final")
    for path in doomed:
        target = path.with_name(path.name + ".superseded")
        ckpt.remove_tree(target)
        path.rename(target)
        logger.warning(
            "resume at step %d: %s is from after that step; renamed to %s so that it is never resumed",
            step,
            path.name,
            target.name,
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_directory_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output_dir: '{out}' is an existing file, not a directory; choose a directory path"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir: '{parent}' (a parent of '{out}') is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"output_dir: cannot create '{out}': '{parent}' is not writable")
            break


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_safe_to_clear(out: Path, config) -> None:
    """overwrite_output_dir deletes the directory: never one that holds the inputs or the working directory."""
    target = out.resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        raise ConfigError(f"overwrite_output_dir=true would delete '{out}'; use a dedicated output_dir")
    inputs = {
        "the current directory": Path.cwd(),
        "data.train": config.data.train,
        "data.eval": config.data.eval,
        "model.name_or_path": config.model.name_or_path,
        "reference.name_or_path": config.reference.name_or_path,
        "train.deepspeed": config.train.deepspeed,
    }
    for what, value in inputs.items():
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists() and _inside(path.resolve(), target):
            raise ConfigError(
                f"overwrite_output_dir=true would delete '{out}', which holds {what} ({value}); "
                "use a dedicated output_dir"
            )


def _move_aside_and_delete(out: Path) -> None:
    aside = out.parent / f".{out.name}.overwritten-{os.getpid()}"
    ckpt.remove_tree(aside)
    out.rename(aside)  # one atomic step: the directory holds the old run or nothing
    shutil.rmtree(aside, ignore_errors=True)


def _delete_stale_overwrites(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.overwritten-*"):
        shutil.rmtree(stale, ignore_errors=True)
