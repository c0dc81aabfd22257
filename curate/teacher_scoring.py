"""One teacher forward pass over a padded batch, reduced to what a KD cache keeps per completion token.

Only the logits of completion positions are projected onto the vocabulary (``logits_to_keep``), so caching
costs about what a bare forward pass costs; top-k, the exact residual mass and the entropy come from the
full-vocabulary log-softmax computed here in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from curate.models import accepts_logits_to_keep

ROWS_PER_REDUCTION = 512  # completion positions reduced at once: bounds the [rows, vocab] float32 buffers


@dataclass
class ScoredExample:
    """The teacher's view of one example's completion (numpy, float32 / int64)."""

    topk_ids: np.ndarray  # [T, k]
    topk_logprobs: np.ndarray  # [T, k], sorted descending
    residual: np.ndarray  # [T], 1 - sum(top-k probs), from the masked log-sum-exp (no cancellation)
    entropy: np.ndarray  # [T], nats
    label_logprobs: np.ndarray | None  # [num_labels] at the answer position (first completion token)
    full_logprobs: np.ndarray | None = None  # [T, V], only when asked for (benchmarks, tests)


def pad_batch(seqs: list[list[int]], pad_id: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask (right padding keeps positions 0..len-1 for every row)."""
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def completion_logits(model: Any, seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> torch.Tensor:
    """[N, V] logits predicting every completion token of the batch, rows in example order."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id, device)
    start = min(prompt_lens) - 1
    end = max(len(s) for s in seqs) - 1
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(start, end, device=device)
        logits = model(**kwargs).logits
        offset = start
    else:
        logits = model(**kwargs).logits
        offset = 0
    rows = [b for b, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)) for _ in range(p - 1, len(s) - 1)]
    cols = [q - offset for s, p in zip(seqs, prompt_lens, strict=True) for q in range(p - 1, len(s) - 1)]
    return logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]


@dataclass
class Reduced:
    """Per-row reductions of a [N, V] logits block (torch, float32 unless noted)."""

    topk_ids: torch.Tensor  # [N, k] int64
    topk_logprobs: torch.Tensor  # [N, k]
    residual: torch.Tensor  # [N] float64
    entropy: torch.Tensor  # [N]
    label_logprobs: torch.Tensor | None  # [N, num_labels]
    full_logprobs: torch.Tensor | None  # [N, V]


@torch.inference_mode()
def reduce_logits(logits: torch.Tensor, k: int, label_ids: torch.Tensor | None = None,
                  keep_full: bool = False) -> Reduced:
    """Top-k log-probs, residual mass and entropy of softmax(logits) without materialising log_softmax.

    Passes over the vocabulary: top-k, shift, exp, two sums. The residual is summed over the non-top-k
    entries directly (top-k zeroed), so a tiny residual keeps its precision instead of cancelling in 1 - sum.
    ``logits`` is overwritten (it is the caller's scratch copy).
    """
    x = logits.float()
    full = torch.log_softmax(x, dim=-1) if keep_full else None
    top, ids = torch.topk(x, k, dim=-1, sorted=True)
    m = top[:, :1]
    labels = x[:, label_ids] - m if label_ids is not None else None
    y = x.sub_(m)  # logits - max, in place
    e = torch.exp(y)
    e.scatter_(-1, ids, 0.0)
    rest = e.sum(-1).double()
    s_rest = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(-1).double()  # row-wise dot, fastest on CPU
    top_y = (top - m).double()
    e_top = top_y.exp()
    z = rest + e_top.sum(-1)
    logz = z.log()
    entropy = logz - (s_rest + (e_top * top_y).sum(-1)) / z
    return Reduced(
        topk_ids=ids,
        topk_logprobs=(top_y - logz[:, None]).float(),
        residual=rest / z,
        entropy=entropy.float(),
        label_logprobs=(labels.double() - logz[:, None]).float() if labels is not None else None,
        full_logprobs=full,
    )


@torch.inference_mode()
def score_batch(model: Any, seqs: list[list[int]], prompt_lens: list[int], *, k: int, pad_id: int,
                label_token_ids: list[int] | None = None, keep_full: bool = False) -> list[ScoredExample]:
    """Run the teacher once over prompt + completion for each sequence and reduce each completion token."""
    logits = completion_logits(model, seqs, prompt_lens, pad_id)
    labels = torch.tensor(label_token_ids, device=logits.device) if label_token_ids else None
    parts = [reduce_logits(logits[a: a + ROWS_PER_REDUCTION], k, labels, keep_full)
             for a in range(0, logits.shape[0], ROWS_PER_REDUCTION)]

    def cat(name: str) -> torch.Tensor | None:
        got = [getattr(r, name) for r in parts]
        return None if got[0] is None else torch.cat(got).cpu()

    ids, lps, res, ent, lab, full = (cat(n) for n in ("topk_ids", "topk_logprobs", "residual", "entropy",
                                                       "label_logprobs", "full_logprobs"))
    out, row = [], 0
    for s, p in zip(seqs, prompt_lens, strict=True):
        sl = slice(row, row + len(s) - p)
        out.append(
            ScoredExample(
                topk_ids=ids[sl].numpy().astype(np.int64),
                topk_logprobs=lps[sl].numpy(),
                residual=res[sl].numpy().astype(np.float32),
                entropy=ent[sl].numpy(),
                label_logprobs=lab[row].numpy().copy() if lab is not None else None,
                full_logprobs=full[sl].numpy() if full is not None else None,
            )
        )
        row = sl.stop
    return out
