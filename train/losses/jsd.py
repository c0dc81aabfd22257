"""Generalised Jensen-Shannon divergence: bounded (≤ log 2 at beta 0.5) and symmetric, so one bad teacher
row cannot dominate a batch the way an unbounded KL can."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from train.losses.base import DistillationLoss, kl


class JSD(DistillationLoss):
    name = "jsd"

    def __init__(self, beta: float = 0.5) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD beta must be in (0, 1), got {beta}")
        self.beta = beta

    def divergence(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        b = self.beta
        # log m with m = b * teacher + (1 - b) * student, computed in log space.
        mix = torch.logsumexp(
            torch.stack([teacher_logp + math.log(b), student_logp + math.log(1 - b)]), dim=0
        )
        return b * kl(teacher_logp, mix) + (1 - b) * kl(student_logp, mix)
