"""Reading rows from files, saved datasets and the Hub, and checking them row by row.

Every reader yields ``(location, row, error)``: ``location`` is what messages show, always 1-based: "line N" where
the file has one row per line (JSON lines, CSV: the line an editor shows; a multi-line CSV record gives its first
line), "row N" for the N-th row of a JSON list, a parquet file or a dataset (row 1 is the first row), ``row`` the
parsed object (``None`` when it could not be parsed) and ``error`` the parse problem. :func:`load_rows` then runs the
format checks of :mod:`prefopt.data.formats` on each row — the same code the trainer and ``data_tools validate`` use.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prefopt.data.formats import (
    DEFAULT_OPTIONS,
    FORMATS,
    NormalizeOptions,
    NormalRow,
    RowError,
    detect_format,
    normalize_row,
)
from prefopt.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz", ".ndjson")
MAX_KEPT_REASONS = 10_000

RawRow = tuple[str, Optional[Any], Optional[str]]


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next(
        (s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower()
    )


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path, name: str) -> Iterator[RawRow]:
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield where, None, f"not valid UTF-8 ({error.reason} at byte {error.start})"
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text), None
            except json.JSONDecodeError as error:
                yield where, None, f"invalid JSON: {error.msg} (column {error.colno})"


def _read_json(path: Path, name: str) -> Iterator[RawRow]:
    with _open_bytes(path) as handle:
        raw = handle.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        first = raw.lstrip()[:1]
        if first == b"{" and error.msg.startswith("Extra data"):  # JSON lines written with a .json name
            yield from _read_jsonl(path, name)
            return
        raise DataError(
            f"{name}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f'{name}: expected a list of rows, {{"data": [...]}}, or JSON lines; got {type(data).__name__}'
        )
    for number, row in enumerate(data, start=1):
        yield f"{name} row {number}", row, None


def _maybe_json_cell(value: str) -> Any:
    """CSV cells holding JSON message lists / completion lists are decoded; everything else stays a string."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            decoded = json.loads(stripped)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and decoded and all(isinstance(item, dict) for item in decoded):
            return decoded
    return value


def _read_csv(path: Path, name: str) -> Iterator[RawRow]:
    with _open_bytes(path) as binary, io.TextIOWrapper(binary, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{name} line 1: unreadable CSV header: {error}") from None
        start = reader.line_num + 1
        while True:
            where = f"{name} line {start}"
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as error:
                yield where, None, f"unreadable CSV record: {error}"
                start = reader.line_num + 1
                continue
            start = reader.line_num + 1
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if len(cells) != len(header):
                yield where, None, f"expected {len(header)} columns ({', '.join(header)}), got {len(cells)}"
                continue
            yield where, {key: _maybe_json_cell(value) for key, value in zip(header, cells)}, None


def _read_parquet(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - any pyarrow failure means the file is not usable
        raise DataError(f"{name}: not a readable parquet file ({error})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{name} row {number}", row, None


def _read_dataset(dataset, name: str) -> Iterator[RawRow]:
    for number, row in enumerate(dataset, start=1):
        yield f"{name} row {number}", row, None


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~", "\\"))
        or _suffix(Path(path)) in FILE_SUFFIXES
        or (len(path) > 1 and path[1] == ":")
    )


class Source:
    """One readable data source: a local file, a saved dataset directory, or a Hub dataset name."""

    def __init__(self, path: str, split: str = "train"):
        self.name = str(path)
        self.split = split
        self.path = Path(os.path.expanduser(str(path)))
        self._dataset = None
        if self.path.is_file():
            self.kind = _suffix(self.path).removesuffix(".gz").lstrip(".")
            if self.kind == "ndjson":
                self.kind = "jsonl"
            if self.kind not in ("jsonl", "json", "csv", "parquet"):
                raise DataError(
                    f"{self.name}: unsupported file type '{self.path.suffix}'; use .jsonl, .json, .csv "
                    "or .parquet, a directory saved with datasets' save_to_disk, or a Hub dataset name"
                )
        elif self.path.is_dir():
            self.kind = "disk"
            self._dataset = self._load_disk()
        elif _looks_local(self.name):
            raise DataError(f"{self.name}: file not found")
        else:
            self.kind = "hub"
            self._dataset = self._load_hub()

    def _select_split(self, data, what: str):
        from datasets import DatasetDict

        if isinstance(data, DatasetDict):
            if self.split not in data:
                raise DataError(
                    f"{self.name}: split '{self.split}' not found in {what}; available: {', '.join(data)}"
                )
            return data[self.split]
        return data

    def _load_disk(self):
        import datasets

        if (self.path / "dataset_info.json").exists() or (self.path / "dataset_dict.json").exists():
            try:
                return self._select_split(datasets.load_from_disk(str(self.path)), "the saved dataset")
            except DataError:
                raise
            except Exception as error:  # noqa: BLE001
                raise DataError(f"{self.name}: could not load the saved dataset ({error})") from None
        try:  # a directory of data files
            return datasets.load_dataset(str(self.path), split=self.split)
        except Exception as error:  # noqa: BLE001
            raise DataError(
                f"{self.name}: directory is neither a saved dataset (save_to_disk) nor loadable "
                f"data files for split '{self.split}' ({type(error).__name__}: {error})"
            ) from None

    def _load_hub(self):
        import datasets

        try:
            return datasets.load_dataset(self.name, split=self.split)
        except Exception as error:  # noqa: BLE001 - offline, unknown name, gated... all end the same way
            message = str(error).splitlines()[0] if str(error) else ""
            raise DataError(
                f"{self.name}: not a local file or directory, and loading it as a Hugging Face Hub "
                f"dataset (split '{self.split}') failed: {type(error).__name__}: {message}"
            ) from None

    def rows(self) -> Iterator[RawRow]:
        if self.kind == "jsonl":
            return _read_jsonl(self.path, self.name)
        if self.kind == "json":
            return _read_json(self.path, self.name)
        if self.kind == "csv":
            return _read_csv(self.path, self.name)
        if self.kind == "parquet":
            return _read_parquet(self.path, self.name)
        return _read_dataset(self._dataset, self.name)

    def content_hash(self) -> str:
        """sha256 over the bytes the rows come from (files), or datasets' own fingerprint (Hub)."""
        if getattr(self, "_hash", None) is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        digest = hashlib.sha256()
        if self.kind == "hub":
            digest.update(f"hub:{self.name}:{self.split}:{self._dataset._fingerprint}".encode())
            return digest.hexdigest()
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        for file in files:
            if file != self.path:
                digest.update(str(file.relative_to(self.path)).encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        digest.update(f"split:{self.split if self.kind == 'disk' else ''}".encode())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Checking rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    source: str
    format: Optional[str]
    rows: list[tuple[str, NormalRow]] = field(default_factory=list)  # (location, row)
    rows_read: int = 0
    invalid: int = 0
    reasons: list[str] = field(default_factory=list)  # "location: problem", at most MAX_KEPT_REASONS
    invalid_codes: dict[str, int] = field(default_factory=dict)
    stopped_at_max_samples: bool = False
    rated_rows: int = 0
    rated_pairs: int = 0
    rated_rows_without_pairs: int = 0
    rated_identical_skipped: int = 0

    def add_invalid(self, location: str, problem: str, code: str) -> None:
        self.invalid += 1
        self.invalid_codes[code] = self.invalid_codes.get(code, 0) + 1
        if len(self.reasons) < MAX_KEPT_REASONS:
            self.reasons.append(f"{location}: {problem}")


def load_rows(
    source: Source,
    fmt: str = "auto",
    options: NormalizeOptions = DEFAULT_OPTIONS,
    max_rows: Optional[int] = None,
) -> LoadResult:
    """Read and check every row (up to ``max_rows`` valid ones). Never raises for bad rows: it counts them;
    :func:`raise_for_invalid` turns them into a :class:`DataError` when ``on_invalid`` is ``error``."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data.format: unknown format '{fmt}'; valid: auto, {', '.join(FORMATS)}")
    result = LoadResult(source=source.name, format=None if fmt == "auto" else fmt)
    for location, row, error in source.rows():
        if max_rows is not None and len(result.rows) >= max_rows:
            result.stopped_at_max_samples = True
            break
        result.rows_read += 1
        if error is not None:
            result.add_invalid(location, error, "parse")
            continue
        try:
            if result.format is None:
                detected = detect_format(row)
                normal = normalize_row(row, detected, options)
                result.format = detected
            else:
                normal = normalize_row(row, result.format, options)
        except RowError as problem:
            result.add_invalid(location, str(problem), problem.code)
            continue
        if normal.rated:
            result.rated_rows += 1
            result.rated_pairs += len(normal.pairs)
            result.rated_identical_skipped += normal.rated_skipped_identical
            result.rated_rows_without_pairs += not normal.pairs
        result.rows.append((location, normal))
    return result


def raise_for_invalid(result: LoadResult) -> None:
    if not result.invalid:
        return
    more = result.invalid - 1
    tail = (
        (
            f"\n({more} more invalid row{'s' if more != 1 else ''}; list them with `python -m data_tools validate "
            f"{result.source}`, or set data.on_invalid=skip to leave them out)"
        )
        if more
        else ("\n(set data.on_invalid=skip to leave invalid rows out)")
    )
    raise DataError(result.reasons[0] + tail)
