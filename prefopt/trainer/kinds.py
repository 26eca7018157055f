"""The step-kind registry the run scaffold reads: importing the step modules registers their kinds.

A new step kind module (``@register_step("name")`` on a :class:`~prefopt.trainer.steps.StepKind` subclass) is added
to the import list below; nothing else in the trainer changes.
"""

from __future__ import annotations

from prefopt.errors import ConfigError
from prefopt.trainer import online, pair_variants, ppo, ppo_resets, steps, unpaired  # noqa: F401 - @register_step
from prefopt.trainer.steps import StepKind, registered_steps


def step_registry() -> dict[str, type[StepKind]]:
    """Every registered step kind by name."""
    return registered_steps()


def step_kind_for(loss) -> type[StepKind]:
    """The step kind a loss declares (``loss.step``); an unknown kind is a configuration error."""
    kinds = registered_steps()
    if loss.step not in kinds:
        raise ConfigError(
            f"loss.name: '{loss.name}' declares step kind '{loss.step}', which is not registered; "
            f"registered: {', '.join(sorted(kinds))}"
        )
    return kinds[loss.step]
