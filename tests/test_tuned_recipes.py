"""The gold benchmark's pure-SimPO entry (issue 16).

The numbers behind its settings (eval accuracy, EOS, gold, KL on the gold task) are in the README's "SimPO without
its SFT term"; this test pins that the entry is the SimPO recipe without its SFT term and nothing else.
"""

from __future__ import annotations

import importlib.util

from prefopt.config import load_config
from prefopt.losses import get_loss
from tests.trainer_helpers import REPO

TINY = REPO / "recipes" / "tiny"


def _bench():
    spec = importlib.util.spec_from_file_location("gold_benchmark", REPO / "scripts" / "gold_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _recipe_loss(name: str, overrides: tuple[str, ...] = ()):
    config = load_config(TINY / f"{name}.yaml", list(overrides))
    return get_loss(config.loss.name, **config.loss.params()), config


def test_simpo_pure_is_the_simpo_recipe_without_its_sft_term(tmp_path):
    bench = _bench()
    recipe, overrides, kind, stage1 = bench.METHODS["simpo_pure"]
    assert (recipe, kind, stage1) == ("simpo.yaml", "pairs", None)
    assert "simpo_pure" not in bench.DEFAULT_METHODS  # opt-in: --methods simpo_pure
    with_sft, base = _recipe_loss("simpo")
    pure, config = _recipe_loss("simpo", tuple(overrides))
    assert with_sft.sft_weight > 0 and pure.sft_weight == 0
    # the paper's large beta and a small margin; everything but the loss and the learning rate is the recipe's
    assert pure.beta >= 10 and pure.margin / pure.beta <= 0.5
    assert {o.split("=", 1)[0].split(".", 1)[0] for o in overrides} == {"loss", "train"}
    assert config.train.num_epochs == base.train.num_epochs and config.data == base.data
    # the same data as the `simpo` entry, from the seed's SFT model
    runs = bench.method_overrides("simpo_pure", tmp_path / "seed-0", tmp_path / "sft", 0, [])
    assert f"data.train={tmp_path / 'seed-0' / 'task' / 'pairs_train.jsonl'}" in runs
    assert all(override in runs for override in overrides)
    # its implicit reward is SimPO's: beta * logp / |y|, no reference
    reward = pure.implicit_reward()
    assert reward.length_normalized and not reward.uses_reference and reward.scale == pure.beta
