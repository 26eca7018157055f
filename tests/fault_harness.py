"""Run ``prefopt train ...`` and SIGKILL it at the N-th event: the driver of ``test_fault_injection.py``.

usage: python -m tests.fault_harness KILL_AT EVENTS_FILE ARGS...

Events are the points where a kill can hurt a run: every optimizer step, every metrics line (before it is written,
or half-written), every ``torch.save`` / safetensors save / ``Path.write_text`` (before it, or with the file cut to
half its bytes as a kill mid-write leaves it), every ``os.rename`` / ``os.replace``, and every file or directory
removal (``os.unlink`` / ``os.rmdir``, as ``shutil.rmtree`` does them) — those inside
:func:`prefopt.trainer.checkpoint.remove_tree` are labelled ``prune``. ``KILL_AT=0`` kills nothing and writes the
labels of every event to ``EVENTS_FILE`` (JSON), so that a test can pick kill points from a real run. The kill is
``SIGKILL`` on the process itself: no ``finally``, no ``atexit``, exactly what ``kill -9`` or the OOM killer does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

KILL_AT = int(sys.argv[1])
EVENTS_FILE = Path(sys.argv[2])
ARGS = sys.argv[3:]
labels: list[str] = []
_context: list[str] = []


def event(label: str) -> bool:
    """Count one event; kill the process if it is the chosen one. Returns True for a chosen ``cut`` event."""
    labels.append(("prune/" if _context else "") + label)
    if len(labels) == KILL_AT:
        if label.endswith(":cut"):
            return True
        os.kill(os.getpid(), signal.SIGKILL)
    return False


def _cut_and_kill(path) -> None:
    if path is not None and Path(path).is_file():
        path = Path(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap_save(original, name_of):
    def save(*args, **kwargs):
        target = name_of(*args, **kwargs)
        label = Path(str(target)).name if isinstance(target, (str, os.PathLike)) else "stream"
        event(f"save:{label}")
        result = original(*args, **kwargs)
        if event(f"save:{label}:cut") and isinstance(target, (str, os.PathLike)):
            _cut_and_kill(target)
        return result

    return save


def install() -> None:
    # Before accelerate is imported: it binds safetensors' save_file at import time.
    import safetensors.torch
    import torch

    safetensors.torch.save_file = _wrap_save(
        safetensors.torch.save_file, lambda tensors, filename, *a, **k: filename
    )
    torch.save = _wrap_save(torch.save, lambda obj, f, *a, **k: f)

    original_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        event(f"write:{self.name}")
        result = original_write_text(self, data, *args, **kwargs)
        if event(f"write:{self.name}:cut"):
            _cut_and_kill(self)
        return result

    Path.write_text = write_text
    for name in ("rename", "replace", "unlink", "rmdir"):
        original = getattr(os, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            event(f"{_name}:{Path(str(args[0])).name}")
            return _original(*args, **kwargs)

        setattr(os, name, wrapped)

    from prefopt.trainer import checkpoint, metrics

    original_remove_tree = checkpoint.remove_tree

    def remove_tree(path):
        _context.append(str(path))
        try:
            return original_remove_tree(path)
        finally:
            _context.pop()

    checkpoint.remove_tree = remove_tree
    original_log, original_advance = metrics.RunLogger.log, metrics.RunLogger.advance

    def log(self, record):
        if self.is_main and event("metrics:line:cut"):  # half a line on disk, then the kill
            with self.path.open("a") as handle:
                handle.write(json.dumps(record)[:25])
            _cut_and_kill(None)
        return original_log(self, record)

    def advance(self, step):
        event(f"step:{step}")
        return original_advance(self, step)

    metrics.RunLogger.log, metrics.RunLogger.advance = log, advance


if __name__ == "__main__":
    install()
    from prefopt.cli import main

    code = main(ARGS)
    if KILL_AT == 0:
        EVENTS_FILE.write_bytes(json.dumps(labels).encode())
    sys.exit(code)
