"""``prefopt diagnose --run OUTPUT_DIR``: plots, a small HTML report and a JSON summary of a run's metrics.jsonl.

Train and eval curves of the same metric share one axis (``eval/<name>`` next to ``<name>``). The chosen and
rejected implicit rewards are drawn on one plot with a zero line, so the well-known pattern where *both* fall
(the margin grows only because the rejected reward falls faster) is visible at a glance; the summary says whether
it happened (``both_rewards_fell``).

Files in the output directory: ``run_summary.json``, ``report.html`` and the PNGs named in ``plots``.
``run_summary.json`` keys:

- ``run_dir``, ``loss`` (``loss.name`` from ``config.yaml`` when readable), ``records`` (lines read),
  ``skipped_lines`` (lines that were not JSON objects, e.g. a half-written last line of a live run),
  ``first_step`` / ``last_step``.
- ``metrics.<name>``: ``{points, first_step, first, last_step, last, min, max}`` for every numeric metric.
- ``both_rewards_fell.train`` / ``.eval``: ``{fell, chosen_change, rejected_change, chosen_last, rejected_last}``
  (``null`` when the run logged no rewards): a change is the mean of the last tenth of the points minus the mean
  of the first tenth (at least one point each); ``fell`` is true when both changes are negative.
- ``plots``: ``{figure name: file}``: ``loss``, ``rewards``, ``logps``, ``online``, ``ppo``, ``rto`` (more than
  four metrics continue in ``ppo-2``, ...), ``training``; a figure is left out when its metrics are absent.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from prefopt.diagnostics import plots as P
from prefopt.diagnostics import report as R
from prefopt.diagnostics.pipeline import make_temp_dir, publish, write_json
from prefopt.errors import UserInputError

Series = tuple[np.ndarray, np.ndarray]  # steps, values
GROUPS = ("online", "ppo", "rto")
SKIP = {"step", "epoch"}


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``metrics.jsonl`` and how many lines were skipped."""
    if not path.is_file():
        raise UserInputError(f"--run: '{path}' not found (is '{path.parent}' a prefopt output_dir?)")
    records, skipped = [], 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    if not records:
        raise UserInputError(
            f"--run: '{path}' has no metric records"
            + (f" ({skipped} unreadable lines)" if skipped else " (empty: no logging step yet)")
        )
    return records, skipped


def collect_series(records: list[dict[str, Any]]) -> dict[str, Series]:
    """``name -> (steps, values)`` for every numeric metric; a record without ``step`` gets its line position."""
    points: dict[str, list[tuple[float, float]]] = {}
    for position, record in enumerate(records):
        step = record.get("step", position)
        if not _number(step):
            step = position
        for key, value in record.items():
            if key in SKIP or not _number(value):
                continue
            points.setdefault(key, []).append((float(step), float(value)))
    return {
        key: (np.array([s for s, _ in values]), np.array([v for _, v in values]))
        for key, values in points.items()
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_summary(series: Series) -> dict[str, Any]:
    steps, values = series
    return {
        "points": int(values.size),
        "first_step": float(steps[0]),
        "first": float(values[0]),
        "last_step": float(steps[-1]),
        "last": float(values[-1]),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _edge_means(values: np.ndarray) -> tuple[float, float]:
    k = max(1, values.size // 10)
    return float(values[:k].mean()), float(values[-k:].mean())


def both_fell(series: dict[str, Series], prefix: str = "") -> Optional[dict[str, Any]]:
    chosen, rejected = series.get(f"{prefix}rewards/chosen"), series.get(f"{prefix}rewards/rejected")
    if chosen is None or rejected is None:
        return None
    c_first, c_last = _edge_means(chosen[1])
    r_first, r_last = _edge_means(rejected[1])
    return {
        "fell": bool(c_last - c_first < 0 and r_last - r_first < 0),
        "chosen_change": c_last - c_first,
        "rejected_change": r_last - r_first,
        "chosen_last": float(chosen[1][-1]),
        "rejected_last": float(rejected[1][-1]),
    }


# ------------------------------------------------------------------------------------------------------ plots


def _curve(ax, series: dict[str, Series], key: str, color: str, label: Optional[str] = None) -> bool:
    drawn = False
    for prefix, style, suffix in (("", "-", "train"), ("eval/", "--", "eval")):
        if f"{prefix}{key}" in series:
            steps, values = series[f"{prefix}{key}"]
            marker = "o" if prefix or values.size < 30 else None
            ax.plot(
                steps,
                values,
                style,
                color=color,
                marker=marker,
                markersize=3,
                linewidth=1.4,
                label=f"{label or key} ({suffix})",
            )
            drawn = True
    return drawn


def panel_figure(
    directory: Path,
    file: str,
    series: dict[str, Series],
    panels: list[tuple[str, list[str]]],
    zero_line: bool = False,
) -> Optional[str]:
    """One row of panels; each panel draws its keys (train solid, eval dashed). None when nothing to draw."""
    panels = [
        (title, keys) for title, keys in panels if any(k in series or f"eval/{k}" in series for k in keys)
    ]
    if not panels:
        return None
    fig, axes = P.figure(len(panels), width=4.6, height=3.4)
    colors = [P.MARGIN, P.ACCENT, P.CHOSEN, P.REJECTED, "#6a1b9a", "#00838f", P.NEUTRAL]
    for ax, (title, keys) in zip(axes, panels):
        for i, key in enumerate(keys):
            _curve(ax, series, key, colors[i % len(colors)])
        if zero_line:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(frameon=False, fontsize=7)
    return P.save(fig, directory, file)


def rewards_figure(directory: Path, series: dict[str, Series]) -> Optional[str]:
    if not any(k in series for k in ("rewards/chosen", "eval/rewards/chosen")):
        return None
    fig, axes = P.figure(2, width=5.2, height=3.8)
    ax = axes[0]
    _curve(ax, series, "rewards/chosen", P.CHOSEN, "chosen")
    _curve(ax, series, "rewards/rejected", P.REJECTED, "rejected")
    ax.axhline(0.0, color="black", linewidth=1)
    verdicts = [(name, both_fell(series, prefix)) for name, prefix in (("train", ""), ("eval", "eval/"))]
    fell = [name for name, verdict in verdicts if verdict and verdict["fell"]]
    ax.set_title(
        "Chosen and rejected implicit rewards" + (f"  — both fell ({', '.join(fell)})" if fell else ""),
        color=P.REJECTED if fell else "black",
    )
    ax.set_xlabel("step")
    ax.legend(frameon=False, fontsize=7)
    _curve(axes[1], series, "rewards/margins", P.MARGIN, "margin")
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].set_title("Reward margin")
    axes[1].set_xlabel("step")
    axes[1].legend(frameon=False, fontsize=7)
    return P.save(fig, directory, "run-rewards.png")


def group_figures(directory: Path, series: dict[str, Series], group: str) -> dict[str, str]:
    """Every ``<group>/...`` metric, four panels per row-figure: ``{group: file, group-2: file, ...}``."""
    keys = sorted(
        {k.removeprefix("eval/") for k in series if k.removeprefix("eval/").startswith(f"{group}/")}
    )
    panels = [(key, [key]) for key in keys]
    files = {}
    for start in range(0, len(panels), 4):
        name = group if start == 0 else f"{group}-{start // 4 + 1}"
        file = panel_figure(directory, f"run-{name}.png", series, panels[start : start + 4])
        if file:
            files[name] = file
    return files


def all_figures(directory: Path, series: dict[str, Series]) -> dict[str, str]:
    figures = {
        "loss": panel_figure(
            directory,
            "run-loss.png",
            series,
            [("Loss", ["loss"]), ("Accuracy (margin > 0)", ["rewards/accuracies"])],
        ),
        "rewards": rewards_figure(directory, series),
        "logps": panel_figure(
            directory,
            "run-logps.png",
            series,
            [("Log-probs of chosen and rejected", ["logps/chosen", "logps/rejected"])],
        ),
    }
    for group in GROUPS:
        figures.update(group_figures(directory, series, group))
    figures["training"] = panel_figure(
        directory,
        "run-training.png",
        series,
        [
            ("Learning rate", ["learning_rate"]),
            ("Tokens / s", ["tokens_per_second"]),
            ("Gradient norm", ["grad_norm"]),
        ],
    )
    return {name: file for name, file in figures.items() if file}


# ------------------------------------------------------------------------------------------------ the report


def run_report(run_dir: Path, out: Path) -> Path:
    if not run_dir.is_dir():
        raise UserInputError(f"--run: '{run_dir}' is not a directory")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out: '{out}' exists and is not a directory")
    records, skipped = read_metrics(run_dir / "metrics.jsonl")
    series = collect_series(records)
    if not series:
        raise UserInputError(f"--run: '{run_dir / 'metrics.jsonl'}' has records but no numeric metrics")
    steps = [float(r["step"]) for r in records if _number(r.get("step"))]
    summary = {
        "run_dir": str(run_dir),
        "loss": _loss_name(run_dir),
        "records": len(records),
        "skipped_lines": skipped,
        "first_step": min(steps) if steps else None,
        "last_step": max(steps) if steps else None,
        "metrics": {key: metric_summary(value) for key, value in sorted(series.items())},
        "both_rewards_fell": {"train": both_fell(series), "eval": both_fell(series, "eval/")},
    }
    tmp = make_temp_dir(out)
    try:
        summary["plots"] = all_figures(tmp, series)
        write_json(tmp / "run_summary.json", summary)
        R.write_html(tmp / "report.html", R.page(f"prefopt run {run_dir.name}", report_body(summary, tmp)))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _loss_name(run_dir: Path) -> Optional[str]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return str(config["loss"]["name"])
    except Exception:  # noqa: BLE001 - the config is optional decoration here
        return None


def report_body(summary: dict[str, Any], directory: Path) -> str:
    parts = [
        (
            f"<h1>Training run <code>{R.esc(summary['run_dir'])}</code></h1><p class=sub>loss "
            f"{R.esc(summary['loss'] or 'unknown')} · {summary['records']} records · steps "
            f"{R.fmt(summary['first_step'], 0)}–{R.fmt(summary['last_step'], 0)}</p>"
        )
    ]
    if summary["skipped_lines"]:
        parts.append(
            f"<div class=note>{summary['skipped_lines']} lines of metrics.jsonl were not JSON objects "
            "and were skipped.</div>"
        )
    for split, verdict in summary["both_rewards_fell"].items():
        if verdict and verdict["fell"]:
            parts.append(
                f"<div class=note><b>Both rewards fell ({split})</b>: chosen changed by "
                f"{verdict['chosen_change']:+.4f}, rejected by {verdict['rejected_change']:+.4f}. The policy "
                "lowers the likelihood of the chosen responses too; the margin grows only because the "
                "rejected ones fall faster.</div>"
            )
    titles = {
        "loss": "Loss and accuracy",
        "rewards": "Rewards",
        "logps": "Log-probs",
        "online": "Online metrics",
        "ppo": "PPO",
        "rto": "RTO token rewards",
        "training": "Optimisation",
    }
    for name, file in summary["plots"].items():
        group = name.split("-")[0]
        heading = f"<h2>{R.esc(titles.get(group, group))}</h2>" if group == name else ""
        parts.append(heading + R.image(directory, file, name))
    rows = [
        [key, m["points"], m["first"], m["last"], m["min"], m["max"]] for key, m in summary["metrics"].items()
    ]
    parts.append("<h2>All metrics</h2>" + R.table(rows, ["metric", "points", "first", "last", "min", "max"]))
    return "".join(parts)
