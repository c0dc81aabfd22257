"""One teacher forward pass over a padded batch, reduced to what a KD cache keeps per completion token.

Only the logits of completion positions are projected onto the vocabulary (``logits_to_keep``), so caching
costs about what a bare forward pass costs; top-k, the exact residual mass and the entropy come from the
full-vocabulary log-softmax computed here in float32.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from curate.models import accepts_logits_to_keep

# Completion positions reduced at once. On a CPU the reduction makes about six passes over each [rows, vocab]
# block; 32 rows of a 49k vocabulary (6 MB) stay in a server's L3 cache between passes, which measured 1.4x
# faster than 512 rows on the 2-core box (97 against 138 ms per 768 rows). An accelerator wants big blocks.
ROWS_PER_REDUCTION = {"cpu": 32, "accelerator": 512}
TAIL_BLOCK = 256  # vocabulary block of the two-level tail sampler (block sums, then one block's entries)


def reduction_rows(device: torch.device) -> int:
    return ROWS_PER_REDUCTION["cpu" if device.type == "cpu" else "accelerator"]


@dataclass
class ScoredExample:
    """The teacher's view of one example's completion (numpy, float32 / int64)."""

    topk_ids: np.ndarray  # [T, k]
    topk_logprobs: np.ndarray  # [T, k], sorted descending
    residual: np.ndarray  # [T], 1 - sum(top-k probs), from the masked log-sum-exp (no cancellation)
    entropy: np.ndarray  # [T], nats
    label_logprobs: np.ndarray | None  # [num_labels] at the answer position (first completion token)
    full_logprobs: np.ndarray | None = None  # [T, V], only when asked for (benchmarks, tests)
    kept: np.ndarray | None = None  # [T] entries kept per token (top-p / sampling); None: all k
    sample_counts: np.ndarray | None = None  # [T, k] draws per kept id (sampling), 0 on padding
    sample_log_weights: np.ndarray | None = None  # [T, k] log p/proposal per kept id (tempered proposal only)
    tail_ids: np.ndarray | None = None  # [T, m] --tail-samples draws from the teacher outside the kept ids
    tail_logprobs: np.ndarray | None = None  # [T, m] their teacher log-probs; -inf where a row has no tail mass


def pad_batch(seqs: list[list[int]], pad_id: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask (right padding keeps positions 0..len-1 for every row)."""
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def completion_logit_views(model: Any, seqs: list[list[int]], prompt_lens: list[int],
                           pad_id: int) -> list[torch.Tensor]:
    """Per sequence, a [T_i, V] view of the logits predicting its completion tokens (no copy: each example's
    positions are contiguous in the model's [B, L, V] output)."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id, device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    offset = 0
    if accepts_logits_to_keep(model):
        offset = min(prompt_lens) - 1
        kwargs["logits_to_keep"] = torch.arange(offset, max(len(s) for s in seqs) - 1, device=device)
    logits = model(**kwargs).logits
    return [logits[b, p - 1 - offset: len(s) - 1 - offset]
            for b, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True))]


@torch.inference_mode()
def completion_logits(model: Any, seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> torch.Tensor:
    """[N, V] logits predicting every completion token of the batch, rows in example order (one copy of
    `completion_logit_views`)."""
    return torch.cat(completion_logit_views(model, seqs, prompt_lens, pad_id))


@dataclass
class Reduced:
    """Per-row reductions of a [N, V] logits block (torch, float32 unless noted). Rows keep ``kept`` entries;
    the rest of each row is padding (id repeated, log-prob -inf)."""

    topk_ids: torch.Tensor  # [N, k] int64
    topk_logprobs: torch.Tensor  # [N, k]
    residual: torch.Tensor  # [N] float64, mass outside the kept entries
    entropy: torch.Tensor  # [N]
    label_logprobs: torch.Tensor | None  # [N, num_labels]
    full_logprobs: torch.Tensor | None  # [N, V]
    kept: torch.Tensor | None = None  # [N] int64 entries kept (None: all k)
    sample_counts: torch.Tensor | None = None  # [N, k] int64
    sample_log_weights: torch.Tensor | None = None  # [N, k] float32, log p(id) - log proposal(id)
    tail_ids: torch.Tensor | None = None  # [N, m] int64, ascending
    tail_logprobs: torch.Tensor | None = None  # [N, m] float32


def _sampled_ids(x: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` draws per row from softmax(x) -> (distinct ids [N, samples] ascending, padded with the row's
    first id; their counts, 0 on padding; number of distinct ids [N]). Seeded, so reruns and shards agree."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    draws = torch.multinomial(torch.softmax(x, dim=-1), samples, replacement=True, generator=g)
    srt, _ = draws.sort(dim=-1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.cumsum(-1) - 1
    distinct = new.sum(-1)
    uids = torch.zeros_like(srt).scatter_(1, slot, srt)
    counts = torch.zeros_like(srt).scatter_add_(1, slot, torch.ones_like(srt))
    pad = torch.arange(samples, device=x.device)[None, :] >= distinct[:, None]
    return torch.where(pad, uids[:, :1], uids), counts, distinct


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N, ceil(V / TAIL_BLOCK)] sums of consecutive vocabulary blocks (the last one short), summed in the
    logits' dtype and returned as float64 for the cumulative sums of `_tail_draws`."""
    n, v = e.shape
    full = v // TAIL_BLOCK
    sums = e[:, : full * TAIL_BLOCK].reshape(n, full, TAIL_BLOCK).sum(-1)
    if v % TAIL_BLOCK:
        sums = torch.cat([sums, e[:, full * TAIL_BLOCK:].sum(-1, keepdim=True)], dim=-1)
    return sums.double()


def _below(values: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """values clamped strictly below bound (a draw may not land on a bucket's closing edge by rounding)."""
    return torch.minimum(values, torch.nextafter(bound, torch.zeros_like(bound)))


def _tail_draws(e: torch.Tensor, block_sums: torch.Tensor, y: torch.Tensor, top_ids: torch.Tensor,
                top_y: torch.Tensor, beyond: torch.Tensor, logz: torch.Tensor, m: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` draws per row (with replacement) from the teacher restricted to the ids outside its kept head.

    The tail is the non-top-k ids (``e`` = exp(y) with the top-k zeroed, summed per vocabulary block in
    ``block_sums``) plus the top-k entries past the row's kept count (exp(``top_y``) where ``beyond``). A draw picks
    the head remainder or a block by its mass, then an entry within the block: two small cumulative sums instead
    of a pass over the vocabulary (torch.multinomial would need a normalised [N, V] copy). Returns (ids [N, m]
    ascending, teacher log-probs [N, m]; -inf for every draw of a row without tail mass). Seeded by content."""
    n, v = e.shape
    g = torch.Generator(device=e.device).manual_seed(seed)
    extra = torch.where(beyond, top_y.exp(), 0.0).cumsum(-1)  # [N, k] float64
    blocks = block_sums.cumsum(-1)  # [N, nb] float64
    head_mass, block_mass = extra[:, -1:], blocks[:, -1:]
    u = torch.rand((n, m), generator=g, device=e.device, dtype=torch.float64) * (head_mass + block_mass)
    in_head = u < head_mass
    j = torch.searchsorted(extra, _below(u, head_mass), right=True).clamp(max=extra.shape[1] - 1)
    u = _below((u - head_mass).clamp(min=0), block_mass)
    blk = torch.searchsorted(blocks, u, right=True).clamp(max=blocks.shape[1] - 1)
    # where in the chosen block, as a fraction of its mass, then located among the block's own entries
    frac = (u - (blocks.gather(1, blk) - block_sums.gather(1, blk))) / block_sums.gather(1, blk).clamp(min=1e-300)
    cols = blk.unsqueeze(-1) * TAIL_BLOCK + torch.arange(TAIL_BLOCK, device=e.device)  # [N, m, B]
    vals = torch.where(cols < v, e.gather(1, cols.clamp(max=v - 1).view(n, -1)).view(n, m, TAIL_BLOCK), 0.0)
    inner = vals.double().cumsum(-1)
    at = _below(frac.clamp(0, 1) * inner[..., -1], inner[..., -1]).unsqueeze(-1)
    pos = torch.searchsorted(inner, at, right=True).squeeze(-1).clamp(max=TAIL_BLOCK - 1)
    tail_id = (blk * TAIL_BLOCK + pos).clamp(max=v - 1)  # the clamp only acts on rows without tail mass
    ids = torch.where(in_head, top_ids.gather(1, j), tail_id)
    lp = torch.where(in_head, top_y.gather(1, j), y.gather(1, tail_id).double()) - logz[:, None]
    lp = torch.where((head_mass + block_mass) > 0, lp, -torch.inf)
    ids, order = ids.sort(dim=-1, stable=True)
    return ids, lp.gather(1, order).float()


def row_kl(lp: torch.Tensor, residual_k: torch.Tensor, entropy: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, k] KL(teacher ‖ cache row keeping the top n) for n = 1..k, float64, in closed form: the kept entries
    are exact, the residual r_n is spread evenly over the other V - n ids (the rule of
    `curate.logit_codec.reconstruct_topk`), so KL = -H - sum_{i<=n} p_i log p_i - r_n log(r_n / (V - n))."""
    p = lp.exp()
    plogp = (p * lp).cumsum(-1)
    tail = p.flip(-1).cumsum(-1).flip(-1)  # tail[:, j] = sum_{i>=j} p_i
    r = residual_k[:, None] + torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], dim=-1)
    r = r.clamp(min=1e-12)
    n = torch.arange(1, lp.shape[-1] + 1, device=lp.device, dtype=torch.float64)
    return (-entropy[:, None] - plogp - r * torch.log(r / (vocab - n))).clamp(min=0)


@torch.inference_mode()
def reduce_logits(logits: torch.Tensor, k: int, label_ids: torch.Tensor | None = None,
                  keep_full: bool = False, *, top_p: float | None = None, k_min: int = 1,
                  entry_cost: float | None = None, samples: int | None = None, seed: int = 0,
                  proposal_temperature: float = 1.0, tail_samples: int = 0) -> Reduced:
    """Kept log-probs, residual mass and entropy of softmax(logits) without materialising log_softmax.

    Kept entries: the top-k; with ``top_p`` the smallest top prefix whose mass reaches it (at least
    ``k_min``, at most k); with ``entry_cost`` the n in [k_min, k] that minimises KL(teacher ‖ cache row) +
    entry_cost · n (the budget-optimal allocation; `row_kl`); with ``samples`` the distinct ids of that many
    draws from softmax(logits / proposal_temperature) (sorted by descending teacher probability, ties by id;
    with a tempered proposal each id also gets its importance log-weight log p - log proposal). With
    ``tail_samples`` m, also m draws from the teacher restricted to the ids outside the kept ones
    (`_tail_draws`). Passes over the vocabulary: top-k, shift, exp, two sums. The residual is summed over the
    other entries directly (kept ones zeroed), so a tiny residual keeps its precision instead of cancelling in
    1 - sum. ``logits`` is overwritten.
    """
    x = logits.float()
    full = torch.log_softmax(x, dim=-1) if keep_full else None
    counts = kept = log_w = None
    if samples:
        tau = proposal_temperature
        ids, counts, kept = _sampled_ids(x / tau if tau != 1.0 else x, samples, seed)
        m = x.max(dim=-1, keepdim=True).values
        valid = counts > 0
        if tau != 1.0:  # log p - log proposal, exactly (float64), before x is shifted in place below
            xs = x.gather(-1, ids).double()
            log_w = ((xs - torch.logsumexp(x.double(), -1, keepdim=True))
                     - (xs / tau - torch.logsumexp(x.double() / tau, -1, keepdim=True)))
        top = torch.where(valid, x.gather(-1, ids), -torch.inf)
        top, order = top.sort(dim=-1, descending=True, stable=True)  # ids ascend, so ties stay in id order
        ids, counts, valid = ids.gather(-1, order), counts.gather(-1, order), valid.gather(-1, order)
        if log_w is not None:
            log_w = torch.where(valid, log_w.gather(-1, order), 0.0).float()
    else:
        top, ids = torch.topk(x, k, dim=-1, sorted=True)
        m = top[:, :1]
        valid = torch.ones_like(top, dtype=torch.bool)
    labels = x[:, label_ids] - m if label_ids is not None else None
    y = x.sub_(m)  # logits - max, in place
    e = torch.exp(y)
    e.scatter_(-1, ids, 0.0)
    block_sums = _block_sums(e) if tail_samples and not samples else None
    # summed directly even when block sums exist: the residual (and so every kept row) is then the same bits
    # with and without tail draws, at the cost of one more pass over an in-cache block
    rest = e.sum(-1).double()
    s_rest = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(-1).double()  # row-wise dot, fastest on CPU
    top_y = (top - m).double()
    e_top = torch.where(valid, top_y.exp(), 0.0)
    z = rest + e_top.sum(-1)
    logz = z.log()
    entropy = logz - (s_rest + torch.where(valid, e_top * top_y, 0.0).sum(-1)) / z
    lp = top_y - logz[:, None]
    residual = rest / z
    if (top_p is not None or entry_cost is not None) and not samples:
        p = lp.exp()
        if entry_cost is not None:
            n = torch.arange(1, k + 1, device=lp.device, dtype=torch.float64)
            cost = row_kl(lp, residual, entropy.double(), x.shape[-1]) + entry_cost * n
            cost[:, : k_min - 1] = torch.inf
            kept = cost.argmin(-1) + 1
        else:
            kept = ((p.cumsum(-1) < top_p).sum(-1) + 1).clamp(min=k_min, max=k)
        tail = p.flip(-1).cumsum(-1).flip(-1)  # tail[:, j] = sum of entries j.. (no cancellation)
        tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=-1)
        residual = residual + tail.gather(-1, kept[:, None]).squeeze(-1)
    beyond = (torch.arange(lp.shape[-1], device=lp.device)[None, :] >= kept[:, None] if kept is not None
              else torch.zeros_like(lp, dtype=torch.bool))
    tail_ids = tail_lp = None
    if block_sums is not None:
        tail_ids, tail_lp = _tail_draws(e, block_sums, y, ids, top_y, beyond, logz, tail_samples, seed)
    if (top_p is not None or entry_cost is not None) and not samples:
        lp = torch.where(beyond, -torch.inf, lp)
    return Reduced(
        topk_ids=ids,
        topk_logprobs=lp.float(),
        residual=residual,
        entropy=entropy.float(),
        label_logprobs=(labels.double() - logz[:, None]).float() if labels is not None else None,
        full_logprobs=full,
        kept=kept,
        sample_counts=counts,
        sample_log_weights=log_w,
        tail_ids=tail_ids,
        tail_logprobs=tail_lp,
    )


@torch.inference_mode()
def score_batch(model: Any, seqs: list[list[int]], prompt_lens: list[int], *, k: int, pad_id: int,
                label_token_ids: list[int] | None = None, keep_full: bool = False, top_p: float | None = None,
                k_min: int = 1, entry_cost: float | None = None, samples: int | None = None,
                proposal_temperature: float = 1.0, tail_samples: int = 0) -> list[ScoredExample]:
    """Run the teacher once over prompt + completion for each sequence and reduce each completion token."""
    views = completion_logit_views(model, seqs, prompt_lens, pad_id)
    return scored_examples(views, seqs, prompt_lens, k=k, label_token_ids=label_token_ids, keep_full=keep_full,
                           top_p=top_p, k_min=k_min, entry_cost=entry_cost, samples=samples,
                           proposal_temperature=proposal_temperature, tail_samples=tail_samples)


def scored_examples(logits: torch.Tensor | list[torch.Tensor], seqs: list[list[int]], prompt_lens: list[int], *,
                    k: int, label_token_ids: list[int] | None = None, keep_full: bool = False,
                    top_p: float | None = None, k_min: int = 1, entry_cost: float | None = None,
                    samples: int | None = None, proposal_temperature: float = 1.0,
                    tail_samples: int = 0) -> list[ScoredExample]:
    """Completion logits of a batch ([N, V] as `completion_logits` gives, or per-example views as
    `completion_logit_views` gives) -> one `ScoredExample` per sequence (the logits are overwritten)."""
    lengths = [len(s) - p for s, p in zip(seqs, prompt_lens, strict=True)]
    views = list(logits.split(lengths)) if isinstance(logits, torch.Tensor) else logits
    device = views[0].device
    labels = torch.tensor(label_token_ids, device=device) if label_token_ids else None
    seed = zlib.crc32(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]).tobytes())  # from content
    step = reduction_rows(device)
    out, row = [], 0
    for view in views:
        parts = [reduce_logits(view[a: a + step], k, labels, keep_full, top_p=top_p, k_min=k_min,
                               entry_cost=entry_cost, samples=samples, seed=seed + row + a,
                               proposal_temperature=proposal_temperature, tail_samples=tail_samples)
                 for a in range(0, view.shape[0], step)]
        row += view.shape[0]

        def cat(name: str, parts: list[Reduced] = parts) -> np.ndarray | None:
            got = [getattr(r, name) for r in parts]
            return None if got[0] is None else torch.cat(got).cpu().numpy()

        ids, lps, res, ent, lab, full, kept, counts, log_w, tail_ids, tail_lp = (
            cat(n) for n in ("topk_ids", "topk_logprobs", "residual", "entropy", "label_logprobs", "full_logprobs",
                             "kept", "sample_counts", "sample_log_weights", "tail_ids", "tail_logprobs"))
        out.append(
            ScoredExample(
                topk_ids=ids.astype(np.int64),
                topk_logprobs=lps,
                residual=res.astype(np.float32),
                entropy=ent,
                label_logprobs=lab[0].copy() if lab is not None else None,
                full_logprobs=full,
                kept=kept.astype(np.int64) if kept is not None else None,
                sample_counts=counts.astype(np.int64) if counts is not None else None,
                sample_log_weights=log_w,
                tail_ids=tail_ids.astype(np.int64) if tail_ids is not None else None,
                tail_logprobs=tail_lp,
            )
        )
    return out


@torch.inference_mode()
def score_at_ids(model: Any, seqs: list[list[int]], prompt_lens: list[int], ids: list[np.ndarray],
                 kept: list[np.ndarray], *, pad_id: int, label_token_ids: list[int] | None = None,
                 keep_full: bool = False) -> list[ScoredExample]:
    """Score a model exactly at given ids (``--at-ids``): per completion token its full-vocabulary log-probs at
    ``ids[i][t, :kept[i][t]]`` (in the given order, not re-sorted), the mass outside them and the full entropy.

    ``ids[i]`` is [T_i, w] (rows padded past ``kept``, any id); rows of the result are padded the same way
    (log-prob -inf, id = the row's first id) and ``kept`` is passed through."""
    logits = completion_logits(model, seqs, prompt_lens, pad_id)
    labels = torch.tensor(label_token_ids, device=logits.device) if label_token_ids else None
    all_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64)).to(logits.device)
    all_kept = torch.from_numpy(np.concatenate(kept).astype(np.int64)).to(logits.device)
    width = all_ids.shape[1]
    valid = torch.arange(width, device=logits.device)[None, :] < all_kept[:, None]
    all_ids = torch.where(valid, all_ids, all_ids[:, :1])  # padding repeats a kept id: zeroing it twice is harmless
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("lp", "res", "ent", "lab", "full")}
    step = reduction_rows(logits.device)
    for a in range(0, logits.shape[0], step):
        sl = slice(a, a + step)
        full = torch.log_softmax(logits[sl].float(), dim=-1)
        e = full.exp()
        parts["ent"].append(-(e * full).sum(-1))
        e.scatter_(-1, all_ids[sl], 0.0)
        parts["res"].append(e.double().sum(-1))  # the rest summed directly: a tiny residual keeps its precision
        parts["lp"].append(torch.where(valid[sl], full.gather(-1, all_ids[sl]), -torch.inf))
        if labels is not None:
            parts["lab"].append(full[:, labels])
        if keep_full:
            parts["full"].append(full)
    lp, res, ent = (torch.cat(parts[n]).cpu() for n in ("lp", "res", "ent"))
    lab = torch.cat(parts["lab"]).cpu() if parts["lab"] else None
    full_all = torch.cat(parts["full"]).cpu() if parts["full"] else None
    out, row = [], 0
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        sl = slice(row, row + len(s) - p)
        out.append(ScoredExample(
            topk_ids=all_ids[sl].cpu().numpy(),
            topk_logprobs=lp[sl].numpy(),
            residual=res[sl].numpy().astype(np.float32),
            entropy=ent[sl].numpy(),
            label_logprobs=lab[row].numpy().copy() if lab is not None else None,
            full_logprobs=full_all[sl].numpy() if full_all is not None else None,
            kept=np.asarray(kept[i], dtype=np.int64),
        ))
        row = sl.stop
    return out
