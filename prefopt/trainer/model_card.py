"""The model card of ``final/`` (``README.md`` in the Hugging Face Hub's format), and ``train.push_to_hub``.

The card is built from what the run wrote beside ``final/`` — ``config.yaml``, ``data_report.json``,
``metrics.jsonl``, ``run_info.json`` — so it says exactly what was run. Its YAML metadata block (read by the Hub
and by ``huggingface_hub.ModelCard.load``) carries ``base_model`` (when it is a Hub id), ``library_name``,
``tags``, ``datasets`` (Hub dataset ids), the eval metrics as ``model-index`` results, and a ``prefopt`` mapping
with the method and its parameters, the data files and their fingerprint, the final train and eval metrics,
the world size and the prefopt version. The body repeats them for people, with how to load the model and how to
rerun the training.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from prefopt.errors import UserInputError

CONFIG_NAME = "prefopt_config.yaml"
# "org/name" or "name": what the Hub accepts as a repository id (a local path has a "/" too; it also exists).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_id(value: Optional[str]) -> Optional[str]:
    """``value`` when it names a Hub repository rather than a local path."""
    if not value or Path(value).exists() or not _HUB_ID.match(value) or value.endswith((".json", ".jsonl")):
        return None
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# Throughput depends on the machine and its load, not on the model: left out so that the card (and with it
# final/) is the same bytes for a resumed run as for an uninterrupted one.
TIMING_METRICS = ("tokens_per_second", "samples_per_second", "seconds")


def _final_metrics(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The last value of every train metric and every ``eval/`` metric in ``metrics.jsonl`` (timings left out)."""
    train: dict[str, float] = {}
    evaluation: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if key.endswith(TIMING_METRICS):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                (evaluation if key.startswith("eval/") else train)[key] = value
    return train, evaluation


def _loss_description(name: str) -> tuple[str, dict[str, Any]]:
    from prefopt.losses import loss_class, loss_parameters

    cls = loss_class(name)
    # The loss's own citation: its `paper` attribute, else the first paragraph of its docstring.
    first_paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    paper = (getattr(cls, "paper", "") or first_paragraph).rstrip(".")
    return paper, loss_parameters(name)


def build_model_card(
    run_dir: Path, *, adapter: bool = False, pipeline_tag: Optional[str] = "text-generation"
):
    """A ``huggingface_hub.ModelCard`` for the run in ``run_dir`` (its ``final/`` is the model)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    import prefopt

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    report = _read_json(run_dir / "data_report.json")
    run_info = _read_json(run_dir / "run_info.json")
    train_metrics, eval_metrics = _final_metrics(run_dir)
    loss = dict(config.get("loss") or {})
    method = loss.pop("name")
    paper, defaults = _loss_description(method)
    parameters = {**defaults, **loss}
    data = config.get("data") or {}
    base = (config.get("model") or {}).get("name_or_path")
    model_name = config.get("logging", {}).get("run_name") or run_dir.name
    hub_datasets = [d for d in (_hub_id(data.get("train")), _hub_id(data.get("eval"))) if d]
    eval_name = data.get("eval") or "held-out split of the training data"
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=_hub_id(data.get("eval")) or "local",
            dataset_name=str(eval_name),
            metric_type=key,
            metric_name=key,
            metric_value=value,
        )
        for key, value in sorted(eval_metrics.items())
    ]
    metadata = {
        "method": method,
        "paper": paper,
        "parameters": parameters,
        "base_model_path": base,
        "reference": config.get("reference"),
        "data": {
            "train": data.get("train"),
            "eval": data.get("eval"),
            "format": data.get("format"),
            "fingerprint": report.get("fingerprint"),
            "rows": report.get("train", {}).get("examples"),
        },
        "final_train_metrics": train_metrics,
        "eval_metrics": eval_metrics,
        "world_size": run_info.get("world_size"),
        "version": prefopt.__version__,
    }
    card_data = ModelCardData(
        base_model=_hub_id(base),
        library_name="peft" if adapter else "transformers",
        tags=["prefopt", method, "preference-optimization"] + (["lora"] if adapter else []),
        datasets=hub_datasets or None,
        model_name=model_name,
        eval_results=results or None,
        pipeline_tag=pipeline_tag,
        prefopt=metadata,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{_body(model_name, metadata, adapter)}")


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [
        f"| `{key}` | {value:.6g} |" if isinstance(value, float) else f"| `{key}` | `{value}` |"
        for key, value in rows.items()
    ]
    return "\n".join(lines)


def _body(model_name: str, meta: dict[str, Any], adapter: bool) -> str:
    load = (
        (
            "from peft import AutoPeftModelForCausalLM\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{model_name}")'
        )
        if adapter
        else (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{model_name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")'
        )
    )
    data = meta["data"]
    sections = [
        f"# {model_name}",
        f"Trained with prefopt {meta['version']} using **{meta['method']}** "
        f"({meta['paper']}), starting from `{meta['base_model_path']}`"
        + (" (a LoRA adapter on it)." if adapter else "."),
        "## Method and parameters",
        _table(meta["parameters"]),
        "## Data",
        _table(
            {
                "train": data["train"],
                "eval": data["eval"],
                "examples": data["rows"],
                "fingerprint": data["fingerprint"],
            }
        ),
        "## Final metrics",
        _table(meta["final_train_metrics"]) if meta["final_train_metrics"] else "(none logged)",
        "## Evaluation",
        _table(meta["eval_metrics"]) if meta["eval_metrics"] else "(no evaluation data)",
        "## Use",
        f"```python\n{load}\n```",
        "## Reproduce",
        f"`{CONFIG_NAME}` is the run's resolved recipe (its paths are the training machine's): "
        f"`prefopt train {CONFIG_NAME}` reruns it.",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(model_dir: Path, run_dir: Path) -> Path:
    """Write ``model_dir/README.md`` (replacing a card PEFT may have written) for the run in ``run_dir``."""
    adapter = (model_dir / "adapter_config.json").is_file()
    architectures = _read_json(model_dir / "config.json").get("architectures") or [""]
    pipeline = (
        "text-classification" if architectures[0].endswith("ForSequenceClassification") else "text-generation"
    )
    path = model_dir / "README.md"
    build_model_card(run_dir, adapter=adapter, pipeline_tag=pipeline).save(path)
    # The resolved recipe travels with the model (a published repository has no run directory around it).
    shutil.copy2(run_dir / "config.yaml", model_dir / CONFIG_NAME)
    return path


def push_final_if_asked(model_dir: Path, run_dir: Path) -> Optional[str]:
    """``train.push_to_hub``: upload ``model_dir`` to ``train.hub_model_id`` (read from the run's config.yaml)."""
    import logging

    train = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train") or {}
    if not train.get("push_to_hub"):
        return None
    url = push_to_hub(model_dir, train["hub_model_id"], private=train.get("hub_private", True))
    logging.getLogger(__name__).info("pushed %s to %s", model_dir, url)
    return url


def push_to_hub(
    model_dir: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> str:
    """Upload ``model_dir`` (the model, its tokenizer and its card) to the Hub repository ``repo_id``.

    Returns the repository's URL. An unreachable Hub, offline mode or missing credentials end in a
    :class:`~prefopt.errors.UserInputError` that says what to do; the trained model stays on disk.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    retry = f"retry later with: hf upload {repo_id} {model_dir} ."
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(model_dir),
            repo_type="model",
            commit_message="Upload a model trained with prefopt",
        )
    except OfflineModeIsEnabled:
        raise UserInputError(
            f"train.push_to_hub: offline mode is on (HF_HUB_OFFLINE=1), nothing was uploaded; "
            f"unset HF_HUB_OFFLINE and {retry}"
        ) from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = (
            "log in with `hf auth login` or set HF_TOKEN (a token with write access)"
            if status in (401, 403)
            else f"the Hub answered {status}"
        )
        raise UserInputError(
            f"train.push_to_hub: upload of {model_dir} to '{repo_id}' failed: {hint}; {retry}"
        ) from None
    except (OSError, _transport_errors()) as error:  # DNS failures, refused connections, timeouts
        raise UserInputError(
            f"train.push_to_hub: the Hugging Face Hub cannot be reached ({type(error).__name__}); "
            f"nothing was uploaded. Check the network (or HF_ENDPOINT) and {retry}"
        ) from None
    return str(url)


def _transport_errors() -> type[Exception]:
    """The HTTP client's connection-level error class (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    try:
        import httpx2 as http_client
    except ImportError:
        import httpx as http_client
    return http_client.TransportError
