"""Matplotlib figures for ``prefopt diagnose`` (Agg backend: no display needed). Each function saves one PNG into
the output directory and returns its file name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

CHOSEN, REJECTED, MARGIN, NEUTRAL, ACCENT = "#2e7d32", "#c62828", "#1565c0", "#757575", "#ef6c00"
MAX_SCATTER = 5000
STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "figure.dpi": 100,
}


def save(fig, directory: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(directory / name, dpi=110)
    plt.close(fig)
    return name


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    for ax in axes[0]:
        ax.set_axisbelow(True)
        for key, value in (("top", False), ("right", False)):
            ax.spines[key].set_visible(value)
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def _subsample(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    size = arrays[0].size
    if size <= MAX_SCATTER:
        return arrays
    keep = np.random.default_rng(0).choice(size, MAX_SCATTER, replace=False)
    return tuple(a[keep] for a in arrays)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- per dataset


def dataset_plots(
    directory: Path,
    name: str,
    section: dict[str, Any],
    *,
    chosen: np.ndarray,
    rejected: np.ndarray,
    margins: np.ndarray,
    stats,
    explicit_margins: Optional[np.ndarray] = None,
    samples=None,
) -> dict[str, str]:
    files = {
        "margins": margin_plot(directory, f"{name}-margins.png", margins, chosen, rejected, section),
        "reliability": reliability_plot(directory, f"{name}-reliability.png", section["calibration"]),
        "length": length_plot(
            directory, f"{name}-length.png", chosen, rejected, margins, stats, section["length"]
        ),
    }
    tokens = section["tokens"]
    if tokens["highest"] or tokens["lowest"]:
        files["tokens"] = token_plot(directory, f"{name}-tokens.png", tokens)
    if explicit_margins is not None:
        files["explicit"] = explicit_plot(
            directory, f"{name}-explicit.png", margins, explicit_margins, section["explicit"]
        )
    if samples is not None:
        files["samples"] = samples_plot(directory, f"{name}-samples.png", samples, section["samples"])
    return files


def margin_plot(directory: Path, file: str, margins, chosen, rejected, section) -> str:
    fig, (left, right) = figure(2)
    left.hist(margins, bins=40, color=MARGIN, alpha=0.85)
    left.axvline(0.0, color="black", linewidth=1)
    left.axvline(
        float(margins.mean()), color=ACCENT, linestyle="--", linewidth=1.2, label=f"mean {margins.mean():.3f}"
    )
    left.set_title(f"Reward margin r(y_w) - r(y_l)   accuracy {_fmt(section['accuracy'])}")
    left.set_xlabel("margin")
    left.set_ylabel("pairs")
    left.legend(frameon=False)
    low, high = float(min(chosen.min(), rejected.min())), float(max(chosen.max(), rejected.max()))
    bins = np.linspace(low, high if high > low else low + 1e-6, 41)
    right.hist(chosen, bins=bins, color=CHOSEN, alpha=0.55, label=f"chosen (mean {chosen.mean():.3f})")
    right.hist(
        rejected, bins=bins, color=REJECTED, alpha=0.55, label=f"rejected (mean {rejected.mean():.3f})"
    )
    right.axvline(0.0, color="black", linewidth=1)
    right.set_title("Implicit rewards")
    right.set_xlabel("reward")
    right.legend(frameon=False)
    return save(fig, directory, file)


def reliability_plot(directory: Path, file: str, calibration: dict[str, Any]) -> str:
    fig, (ax,) = figure(1, width=4.8, height=4.2)
    bins = [b for b in calibration["bins"] if b["count"]]
    ax.plot([0.5, 1.0], [0.5, 1.0], color=NEUTRAL, linestyle="--", linewidth=1, label="perfect calibration")
    if bins:
        centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
        width = bins[0]["upper"] - bins[0]["lower"]
        ax.bar(
            centers,
            [b["accuracy"] for b in bins],
            width=width * 0.9,
            color=MARGIN,
            alpha=0.8,
            edgecolor="white",
            label="accuracy in bin",
        )
        ax.scatter(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            color=ACCENT,
            zorder=3,
            s=18,
            label="(mean confidence, accuracy)",
        )
        for center, b in zip(centers, bins):
            ax.annotate(
                f"n={b['count']}",
                (center, 0.02),
                ha="center",
                fontsize=7,
                color="white",
                rotation=90,
                va="bottom",
            )
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence max(p, 1-p),  p = sigmoid(margin)")
    ax.set_ylabel("accuracy (p > 0.5 correct)")
    ax.set_title(f"Reliability   ECE {_fmt(calibration['ece'])}")
    ax.legend(frameon=False, loc="upper left", fontsize=7)
    return save(fig, directory, file)


def length_plot(directory: Path, file: str, chosen, rejected, margins, stats, length: dict[str, Any]) -> str:
    fig, (a, b, c) = figure(3, width=4.4)
    n_w, n_l = stats.chosen_lengths, stats.rejected_lengths
    xs, ys = _subsample(n_w, chosen)
    a.scatter(xs, ys, s=6, alpha=0.4, color=CHOSEN, label="chosen")
    xs, ys = _subsample(n_l, rejected)
    a.scatter(xs, ys, s=6, alpha=0.4, color=REJECTED, label="rejected")
    corr = length["reward_vs_length"]
    a.set_title(f"Reward vs length  (Spearman {_fmt(corr['spearman'], 2)})")
    a.set_xlabel("completion tokens")
    a.set_ylabel("implicit reward")
    a.legend(frameon=False, markerscale=2)
    xs, ys = _subsample(n_w - n_l, margins)
    b.scatter(xs, ys, s=6, alpha=0.4, color=MARGIN)
    b.axhline(0.0, color="black", linewidth=0.8)
    b.axvline(0.0, color="black", linewidth=0.8)
    corr = length["margin_vs_length_difference"]
    b.set_title(f"Margin vs length difference  (Spearman {_fmt(corr['spearman'], 2)})")
    b.set_xlabel("|y_w| - |y_l| (tokens)")
    b.set_ylabel("margin")
    buckets = length["by_length_difference"]
    labels = [row["bucket"].replace("chosen ", "").replace(" length", "") for row in buckets]
    values = [row["accuracy"] if row["accuracy"] is not None else 0.0 for row in buckets]
    bars = c.bar(
        range(len(buckets)), values, color=[MARGIN if row["count"] else "#e0e0e0" for row in buckets]
    )
    for bar, row in zip(bars, buckets):
        c.annotate(
            f"n={row['count']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    c.axhline(0.5, color=NEUTRAL, linestyle="--", linewidth=1)
    c.set_xticks(range(len(buckets)), labels, rotation=20)
    c.set_ylim(0, 1.08)
    c.set_title("Accuracy by length of chosen vs rejected")
    c.set_ylabel("accuracy")
    return save(fig, directory, file)


def token_plot(directory: Path, file: str, tokens: dict[str, Any], count: int = 15) -> str:
    fig, axes = figure(2, width=4.6, height=4.6)
    for ax, side, color, title in (
        (axes[0], "highest", CHOSEN, "Highest mean token reward"),
        (axes[1], "lowest", REJECTED, "Lowest mean token reward"),
    ):
        rows = tokens[side][:count][::-1]
        labels = [f"{row['token']!r} ({row['count']})" for row in rows]
        ax.barh(range(len(rows)), [row["mean_reward"] for row in rows], color=color, alpha=0.85)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel(f"mean per-token reward (tokens seen >= {tokens['min_count']}x)")
    return save(fig, directory, file)


def explicit_plot(directory: Path, file: str, implicit, explicit, section: dict[str, Any]) -> str:
    fig, (ax,) = figure(1, width=5.2, height=4.2)
    agree = (implicit > 0) == (explicit > 0)
    xs, ys, keep = _subsample(explicit, implicit, agree)
    keep = keep.astype(bool)
    ax.scatter(xs[keep], ys[keep], s=8, alpha=0.5, color=MARGIN, label="agree")
    ax.scatter(xs[~keep], ys[~keep], s=10, alpha=0.7, color=ACCENT, label="disagree")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    corr = section["margin_correlation"]
    ax.set_title(
        f"Implicit vs explicit margin   agreement {_fmt(section['agreement_rate'])}, "
        f"Pearson {_fmt(corr['pearson'], 2)}"
    )
    ax.set_xlabel(f"explicit margin ({section['source']})")
    ax.set_ylabel("implicit margin")
    ax.legend(frameon=False)
    return save(fig, directory, file)


def samples_plot(directory: Path, file: str, samples, section: dict[str, Any]) -> str:
    panels = 2 if samples.k1 is not None else 1
    fig, axes = figure(panels)
    axes[0].hist(samples.lengths, bins=30, color=MARGIN, alpha=0.85)
    axes[0].set_title(f"Sample length   EOS rate {_fmt(section['eos_rate'])}")
    axes[0].set_xlabel("completion tokens")
    axes[0].set_ylabel("samples")
    if samples.k1 is not None:
        kl = section["kl"]
        axes[1].hist(samples.k1, bins=30, color=ACCENT, alpha=0.85)
        axes[1].axvline(kl["k1"], color="black", linestyle="--", linewidth=1, label=f"KL k1 {kl['k1']:.3f}")
        axes[1].axvline(kl["k3"], color=CHOSEN, linestyle=":", linewidth=1.2, label=f"KL k3 {kl['k3']:.3f}")
        axes[1].set_title("Sequence log-ratio log pi(y) - log pi_ref(y), y ~ pi")
        axes[1].set_xlabel("log-ratio")
        axes[1].legend(frameon=False)
    return save(fig, directory, file)


def dataset_comparison(directory: Path, summary: list[dict[str, Any]]) -> str:
    fig, (a, b, c) = figure(3, width=4.0)
    names = [row["dataset"] for row in summary]
    positions = np.arange(len(names))
    a.bar(positions, [row["accuracy"] or 0.0 for row in summary], color=MARGIN)
    a.axhline(0.5, color=NEUTRAL, linestyle="--", linewidth=1)
    a.set_ylim(0, 1.05)
    a.set_title("Accuracy")
    b.bar(
        positions,
        [row["margin_mean"] or 0.0 for row in summary],
        yerr=[row["margin_std"] or 0.0 for row in summary],
        color=ACCENT,
        capsize=3,
    )
    b.axhline(0.0, color="black", linewidth=0.8)
    b.set_title("Margin (mean +- std)")
    c.bar(positions, [row["ece"] or 0.0 for row in summary], color=REJECTED)
    c.set_title("ECE")
    for ax in (a, b, c):
        ax.set_xticks(positions, names, rotation=20)
    return save(fig, directory, "datasets.png")
