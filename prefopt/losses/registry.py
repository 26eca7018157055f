"""Name -> loss class mapping, and construction with checked parameters.

A loss's parameters are exactly the keyword arguments of its ``__init__`` (with their defaults); the registry
reads them from the signature, so there is no second list to keep in sync.
"""

from __future__ import annotations

import difflib
from typing import Any

from prefopt.losses.aot import AOTLoss, AOTUnpairedLoss
from prefopt.losses.apo import APODownLoss, APOZeroLoss
from prefopt.losses.base import PreferenceLoss
from prefopt.losses.bco import BCOPairLoss
from prefopt.losses.copg import CoPGLoss
from prefopt.losses.cpo import CPOLoss
from prefopt.losses.discopop import DiscoPOPLoss
from prefopt.losses.dno import DNOSoftLoss
from prefopt.losses.dpo import DPOLoss
from prefopt.losses.drpo import DRPOLoss
from prefopt.losses.exo import EXOPairLoss
from prefopt.losses.fdpo import FDPOLoss
from prefopt.losses.hinge import HingeLoss
from prefopt.losses.hypo import HyPOLoss
from prefopt.losses.ipo import IPOLoss
from prefopt.losses.kto import KTOLoss
from prefopt.losses.mixture import MixtureLoss
from prefopt.losses.nca import NCAPairLoss
from prefopt.losses.online_dpo import OnlineDPOLoss
from prefopt.losses.orpo import ORPOLoss
from prefopt.losses.ppo import PPOLoss
from prefopt.losses.reward_model import RewardModelLoss
from prefopt.losses.robust import RobustDPOLoss
from prefopt.losses.rpo import RPOLoss
from prefopt.losses.rto import RTOLoss
from prefopt.losses.sft import SFTLoss
from prefopt.losses.sigmoid_norm import SigmoidNormLoss
from prefopt.losses.simpo import SimPOLoss
from prefopt.losses.sppo import SPPOHardLoss
from prefopt.losses.srpo import SRPOLoss
from prefopt.losses.tpo import TPOLLoss, TPOLoss
from prefopt.losses.xpo import XPOLoss

_LOSSES: dict[str, type[PreferenceLoss]] = {
    cls.name: cls
    for cls in (
        DPOLoss,
        SimPOLoss,
        FDPOLoss,
        RPOLoss,
        HyPOLoss,
        XPOLoss,
        OnlineDPOLoss,
        PPOLoss,
        RTOLoss,
        SFTLoss,
        RewardModelLoss,
        IPOLoss,
        HingeLoss,
        RobustDPOLoss,
        EXOPairLoss,
        NCAPairLoss,
        BCOPairLoss,
        SPPOHardLoss,
        AOTLoss,
        AOTUnpairedLoss,
        APOZeroLoss,
        APODownLoss,
        DiscoPOPLoss,
        SigmoidNormLoss,
        ORPOLoss,
        CPOLoss,
        MixtureLoss,
    )
}
_LOSSES.update({cls.name: cls for cls in (CoPGLoss, TPOLoss, TPOLLoss, SRPOLoss, DRPOLoss, DNOSoftLoss)})
_LOSSES[KTOLoss.name] = KTOLoss  # unpaired rows (its own step kind)


DEFAULT_LOSS = (
    DPOLoss.name
)  # a recipe without loss.name trains this; diagnose falls back to its implicit reward


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def available_losses() -> list[str]:
    """Names accepted by :func:`get_loss`, sorted."""
    return sorted(_LOSSES)


def loss_class(name: str) -> type[PreferenceLoss]:
    """The class registered under ``name``; unknown names raise a ValueError listing the valid ones."""
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        valid = available_losses()
        hint = _did_you_mean(name, valid) if isinstance(name, str) else ""
        raise ValueError(f"unknown loss {name!r}{hint}; available losses: {', '.join(valid)}") from None


def loss_parameters(name: str) -> dict[str, Any]:
    """``{parameter: default}`` of the loss ``name``, read from its ``__init__`` signature, in order."""
    return loss_class(name).parameter_defaults()


def get_loss(name: str, **params: Any) -> PreferenceLoss:
    """Build the loss ``name`` with ``params`` (the rest keep their defaults).

    Raises ValueError for an unknown loss name (listing the valid names), an unknown parameter (naming it and
    listing the loss's valid parameters) or a bad value (the loss's own check, e.g. an unknown divergence).
    """
    cls = loss_class(name)
    valid = loss_parameters(name)
    unknown = [key for key in params if key not in valid]
    if unknown:
        listed = ", ".join(f"{key}={default!r}" for key, default in valid.items()) or "(none)"
        details = "; ".join(f"{key!r}{_did_you_mean(key, list(valid))}" for key in unknown)
        raise ValueError(f"unknown parameter(s) for loss {name!r}: {details}. Valid parameters: {listed}")
    return cls(**params)
