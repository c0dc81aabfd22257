"""Distillation losses, one per file behind `DistillationLoss`; `get_loss(name)` picks one by name."""

from __future__ import annotations

from curate.errors import CurateError
from train.losses.base import DistillationLoss, label_log_distributions, sparse_log_distributions
from train.losses.forward_kl import ForwardKL
from train.losses.jsd import JSD
from train.losses.reverse_kl import ReverseKL

LOSSES: dict[str, type[DistillationLoss]] = {cls.name: cls for cls in (ForwardKL, ReverseKL, JSD)}


def get_loss(name: str) -> DistillationLoss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise CurateError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}") from None


__all__ = ["LOSSES", "DistillationLoss", "get_loss", "label_log_distributions", "sparse_log_distributions"]
