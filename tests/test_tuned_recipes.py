"""The gold benchmark's pure-SimPO entry and the tuned DiscoPOP recipe (issue 16).

The numbers behind the settings (eval accuracy, EOS, gold, KL on the gold task) are in the README's "SimPO without
its SFT term" and "Tuned recipes" paragraphs; these tests pin what the settings must do whatever the task: the
pure-SimPO entry is the SimPO recipe without its SFT term, and the DiscoPOP recipe's first step from the reference
goes the right way.
"""

from __future__ import annotations

import importlib.util

import torch

from prefopt.config import load_config
from prefopt.losses import LossInputs, get_loss
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


def _at_reference(batch: int = 4) -> LossInputs:
    """Policy == reference (every training run's first step), sequence logps and lengths of tiny-task size."""
    chosen = torch.linspace(-30.0, -18.0, batch, dtype=torch.float64)
    rejected = torch.linspace(-26.0, -20.0, batch, dtype=torch.float64)
    return LossInputs(
        policy_chosen_logps=chosen.clone().requires_grad_(),
        policy_rejected_logps=rejected.clone().requires_grad_(),
        reference_chosen_logps=chosen,
        reference_rejected_logps=rejected,
        chosen_lengths=torch.tensor([18, 16, 15, 12]),
        rejected_lengths=torch.tensor([14, 17, 16, 13]),
    )


def test_discopop_recipe_moves_the_margin_up_from_the_reference():
    # At tau = 0.05 (the paper's and TRL's default) d loss / d margin is +0.784 at margin 0: from policy ==
    # reference gradient descent first lowers the chosen log-ratio. The recipe's tau must start the right way.
    loss, _ = _recipe_loss("discopop")
    inputs = _at_reference()
    loss(inputs).loss.backward()
    assert (inputs.policy_chosen_logps.grad < 0).all()  # descent raises the chosen logp ...
    assert (inputs.policy_rejected_logps.grad > 0).all()  # ... and lowers the rejected one
    default = _at_reference()
    get_loss("discopop", beta=loss.beta, tau=0.05)(default).loss.backward()
    assert (default.policy_chosen_logps.grad > 0).all()  # the default's wrong first step, for contrast
