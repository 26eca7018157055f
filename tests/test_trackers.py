"""`logging.report_to`: the trackers receive exactly what metrics.jsonl holds, and the run's config.

TensorBoard's event files are read back with tensorboard's own reader; the offline wandb run is read back from
its `.wandb` transaction log (record framing: wandb's LevelDB-style log, see `_wandb_records`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from tests.trainer_helpers import metrics, run, write_pairs

STEPS = 3


def _numeric_records(out: Path) -> dict[tuple[int, str], float]:
    """``{(step, name): value}`` of every number metrics.jsonl logged (what a tracker must receive)."""
    values = {}
    for record in metrics(out):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                values[(record["step"], key)] = float(value)
    return values


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    tmp = tmp_path_factory.mktemp("trackers")
    data = write_pairs(tmp / "pairs.jsonl", rows=32)
    out = tmp / "run"
    run(
        tiny_model_dir,
        data,
        out,
        f"train.max_steps={STEPS}",
        f"data.eval={data}",
        "train.eval_steps=2",
        "logging.report_to=[tensorboard, wandb]",
        "logging.run_name=tracked",
        "logging.project=prefopt-tests",
    )
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_tensorboard_scalars_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run / "tensorboard" / "tracked"
    scalars: dict[tuple[int, str], float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                scalars[(event.step, tag)] = event.value
    expected = _numeric_records(tracked_run)
    assert any(key.startswith("eval/") for _, key in expected)  # eval records are forwarded too
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # TensorBoard stores float32


def test_tensorboard_holds_the_run_config_as_hyperparameters(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = yaml.safe_load((tracked_run / "config.yaml").read_text())
    found = {}
    for events in (tracked_run / "tensorboard" / "tracked").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        try:
            content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        except KeyError:  # torch writes the hyperparameters into a file of their own
            continue
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.WhichOneof("data") == "session_start_info":
                found.update(dict(data.session_start_info.hparams.items()))
    assert found["loss.name"].string_value == config["loss"]["name"]
    assert found["train.max_steps"].number_value == config["train"]["max_steps"] == STEPS
    assert found["model.name_or_path"].string_value == config["model"]["name_or_path"]
    assert found["reference.name_or_path"].string_value == "null"  # None is kept, as text


def _wandb_records(path: Path):
    """Protobuf ``Record``s of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
    of chunks, each with a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_has_the_same_scalars_and_the_config(tracked_run):
    logs = list((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    logged: dict[tuple[int, str], float] = {}
    config: dict[str, object] = {}
    run_info = None
    for record in _wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = items.pop("_step")
            logged.update({(step, key): value for key, value in items.items() if not key.startswith("_")})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run_info = record.run
    assert run_info is not None and run_info.project == "prefopt-tests" and run_info.display_name == "tracked"
    expected = _numeric_records(tracked_run)
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    resolved = yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert config["loss.name"] == resolved["loss"]["name"]
    assert config["train.learning_rate"] == resolved["train"]["learning_rate"]
    assert config["logging.report_to"] == json.dumps(["tensorboard", "wandb"])


def test_a_missing_tracker_package_is_a_warning_not_a_crash(monkeypatch, caplog):
    import importlib.util

    from prefopt.config import Config
    from prefopt.trainer.trackers import build_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = Config.model_validate({"logging": {"report_to": ["wandb"]}})
    assert build_trackers(config) == []
    assert "wandb is not installed" in caplog.text
