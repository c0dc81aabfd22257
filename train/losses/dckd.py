"""Dual-Constrained KD: NLL on chosen tokens plus the forward KL to the DPO teacher on both sides, so the
student copies the teacher's token distribution where it is preferred and where it is dispreferred."""

from __future__ import annotations

from torch import Tensor

from train.losses.preference import PreferenceLoss, SideTokens, nll, sparse_kl


class DCKD(PreferenceLoss):
    """loss = NLL(chosen) + alpha · KL(p_T ‖ q_S on chosen) + beta · KL(p_T ‖ q_S on rejected), token means."""

    name = "dckd"

    def __init__(self, alpha: float = 0.1, beta: float = 0.1) -> None:
        self.alpha, self.beta = alpha, beta

    def __call__(self, chosen: SideTokens, rejected: SideTokens) -> dict[str, Tensor]:
        terms = {"nll": nll(chosen), "kl_chosen": sparse_kl(chosen), "kl_rejected": sparse_kl(rejected)}
        return {"loss": terms["nll"] + self.alpha * terms["kl_chosen"] + self.beta * terms["kl_rejected"], **terms}
