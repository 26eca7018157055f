"""One self-contained ``report.html``: inline CSS, plots embedded as base64 PNG, tables, and responses coloured
token by token by their implicit reward (red negative, white zero, green positive; hover for the value)."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d232a}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #d9dee5;
padding-bottom:4px}h3{font-size:15px;margin:22px 0 8px}
.sub{color:#5b6672;font-size:13px}.card{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:14px 18px;
margin:12px 0;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}.stat{background:#fff;border:1px solid #e1e5ea;
border-radius:8px;padding:8px 14px;min-width:120px}.stat b{display:block;font-size:19px}.stat span{font-size:12px;
color:#5b6672}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px;background:#fff}th,td{border:1px solid #e1e5ea;
padding:4px 8px;text-align:right;vertical-align:top}th{background:#eef1f5;text-align:center}
td.l,th.l{text-align:left}td.txt{text-align:left;max-width:330px;white-space:pre-wrap;word-break:break-word;
font-size:12px}
img{max-width:100%;border:1px solid #e1e5ea;border-radius:6px;background:#fff;margin:6px 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 12px;margin:6px 0;font-size:13px}
.resp{white-space:pre-wrap;word-break:break-word;font-family:SFMono-Regular,Menlo,Consolas,monospace;
font-size:12.5px;line-height:1.75;background:#fff;border:1px solid #e1e5ea;border-radius:6px;padding:8px 10px}
.tok{border-radius:2px;padding:1px 0}.tok:hover{outline:1px solid #333}
.good{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}
.legend span{display:inline-block;width:70px;text-align:center;font-size:11px;padding:2px 0}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}details{margin:6px 0}summary{cursor:pointer}
"""


# ------------------------------------------------------------------------------------------------ building blocks


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3e}"
    return esc(value)


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def image(directory: Path, file: Optional[str], alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a data URI (the report must stand alone)."""
    if not file:
        return ""
    data = base64.b64encode((Path(directory) / file).read_bytes()).decode("ascii")
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def table(
    rows: Iterable[Sequence[Any]], header: Sequence[str], left: Sequence[int] = (0,), text: Sequence[int] = ()
) -> str:
    head = "".join(f"<th{' class=l' if i in left else ''}>{esc(h)}</th>" for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = " class=txt" if i in text else (" class=l" if i in left else "")
            cells.append(f"<td{cls}>{cell if isinstance(cell, Raw) else fmt(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Already-escaped HTML for a table cell."""


def stat(label: str, value: Any, digits: int = 3) -> str:
    return f"<div class=stat><b>{fmt(value, digits)}</b><span>{esc(label)}</span></div>"


def clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def write_html(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- token colouring


def token_colour(reward: float, scale: float) -> str:
    """White at 0, towards green (positive) or red (negative); full colour at |reward| >= scale."""
    strength = min(abs(reward) / scale, 1.0) * 0.8 if scale > 0 else 0.0
    target = (46, 160, 67) if reward > 0 else (214, 50, 50)
    r, g, b = (round(255 + (c - 255) * strength) for c in target)
    return f"rgb({r},{g},{b})"


def coloured_tokens(tokens: Sequence[str], rewards: Sequence[float], scale: float) -> str:
    spans = []
    for token, reward in zip(tokens, rewards):
        tip = f"{token!r}  reward {reward:+.5f}"
        spans.append(
            f"<span class=tok style='background:{token_colour(reward, scale)}' title='{esc(tip)}'>"
            f"{esc(token)}</span>"
        )
    return "<div class=resp>" + "".join(spans) + "</div>"


def colour_legend(scale: float) -> str:
    steps = [-1.0, -0.5, 0.0, 0.5, 1.0]
    return (
        "<div class=legend>token reward: "
        + "".join(
            f"<span style='background:{token_colour(s * scale, scale)}'>{s * scale:+.3g}</span>"
            for s in steps
        )
        + " (hover a token for its value)</div>"
    )


def token_examples_html(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return ""
    everything = np.abs(
        np.concatenate(
            [np.asarray(e[s]["rewards"], dtype=float) for e in examples for s in ("chosen", "rejected")]
            + [np.zeros(1)]
        )
    )
    scale = float(np.quantile(everything, 0.98)) or float(everything.max()) or 1.0
    parts = [colour_legend(scale)]
    for example in examples:
        verdict = "<span class=good>correct</span>" if example["correct"] else "<span class=bad>wrong</span>"
        top = ", ".join(
            f"{esc(repr(t['token']))} ({t['side']}, {t['margin_contribution']:+.4f})"
            for t in example["top_tokens"]
        )
        parts.append(
            f"<div class=card><b>pair {example['index']}</b> — {esc(example['why'])} — margin "
            f"{example['margin']:+.4f}, p(chosen) {example['bt_probability']:.3f}, {verdict}"
            f"<details><summary>prompt</summary><div class=resp>{esc(clip(example['prompt'], 2000))}</div></details>"
            f"<h3>chosen (reward {example['chosen']['reward']:+.4f})</h3>"
            + coloured_tokens(example["chosen"]["tokens"], example["chosen"]["rewards"], scale)
            + f"<h3>rejected (reward {example['rejected']['reward']:+.4f})</h3>"
            + coloured_tokens(example["rejected"]["tokens"], example["rejected"]["rewards"], scale)
            + f"<p class=sub>tokens carrying most of the margin: {top}</p></div>"
        )
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the report


def write_report(path: Path, result: dict[str, Any], directory: Path) -> None:
    settings = result["settings"]
    parts = [
        (
            f"<h1>prefopt diagnostics</h1><p class=sub>{esc(result['created_at'])} · policy "
            f"<code>{esc(settings['policy'])}</code> · reference "
            f"<code>{esc(settings['reference'] or 'none')}</code>"
            f" · {esc(settings['loss'])} implicit reward "
            f"<code>{esc(settings.get('implicit_reward') or '')}</code>, beta {settings['beta']:g}</p>"
        )
    ]
    parts += [f"<div class=note>{esc(note)}</div>" for note in result["notes"]]
    parts.append("<h2>Summary</h2>" + summary_table(result["summary"]))
    if result["plots"].get("datasets"):
        parts.append(image(directory, result["plots"]["datasets"], "per-dataset comparison"))
    for name, section in result["datasets"].items():
        parts.append(dataset_html(name, section, directory, settings))
    parts.append(
        "<h2>Settings</h2>"
        + table(
            [
                (key, Raw(esc(_setting(value))), Raw(esc(settings["sources"].get(key, ""))))
                for key, value in settings.items()
                if key != "sources"
            ],
            ["setting", "value", "from"],
            left=(0, 1, 2),
        )
    )
    write_html(path, page("prefopt diagnostics", "".join(parts)))


def _setting(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, dict) and "path" in v for v in value):
        return ", ".join(f"{v['name']} = {v['path']}" for v in value)
    return "–" if value is None else str(value)


def summary_table(summary: list[dict[str, Any]]) -> str:
    columns = [
        ("dataset", "dataset"),
        ("pairs", "pairs"),
        ("accuracy", "accuracy"),
        ("margin_mean", "margin mean"),
        ("margin_std", "margin std"),
        ("ece", "ECE"),
        ("mean_bt_probability", "mean p(chosen)"),
        ("chosen_reward_mean", "chosen reward"),
        ("rejected_reward_mean", "rejected reward"),
        ("longer_wins_rate", "longer wins"),
        ("explicit_accuracy", "explicit acc."),
        ("agreement_rate", "agreement"),
        ("kl_k1", "KL k1"),
        ("kl_k3", "KL k3"),
    ]
    present = [(key, label) for key, label in columns if any(row.get(key) is not None for row in summary)]
    return table([[row.get(key) for key, _ in present] for row in summary], [label for _, label in present])


def dataset_html(name: str, section: dict[str, Any], directory: Path, settings: dict[str, Any]) -> str:
    plots, margin, calibration, length = (
        section["plots"],
        section["margin"],
        section["calibration"],
        section["length"],
    )
    parts = [
        f"<h2>{esc(name)}</h2><p class=sub><code>{esc(section['path'])}</code> · {section['pairs']:,} pairs</p>",
        "<div class=stats>"
        + stat("accuracy (margin > 0)", section["accuracy"])
        + stat("margin mean", margin["mean"])
        + stat("margin std", margin["std"])
        + stat("ECE (10 bins)", calibration["ece"])
        + stat("mean p(chosen)", calibration["mean_bt_probability"])
        + stat("BT log-loss", calibration["log_loss"])
        + stat("longer completion wins", length["longer_wins_rate"])
        + "</div>",
    ]
    rewards = section["rewards"]
    if (
        rewards["chosen"]["mean"] is not None
        and rewards["chosen"]["mean"] < 0
        and rewards["rejected"]["mean"] < 0
    ):
        parts.append(
            "<div class=note>Both the chosen and the rejected rewards are negative on average: the policy "
            "lowered the likelihood of both relative to the reference (the margin grows because the "
            "rejected reward falls faster).</div>"
        )
    parts.append("<h3>Margins and rewards</h3>" + image(directory, plots.get("margins"), "margins"))
    quantiles = list(margin["quantiles"])
    parts.append(
        table(
            [
                [label] + [dist["quantiles"].get(q) for q in quantiles] + [dist["mean"], dist["std"]]
                for label, dist in (
                    ("margin", margin),
                    ("chosen reward", rewards["chosen"]),
                    ("rejected reward", rewards["rejected"]),
                )
            ],
            [""] + quantiles + ["mean", "std"],
        )
    )
    logps = section["logps"]
    parts.append(
        table(
            [
                ["policy", logps["policy_chosen"], logps["policy_rejected"]],
                ["reference", logps["reference_chosen"], logps["reference_rejected"]],
            ],
            ["mean log-prob (sum)", "chosen", "rejected"],
        )
    )
    parts.append(
        "<h3>Calibration</h3>"
        + image(directory, plots.get("reliability"), "reliability diagram")
        + table(
            [
                [
                    f"[{b['lower']:.1f}, {b['upper']:.1f})",
                    b["count"],
                    b["confidence"],
                    b["accuracy"],
                    b["gap"],
                ]
                for b in calibration["bins"]
                if b["count"]
            ],
            ["confidence bin", "pairs", "mean confidence", "accuracy", "accuracy − confidence"],
        )
    )
    parts.append("<h3>Length effects</h3>" + image(directory, plots.get("length"), "length effects"))
    corr_rows = [
        [
            "reward vs completion length",
            length["reward_vs_length"]["pearson"],
            length["reward_vs_length"]["spearman"],
        ],
        [
            "margin vs length difference",
            length["margin_vs_length_difference"]["pearson"],
            length["margin_vs_length_difference"]["spearman"],
        ],
    ]
    parts.append(
        table(corr_rows, ["correlation", "Pearson", "Spearman"])
        + f"<p class=sub>Among {length['unequal_length_pairs']:,} pairs of unequal length the longer "
        f"completion gets the higher reward in {fmt(length['longer_wins_rate'], 3)} of them; the labelled "
        f"chosen completion is the longer one in {fmt(length['chosen_longer_rate'], 3)}.</p>"
    )
    parts.append(
        table(
            [
                [row["bucket"], Raw(_range(row)), row["count"], row["accuracy"], row["mean_margin"]]
                for row in length["by_length_difference"]
            ],
            ["bucket", "(|y_w|−|y_l|)/max", "pairs", "accuracy", "mean margin"],
            left=(0, 1),
        )
    )
    parts.append(tokens_html(section["tokens"], directory, plots))
    if "explicit" in section:
        parts.append(explicit_html(section["explicit"], directory, plots))
    if "samples" in section:
        parts.append(samples_html(section["samples"], directory, plots))
    return "".join(parts)


def _range(row: dict[str, Any]) -> str:
    low = "−∞" if row["relative_low"] is None else f"{row['relative_low']:+.1f}"
    high = "+∞" if row["relative_high"] is None else f"{row['relative_high']:+.1f}"
    return f"{low} … {high}"


def tokens_html(tokens: dict[str, Any], directory: Path, plots: dict[str, str]) -> str:
    share = tokens["top5_share"]
    intro = (
        "<h3>Token-level rewards</h3><p class=sub>Per-token implicit reward (for the DPO family "
        "beta·(log π(y_t) − log π_ref(y_t)); length-normalised rewards divide by |y|); "
        "it sums to the response's reward. "
        "On average the 5 tokens with the "
        f"largest |contribution| carry {fmt(share['mean'], 3)} of a pair's total |token contribution| "
        f"(median {fmt(share['quantiles'].get('p50'), 3)}).</p>"
    )
    parts = [intro, image(directory, plots.get("tokens"), "token rewards")]
    header = [
        "token",
        "mean reward",
        "count",
        "in chosen",
        "mean in chosen",
        "in rejected",
        "mean in rejected",
    ]
    for side in ("highest", "lowest"):
        rows = [
            [
                Raw(f"<code>{esc(repr(r['token']))}</code>"),
                r["mean_reward"],
                r["count"],
                r["count_chosen"],
                r["mean_reward_chosen"],
                r["count_rejected"],
                r["mean_reward_rejected"],
            ]
            for r in tokens[side]
        ]
        parts.append(
            f"<details{' open' if side == 'highest' else ''}><summary>{side} mean token reward "
            f"(tokens seen ≥ {tokens['min_count']}×)</summary>{table(rows, header)}</details>"
        )
    parts.append("<h3>Token examples</h3>" + token_examples_html(tokens["examples"]))
    return "".join(parts)


def explicit_html(explicit: dict[str, Any], directory: Path, plots: dict[str, str]) -> str:
    corr = explicit["margin_correlation"]
    parts = [
        f"<h3>Implicit vs explicit reward ({esc(explicit['source'])})</h3>",
        "<div class=stats>"
        + stat("implicit accuracy", explicit["implicit_accuracy"])
        + stat("explicit accuracy", explicit["explicit_accuracy"])
        + stat("agreement", explicit["agreement_rate"])
        + stat("margin Pearson", corr["pearson"])
        + stat("margin Spearman", corr["spearman"])
        + "</div>",
        image(directory, plots.get("explicit"), "implicit vs explicit"),
    ]
    rows = [
        [
            d["index"],
            Raw(esc(clip(d["prompt"], 300))),
            Raw(esc(clip(d["chosen_text"]))),
            Raw(esc(clip(d["rejected_text"]))),
            d["implicit_margin"],
            d["explicit_margin"],
        ]
        for d in explicit["disagreements"]
    ]
    if rows:
        parts.append(
            "<p class=sub>Pairs where they disagree most (opposite preferences, largest standardised "
            "difference first):</p>"
            + table(
                rows,
                ["pair", "prompt", "chosen", "rejected", "implicit margin", "explicit margin"],
                text=(1, 2, 3),
            )
        )
    return "".join(parts)


def samples_html(samples: dict[str, Any], directory: Path, plots: dict[str, str]) -> str:
    kl = samples["kl"] or {}
    explicit, implicit = samples["explicit_reward"] or {}, samples["implicit_reward"] or {}
    title = (
        f"<h3>Policy samples ({samples['count']:,} = {samples['prompts']} prompts × "
        f"{samples['samples_per_prompt']}, temperature {samples['temperature']:g})</h3>"
    )
    cards = (
        stat("KL k1 = mean log-ratio", kl.get("k1"))
        + stat("KL k3 (per-token, summed)", kl.get("k3"))
        + stat("k1 std. error", kl.get("k1_stderr"))
        + stat("mean length", samples["length"]["mean"], 1)
        + stat("EOS rate", samples["eos_rate"])
        + stat("explicit reward mean", explicit.get("mean"))
        + stat("explicit reward std", explicit.get("std"))
        + stat("implicit reward mean", implicit.get("mean"))
    )
    parts = [title, f"<div class=stats>{cards}</div>", image(directory, plots.get("samples"), "samples")]
    if samples["examples"]:
        parts.append(
            table(
                [
                    [Raw(esc(clip(e["prompt"], 300))), Raw(esc(clip(e["completion"])))]
                    for e in samples["examples"]
                ],
                ["prompt", "sample"],
                text=(0, 1),
            )
        )
    return "".join(parts)
