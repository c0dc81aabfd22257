"""Advantage-Guided Distillation for Preference Alignment: NLL on chosen tokens, and on rejected tokens a
reward for student probability mass where the DPO teacher gains over its reference (A = log p_T - log p_ref).

    loss = NLL(chosen) - gamma · mean over rejected tokens of sum_{v in top-k} q_S(v) · A(v)

with q_S the student's probabilities (not log-probs) at the teacher's cached top-k ids. No term on chosen.

``clamp="none"`` (default) is this published formula: negative advantages push mass away, positive ones pull
it in, in proportion. ``clamp="reference"`` reproduces the public code, whose probability stabiliser clamps
both q_S and A to [1e-8, 1 - 1e-8] before the product: negative advantages then count ~0 (only mass moved
towards ids the teacher favours is rewarded) and advantages above 1 saturate at 1 (no gradient through them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curate.errors import CurateError
from train.losses.preference import PreferenceLoss, SideTokens, gather_sparse, nll, pad_mask

CLAMPS = ("none", "reference")
EPS = 1e-8  # the public code's stabiliser bounds


class ADPA(PreferenceLoss):
    """loss = NLL(chosen) - gamma · adv, adv = token mean over rejected of sum_k q_S · A (see module doc)."""

    name = "adpa"

    def __init__(self, gamma: float = 1.6, clamp: str = "none") -> None:
        if clamp not in CLAMPS:
            raise CurateError(f"--advantage-clamp must be one of {', '.join(CLAMPS)}, not {clamp!r}")
        self.gamma, self.clamp = gamma, clamp

    def __call__(self, chosen: SideTokens, rejected: SideTokens) -> dict[str, Tensor]:
        terms = {"nll": nll(chosen), "adv": self.advantage_term(rejected)}
        return {"loss": terms["nll"] - self.gamma * terms["adv"], **terms}

    def advantage_term(self, side: SideTokens) -> Tensor:
        """Token mean over the side of sum_k q_S(v_k) · A(v_k); padding entries count 0."""
        if side.advantage is None:
            raise CurateError("adpa needs the cached advantage on the rejected side (curate build advantage)")
        if side.targets.numel() == 0:
            return side.logprobs.sum() * 0.0
        pad = pad_mask(side)
        q = gather_sparse(side).exp()
        adv = side.advantage.to(q.dtype).masked_fill(pad, 0.0)  # padding may hold junk, even NaN
        if self.clamp == "reference":
            q, adv = q.clamp(EPS, 1 - EPS), adv.clamp(EPS, 1 - EPS)
        return torch.where(pad, torch.zeros_like(q), q * adv).sum(-1).mean()
