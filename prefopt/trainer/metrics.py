"""Metric averaging across micro-batches and ranks, ``metrics.jsonl``, the progress bar and optional trackers."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


class MetricAverager:
    """Weighted means of metric dicts; ``reduce`` combines them over ranks (every rank must call it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        for key, value in metrics.items():
            self.sums[key] += float(value) * weight
            self.weights[key] += weight

    def reduce(self, accelerator, keys: Optional[list[str]] = None) -> dict[str, float]:
        """Mean over everything added on every rank. ``keys``: the agreed key order (ranks must agree)."""
        keys = sorted(self.sums) if keys is None else keys
        if accelerator is not None and accelerator.num_processes > 1:
            keys = _union_keys(accelerator, keys)
            values = torch.tensor(
                [[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys],
                dtype=torch.float64,
                device=accelerator.device,
            )
            values = accelerator.reduce(values, reduction="sum").cpu()
            result = {k: (v[0] / v[1]).item() for k, v in zip(keys, values) if v[1] > 0}
        else:
            result = {k: self.sums[k] / self.weights[k] for k in keys if self.weights.get(k, 0) > 0}
        self.sums.clear()
        self.weights.clear()
        return result


def _union_keys(accelerator, keys: list[str]) -> list[str]:
    from accelerate.utils import gather_object

    gathered = gather_object([list(keys)])
    return sorted({k for ks in gathered for k in ks})


class RunLogger:
    """Writes ``metrics.jsonl`` (main process only), drives a rich progress bar, forwards to trackers."""

    def __init__(
        self,
        output_dir: Path,
        accelerator,
        total_steps: int,
        *,
        progress: bool,
        trackers: bool,
        resume: bool = False,
    ):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        self.trackers = trackers
        self.last: dict[str, float] = {}
        self._progress = None
        if self.is_main and not resume:
            self.path.write_text("")
        if self.is_main and progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, record: dict) -> None:
        """Append one record (``step`` + metrics); rank 0 writes, every rank may call."""
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        if self.is_main:
            with self.path.open("a") as handle:
                handle.write(json.dumps(clean) + "\n")
            self.last.update({k: v for k, v in clean.items() if v is not None})
            if self._progress is not None:
                parts = [
                    f"{k.split('/')[-1]}={clean[k]:.4f}" for k in PROGRESS_KEYS if clean.get(k) is not None
                ]
                self._progress.update(self._task, status=" ".join(parts))
        if self.trackers:
            step = record.get("step")
            self.accelerator.log(
                {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}, step=step
            )

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.is_main and samples:
            with self.samples_path.open("a") as handle:
                for sample in samples:
                    handle.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Throughput:
    """Real (unpadded) tokens per second between logging steps."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def rate(self, accelerator) -> float:
        tokens = torch.tensor(self.tokens, dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            tokens = accelerator.reduce(tokens, reduction="sum")
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.tokens, self.start = 0.0, time.perf_counter()
        return tokens.item() / elapsed
