"""Student log-probs at the supervised positions only: the one place SFT and KD touch the logits.

Only positions that predict a completion token are projected to the vocabulary (``logits_to_keep``) and
log-softmaxed, so the [tokens, vocab] buffers cover completions, not prompts or padding. Both trainers use
it, which keeps the KD-vs-SFT step-time comparison about the KD term alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curate.models import accepts_logits_to_keep
from train.data import IGNORE

__all__ = ["accepts_logits_to_keep", "completion_ce", "logprobs_at", "supervised_positions"]


def supervised_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, logit position, target id) per supervised token: logits at position p predict labels[p + 1]."""
    rows, pos = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows, pos, labels[rows, pos + 1]


def logprobs_at(model: Any, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor, pos: Tensor,
                position_ids: Tensor | None = None) -> Tensor:
    """[N, V] float32 log-softmax of the student's logits at (rows, pos); packed rows come with restarting
    ``position_ids`` and no attention mask (see `train.data.pack`)."""
    width = input_ids.shape[1]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    offset = 0
    if rows.numel() and accepts_logits_to_keep(model):
        keep = width - int(pos.min())
        kwargs["logits_to_keep"] = keep
        offset = width - keep
    logits = model(**kwargs).logits
    picked = logits[rows, pos - offset]
    return torch.log_softmax(picked.float(), dim=-1)


def completion_ce(logprobs: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of the gold tokens (0 with a graph when there are none)."""
    if targets.numel() == 0:
        return logprobs.sum() * 0.0
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
