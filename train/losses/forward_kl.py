"""Forward KL(teacher ‖ student): the classic (Hinton) distillation loss; mass-covering."""

from __future__ import annotations

from torch import Tensor

from train.losses.base import DistillationLoss, kl


class ForwardKL(DistillationLoss):
    name = "forward_kl"

    def divergence(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return kl(teacher_logp, student_logp)
