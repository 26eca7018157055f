"""final/ carries a Hub model card (README.md with a YAML metadata block) built from the run, and
train.push_to_hub fails with an actionable message when the Hub cannot be used (the upload itself needs a network
this project's machines do not have)."""

from __future__ import annotations

import json

import pytest
import yaml

import prefopt
from prefopt.errors import ConfigError, UserInputError
from tests.trainer_helpers import metrics, run, write_pairs

STEPS = 3


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    data = write_pairs(tmp / "pairs.jsonl", rows=32)
    out = tmp / "run"
    run(tiny_model_dir, data, out, f"train.max_steps={STEPS}", f"data.eval={data}", "loss.beta=0.2")
    return out


def test_final_has_a_model_card_whose_metadata_parses(dpo_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(dpo_run / "final" / "README.md")
    data = card.data.to_dict()
    meta = data["prefopt"]
    config = yaml.safe_load((dpo_run / "config.yaml").read_text())
    report = json.loads((dpo_run / "data_report.json").read_text())
    records = metrics(dpo_run)
    last_train = next(r for r in reversed(records) if "loss" in r)
    last_eval = next(r for r in reversed(records) if "eval/loss" in r)

    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"prefopt", "dpo"} <= set(data["tags"])
    assert "base_model" not in data  # a local path is not a Hub id; it is kept in prefopt.base_model_path
    assert meta["base_model_path"] == config["model"]["name_or_path"]
    assert meta["method"] == "dpo" and "Rafailov" in meta["paper"]
    # the recipe's value and every default, exactly as config.yaml records them
    assert (
        meta["parameters"] == {k: v for k, v in config["loss"].items() if k != "name"}
        and meta["parameters"]["beta"] == 0.2
    )
    assert {"label_smoothing", "divergence"} <= set(meta["parameters"])
    assert meta["data"]["fingerprint"] == report["fingerprint"] and len(report["fingerprint"]) == 64
    assert meta["data"]["train"] == config["data"]["train"]
    assert meta["version"] == prefopt.__version__
    assert meta["final_train_metrics"]["step"] == STEPS
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        assert meta["final_train_metrics"][key] == pytest.approx(last_train[key])
    assert meta["eval_metrics"]["eval/loss"] == pytest.approx(last_eval["eval/loss"])
    # The eval metrics are also Hub model-index results.
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results["eval/rewards/accuracies"] == pytest.approx(last_eval["eval/rewards/accuracies"])
    # The body says the same for people, and the recipe travels with the model.
    assert "## Method and parameters" in card.text and "`beta` | 0.2" in card.text
    assert report["fingerprint"] in card.text
    assert yaml.safe_load((dpo_run / "final" / "prefopt_config.yaml").read_text()) == config


def test_hub_ids_become_base_model_and_datasets(dpo_run, tmp_path):
    from prefopt.trainer.model_card import build_model_card

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = yaml.safe_load((dpo_run / "config.yaml").read_text())
    config["model"]["name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    config["data"]["train"] = "HuggingFaceH4/ultrafeedback_binarized"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    data = build_model_card(run_dir).data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert data["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]


def test_a_lora_adapter_gets_the_prefopt_card_not_peft_s(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    data = write_pairs(tmp_path / "pairs.jsonl", rows=16)
    run(tiny_model_dir, data, tmp_path / "lora", "train.max_steps=1", "model.peft.r=4")
    card = ModelCard.load(tmp_path / "lora" / "final" / "README.md")
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.to_dict()["prefopt"]["method"] == "dpo"


def test_push_to_hub_needs_a_repository_id_and_the_hub(monkeypatch):
    from prefopt.config import load_config

    with pytest.raises(ConfigError, match="train.hub_model_id"):
        load_config(None, ["train.push_to_hub=true"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        load_config(None, ["train.push_to_hub=true", "train.hub_model_id=me/tiny"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert load_config(None, ["train.push_to_hub=true", "train.hub_model_id=me/tiny"]).train.push_to_hub


def test_unreachable_hub_is_an_actionable_error(dpo_run, monkeypatch):
    import huggingface_hub.constants

    from prefopt.trainer.model_card import push_to_hub

    # Offline mode (the Makefile's default): the message says how to upload later.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match="offline mode is on.*hf upload me/tiny"):
        push_to_hub(dpo_run / "final", "me/tiny", token="hf_test")
    # A Hub that does not answer (nothing listens on port 9).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserInputError, match="cannot be reached.*hf upload me/tiny"):
        push_to_hub(dpo_run / "final", "me/tiny", token="hf_test", endpoint="http://127.0.0.1:9")
