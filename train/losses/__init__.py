"""Distillation losses, one per file behind `DistillationLoss`; `get_loss(name)` picks one by name. Preference
losses (both sides of a pair at once) sit behind `PreferenceLoss`; `get_preference_loss(name, **weights)`."""

from __future__ import annotations

import inspect

from curate.errors import CurateError
from train.losses.adpa import ADPA
from train.losses.base import DistillationLoss, label_log_distributions, sparse_log_distributions
from train.losses.dckd import DCKD
from train.losses.forward_kl import ForwardKL
from train.losses.jsd import JSD
from train.losses.preference import PreferenceLoss, SideTokens
from train.losses.reverse_kl import ReverseKL

LOSSES: dict[str, type[DistillationLoss]] = {cls.name: cls for cls in (ForwardKL, ReverseKL, JSD)}
PREFERENCE_LOSSES: dict[str, type[PreferenceLoss]] = {cls.name: cls for cls in (DCKD, ADPA)}


def get_loss(name: str) -> DistillationLoss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise CurateError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}") from None


def get_preference_loss(name: str, **weights: float | str) -> PreferenceLoss:
    """The named preference loss with its weights (dckd: alpha, beta; adpa: gamma, clamp)."""
    try:
        cls = PREFERENCE_LOSSES[name]
    except KeyError:
        raise CurateError(f"preference loss must be one of {', '.join(PREFERENCE_LOSSES)}, not {name!r}") from None
    known = inspect.signature(cls).parameters
    if unknown := sorted(set(weights) - set(known)):
        raise CurateError(f"{name} takes weights {', '.join(known)}, not {', '.join(unknown)}")
    return cls(**weights)  # type: ignore[arg-type]


__all__ = ["LOSSES", "PREFERENCE_LOSSES", "DistillationLoss", "PreferenceLoss", "SideTokens", "get_loss",
           "get_preference_loss", "label_log_distributions", "sparse_log_distributions"]
