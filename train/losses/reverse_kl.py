"""Reverse KL(student ‖ teacher): mode-seeking; a small student concentrates on the teacher's main modes
instead of spreading mass over everything the teacher finds plausible (MiniLLM-style)."""

from __future__ import annotations

from torch import Tensor

from train.losses.base import DistillationLoss, kl


class ReverseKL(DistillationLoss):
    name = "reverse_kl"

    def divergence(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return kl(student_logp, teacher_logp)
