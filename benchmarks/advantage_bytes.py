"""Bytes per token of the ADPA advantage table (`curate build advantage`) against the public reference layout.

Data: a preferences-like `sides` table of N DFAR train pairs (chosen = the gold `lr` completion; rejected =
the opposite label word with another row's reason), written through the store. Teacher: SmolLM2-135M-Instruct
(GGUF, float32 on CPU), cached at k = 50 in fp16 (so A is continuous, like the public fp16-derived values).
Reference: no SFT/DPO pair of SmolLM2 ships with the toolkit, so the reference is the same model with
Gaussian noise on every weight (sigma = a fraction of each tensor's std: "near" and "far"), scored with
`--at-ids` the teacher cache. The table stores the teacher's ids plus one int8 code per entry, so the models
only move the codes' entropy (mean |A| is reported beside each row).

Rows: each advantage setting's bytes per advantage (rejected) token of the whole version (parquet + zstd,
all columns, as the store writes it), the codes' share, clamped entries, and the public reference's layout
(top-50 ids as int64 + advantages as float64 lists: 16 * k = 800 B/token raw, and the same written to
parquet + zstd for a like-for-like figure).

Run: ``python benchmarks/advantage_bytes.py [--pairs 24]``. Prints a table, writes
benchmarks/results/advantage_bytes.json. A few minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import SHARED_DATA, emit  # noqa: E402
from builders.advantage import build_advantage, load_advantage  # noqa: E402
from builders.dfar import DfarConfig, build_dfar  # noqa: E402
from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits  # noqa: E402
from curate.logit_codec import CACHE_CONFIG, load_cache  # noqa: E402
from curate.models import SMOLLM2, ModelRef, load_causal_lm, load_tokenizer  # noqa: E402
from curate.store import DatasetStore  # noqa: E402

K = 50
GOAL = 160.0  # B/token, a fifth of the public reference's ~800
NOISE = {"near": 0.02, "far": 0.1}  # weight noise of the stand-in reference, as a fraction of each tensor's std


def write_sides(store: DatasetStore, pairs: int) -> None:
    """`prefs` version, config `sides`: id, side, prompt, completion, split from DFAR lr train rows."""
    lr = store.get("dfar").read("lr", "train").slice(0, pairs).to_pylist()
    rows: dict[str, list[Any]] = {"id": [], "side": [], "prompt": [], "completion": [], "split": []}
    for i, r in enumerate(lr):
        other = next(o for o in lr[i + 1:] + lr[:i] if o["label"] != r["label"])
        wrong = "ethical" if r["label_text"] == "unethical" else "unethical"
        rejected = f" {wrong}. Reason: " + other["completion"].split(". Reason: ", 1)[-1]
        for side, text in (("chosen", r["completion"]), ("rejected", rejected)):
            for col, v in zip(rows, (r["id"], side, r["prompt"], text, "train"), strict=True):
                rows[col].append(v)
    with store.new_version("prefs", builder="bench-sides", builder_version="0", params={"pairs": pairs},
                           sources=[]) as w:
        w.write_table("sides", "train", pa.table(rows))


def noisy(model: Any, frac: float, seed: int) -> Any:
    """A copy of `model` with N(0, (frac * std)^2) added to every weight tensor (the stand-in reference)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * frac)
    return out


def parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.tell()


def exact_advantages(teacher: Any, reference: Any, sides: tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, A) per row of the given sides, A from the two fp16 caches (what the int8 codes approximate)."""
    return [(t.topk_ids, (t.topk_logprobs.astype(np.float64) - r.topk_logprobs.astype(np.float64)))
            for t, r in zip(load_cache(teacher), load_cache(reference), strict=True) if t.side in sides]


def public_layout_bytes(exact: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """The public reference's storage of the same tokens: per token top-50 ids (int64) and advantages (float64,
    from fp16-derived values) -> (raw bytes, parquet + zstd bytes)."""
    table = pa.table({"topk_ids": pa.array([i.astype(np.int64).tolist() for i, _ in exact],
                                           pa.list_(pa.list_(pa.int64()))),
                      "advantage": pa.array([a.tolist() for _, a in exact], pa.list_(pa.list_(pa.float64())))})
    return sum(16 * i.size for i, _ in exact), parquet_bytes(table)


def column_bytes(version: Any) -> dict[str, int]:
    t = version.read(CACHE_CONFIG)
    return {c: parquet_bytes(t.select([c])) for c in t.column_names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=24)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    rows, details = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(tmp)
        build_dfar(store, SHARED_DATA / "dfar", DfarConfig(limit=args.pairs))
        write_sides(store, args.pairs)
        ref = ModelRef.parse(SMOLLM2)
        tok = load_tokenizer(ref)
        teacher = load_causal_lm(ref, dtype="float32", device="cpu").eval()
        # fp16 caches: A is then as continuous as the public reference's fp16-derived values (u8 caches put A on
        # the 1/16 grid already, which only makes the int8 codes exact)
        common = dict(model=SMOLLM2, dataset="prefs", config="sides", dtype="float32", batch_size=8,
                      quantization="fp16")
        tcache = cache_teacher_logits(store, LogitCacheConfig(k=K, name="teacher-cache", **common), model=teacher,
                                      tokenizer=tok, progress=False).version
        tp = tcache.manifest["params"]
        print(f"teacher cache: {tp['completion_tokens']} completion tokens, {tp['bytes_per_token']} B/token "
              f"({time.perf_counter() - t0:.0f} s)")
        for i, (label, frac) in enumerate(NOISE.items()):
            ref_model = noisy(teacher, frac, seed=i)
            rcache = cache_teacher_logits(store, LogitCacheConfig(at_ids="teacher-cache", name=f"ref-{label}",
                                                                  **common),
                                          model=ref_model, tokenizer=tok, progress=False).version
            del ref_model
            settings = [("i8, step 1/16 (default)", "i8", 1 / 16, ("rejected",)),
                        ("i8-delta, step 1/16", "i8-delta", 1 / 16, ("rejected",)),
                        ("i8, step 1/8", "i8", 1 / 8, ("rejected",)),
                        ("i8, step 1/16, both sides", "i8", 1 / 16, ("chosen", "rejected"))]
            for name, enc, step, sides in settings:
                v = build_advantage(store, "teacher-cache", rcache.ref, name=f"adv-{label}-{len(rows)}",
                                    encoding=enc, step=step, sides=sides).version
                p = v.manifest["params"]
                cols = column_bytes(v)
                exact = exact_advantages(tcache, rcache, sides)
                raw, pub = public_layout_bytes(exact)
                got = np.concatenate([r.advantage[r.valid] for r in load_advantage(v) if r.side in sides])
                want = np.concatenate([a.reshape(-1) for _, a in exact])
                inside = np.abs(want) < 127 * step
                err = float(np.abs(got - want)[inside].max())
                n = p["advantage_tokens"]
                rows.append([label, name, n, round(p["bytes_per_token"], 1), round(cols["advantage"] / n, 1),
                             round(cols["topk_ids"] / n, 1), round(p["clamped_entries"] / p["advantage_entries"], 5),
                             round(p["advantage_abs_mean"], 3), round(err, 4), round(raw / n, 1), round(pub / n, 1),
                             round(raw / max(p["bytes"], 1), 1), p["bytes_per_token"] <= GOAL])
                details[f"{label} / {name}"] = {"params": {k: p[k] for k in (
                    "bytes", "bytes_per_token", "bytes_per_completion_token", "advantage_tokens", "completion_tokens",
                    "advantage_entries", "clamped_entries", "advantage_mean", "advantage_abs_mean", "advantage_min",
                    "advantage_max", "step", "advantage_encoding", "max_error")}, "column_bytes": cols,
                    "max_abs_error_unclamped": err, "public_raw_bytes": raw, "public_parquet_bytes": pub}
        n_cache = len(load_cache(tcache))
    columns = ["reference", "setting", "adv tokens", "B/token", "codes B/token", "ids B/token", "clamped",
               "mean |A|", "max |err| (nats)", "public raw B/token", "public parquet B/token",
               "x smaller than public raw", "<= 160"]
    emit("advantage_bytes", f"Advantage table, SmolLM2 teacher k={K}, {args.pairs} DFAR pairs", columns, rows, {
        "teacher": "SmolLM2-135M-Instruct.Q4_1.gguf (transformers, dequantised to float32, CPU)",
        "reference": f"the teacher with N(0, (f * std)^2) weight noise, f = {NOISE} (no SFT/DPO pair ships here)",
        "k": K, "pairs": args.pairs, "cache_rows": n_cache, "teacher_cache_bytes_per_token": tp["bytes_per_token"],
        "goal_bytes_per_token": GOAL, "details": details, "seconds": round(time.perf_counter() - t0, 1),
        "bytes_per_token_rule": "all parquet bytes of the version (every column, both sides' rows) / rejected "
                                "(advantage) tokens; with both sides: / all completion tokens",
    })


if __name__ == "__main__":
    main()
