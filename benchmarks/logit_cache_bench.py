"""Teacher-logit cache benchmark on SmolLM2-135M-Instruct (GGUF) over DFAR lr examples.

1. Fidelity vs size: for each k and quantisation scheme, bytes per completion token of the real cache table
   (all columns, parquet + zstd as the store writes it) and mean KL(full teacher || distribution rebuilt from
   the cache, residual spread over the other tokens), plus top-1 agreement of the rebuilt distribution.
   The teacher runs once with k=128; smaller k are prefixes of that top-128 (exactly what top-k would give).
2. Overhead: wall and CPU time of the whole caching pipeline (tokenize, forward, reduce, encode, write, merge)
   against a bare forward pass over the same padded, length-sorted batches, interleaved batch by batch so a
   shared machine's load hits all three alike (the median of per-batch ratios is the headline figure).
3. Size of a cache of the whole DFAR lr train split, from its exact completion-token count.

Run: ``python benchmarks/logit_cache_bench.py [--examples 200]``. Prints a table, writes
benchmarks/results/logit_cache_bench.json and logit_cache_bench.png. CPU only (no GPU part here).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import RESULTS, SHARED_DATA, emit  # noqa: E402
from builders.dfar import build_dfar  # noqa: E402
from builders.teacher_logits import LogitCacheConfig, Plan, cache_teacher_logits, plan_cache, unit_table  # noqa: E402
from curate.logit_codec import SCHEMES, decode_logprobs, encode_logprobs, reconstruct_topk  # noqa: E402
from curate.models import SMOLLM2, ModelRef, load_causal_lm, load_tokenizer  # noqa: E402
from curate.store import DatasetStore  # noqa: E402
from curate.teacher_scoring import ScoredExample, pad_batch, score_batch  # noqa: E402

KS = (8, 16, 32, 64, 128)
BATCH = 8


def batches(plan: Plan) -> list[list[int]]:
    """The pipeline's own batches: length-sorted units cut into batch_size runs."""
    bs = plan.params.batch_size
    return [u[a: a + bs] for u in plan.units for a in range(0, len(u), bs)]


def truncate(s: ScoredExample, k: int, full: np.ndarray) -> ScoredExample:
    """The top-k prefix of a top-128 result, with the exact residual of that k (from the full distribution)."""
    p_top = np.exp(full[np.arange(len(full))[:, None], s.topk_ids[:, :k]].astype(np.float64))
    return ScoredExample(s.topk_ids[:, :k], s.topk_logprobs[:, :k], (1 - p_top.sum(1)).clip(0).astype(np.float32),
                         s.entropy, s.label_logprobs)


def fidelity(model: Any, plan: Plan) -> tuple[list[dict], dict[str, float]]:
    """One teacher pass (top-128 + full log-probs); KL / top-1 / bytes for every (k, scheme)."""
    vocab = plan.vocab_size
    acc: dict[tuple[int, str], dict[str, float]] = {
        (k, s): {"kl": 0.0, "kl_bucket": 0.0, "top1": 0.0} for k in KS for s in SCHEMES}
    tables: dict[tuple[int, str], list[pa.Table]] = {key: [] for key in acc}
    tokens = 0
    t0 = time.perf_counter()
    for bi, idx in enumerate(batches(plan)):
        exs = [plan.examples[i] for i in idx]
        scored = score_batch(model, [e.input_ids for e in exs], [e.prompt_len for e in exs], k=max(KS),
                             pad_id=plan.pad_id, label_token_ids=plan.label_token_ids, keep_full=True)
        for s in scored:
            full = s.full_logprobs.astype(np.float64)
            neg_h = (np.exp(full) * full).sum(1)  # sum p log p, exact
            true_top1 = full.argmax(1)
            tokens += len(full)
            for k in KS:
                sk = truncate(s, k, full)
                p_top = np.exp(sk.topk_logprobs.astype(np.float64))
                for name, scheme in SCHEMES.items():
                    stored = decode_logprobs(encode_logprobs(sk.topk_logprobs, scheme), scheme)
                    resid = sk.residual.astype(np.float16).astype(np.float32)
                    log_top, log_other = reconstruct_topk(stored, resid, vocab)
                    r_true = sk.residual.astype(np.float64)
                    kl = neg_h - (p_top * log_top).sum(1) - r_true * log_other
                    # quantisation alone: KL over the k + 1 buckets (top-k tokens, "everything else")
                    log_r = np.log(np.maximum(r_true, 1e-300))
                    log_rq = log_other + np.log(vocab - k)
                    kl_b = (p_top * (np.log(p_top) - log_top)).sum(1)
                    kl_b += np.where(r_true > 0, r_true * (log_r - log_rq), 0)
                    # argmax of the rebuilt distribution; ties go to the lowest token id, as a dense argmax would
                    best = log_top.max(1, keepdims=True)
                    tied_ids = np.where(log_top >= best, sk.topk_ids, np.iinfo(np.int64).max)
                    acc[(k, name)]["kl"] += float(np.maximum(kl, 0).sum())
                    acc[(k, name)]["kl_bucket"] += float(np.maximum(kl_b, 0).sum())
                    acc[(k, name)]["top1"] += float((tied_ids.min(1) == true_top1).sum())
        for k in KS:
            trunc = [truncate(s, k, s.full_logprobs) for s in scored]
            for name in SCHEMES:
                kplan = replace(plan, params=replace(plan.params, k=k, quantization=name), scheme=SCHEMES[name])
                tables[(k, name)].append(unit_table(kplan, idx, trunc).drop_columns(["_row"]))
        print(f"  fidelity batch {bi + 1}: {tokens} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    breakdown: dict[str, float] = {}
    for (k, name), a in acc.items():
        buf = io.BytesIO()
        table = pa.concat_tables(tables[(k, name)])
        pq.write_table(table, buf, compression="zstd")  # the store's writer options
        rows.append({"k": k, "quantization": name, "bytes_per_token": buf.tell() / tokens,
                     "mean_kl": a["kl"] / tokens, "mean_kl_quantisation": a["kl_bucket"] / tokens,
                     "top1_agreement": a["top1"] / tokens})
        if (k, name) == (64, "u8-delta"):
            md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
            for g in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(g).column(c)
                    key = col.path_in_schema.split(".")[0]
                    breakdown[key] = breakdown.get(key, 0.0) + col.total_compressed_size / tokens
    return rows, breakdown


def cached_run(model: Any, tok: Any, store: DatasetStore, params: LogitCacheConfig) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = cache_teacher_logits(store, params, model=model, tokenizer=tok, progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu, result.version


def measure_overhead(model: Any, tok: Any, store: DatasetStore, plan: Plan, base: LogitCacheConfig) -> dict[str, Any]:
    """Per batch, interleaved (order rotated each batch): a bare forward with full logits, a bare forward with
    completion logits only, and the caching step (forward + reduce + encode + parquet). Interleaving puts all
    three under the same machine load, which a shared CPU box needs. The end-to-end pipeline (tokenize, plan,
    units, merge, version) is timed once on top."""
    from builders.teacher_logits import unit_table

    kplan = replace(plan, params=replace(plan.params, k=base.k, quantization=base.quantization),
                    scheme=SCHEMES[base.quantization])
    steps = {
        "full": lambda seqs, plens, idx: _bare(model, seqs, plens, plan.pad_id, keep=False),
        "keep": lambda seqs, plens, idx: _bare(model, seqs, plens, plan.pad_id, keep=True),
        "cache": lambda seqs, plens, idx: pq.write_table(unit_table(kplan, idx, score_batch(
            model, seqs, plens, k=base.k, pad_id=plan.pad_id, label_token_ids=plan.label_token_ids)),
            io.BytesIO(), compression="zstd"),
    }
    names = list(steps)
    first = batches(plan)[0]
    for name in names:  # warm-up
        steps[name]([plan.examples[i].input_ids for i in first], [plan.examples[i].prompt_len for i in first], first)
    per_batch: dict[str, list[float]] = {n: [] for n in names}
    cpu = dict.fromkeys(names, 0.0)
    for bi, idx in enumerate(batches(plan)):
        seqs = [plan.examples[i].input_ids for i in idx]
        plens = [plan.examples[i].prompt_len for i in idx]
        for name in names[bi % 3:] + names[: bi % 3]:
            w, c = time.perf_counter(), time.process_time()
            steps[name](seqs, plens, idx)
            per_batch[name].append(time.perf_counter() - w)
            cpu[name] += time.process_time() - c
        if bi % 5 == 4:
            print("  overhead batch", bi + 1, {n: round(sum(t), 1) for n, t in per_batch.items()}, flush=True)
    # Fixed costs around the per-batch work, each timed on its own: planning (read, tokenize, sort, hash the
    # teacher file), then computing the units, then merging into a version (read units, reorder, write, commit).
    w = time.perf_counter()
    cache_teacher_logits(store, base, model=model, tokenizer=tok, progress=False, max_units=0, merge=False)
    plan_s = time.perf_counter() - w
    w = time.perf_counter()
    report = cache_teacher_logits(store, base, model=model, tokenizer=tok, progress=False, merge=False)
    compute_s = time.perf_counter() - w
    w = time.perf_counter()
    version = cache_teacher_logits(store, base, model=model, tokenizer=tok, progress=False, merge_only=True).version
    merge_s = time.perf_counter() - w - plan_s
    totals = {n: sum(t) for n, t in per_batch.items()}
    ratio = {n: float(np.median(np.array(per_batch["cache"]) / np.array(per_batch[n]))) for n in ("full", "keep")}
    fixed = plan_s + max(merge_s, 0.0)
    return {
        "interleaved_s": {n: {"wall": totals[n], "cpu": cpu[n]} for n in names},
        "per_batch_wall_s": per_batch,
        "overhead_vs_full_forward_pct": 100 * (ratio["full"] - 1),
        "overhead_vs_completion_forward_pct": 100 * (ratio["keep"] - 1),
        "overhead_totals_vs_full_pct": 100 * (totals["cache"] / totals["full"] - 1),
        "overhead_totals_vs_completion_pct": 100 * (totals["cache"] / totals["keep"] - 1),
        "fixed_costs_s": {"plan": plan_s, "merge": merge_s},
        "fixed_costs_pct_of_full_forward": 100 * fixed / totals["full"],
        "end_to_end_s": {"plan": plan_s, "compute_units": compute_s, "merge": merge_s,
                         "units_computed": report.computed},
        "pipeline_tokens_per_s": sum(len(e.input_ids) for e in plan.examples) / (compute_s + fixed),
        "pipeline_bytes_per_token": version.manifest["params"]["bytes_per_token"],
    }


def _bare(model: Any, seqs: list[list[int]], plens: list[int], pad_id: int, keep: bool) -> None:
    with torch.inference_mode():
        ids, mask = pad_batch(seqs, pad_id, "cpu")
        kw = {"logits_to_keep": torch.arange(min(plens) - 1, ids.shape[1] - 1)} if keep else {}
        model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits.sum()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in SCHEMES:
        pts = sorted((r["bytes_per_token"], r["mean_kl"], r["k"]) for r in rows if r["quantization"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if name == "fp16":  # one labelled series keeps the plot readable; k grows left to right on every line
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bytes per completion token (all columns, parquet + zstd)")
    ax.set_ylabel("mean KL(teacher || cache reconstruction), nats")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M teacher-logit cache on DFAR lr: fidelity vs size")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(tmp)
        build_dfar(store, SHARED_DATA / "dfar")
        ref = ModelRef.parse(SMOLLM2)
        tok = load_tokenizer(ref)
        model = load_causal_lm(ref, dtype="float32", device="cpu").eval()
        base = LogitCacheConfig(model=SMOLLM2, splits=["train"], limit=args.examples, batch_size=BATCH,
                                dtype="float32", k=64, quantization="u8-delta")
        plan = plan_cache(store, replace(base, k=max(KS)), tok)
        n_tokens = sum(len(e.input_ids) - e.prompt_len for e in plan.examples)
        print(f"{len(plan.examples)} examples, {n_tokens} completion tokens, {len(batches(plan))} batches")

        overhead: dict[str, Any] = {}
        if not args.skip_overhead:
            overhead = measure_overhead(model, tok, store, plan, base)
        rows, breakdown = fidelity(model, plan)
        full_plan = plan_cache(store, replace(base, limit=None), tok)
        train_tokens = sum(len(e.input_ids) - e.prompt_len for e in full_plan.examples)
        for r in rows:
            r["train_split_mb"] = r["bytes_per_token"] * train_tokens / 1e6

    columns = ["k", "quantization", "bytes/token", "mean KL (nats)", "KL from quantisation", "top-1 agreement",
               "DFAR train cache (MB)"]
    table = [[r["k"], r["quantization"], round(r["bytes_per_token"], 1), float(f"{r['mean_kl']:.3g}"),
              float(f"{r['mean_kl_quantisation']:.2g}"), round(r["top1_agreement"], 4),
              round(r["train_split_mb"], 2)] for r in rows]
    table.sort(key=lambda r: (r[1], r[0]))
    extra = {
        "teacher": "SmolLM2-135M-Instruct.Q4_1.gguf (transformers, dequantised to float32, CPU)",
        "examples": len(plan.examples), "completion_tokens": n_tokens, "train_split_completion_tokens": train_tokens,
        "results": rows, "overhead": overhead, "bytes_per_token_by_column_k64_u8_delta": breakdown,
        "notes": "KL uses the exact full-vocabulary teacher distribution; the cache keeps top-k log-probs "
                 "(quantised), the residual mass (float16) and spreads it evenly over the other tokens. "
                 "No GPU part: this task had no GPU.",
    }
    emit("logit_cache_bench", f"Teacher-logit cache fidelity vs size ({len(plan.examples)} DFAR lr examples)",
         columns, table, extra)
    if overhead:
        o, t = overhead, overhead["interleaved_s"]
        print(f"overhead (interleaved per batch, median of per-batch ratios): caching step "
              f"{o['overhead_vs_full_forward_pct']:+.1f}% vs a bare forward with full logits, "
              f"{o['overhead_vs_completion_forward_pct']:+.1f}% vs one with completion logits only "
              f"(totals {t['cache']['wall']:.0f}s / {t['full']['wall']:.0f}s / {t['keep']['wall']:.0f}s); "
              f"fixed plan + merge {sum(o['fixed_costs_s'].values()):.1f}s "
              f"({o['fixed_costs_pct_of_full_forward']:.1f}% of the forward)")
    print("bytes/token by column (k=64, u8-delta):", {k: round(v, 2) for k, v in breakdown.items()})
    png = RESULTS / "logit_cache_bench.png"
    plot(rows, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
