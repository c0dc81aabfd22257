"""The preference-distillation interface: a loss over the chosen and the rejected side of a batch of pairs.

Unlike `DistillationLoss` (one divergence per position), DCKD and ADPA weigh different terms on different
sides, so the loss sees both sides at once. Each side arrives as its response tokens pooled over the batch,
and every term is a token mean over that pool (not a mean of per-sequence means: α, β, γ keep their published
meaning only so). Prompt tokens never appear; padding entries of variable-length rows contribute nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from curate.errors import CurateError
from train.losses.base import PAD_LOGPROB
from train.losses.forward_kl import ForwardKL
from train.token_rows import completion_ce

__all__ = ["TERMS", "PreferenceLoss", "SideTokens", "gather_sparse", "nll", "pad_mask", "sparse_kl"]

TERMS = ("nll", "kl_chosen", "kl_rejected", "adv")  # the named terms a preference loss may return (logged)


@dataclass
class SideTokens:
    """One side's response tokens pooled over the batch (N = all of them), with the teacher rows at each."""

    logprobs: Tensor  # [N, V] student full-vocab log-probs (temperature 1) at the side's response positions
    targets: Tensor  # [N] the response token ids
    top_ids: Tensor | None = None  # [N, k] teacher kept ids (padding: logprob -inf / advantage 0 + mask)
    teacher_logprobs: Tensor | None = None  # [N, k]
    residual: Tensor | None = None  # [N] teacher mass outside top_ids
    advantage: Tensor | None = None  # [N, k]
    pad: Tensor | None = None  # [N, k] bool, True on padding entries (variable-length rows)


class PreferenceLoss(ABC):
    """Maps (chosen, rejected) to {"loss": ..., <term>: ...}, every term a token mean over its side."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, chosen: SideTokens, rejected: SideTokens) -> dict[str, Tensor]:
        """The total under "loss" plus each named term (differentiable), for logging."""


def pad_mask(side: SideTokens) -> Tensor:
    """[N, k] True on padding: the given mask, else non-finite teacher log-probs, else nothing."""
    if side.top_ids is None:
        raise CurateError("this preference loss needs the teacher's top-k ids on both sides it reads")
    if side.pad is not None:
        return side.pad.to(torch.bool)
    if side.teacher_logprobs is not None:
        return ~torch.isfinite(side.teacher_logprobs)
    return torch.zeros_like(side.top_ids, dtype=torch.bool)


def gather_sparse(side: SideTokens) -> Tensor:
    """[N, k] the student's log-probs at the teacher's kept ids; padding entries read `PAD_LOGPROB` (exp = 0)."""
    pad = pad_mask(side)
    assert side.top_ids is not None  # checked by pad_mask
    picked = side.logprobs.gather(-1, side.top_ids.masked_fill(pad, 0).long())
    return picked.masked_fill(pad, PAD_LOGPROB)


def nll(side: SideTokens) -> Tensor:
    """Token-mean cross-entropy of the student on the side's response tokens."""
    return completion_ce(side.logprobs, side.targets.long())


def sparse_kl(side: SideTokens) -> Tensor:
    """Token mean of KL(p_T ‖ q_S) on the kept ids + one bucket with the cache's residual (none when k = V)."""
    if side.teacher_logprobs is None or side.residual is None:
        raise CurateError("the KL term needs the teacher's cached log-probs and residual on its side")
    if side.targets.numel() == 0:
        return side.logprobs.sum() * 0.0
    pad = pad_mask(side)
    teacher = side.teacher_logprobs.to(side.logprobs.dtype).masked_fill(pad, -torch.inf)
    complete = side.logprobs.shape[-1] <= teacher.shape[-1] and not bool(pad.any())
    return ForwardKL().token_loss(gather_sparse(side), teacher, side.residual, 1.0, complete=complete).mean()
