"""Recipe schema: overrides, typed errors that name the key and the valid choices, saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prefopt.config import Config, apply_overrides, config_to_yaml, load_config, parse_override, save_config
from prefopt.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_every_recipe_validates():
    recipes = sorted(RECIPES.rglob("*.yaml"))
    recipes = [r for r in recipes if "accelerate" not in r.parts]
    assert len(recipes) >= 6
    for recipe in recipes:
        load_config(recipe)  # raises on any unknown key or bad value


def test_dotted_overrides_parse_yaml_scalars():
    assert parse_override("loss.beta=0.5") == (["loss", "beta"], 0.5)
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("loss.alpha=1e-5") == (["loss", "alpha"], 1e-5)  # YAML 1.1 would say "1e-5"
    assert parse_override("train.resume_from=latest") == (["train", "resume_from"], "latest")
    assert parse_override("reference.name_or_path=null") == (["reference", "name_or_path"], None)
    assert parse_override("logging.report_to=[tensorboard]") == (["logging", "report_to"], ["tensorboard"])


def test_override_swaps_the_loss_and_keeps_the_rest():
    config = load_config(RECIPES / "tiny" / "dpo.yaml", ["loss.name=simpo", "loss.beta=2.0"])
    # every parameter is recorded with its resolved value, defaults included
    assert config.loss.name == "simpo" and config.loss.params() == {
        "beta": 2.0,
        "gamma": None,
        "gamma_beta_ratio": None,
        "sft_weight": 0.0,
    }
    assert config.resolved_reference_mode() == "none"
    base = load_config(RECIPES / "tiny" / "dpo.yaml")
    assert config.train == base.train and config.data == base.data


def test_override_creates_nested_sections():
    data = apply_overrides({}, ["model.peft.r=4", "seed=3"])
    assert data == {"model": {"peft": {"r": 4}}, "seed": 3}
    assert Config.model_validate(data).model.peft.r == 4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learning_rte=1e-4", ["train.learning_rte: unknown key", "learning_rate"]),
        ("loss.name=dpoo", ["loss.name", "dpoo", "dpo", "simpo", "fdpo", "rpo"]),
        ("loss.gamma=1.0", ["gamma", "beta", "label_smoothing"]),
        ("train.per_device_batch_size=many", ["train.per_device_batch_size", "many"]),
        ("reference.mode=sideways", ["reference.mode", "sideways", "precomputed"]),
        ("loss.divergence=l2", ["divergence"]),
        ("bogus=1", ["bogus: unknown key", "output_dir"]),
    ],
)
def test_errors_name_the_key_and_the_choices(override, expected):
    overrides = ["loss.name=fdpo", override] if "divergence" in override else [override]
    with pytest.raises(ConfigError) as info:
        load_config(RECIPES / "tiny" / "dpo.yaml", overrides)
    for text in expected:
        assert text in str(info.value)


def test_reference_mode_rules():
    with pytest.raises(ConfigError, match="needs a reference"):
        load_config(None, ["loss.name=dpo", "reference.mode=none"])
    with pytest.raises(ConfigError, match="model.peft"):
        load_config(None, ["reference.mode=adapter"])
    with pytest.raises(ConfigError, match="live one"):
        load_config(None, ["loss.name=hypo", "reference.mode=precomputed"])
    assert load_config(None, ["model.peft.r=4"]).resolved_reference_mode() == "adapter"


def test_vllm_without_vllm_says_use_hf():
    with pytest.raises(ConfigError, match="generation.backend=hf"):
        load_config(None, ["generation.backend=vllm"])


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["loss.beta"])


def test_saved_config_round_trips(tmp_path):
    config = load_config(RECIPES / "tiny" / "fdpo_alpha.yaml", ["loss.alpha=0.3"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert yaml.safe_load(config_to_yaml(config))["loss"] == {
        "name": "fdpo",
        "beta": 0.1,
        "divergence": "alpha",
        "alpha": 0.3,
        "ld_alpha": None,
        "wpo_weighting": False,
    }
