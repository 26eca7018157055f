"""Experiment trackers (``logging.report_to``): TensorBoard, Weights & Biases, trackio, through accelerate.

Every run writes ``metrics.jsonl``; a tracker receives the same records (same names, same steps) and the run's
resolved config. Where each one writes:

- ``tensorboard``: ``output_dir/tensorboard/<run name>/`` — scalars, plus the config as hyperparameters
  (TensorBoard's HPARAMS tab) and as ``hparams.yml``; view with ``tensorboard --logdir output_dir/tensorboard``.
- ``wandb``: project ``logging.project``, run ``<run name>``, files under ``output_dir/wandb/``. Offline
  (``WANDB_MODE=offline``) it needs no account or network; ``wandb sync output_dir/wandb/offline-run-*``
  uploads such a run later.
- ``trackio``: accelerate's defaults (project = the run name).

The run name is ``logging.run_name``, else the output directory's name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Union

logger = logging.getLogger(__name__)

# report_to name -> the module that must be importable for it
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def run_name(config) -> str:
    return config.logging.run_name or Path(config.output_dir).name


def build_trackers(config) -> list[Union[str, Any]]:
    """The ``log_with`` list for ``Accelerator``: tracker objects that write inside ``output_dir``.

    Trackers whose package is missing are left out with a warning (the run still writes ``metrics.jsonl``).
    """
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    output_dir = Path(config.output_dir)
    trackers: list[Union[str, Any]] = []
    for name in config.logging.report_to:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            logger.warning(
                "logging.report_to: %s is not installed (pip install %s); not logging to it", name, name
            )
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(run_name(config), output_dir / "tensorboard"))
        elif name == "wandb":
            # accelerate passes its run name as wandb's project; prefopt's project and run name are separate.
            trackers.append(WandBTracker(config.logging.project, name=run_name(config), dir=str(output_dir)))
        else:
            trackers.append(name)
    return trackers


def flat_config(config) -> dict[str, Union[int, float, str, bool]]:
    """The resolved config as ``{"section.key": value}`` with scalar values only.

    TensorBoard's hyperparameters accept int, float, str and bool: ``None`` becomes ``"null"`` and lists or
    mappings their JSON text, so nothing is dropped and every value reads back as it is in ``config.yaml``.
    """
    flat: dict[str, Union[int, float, str, bool]] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is None:
            flat[prefix] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    visit("", config.model_dump(mode="json"))
    return flat


def start_trackers(accelerator, config) -> None:
    """Start the trackers set up by ``build_trackers`` and log the run's config with them (main process)."""
    accelerator.init_trackers(run_name(config), config=flat_config(config))
