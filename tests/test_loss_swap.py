"""Swapping the loss with one override, and config.yaml that reproduces a run (issue 16)."""

from __future__ import annotations

import logging

import pytest
import yaml

from prefopt.cli import main
from prefopt.config import config_to_yaml, load_config
from prefopt.losses import available_losses, get_loss, loss_class, loss_parameters
from prefopt.trainer import train
from tests.trainer_helpers import REPO, losses, run, write_pairs

PAIR_RECIPES = sorted(
    path
    for folder in ("tiny", "models")
    for path in (REPO / "recipes" / folder).glob("*.yaml")
    if loss_class(load_config(path).loss.name).step in ("pairs", "pairs+samples")
)
# every loss that trains on preference pairs alone; "mix" is not one loss (its parts come with loss.mix)
PAIRWISE = [name for name in available_losses() if loss_class(name).step == "pairs" and name != "mix"]


def test_there_are_recipes_and_losses_to_swap():
    assert len(PAIR_RECIPES) >= 8 and len(PAIRWISE) >= 19


@pytest.mark.parametrize("recipe", PAIR_RECIPES, ids=[p.stem for p in PAIR_RECIPES])
def test_every_pair_recipe_takes_every_pairwise_loss(recipe, caplog):
    recipe_params = yaml.safe_load(recipe.read_text())["loss"]
    for name in PAIRWISE:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefopt.config"):
            config = load_config(recipe, [f"loss.name={name}"])
        valid = loss_parameters(name)
        dropped = [key for key in recipe_params if key != "name" and key not in valid]
        warnings = [r.getMessage() for r in caplog.records if r.name == "prefopt.config"]
        if dropped:
            assert len(warnings) == 1 and all(f"{key}=" in warnings[0] for key in dropped), (name, warnings)
        else:
            assert warnings == [], (name, warnings)
        kept = {k: v for k, v in recipe_params.items() if k != "name" and k in valid}
        assert {k: config.loss.params()[k] for k in kept} == pytest.approx(kept), name
        assert set(config.loss.params()) == set(valid)  # every parameter recorded, defaults included


def test_a_command_line_parameter_the_loss_does_not_take_is_still_exit_2(capsys):
    code = main(["train", str(REPO / "recipes/tiny/rpo.yaml"), "loss.name=dpo", "loss.eta=0.1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'eta'" in err and "Valid parameters: beta=0.1" in err


def test_config_yaml_records_every_loss_parameter_with_its_default():
    saved = yaml.safe_load(config_to_yaml(load_config(REPO / "recipes/tiny/dpo.yaml")))["loss"]
    assert saved == {
        "name": "dpo",
        "beta": 0.1,
        "label_smoothing": 0.0,
        "divergence": "reverse_kl",
        "alpha": 0.5,
        "ld_alpha": None,
        "wpo_weighting": False,
    }
    mixed = load_config(None, ["loss.mix=[{name: dpo, weight: 0.8}, {name: sft}]"])
    assert config_to_yaml(mixed).count("reduction: token_mean") == 1
    assert mixed.loss.name == "mix" and mixed.loss.params()["mix"][1] == {
        "name": "sft",
        "weight": 1.0,
        "reduction": "token_mean",
    }
    assert mixed.resolved_reference_mode() == "model"  # the dpo part needs a reference


def test_training_from_the_saved_config_reproduces_the_loss_curve(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows=48)
    first = run(
        tiny_model_dir,
        pairs,
        tmp_path / "a",
        "train.max_steps=4",
        "loss.name=ipo",
        recipe="recipes/tiny/rpo.yaml",
    )  # rpo's eta/nll are dropped; ipo's defaults are recorded
    saved = yaml.safe_load((first.output_dir / "config.yaml").read_text())
    assert saved["loss"] == {"name": "ipo", **loss_parameters("ipo"), "beta": 0.1}
    again = train(load_config(first.output_dir / "config.yaml", [f"output_dir={tmp_path / 'b'}"]))
    assert len(losses(first.output_dir)) == 4
    assert losses(again.output_dir) == losses(first.output_dir)  # exactly


def test_every_loss_builds_from_its_defaults_or_says_what_it_needs():
    for name in available_losses():
        if name == "mix":
            with pytest.raises(ValueError, match="non-empty list"):
                get_loss(name)
        else:
            get_loss(name)
