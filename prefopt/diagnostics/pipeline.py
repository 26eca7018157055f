"""The ``prefopt diagnose`` pipeline: load models and data, run the passes, summarise, write outputs atomically.

The structure of ``diagnostics.json`` is documented key by key in :mod:`prefopt.diagnostics`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from prefopt.diagnostics import compute as C
from prefopt.diagnostics import metrics as M
from prefopt.errors import UserInputError

FORMAT_VERSION = 1


def diagnose(settings: dict[str, Any]) -> Path:
    """Run every diagnostic ``settings`` (from :func:`prefopt.diagnostics.cli.resolve_settings`) asks for."""
    from prefopt.diagnostics import plots, report

    out = Path(settings["out"])
    # SimPO needs no reference; one given is still loaded when samples ask for a KL estimate.
    reference = settings["reference"] if settings["reward"].uses_reference or settings["samples"] else None
    models = C.load_models(settings["policy"], reference, dtype=settings["dtype"], device=settings["device"])
    scorer, scorer_name = build_scorer(settings)
    if not settings["progress"]:
        import datasets

        datasets.disable_progress_bars()
    datasets = {
        entry["name"]: (entry, load_pairs(entry, settings, models.tokenizer)) for entry in settings["data"]
    }
    tmp = make_temp_dir(out)
    try:
        sections: dict[str, Any] = {}
        with C.progress_bar(settings["progress"]) as task:
            for name, (entry, dataset) in datasets.items():
                sections[name] = diagnose_dataset(
                    name, entry["path"], dataset, models, settings, scorer, scorer_name, task, tmp
                )
        result = {
            "format_version": FORMAT_VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": public_settings(settings, models, scorer_name),
            "notes": list(settings["notes"]),
            "summary": [summary_row(name, section) for name, section in sections.items()],
            "datasets": sections,
            "plots": {},
        }
        if len(sections) > 1:
            result["plots"]["datasets"] = plots.dataset_comparison(tmp, result["summary"])
        write_json(tmp / "diagnostics.json", result)
        report.write_report(tmp / "report.html", result, tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def diagnose_dataset(
    name: str,
    path: str,
    dataset,
    models: C.LogpModels,
    settings: dict,
    scorer,
    scorer_name,
    task,
    plot_dir: Path,
) -> dict[str, Any]:
    from prefopt.diagnostics import plots

    reward = settings["reward"]
    stats = C.pair_pass(
        dataset,
        models,
        reward=reward,
        batch_size=settings["batch_size"],
        scorer=scorer,
        advance=task(f"{name}: pairs", len(dataset)),
    )
    chosen, rejected = stats.rewards(reward)
    margins = chosen - rejected
    probabilities = M.bt_probabilities(margins)
    calibration = M.calibration(probabilities)
    calibration["mean_bt_probability"] = float(probabilities.mean())
    calibration["log_loss"] = float(np.mean(np.logaddexp(0.0, -margins)))  # mean -log sigmoid(margin)
    section: dict[str, Any] = {
        "path": path,
        "pairs": int(margins.size),
        "accuracy": M.accuracy(margins),
        "margin": M.distribution(margins),
        "rewards": {"chosen": M.distribution(chosen), "rejected": M.distribution(rejected)},
        "logps": {
            "policy_chosen": float(stats.policy_chosen.mean()),
            "policy_rejected": float(stats.policy_rejected.mean()),
            "reference_chosen": _mean(stats.reference_chosen),
            "reference_rejected": _mean(stats.reference_rejected),
        },
        "calibration": calibration,
        "length": M.length_effects(chosen, rejected, stats.chosen_lengths, stats.rejected_lengths),
        "tokens": token_section(stats, models.tokenizer, dataset, margins, models, settings),
    }
    explicit_margins = None
    if stats.explicit_chosen is not None:
        explicit_margins = stats.explicit_chosen - stats.explicit_rejected
        section["explicit"] = explicit_section(
            scorer_name, margins, explicit_margins, stats, dataset, settings["top_disagreements"]
        )
    if settings["samples"]:
        prompts = C.unique_prompts(dataset, settings["max_prompts"])
        samples = C.sample_pass(
            prompts,
            models,
            samples=settings["samples"],
            temperature=settings["temperature"],
            max_new_tokens=settings["max_new_tokens"],
            batch_size=settings["batch_size"],
            seed=settings["seed"],
            scorer=scorer,
            advance=task(f"{name}: sampling", len(prompts)),
        )
        section["samples"] = samples_section(samples, settings)
    else:
        samples = None
    section["per_pair_file"] = write_per_pair(
        plot_dir / f"pairs-{name}.jsonl", stats, chosen, rejected, margins, probabilities
    )
    section["plots"] = plots.dataset_plots(
        plot_dir,
        name,
        section,
        chosen=chosen,
        rejected=rejected,
        margins=margins,
        stats=stats,
        explicit_margins=explicit_margins,
        samples=samples,
    )
    return section


# --------------------------------------------------------------------------------------------------- sections


def token_section(stats: C.PairStats, tokenizer, dataset, margins, models, settings) -> dict[str, Any]:
    sums = stats.token_sums["chosen"] + stats.token_sums["rejected"]
    counts = stats.token_counts["chosen"] + stats.token_counts["rejected"]
    table = M.token_table(sums, counts, lambda token_id: tokenizer.decode([token_id]), k=20)
    for side in ("highest", "lowest"):
        for row in table[side]:
            token_id = row["token_id"]
            for part in ("chosen", "rejected"):
                count = stats.token_counts[part][token_id]
                row[f"count_{part}"] = int(count)
                row[f"mean_reward_{part}"] = (
                    float(stats.token_sums[part][token_id] / count) if count else None
                )
    picks = M.select_token_examples(margins, settings["token_examples"])
    examples = C.token_examples(dataset, picks, models, reward=settings["reward"])
    return {"top5_share": M.distribution(stats.top5_share, n_bins=20), **table, "examples": examples}


def explicit_section(
    scorer_name: str, implicit_margins, explicit_margins, stats: C.PairStats, dataset, top: int
) -> dict[str, Any]:
    section = {"source": scorer_name, **M.reward_agreement(implicit_margins, explicit_margins)}
    rows = []
    for position in M.disagreement_order(implicit_margins, explicit_margins)[:top]:
        row = C.rows_of(dataset, position, position + 1)[0]
        rows.append(
            {
                "index": int(stats.index[position]),
                "prompt": row.get("prompt_text", ""),
                "chosen_text": row.get("chosen_text", ""),
                "rejected_text": row.get("rejected_text", ""),
                "implicit_margin": float(implicit_margins[position]),
                "explicit_margin": float(explicit_margins[position]),
            }
        )
    section["disagreements"] = rows
    return section


def samples_section(samples: C.SampleStats, settings: dict) -> dict[str, Any]:
    kl = M.kl_summary(samples.k1, samples.k3, samples.lengths) if samples.k1 is not None else None
    implicit = None
    reward = settings["reward"]
    if samples.k1 is not None and reward.uses_reference and not reward.length_normalized:
        implicit = M.mean_std(reward.scale * samples.k1)
    return {
        "prompts": samples.prompts,
        "samples_per_prompt": settings["samples"],
        "count": int(samples.lengths.size),
        "temperature": settings["temperature"],
        "max_new_tokens": settings["max_new_tokens"],
        "kl": kl,
        "length": M.distribution(samples.lengths, n_bins=20),
        "eos_rate": float(samples.finished.mean()),
        "policy_logp": M.mean_std(samples.policy_logps),
        "implicit_reward": implicit,
        "explicit_reward": M.mean_std(samples.explicit) if samples.explicit is not None else None,
        "examples": [
            {"prompt": p, "completion": t} for p, t in zip(samples.prompt_texts[:3], samples.texts[:3])
        ],
    }


def write_per_pair(path: Path, stats: C.PairStats, chosen, rejected, margins, probabilities) -> str:
    """One JSON line per pair (dataset order): the numbers behind every aggregate, for joining with the data."""
    columns = {
        "index": stats.index,
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "margin": margins,
        "bt_probability": probabilities,
        "chosen_length": stats.chosen_lengths,
        "rejected_length": stats.rejected_lengths,
        "policy_chosen_logp": stats.policy_chosen,
        "policy_rejected_logp": stats.policy_rejected,
        "reference_chosen_logp": stats.reference_chosen,
        "reference_rejected_logp": stats.reference_rejected,
        "explicit_chosen": stats.explicit_chosen,
        "explicit_rejected": stats.explicit_rejected,
    }
    columns = {k: v.tolist() for k, v in columns.items() if v is not None}
    with path.open("w", encoding="utf-8") as handle:
        for values in zip(*columns.values()):
            row = dict(zip(columns, values))
            for key in ("index", "chosen_length", "rejected_length"):
                row[key] = int(row[key])
            handle.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
    return path.name


def summary_row(name: str, section: dict[str, Any]) -> dict[str, Any]:
    explicit, samples = section.get("explicit") or {}, section.get("samples") or {}
    kl = samples.get("kl") or {}
    return {
        "dataset": name,
        "pairs": section["pairs"],
        "accuracy": section["accuracy"],
        "margin_mean": section["margin"]["mean"],
        "margin_std": section["margin"]["std"],
        "ece": section["calibration"]["ece"],
        "mean_bt_probability": section["calibration"]["mean_bt_probability"],
        "chosen_reward_mean": section["rewards"]["chosen"]["mean"],
        "rejected_reward_mean": section["rewards"]["rejected"]["mean"],
        "longer_wins_rate": section["length"]["longer_wins_rate"],
        "explicit_accuracy": explicit.get("explicit_accuracy"),
        "agreement_rate": explicit.get("agreement_rate"),
        "kl_k1": kl.get("k1"),
        "kl_k3": kl.get("k3"),
    }


def public_settings(
    settings: dict[str, Any], models: C.LogpModels, scorer_name: Optional[str]
) -> dict[str, Any]:
    keep = (
        "policy",
        "run_dir",
        "policy_is_adapter",
        "adapter_base",
        "reference",
        "loss",
        "beta",
        "implicit_reward",
        "trained_loss",
        "data",
        "max_length",
        "max_prompt_length",
        "format",
        "max_pairs",
        "batch_size",
        "token_examples",
        "samples",
        "max_prompts",
        "max_new_tokens",
        "temperature",
        "seed",
        "dtype",
        "device",
        "sources",
    )
    public = {key: settings[key] for key in keep}
    public["reference_is_adapter_disabled_policy"] = models.reference_is_base
    public["explicit_reward"] = scorer_name
    return public


def _mean(values) -> Optional[float]:
    return float(values.mean()) if values is not None and values.size else None


# ------------------------------------------------------------------------------------------------ loading


def load_pairs(entry: dict[str, str], settings: dict[str, Any], tokenizer):
    """A tokenized pair dataset (first ``max_pairs`` pairs, file order) with the diagnose settings."""
    from prefopt.config import DataConfig
    from prefopt.data import build_datasets

    try:
        data_cfg = DataConfig(
            train=entry["path"],
            format=settings["format"],
            shuffle=False,
            max_samples=settings["max_pairs"],
            max_length=settings["max_length"],
            max_prompt_length=settings["max_prompt_length"],
            chat_template=settings["chat_template"],
            on_invalid=settings["on_invalid"],
        )
    except Exception as error:  # noqa: BLE001 - pydantic validation of --format etc.
        raise UserInputError(f"--data {entry['path']}: {error}") from None
    bundle = build_datasets(data_cfg, tokenizer, "pairs", seed=settings["seed"])
    dataset = bundle.train
    if settings["max_pairs"] is not None and len(dataset) > settings["max_pairs"]:
        dataset = dataset.select(range(settings["max_pairs"]))
    return dataset


def build_scorer(settings: dict[str, Any]):
    """(scorer, description) for ``--reward-model`` / ``--reward-function``; (None, None) without either."""
    if settings["reward_function"]:
        from prefopt.models.reward import FunctionReward, import_callable

        spec = settings["reward_function"]
        return FunctionReward(
            import_callable(spec, key="--reward-function"), name="--reward-function"
        ), f"function {spec}"
    if settings["reward_model"]:
        from prefopt.config import RewardConfig
        from prefopt.models.reward import build_reward

        path = settings["reward_model"]
        config = RewardConfig(
            kind="model",
            name_or_path=path,
            batch_size=max(settings["batch_size"] * 2, 8),
            max_length=max(settings["max_length"] * 2, 1024),
        )
        return build_reward(config, device=settings["device"]), f"model {path}"
    return None, None


# ------------------------------------------------------------------------------------------------- output


def make_temp_dir(out: Path) -> Path:
    out = out.expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published directory should not be
        return tmp
    except OSError as error:
        raise UserInputError(f"--out: cannot write under '{out.parent}': {error}") from None


def publish(tmp: Path, out: Path) -> None:
    """Move a finished output directory into place: one rename when ``out`` is new; else each file replaces
    its old version (one atomic ``os.replace`` each, report.html last), leaving unrelated files alone."""
    out = out.expanduser()
    if not out.exists():
        os.rename(tmp, out)
        return
    files = sorted(
        tmp.iterdir(), key=lambda p: (p.name == "report.html", p.name == "diagnostics.json", p.name)
    )
    for file in files:
        os.replace(file, out / file.name)


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)
