"""Forward KL(teacher ‖ student): the classic (Hinton) distillation loss; mass-covering."""

from __future__ import annotations

from torch import Tensor

from curate.errors import CurateError
from train.losses.base import DistillationLoss, kl, sampled_forward_kl, tail_forward_kl


class ForwardKL(DistillationLoss):
    name = "forward_kl"

    def divergence(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return kl(teacher_logp, student_logp)

    def sampled_token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, weights: Tensor,
                           temperature: float) -> Tensor:
        """The unbiased estimator of KL(teacher ‖ student) at temperature 1 (a tempered teacher's normaliser is
        not known from draws, so other temperatures are refused)."""
        self.check_sampled(temperature)
        return sampled_forward_kl(student_logprobs, teacher_logprobs, weights)

    def uses_tail(self, temperature: float) -> bool:
        return temperature == 1.0

    def tail_token_loss(self, student_topk: Tensor, topk_logprobs: Tensor, student_tail: Tensor, drawn: Tensor,
                        residual: Tensor, entropy: Tensor) -> Tensor:
        return tail_forward_kl(student_topk, topk_logprobs, student_tail, drawn, residual, entropy)

    def check_sampled(self, temperature: float) -> None:
        if temperature != 1.0:
            raise CurateError(f"a sampled cache estimates the temperature-1 KL; --temperature {temperature} needs "
                              "a top-k cache")
