"""Teacher-logit cache benchmark on SmolLM2-135M-Instruct (GGUF) over DFAR lr examples.

1. Fidelity vs size: for each selection (fixed k, --top-p, --entry-cost, the presets, sampled rows) and
   quantisation scheme, bytes per completion token of the real cache table (all columns, parquet + zstd as
   the store writes it) and mean KL(full teacher || distribution rebuilt from the cache, residual spread
   evenly over the other tokens), plus top-1 agreement. The teacher runs once per batch; every setting reduces
   the same logits with the cacher's own code (`scored_examples` + `unit_table`).
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
from builders.teacher_logits import (  # noqa: E402
    PRESETS,
    LogitCacheConfig,
    Plan,
    cache_teacher_logits,
    plan_cache,
    unit_table,
)
from curate.logit_codec import SCHEMES, decode_logprobs, encode_logprobs, reconstruct_topk  # noqa: E402
from curate.models import SMOLLM2, ModelRef, load_causal_lm, load_tokenizer  # noqa: E402
from curate.store import DatasetStore  # noqa: E402
from curate.teacher_scoring import completion_logits, pad_batch, score_batch, scored_examples  # noqa: E402

KS = (8, 16, 32, 64, 128)
BATCH = 8


def batches(plan: Plan) -> list[list[int]]:
    """The pipeline's own batches: length-sorted units cut into batch_size runs."""
    bs = plan.params.batch_size
    return [u[a: a + bs] for u in plan.units for a in range(0, len(u), bs)]


# Settings measured: (label, LogitCacheConfig fields). Fixed k for every scheme (the earlier table), then the
# per-token selections the preset is chosen from.
SETTINGS: list[tuple[str, dict[str, Any]]] = (
    [(f"k={k} {q}", {"k": k, "quantization": q}) for k in KS for q in SCHEMES]
    + [(f"top-p {tp} k<={k} k_min={m} {q}", {"k": k, "top_p": tp, "k_min": m, "quantization": q})
       for tp, k, m in ((0.95, 96, 8), (0.98, 64, 8), (0.97, 96, 8)) for q in ("u8-delta", "u8-delta-coarse")]
    + [(f"entry-cost {c} k<={k} {q}", {"k": k, "entry_cost": c, "quantization": q})
       for c in (0.003, 0.004, 0.005, 0.006) for k in (128,) for q in ("u8-delta", "u8-delta-coarse")]
    + [(f"entry-cost {c} k<=128 u8-delta-coarse", {"k": 128, "entry_cost": c, "quantization": "u8-delta-coarse"})
       for c in (0.0045, 0.0055)]
    + [(f"sample N={n} {q}", {"select": "sample", "samples": n, "k": 1, "quantization": q})
       for n in (16, 48) for q in ("u8-delta",)]
    + [(f"preset {name}", dict(values)) for name, values in PRESETS.items()]
    + [(f"preset small --tail-samples {m}", {**PRESETS["small"], "tail_samples": m}) for m in (2, 4)]
)
TAIL = 4  # --tail-samples of the overhead's fourth step


@np.errstate(invalid="ignore")  # 0 * -inf on padding, masked by np.where
def fidelity(model: Any, plan: Plan) -> tuple[list[dict], dict[str, float]]:
    """One teacher pass per batch; every setting reduces the same logits. KL / top-1 / bytes per setting."""
    vocab = plan.vocab_size
    acc = {label: {"kl": 0.0, "kl_bucket": 0.0, "top1": 0.0, "entries": 0.0} for label, _ in SETTINGS}
    tables: dict[str, list[pa.Table]] = {label: [] for label, _ in SETTINGS}
    tokens = 0
    t0 = time.perf_counter()
    for bi, idx in enumerate(batches(plan)):
        exs = [plan.examples[i] for i in idx]
        seqs, plens = [e.input_ids for e in exs], [e.prompt_len for e in exs]
        logits = completion_logits(model, seqs, plens, plan.pad_id)
        full_all = torch.log_softmax(logits.double(), dim=-1).numpy()
        tokens += len(full_all)
        neg_h_all = (np.exp(full_all) * full_all).sum(1)
        for label, fields in SETTINGS:
            cfg = replace(plan.params, **{"top_p": None, "entry_cost": None, "k_min": 1, "select": "top",
                                          "tail_samples": 0, **fields})
            scheme = SCHEMES[cfg.quantization]
            scored = scored_examples(logits.clone(), seqs, plens, k=cfg.k, label_token_ids=plan.label_token_ids,
                                     top_p=cfg.top_p, k_min=cfg.k_min, entry_cost=cfg.entry_cost,
                                     samples=cfg.samples if cfg.select == "sample" else None,
                                     tail_samples=cfg.tail_samples)
            kplan = replace(plan, params=cfg, scheme=scheme)
            tables[label].append(unit_table(kplan, idx, scored).drop_columns(["_row"]))
            row = 0
            a = acc[label]
            for s in scored:
                n = len(s.residual)
                full, neg_h = full_all[row: row + n], neg_h_all[row: row + n]
                row += n
                kept = np.isfinite(s.topk_logprobs)
                stored = np.where(kept, decode_logprobs(encode_logprobs(s.topk_logprobs, scheme), scheme), -np.inf)
                resid = s.residual.astype(np.float16).astype(np.float32)
                log_top, log_other = reconstruct_topk(stored, resid, vocab)
                p_top = np.where(kept, np.exp(np.take_along_axis(full, s.topk_ids, 1)), 0.0)
                r_true = np.clip(1 - p_top.sum(1), 0, 1)
                kl = neg_h - np.where(kept, p_top * log_top, 0).sum(1) - r_true * log_other
                # quantisation alone: KL over the kept entries + one bucket for everything else
                log_rq = log_other + np.log(vocab - kept.sum(1))
                kl_b = np.where(kept, p_top * (np.log(np.maximum(p_top, 1e-300)) - log_top), 0).sum(1)
                kl_b += np.where(r_true > 0, r_true * (np.log(np.maximum(r_true, 1e-300)) - log_rq), 0)
                best = np.where(kept, log_top, -np.inf).max(1, keepdims=True)
                tied = np.where(kept & (log_top >= best), s.topk_ids, np.iinfo(np.int64).max)
                a["kl"] += float(np.maximum(kl, 0).sum())
                a["kl_bucket"] += float(np.maximum(kl_b, 0).sum())
                a["top1"] += float((tied.min(1) == full.argmax(1)).sum())
                a["entries"] += float(kept.sum())
        print(f"  fidelity batch {bi + 1}: {tokens} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    breakdown: dict[str, float] = {}
    for label, fields in SETTINGS:
        a = acc[label]
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(tables[label]), buf, compression="zstd")  # the store's writer options
        rows.append({"setting": label, **fields, "bytes_per_token": buf.tell() / tokens,
                     "mean_kl": a["kl"] / tokens, "mean_kl_quantisation": a["kl_bucket"] / tokens,
                     "top1_agreement": a["top1"] / tokens, "mean_entries": a["entries"] / tokens})
        if label.startswith("preset small") or label == "k=64 u8-delta":
            md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
            part: dict[str, float] = {}
            for g in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(g).column(c)
                    key = col.path_in_schema.split(".")[0]
                    part[key] = part.get(key, 0.0) + col.total_compressed_size / tokens
            breakdown[label] = part  # type: ignore[assignment]
    return rows, breakdown


def cached_run(model: Any, tok: Any, store: DatasetStore, params: LogitCacheConfig) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = cache_teacher_logits(store, params, model=model, tokenizer=tok, progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu, result.version


def measure_overhead(model: Any, tok: Any, store: DatasetStore, plan: Plan, base: LogitCacheConfig) -> dict[str, Any]:
    """Per batch, interleaved (order rotated each batch): a bare forward with full logits, a bare forward with
    completion logits only, the caching step (forward + reduce + encode + parquet), and the same with
    ``--tail-samples``. Interleaving puts all
    four under the same machine load, which a shared CPU box needs. The end-to-end pipeline (tokenize, plan,
    units, merge, version) is timed once on top."""
    from builders.teacher_logits import unit_table

    kplan = replace(plan, params=base, scheme=SCHEMES[base.quantization])
    tplan = replace(kplan, params=replace(base, tail_samples=TAIL))
    steps = {
        "full": lambda seqs, plens, idx: _bare(model, seqs, plens, plan.pad_id, keep=False),
        "keep": lambda seqs, plens, idx: _bare(model, seqs, plens, plan.pad_id, keep=True),
        "cache": lambda seqs, plens, idx: pq.write_table(unit_table(kplan, idx, score_batch(
            model, seqs, plens, k=base.k, pad_id=plan.pad_id, label_token_ids=plan.label_token_ids,
            top_p=base.top_p, k_min=base.k_min, entry_cost=base.entry_cost)), io.BytesIO(), compression="zstd"),
        "cache_tail": lambda seqs, plens, idx: pq.write_table(unit_table(tplan, idx, score_batch(
            model, seqs, plens, k=base.k, pad_id=plan.pad_id, label_token_ids=plan.label_token_ids,
            top_p=base.top_p, k_min=base.k_min, entry_cost=base.entry_cost, tail_samples=TAIL)), io.BytesIO(),
            compression="zstd"),
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
        for name in names[bi % len(names):] + names[: bi % len(names)]:
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
    tail_ratio = float(np.median(np.array(per_batch["cache_tail"]) / np.array(per_batch["keep"])))
    fixed = plan_s + max(merge_s, 0.0)
    return {
        "interleaved_s": {n: {"wall": totals[n], "cpu": cpu[n]} for n in names},
        "per_batch_wall_s": per_batch,
        "overhead_vs_full_forward_pct": 100 * (ratio["full"] - 1),
        "overhead_vs_completion_forward_pct": 100 * (ratio["keep"] - 1),
        f"overhead_with_tail_samples_{TAIL}_vs_completion_forward_pct": 100 * (tail_ratio - 1),
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


# DistillKit's two settings as issue 14 measured them (2,560 DFAR L+R tokens, same teacher); not rerun here.
DISTILLKIT = [{"setting": "DistillKit k=128 polynomial (recommended)", "bytes_per_token": 312, "mean_kl": 0.294},
              {"setting": "DistillKit k=50 (budget)", "bytes_per_token": 114, "mean_kl": 0.497}]
GOAL = {"bytes_per_token": 100, "mean_kl": 0.29}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families = {"fixed k, u8-delta": lambda r: r["setting"].startswith("k=") and r["quantization"] == "u8-delta",
                "fixed k, fp16": lambda r: r["setting"].startswith("k=") and r["quantization"] == "fp16",
                "--top-p, u8-delta": lambda r: r["setting"].startswith("top-p") and r["quantization"] == "u8-delta",
                "--entry-cost, u8-delta": lambda r: (r["setting"].startswith("entry-cost")
                                                     and r["quantization"] == "u8-delta"),
                "--entry-cost, u8-delta-coarse": lambda r: (r["setting"].startswith("entry-cost")
                                                            and r["quantization"] == "u8-delta-coarse"),
                "--select sample": lambda r: r["setting"].startswith("sample")}
    for name, keep in families.items():
        pts = sorted((r["bytes_per_token"], r["mean_kl"]) for r in rows if keep(r))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=name)
    for r in rows:
        if r["setting"].startswith("preset") and "tail" not in r["setting"]:
            ax.plot(r["bytes_per_token"], r["mean_kl"], "k*", ms=14, label=r["setting"])
    tails = sorted((r["bytes_per_token"], r["mean_kl"]) for r in rows if "--tail-samples" in r["setting"])
    if tails:  # the draws add bytes, not reconstruction fidelity: their use is the unbiased KD tail term
        ax.plot([t[0] for t in tails], [t[1] for t in tails], "kx", ms=7, label="preset small + 2 / 4 tail draws")
    for d in DISTILLKIT:
        ax.plot(d["bytes_per_token"], d["mean_kl"], "s", ms=8, label=d["setting"] + " [issue 14]")
    ax.axvline(GOAL["bytes_per_token"], color="grey", ls=":", lw=1)
    ax.axhline(GOAL["mean_kl"], color="grey", ls=":", lw=1)
    ax.set_xlabel("bytes per completion token (all columns, parquet + zstd)")
    ax.set_ylabel("mean KL(teacher || cache reconstruction), nats")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M teacher-logit cache on DFAR lr: size vs fidelity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
                                dtype="float32", **PRESETS["small"], preset="small")  # overhead: the preset
        plan = plan_cache(store, base, tok)
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

    columns = ["setting", "entries/token", "bytes/token", "mean KL (nats)", "KL from quantisation",
               "top-1 agreement", "DFAR train cache (MB)", "meets goal"]
    for r in rows:
        r["meets_goal"] = r["bytes_per_token"] <= GOAL["bytes_per_token"] and r["mean_kl"] <= GOAL["mean_kl"]
    table = [[r["setting"], round(r["mean_entries"], 1), round(r["bytes_per_token"], 1),
              float(f"{r['mean_kl']:.3g}"), float(f"{r['mean_kl_quantisation']:.2g}"), round(r["top1_agreement"], 4),
              round(r["train_split_mb"], 2), r["meets_goal"]] for r in rows]
    extra = {
        "teacher": "SmolLM2-135M-Instruct.Q4_1.gguf (transformers, dequantised to float32, CPU)",
        "examples": len(plan.examples), "completion_tokens": n_tokens, "train_split_completion_tokens": train_tokens,
        "results": rows, "overhead": overhead, "bytes_per_token_by_column": breakdown,
        "goal": GOAL, "distillkit_from_issue_14": DISTILLKIT, "presets": PRESETS,
        "notes": "KL uses the exact full-vocabulary teacher distribution; the cache keeps the selected log-probs "
                 "(quantised), the residual mass (float16) and spreads it evenly over the other tokens. "
                 "DistillKit points are issue 14's measurement, not rerun. No GPU part.",
        "machine_load": os.getloadavg(),
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
              f"({o['fixed_costs_pct_of_full_forward']:.1f}% of the forward); with --tail-samples {TAIL} "
              f"{o[f'overhead_with_tail_samples_{TAIL}_vs_completion_forward_pct']:+.1f}% vs the completion forward")
    for label, part in breakdown.items():
        print(f"bytes/token by column ({label}):", {k: round(v, 2) for k, v in part.items()})
    png = RESULTS / "logit_cache_bench.png"
    plot(rows, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
