"""What happened to the data on its way to the trainer: rows read, rows left out and why, truncation, drops.

Nothing is dropped silently: every invalid row, every truncated prompt or completion and every row whose completion
did not fit is counted here, and the first reasons are kept with the file and line they come from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

FIRST_REASONS = 10


@dataclass
class SplitReport:
    """Counts for one split (``train`` or ``eval``)."""

    source: str
    format: Optional[str] = None
    rows_read: int = 0  # source rows read (valid or not)
    invalid_rows: int = 0  # rows left out by the format checks (only under data.on_invalid=skip)
    invalid_reasons: list[str] = field(default_factory=list)  # every kept reason; to_dict shows the first ten
    stopped_at_max_samples: bool = False
    carved_rows: int = 0  # source rows moved to the eval split (data.eval_size)
    rated_rows: int = 0
    pairs_from_rated: int = 0
    rated_rows_without_pairs: int = 0  # every score tied, or no gap above data.rated_min_gap
    rated_identical_pairs_skipped: int = 0
    examples: int = 0  # examples before tokenization (pairs, prompts or completions)
    template_errors: int = 0  # chat-template failures (counted in invalid_rows too)
    truncated_prompts: int = 0
    truncated_completions: dict[str, int] = field(default_factory=dict)  # per completion column
    dropped_rows: int = 0  # a completion would have been cut to nothing
    dropped_reasons: list[str] = field(default_factory=list)
    rows: int = 0  # rows in the final tokenized split
    desirable: int = 0  # unpaired rows (KTO): completions labelled desirable / undesirable
    undesirable: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["invalid_reasons"] = self.invalid_reasons[:FIRST_REASONS]
        data["dropped_reasons"] = self.dropped_reasons[:FIRST_REASONS]
        return data

    def summary_lines(self, name: str) -> list[str]:
        lines = [
            f"data {name}: {self.source} (format {self.format or '?'}): {self.rows_read} rows read, "
            f"{self.invalid_rows} invalid skipped, {self.rows} examples after tokenization"
        ]
        if self.carved_rows:
            lines.append(f"  {self.carved_rows} source rows carved out of train for eval")
        if self.rated_rows:
            lines.append(
                f"  {self.pairs_from_rated} pairs from {self.rated_rows} rated rows "
                f"({self.rated_rows_without_pairs} rows gave no pair: tied or below data.rated_min_gap)"
            )
        if self.desirable or self.undesirable:
            lines.append(f"  {self.desirable} desirable and {self.undesirable} undesirable completions")
        counts = self.truncated_completions
        completions = (
            f", {counts['completion']} completions"
            if list(counts) == ["completion"]
            else "".join(f", {n} {k} completions" for k, n in counts.items())
        )
        lines.append(
            f"  truncated: {self.truncated_prompts} prompts{completions}; dropped (completion cut to "
            f"nothing): {self.dropped_rows}"
        )
        lines.extend(f"  invalid: {reason}" for reason in self.invalid_reasons[:3])
        if self.invalid_rows > 3:
            lines.append(f"  ... {self.invalid_rows - 3} more invalid rows (see data_invalid_rows.txt)")
        return lines


@dataclass
class DataReport:
    kind: str
    fingerprint: str = ""
    train: Optional[SplitReport] = None
    eval: Optional[SplitReport] = None
    settings: dict[str, Any] = field(default_factory=dict)

    def _splits(self) -> list[SplitReport]:
        return [s for s in (self.train, self.eval) if s is not None]

    # Totals over the splits, for callers that do not care which split a count came from.
    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self._splits())

    @property
    def invalid_rows(self) -> int:
        return sum(s.invalid_rows for s in self._splits())

    @property
    def truncated_prompts(self) -> int:
        return sum(s.truncated_prompts for s in self._splits())

    @property
    def truncated_completions(self) -> int:
        return sum(sum(s.truncated_completions.values()) for s in self._splits())

    @property
    def dropped_rows(self) -> int:
        return sum(s.dropped_rows for s in self._splits())

    @property
    def pairs_from_rated(self) -> int:
        return sum(s.pairs_from_rated for s in self._splits())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "totals": {
                "rows_read": self.rows_read,
                "invalid_rows": self.invalid_rows,
                "truncated_prompts": self.truncated_prompts,
                "truncated_completions": self.truncated_completions,
                "dropped_rows": self.dropped_rows,
                "pairs_from_rated": self.pairs_from_rated,
            },
            "train": self.train.to_dict() if self.train else None,
            "eval": self.eval.to_dict() if self.eval else None,
            "settings": self.settings,
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for name, split in (("train", self.train), ("eval", self.eval)):
            if split is not None:
                lines.extend(split.summary_lines(name))
        lines.append(f"data fingerprint: {self.fingerprint}")
        return lines

    def write(self, output_dir: str | os.PathLike) -> Path:
        """Write ``data_report.json`` and, when rows were left out, ``data_invalid_rows.txt`` (all kept reasons)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            out / "data_report.json", json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        )
        reasons = [
            f"[{name}] {reason}"
            for name, split in (("train", self.train), ("eval", self.eval))
            if split is not None
            for reason in split.invalid_reasons + split.dropped_reasons
        ]
        if reasons:
            _atomic_write(out / "data_invalid_rows.txt", "\n".join(reasons) + "\n")
        return out / "data_report.json"


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary sibling then rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
