"""Step time and peak memory of offline KD against plain SFT: same student, same rows, same batches.

The student is SmolLM2-135M-Instruct with LoRA (r 16, all linear layers). SFT trains on the cached rows'
own ids (no EOS, so both see identical tokens); KD adds the sparse top-k term with k in {16, 64}. The k=16
rows are cut from a k=64 cache exactly (the top-16 of a sorted top-64, with the residual grown by the mass
of ranks 17-64). Each configuration runs in its own process (peak RSS is per process), in interleaved
rounds, and the median step time after a warm-up step is reported. The goal is KD ≤ 15 % slower than SFT.
On a CUDA machine the same runs use the GPU (Trainer places the model); the device is recorded.

    python benchmarks/train_bench.py [--rows 32] [--steps 4] [--batch-size 4] [--max-length 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import emit  # noqa: E402

CONFIGS = [("SFT", None), ("KD k=16", 16), ("KD k=64", 64)]


def ensure_cache(store_root: Path, rows: int, max_length: int) -> None:
    """dfar + a k=64 SmolLM2 cache of the first `rows` train rows (built once, reused)."""
    from builders.dfar import build_dfar
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.store import DatasetStore

    store = DatasetStore(store_root)
    if "dfar" not in store.names():
        from benchmarks._common import SHARED_DATA

        src = SHARED_DATA / "dfar" if (SHARED_DATA / "dfar").is_dir() else "upstream"
        build_dfar(store, src)
    if "dfar-lr-logits" not in store.names():
        cache_teacher_logits(store, LogitCacheConfig(dataset="dfar", config="lr", splits=["train"], k=64,
                                                     limit=rows, max_length=max_length), progress=False)


def cut_to_k(examples: list[Any], k: int) -> list[Any]:
    """The top-k view of a larger sorted top-K cache row, residual included (exact)."""
    import dataclasses

    import numpy as np

    out = []
    for e in examples:
        dropped = np.exp(e.topk_logprobs[:, k:].astype(np.float64)).sum(-1)
        out.append(dataclasses.replace(e, topk_ids=e.topk_ids[:, :k], topk_logprobs=e.topk_logprobs[:, :k],
                                       residual=(e.residual + dropped).astype(np.float32)))
    return out


def one_config(args: dict[str, Any], k: int | None, queue: Any) -> None:
    """Child process: train `steps + 1` steps with a timing callback; report step times and peak RSS."""
    import torch
    from transformers import TrainerCallback

    from curate.logit_codec import load_cache
    from curate.store import DatasetStore
    from train.config import KDConfig, SFTConfig
    from train.data import CompletionCollator, ListDataset
    from train.kd import KDTrainer
    from train.kd_data import KDCollator, kd_features
    from train.losses import get_loss
    from train.modeling import load_student
    from train.run_folder import RunFolder
    from train.runner import training_arguments
    from train.sft import SFTTrainer

    torch.manual_seed(0)
    common = dict(model=args["model"], max_length=args["max_length"], batch_size=args["batch_size"],
                  max_steps=args["steps"] + 1, logging_steps=1000, save_steps=10_000, evaluate=False,
                  lora_dropout=0.0, run_dir=str(Path(args["tmp"]) / f"run-{k}"), overwrite=True)
    cfg = SFTConfig(**common) if k is None else KDConfig(**common, alpha=0.5, temperature=2.0)
    cache = load_cache(DatasetStore(args["store"]).get("dfar-lr-logits"), "train")[: args["rows"]]
    feats = [f for f in (kd_features(e, args["max_length"]) for e in cut_to_k(cache, k or 64)) if f]
    model, tok, _ = load_student(cfg)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = RunFolder.prepare(cfg, "bench")
    targs = training_arguments(cfg, run, has_eval=False)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t)

    if k is None:
        data = [{"input_ids": f["input_ids"].tolist(), "labels": f["labels"].tolist()} for f in feats]
        trainer = SFTTrainer(model=model, args=targs, train_dataset=ListDataset(data),
                             data_collator=CompletionCollator(tok.pad_token_id), callbacks=[Clock()])
    else:
        trainer = KDTrainer(model=model, args=targs, train_dataset=ListDataset(feats),
                            data_collator=KDCollator(tok.pad_token_id, num_labels=2), callbacks=[Clock()],
                            kd_loss=get_loss("forward_kl"), alpha=0.5, temperature=2.0)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    queue.put({"times": times[1:], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_after_load_mib": rss_model / 1024, "cuda_peak_mib": cuda,
               "tokens_per_step": args["batch_size"] * statistics.mean(len(f["input_ids"]) for f in feats)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="measured steps per run (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--store", type=Path, default=Path("runs/bench/store"))
    a = ap.parse_args()
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_cache(a.store, a.rows, a.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        # The GGUF is dequantised once into a plain folder so each child loads it in seconds.
        from curate.models import ModelRef, load_causal_lm, load_tokenizer
        from train.modeling import clear_gguf_marker

        ref = ModelRef.parse("smollm2")
        m = load_causal_lm(ref, device="cpu")
        clear_gguf_marker(m)
        m.save_pretrained(f"{tmp}/student")
        load_tokenizer(ref).save_pretrained(f"{tmp}/student")
        del m
        args = {"model": f"{tmp}/student", "store": str(a.store), "rows": a.rows, "steps": a.steps,
                "batch_size": a.batch_size, "max_length": a.max_length, "tmp": tmp}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in CONFIGS}
        ctx = mp.get_context("spawn")
        for r in range(a.rounds):
            for name, k in CONFIGS:
                q = ctx.Queue()
                p = ctx.Process(target=one_config, args=(args, k, q))
                p.start()
                res = q.get()
                p.join()
                results[name].append(res)
                print(f"round {r + 1} {name}: median step {statistics.median(res['times']):.2f} s, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    base = statistics.median([t for res in results["SFT"] for t in res["times"]])
    rows = []
    for name, k in CONFIGS:
        ts = [t for res in results[name] for t in res["times"]]
        med = statistics.median(ts)
        peak = max(res["peak_rss_mib"] for res in results[name])
        rows.append([name, k or "-", round(med, 3), f"{100 * (med / base - 1):+.1f}%", round(peak),
                     round(results[name][0]["tokens_per_step"]), len(ts)])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    emit("train_bench", f"KD vs SFT step time, SmolLM2-135M + LoRA r16, batch {a.batch_size}, "
         f"max_length {a.max_length}, {'CUDA' if torch.cuda.is_available() else 'CPU'}",
         ["config", "k", "median step s", "vs SFT", "peak RSS MiB", "tokens/step", "steps timed"], rows,
         {"settings": vars(a) | {"store": str(a.store)}, "raw": results, "device": device,
          "goal": "KD <= 15% slower than SFT"})


if __name__ == "__main__":
    main()
