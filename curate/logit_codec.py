"""Schema, quantisation and reader of teacher-logit caches (the contract between the cacher and KD training).

One parquet row per example. Per completion token ``t`` (``T = len(input_ids) - prompt_len``) the cache keeps
``n_t`` token ids and log-probs of the distribution that predicts ``input_ids[prompt_len + t]`` (logits at
position ``prompt_len + t - 1``): the top-k, or with ``--top-p`` / ``--entry-cost`` a per-token number of top
entries, or with ``--select sample`` the distinct ids of N draws. Also the probability mass outside the kept
ids (``residual``) and the full-vocabulary entropy. Target ids are not duplicated: they are ``input_ids[prompt_len:]``.

Columns (layout 2, the default; ``params.layout`` in the manifest)::

    id              string
    side            string, only when the parent has a ``side`` column (preferences ``sides``: "chosen" /
                    "rejected"); the row key is then (id, side)
    split           string
    label           int8, null when the parent has no label
    input_ids       list<uint16|uint32>              teacher tokenization of prompt + completion
    prompt_len      int32
    topk_ids        list<list<uint16|uint32>> [T][n_t]  kept ids, sorted by descending teacher probability;
                                                     n_t = k, or per token with --top-p / --select sample;
                                                     with --at-ids: exactly the other cache's ids, in its order
    topk_logprobs   list<list<float16|uint8>> [T][n_t]  their log-probs, encoded by the scheme below
    sample_counts   list<list<uint16>> [T][n_t]      only with --select sample: draws that hit each id
    sample_log_weights list<list<float32>> [T][n_t]  only with --proposal-temperature != 1: log p - log proposal
    tail_ids        list<list<uint16|uint32>> [T][m_t]  only with --tail-samples m: m draws (ascending ids, repeats
                                                     kept) from the teacher restricted to the ids outside the
                                                     kept ones; m_t = 0 where that tail has no mass
    residual        list<float16> [T]                1 - sum(kept probs), computed exactly at cache time
    entropy         list<float16> [T]                entropy (nats) of the full teacher distribution
    label_logprobs  list<float32> [num_labels]       log-softmax over the full vocab of each label's 1st token
    label_token_ids list<uint16|uint32> [num_labels] only when label words differ per subset (ethics instruct,
                                                     ``params.label_token_ids_by_subset``): the row's own label
                                                     first tokens, in the order of its label_logprobs

Layout 1 (caches written before v2, still read; ``--layout 1`` writes it): the same columns, every row
exactly k entries, no ``sample_counts``, no ``layout`` / ``max_entries`` in the manifest.

Ids: parquet dictionary-encodes the id lists, which already stores each id as a bit-packed index into the
ids present (about ceil(log2 distinct ids) bits) before zstd, so uint32 ids of a 152k vocabulary do not cost
4 bytes. Measured on SmolLM2 DFAR lr (9,173 tokens, k = 64, B/token, parquet + zstd): id lists 114.2;
explicitly packed at ceil(log2 V) = 16 bits 114.2; sorted by id with varint gaps (74.0) plus the
probability-order permutation (48.3) 122.3; and with the ids mapped into a 151,936 vocabulary, uint32 lists
114.8 against 144.1 packed at 18 bits. The lists are kept: they are the smallest and need no hand-written codec.

The reader (`iter_cache`, `CachedExample`) is the same for both layouts: rows are padded to the cache's
``max_entries`` (k) with id 0 and log-prob -inf (probability 0); losses and `reconstruct_topk` skip them.

Quantisation schemes (log-probs are raw, temperature 1; apply any temperature in the loss):

- ``fp16``: IEEE half floats.
- ``u8``: ``code = min(round(-logprob / step), 255)`` with ``step = 1/16`` nat (error <= 1/32 nat, floor -15.94
  nat: a clipped entry had p < 1.2e-7). DuckDB reads it as ``-code / 16``.
- ``u8-delta`` (default): the ``u8`` codes, stored as differences along the sorted order (first code, then
  non-negative gaps). Decodes to exactly the ``u8`` values; the small gaps compress far better.
- ``u8-delta-coarse``: ``step = 1/4`` nat (floor -63.75), delta-coded: the smallest, at some fidelity cost.
- ``u8-coarse``: the ``u8-delta-coarse`` codes without the delta step.

``--at-ids`` caches (``params.select == "at-ids"``, ``params.at_ids`` names the other cache) keep another
cache's ids, which are not sorted by this model's probability: delta schemes (which need descending rows)
are stored as their plain counterpart (``u8-delta`` -> ``u8``, ``u8-delta-coarse`` -> ``u8-coarse``), same step.

Sampled caches (``--select sample --samples N``): the kept ids are the distinct ids among N draws from the
teacher (or from a tempered proposal softmax(logits / tau), then with importance log-weights), ``sample_counts``
says how often each was drawn; `CachedExample.sample_weights` = counts / N (x p / proposal), so
``sum_j w_j (log p_j - log q_j)`` is an unbiased estimate of KL(p ‖ q) (`train.losses.base.sampled_forward_kl`).

Tail draws (``--tail-samples m``, ``params.tail_samples``): a top selection leaves the shape of the tail out
(a top-k cache is a biased estimate of the teacher). By the chain rule KL(p ‖ q) = KL over (kept ids + one
bucket) + r · KL(p|tail ‖ q|tail), and m draws from p|tail estimate the second term without bias
(`train.losses.base.tail_forward_kl`). Only the ids are stored (2.2-2.5 bytes a draw): the gradient needs
nothing else, and the teacher's own part of the term, sum over the tail of p log p, comes from the entropy
column (exact for fp16 rows, within the codes' rounding for u8). The kept rows, residual and everything else
are bit-identical to the same cache without draws, so readers that ignore the tail see an ordinary top cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError

if TYPE_CHECKING:
    from curate.store import Version

CACHE_CONFIG = "default"  # the config a cache version writes its rows under


@dataclass(frozen=True)
class Scheme:
    """How top-k log-probs are stored: half floats, or uint8 codes of a uniform step (optionally delta-coded)."""

    name: str
    step: float | None  # nats per code; None for fp16
    delta: bool = False

    @property
    def max_error(self) -> float:
        """Worst-case absolute error (nats) on an unclipped log-prob."""
        return 0.0 if self.step is None else self.step / 2

    @property
    def floor(self) -> float | None:
        """Lowest representable log-prob; smaller ones are clipped to it."""
        return None if self.step is None else -255 * self.step

    def arrow_type(self) -> pa.DataType:
        return pa.float16() if self.step is None else pa.uint8()

    def describe(self) -> dict[str, object]:
        return {"scheme": self.name, "step": self.step, "delta": self.delta, "floor": self.floor}


SCHEMES: dict[str, Scheme] = {
    "fp16": Scheme("fp16", None),
    "u8": Scheme("u8", 1 / 16),
    "u8-delta": Scheme("u8-delta", 1 / 16, delta=True),
    "u8-delta-coarse": Scheme("u8-delta-coarse", 1 / 4, delta=True),
    "u8-coarse": Scheme("u8-coarse", 1 / 4),
}
PLAIN_SCHEME = {"u8-delta": "u8", "u8-delta-coarse": "u8-coarse"}  # for rows not sorted by probability
DEFAULT_SCHEME = "u8-delta"


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise CurateError(f"--quantization must be one of {', '.join(SCHEMES)}, not {name!r}") from None


def encode_logprobs(logprobs: np.ndarray, scheme: Scheme) -> np.ndarray:
    """[T, k] log-probs sorted descending along k -> the stored array (float16 or uint8 codes)."""
    lp = np.asarray(logprobs, dtype=np.float32)
    if scheme.step is None:
        return lp.astype(np.float16)
    codes = np.clip(np.rint(-lp / scheme.step), 0, 255).astype(np.uint8)
    if scheme.delta:
        # Codes are non-decreasing along k (log-probs sorted descending), so every gap is in [0, 255].
        codes = np.diff(codes, axis=-1, prepend=np.zeros(codes.shape[:-1] + (1,), np.uint8)).astype(np.uint8)
    return codes


def decode_logprobs(stored: np.ndarray, scheme: Scheme) -> np.ndarray:
    """The inverse of `encode_logprobs` (up to quantisation): float32 log-probs [T, k]."""
    if scheme.step is None:
        return np.asarray(stored).astype(np.float32)
    codes = np.asarray(stored).astype(np.int32)
    if scheme.delta:
        codes = np.cumsum(codes, axis=-1)
    return (-codes * scheme.step).astype(np.float32)


def id_type(vocab_size: int) -> pa.DataType:
    """The smallest unsigned Arrow integer type that holds every token id."""
    if vocab_size <= 1 << 16:
        return pa.uint16()
    if vocab_size <= 1 << 32:
        return pa.uint32()
    return pa.uint64()


LAYOUT = 2  # what new caches are written as (layout 1 is still read, and written on request)


def cache_schema(vocab_size: int, scheme: Scheme, *, layout: int = LAYOUT, sampled: bool = False,
                 tempered: bool = False, row_labels: bool = False, sided: bool = False,
                 tail: bool = False) -> pa.Schema:
    ids = id_type(vocab_size)
    fields = [
        ("id", pa.string()),
        *([("side", pa.string())] if sided else []),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("input_ids", pa.list_(ids)),
        ("prompt_len", pa.int32()),
        ("topk_ids", pa.list_(pa.list_(ids))),
        ("topk_logprobs", pa.list_(pa.list_(scheme.arrow_type()))),
    ]
    if sampled:
        fields.append(("sample_counts", pa.list_(pa.list_(pa.uint16()))))
    if sampled and tempered:
        fields.append(("sample_log_weights", pa.list_(pa.list_(pa.float32()))))
    if tail:
        fields.append(("tail_ids", pa.list_(pa.list_(ids))))
    fields += [
        ("residual", pa.list_(pa.float16())),
        ("entropy", pa.list_(pa.float16())),
        ("label_logprobs", pa.list_(pa.float32())),
    ]
    if row_labels:
        fields.append(("label_token_ids", pa.list_(ids)))
    return pa.schema(fields)


@dataclass
class CachedExample:
    """One example as KD training consumes it (dequantised, numpy)."""

    id: str
    input_ids: np.ndarray  # int64 [L]: teacher tokenization of prompt + completion
    prompt_len: int  # completion tokens are input_ids[prompt_len:]
    topk_ids: np.ndarray  # int64 [T, k]; row t predicts input_ids[prompt_len + t]; padding: id 0
    topk_logprobs: np.ndarray  # float32 [T, k], raw log-probs, sorted descending; padding: -inf
    residual: np.ndarray  # float32 [T], mass outside the kept entries (>= 0)
    label: int | None
    label_logprobs: np.ndarray | None  # float32 [num_labels]
    entropy: np.ndarray | None = None  # float32 [T], full-distribution entropy (nats)
    split: str | None = None
    sample_weights: np.ndarray | None = None  # float32 [T, k], sampled caches only: counts / N (0 on padding)
    label_token_ids: np.ndarray | None = None  # int64 [num_labels], per-subset-word caches only: this row's words
    side: str | None = None  # "chosen" / "rejected" when the parent has a side column; the key is (id, side)
    tail_ids: np.ndarray | None = None  # int64 [T, m], --tail-samples caches only: draws outside the kept ids;
    # -1 on padding (a token whose tail has no mass has no draws)

    @property
    def target_ids(self) -> np.ndarray:
        return self.input_ids[self.prompt_len:]


def _nested(col: pa.Array, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets, flat values) of a list<...> column; for list<list<>> the values are reshaped to [-1, k]."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy(zero_copy_only=False)
    values = col.flatten()
    if k is not None:
        values = values.flatten()
        return offsets, values.to_numpy(zero_copy_only=False).reshape(-1, k) if len(values) else np.zeros((0, k))
    return offsets, values.to_numpy(zero_copy_only=False)


def _padded_entries(col: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A list<list<v>> column with variable inner lengths -> (example offsets over tokens, [tokens, width]
    values padded with 0, validity mask, per-token lengths)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    outer = col.offsets.to_numpy(zero_copy_only=False)
    inner_col = col.flatten()
    inner = inner_col.offsets.to_numpy(zero_copy_only=False)
    flat = inner_col.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(inner)
    if len(lengths) and int(lengths.max()) > width:
        raise CurateError(f"a cache row keeps {int(lengths.max())} entries, more than its k / max_entries {width}")
    tok = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(flat)) - np.repeat(inner[:-1] - inner[0], lengths)
    values = np.zeros((len(lengths), width), dtype=flat.dtype if len(flat) else np.float32)
    values[tok, pos] = flat
    valid = np.zeros((len(lengths), width), dtype=bool)
    valid[tok, pos] = True
    return outer, values, valid, lengths


def decode_batch(batch: pa.RecordBatch | pa.Table, scheme: Scheme, k: int, *, ragged: bool = False,
                 samples: int | None = None, tail_samples: int = 0) -> list[CachedExample]:
    """Arrow rows -> CachedExample objects (vectorised per column, then sliced per row).

    ``ragged`` (layout 2): rows of up to ``k`` entries, padded to k (id 0, log-prob -inf); ``samples``: the
    draws per token of a sampled cache (weights = counts / samples); ``tail_samples``: the tail draws per token
    (rows padded to it the same way)."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
    n = batch.num_rows
    names = batch.schema.names
    ids = batch.column("id").to_pylist()
    splits = batch.column("split").to_pylist() if "split" in names else [None] * n
    sides = batch.column("side").to_pylist() if "side" in names else [None] * n
    labels = batch.column("label").to_pylist()
    prompt_lens = batch.column("prompt_len").to_pylist()
    in_off, in_vals = _nested(batch.column("input_ids"))
    weights = None
    if ragged:
        tk_off, codes, valid, _ = _padded_entries(batch.column("topk_logprobs"), k)
        tk_lp = np.where(valid, decode_logprobs(codes, scheme), -np.inf).astype(np.float32)
        _, tk_ids, _, _ = _padded_entries(batch.column("topk_ids"), k)
        if "sample_counts" in names:
            _, counts, _, _ = _padded_entries(batch.column("sample_counts"), k)
            weights = counts.astype(np.float32) / float(samples or 1)
            if "sample_log_weights" in names:
                _, log_w, _, _ = _padded_entries(batch.column("sample_log_weights"), k)
                weights = (weights * np.exp(log_w.astype(np.float64))).astype(np.float32)
    else:
        tk_off, tk_ids = _nested(batch.column("topk_ids"), k)
        _, tk_lp = _nested(batch.column("topk_logprobs"), k)
        tk_lp = decode_logprobs(tk_lp, scheme)
    tail_ids = None
    if tail_samples and "tail_ids" in names:
        _, drawn, valid, _ = _padded_entries(batch.column("tail_ids"), tail_samples)
        tail_ids = np.where(valid, drawn.astype(np.int64), -1)
    _, resid = _nested(batch.column("residual"))
    _, ent = _nested(batch.column("entropy"))
    lab_col = batch.column("label_logprobs")
    lab_off, lab_vals = _nested(lab_col)
    lab_valid = lab_col.is_valid().to_pylist()
    row_ids = batch.column("label_token_ids").to_pylist() if "label_token_ids" in names else [None] * n
    out = []
    for i in range(n):
        a, b = tk_off[i], tk_off[i + 1]
        out.append(
            CachedExample(
                id=ids[i],
                input_ids=in_vals[in_off[i]:in_off[i + 1]].astype(np.int64),
                prompt_len=int(prompt_lens[i]),
                topk_ids=tk_ids[a:b].astype(np.int64),
                topk_logprobs=tk_lp[a:b],
                residual=np.maximum(resid[a:b].astype(np.float32), 0.0),
                label=labels[i],
                label_logprobs=lab_vals[lab_off[i]:lab_off[i + 1]].astype(np.float32) if lab_valid[i] else None,
                entropy=ent[a:b].astype(np.float32),
                split=splits[i],
                sample_weights=weights[a:b] if weights is not None else None,
                label_token_ids=np.asarray(row_ids[i], dtype=np.int64) if row_ids[i] is not None else None,
                side=sides[i],
                tail_ids=tail_ids[a:b] if tail_ids is not None else None,
            )
        )
    return out


def cache_params(version: Version) -> dict:
    params = version.manifest.get("params", {})
    if "k" not in params or "quantization" not in params:
        raise CurateError(f"{version.ref} is not a teacher-logit cache (its manifest has no k / quantization)")
    return params


def iter_cache(version: Version, split: str | None = None, batch_rows: int = 256) -> Iterator[CachedExample]:
    """Stream a cache version's examples (all splits, or one), in the parent's row order."""
    params = cache_params(version)
    scheme = get_scheme(params["quantization"])
    width = int(params.get("max_entries", params["k"]))
    ragged = int(params.get("layout", 1)) >= 2
    samples = params.get("samples") if params.get("select") == "sample" else None
    tail_samples = int(params.get("tail_samples") or 0)
    for path in version.files(CACHE_CONFIG, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield from decode_batch(batch, scheme, width, ragged=ragged, samples=samples, tail_samples=tail_samples)


def load_cache(version: Version, split: str | None = None) -> list[CachedExample]:
    return list(iter_cache(version, split))


# The mass a residual stored as 0 stands for. fp16 rounds masses below 2^-25 (~3e-8) to 0, so a stored 0 means
# "somewhere in [0, 3e-8)"; 1e-8 lies inside. Also the floor of both KD buckets (train/losses/base.py), where
# float32 sums cannot resolve smaller masses either.
RESIDUAL_FLOOR = 1e-8


def reconstruct_topk(topk_logprobs: np.ndarray, residual: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distribution a cache row stands for, in closed form: (log q of the kept entries [T, k], log q of
    each of the other V - n_t tokens [T]). The kept entries are renormalised to 1 - residual; the residual
    (floored at `RESIDUAL_FLOOR`) is spread evenly over the rest. Padding (-inf) stays -inf. KD losses and the
    benchmark's KL use this."""
    lp = topk_logprobs.astype(np.float64)
    resid = np.clip(residual.astype(np.float64), RESIDUAL_FLOOR, 1.0)
    lse = np.logaddexp.reduce(lp, axis=1)
    log_top = lp - lse[:, None] + np.log1p(-np.minimum(resid, 1 - 1e-12))[:, None]
    rest = np.maximum(vocab_size - np.isfinite(lp).sum(1), 1)
    return log_top, np.log(resid / rest)


def reconstruct_logprobs(topk_ids: np.ndarray, topk_logprobs: np.ndarray, residual: np.ndarray,
                         vocab_size: int) -> np.ndarray:
    """Dense [T, V] log-distribution of `reconstruct_topk` (tests, small inspections)."""
    log_top, log_other = reconstruct_topk(topk_logprobs, residual, vocab_size)
    dense = np.repeat(log_other[:, None], vocab_size, axis=1)
    rows, cols = np.nonzero(np.isfinite(log_top))
    dense[rows, topk_ids[rows, cols].astype(np.int64)] = log_top[rows, cols]
    return dense
