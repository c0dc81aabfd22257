"""Small-scale reproduction of the seeds' DFAR results with SmolLM2-135M-Instruct on CPU.

1. zero-shot SmolLM2 vs L (label-only SFT) vs L+R (label + reason SFT), same rows, same LoRA settings;
2. the L+R model becomes the teacher: its logits are cached (top-k), and a student initialised from it with
   half its decoder layers (fully fine-tuned by default) is trained with KD (alpha·CE + (1-alpha)·T²·KL) and,
   as the control, without (alpha = 1: same rows, same code path, no teacher term).

Every model is evaluated on the same first ``--test`` rows of DFAR test: accuracy / precision / recall / F1
(label 1 = unethical positive) read from the verbalizer scores (the table) and from greedy generations,
gold-reason perplexity, and the misalignment rate of generated reasons judged by zero-shot SmolLM2.
A fixed subset (first ``--train`` rows of DFAR train) and fixed seeds make it repeatable.

    OMP_NUM_THREADS=1 python benchmarks/reproduce_dfar.py [--train 256] [--test 200] [--epochs 1]

(On a shared CPU one thread per process is several times faster than two fighting for the cores.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATA, Laps, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=256, help="first N rows of DFAR train")
    ap.add_argument("--test", type=int, default=200, help="first N rows of DFAR test")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--student-layers", type=int, default=15, help="of SmolLM2's 30")
    ap.add_argument("--student-lora", action="store_true",
                    help="LoRA for the students too (default: full fine-tuning, which can repair the pruning)")
    ap.add_argument("--student-lr", type=float, default=1e-4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--judge", choices=["zero-shot", "none"], default="zero-shot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/repro"))
    a = ap.parse_args()

    import torch

    from builders.dfar import build_dfar
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.models import ModelRef, load_causal_lm, load_tokenizer
    from curate.store import DatasetStore
    from train.config import KDConfig, SFTConfig
    from train.evaluate import evaluate_model, read_eval_rows, write_eval
    from train.judge import LocalJudge
    from train.kd import run_kd
    from train.modeling import load_run
    from train.sft import run_sft

    torch.manual_seed(a.seed)
    lap = Laps()

    store = DatasetStore(a.out / "store")
    src = SHARED_DATA / "dfar" if (SHARED_DATA / "dfar").is_dir() else "upstream"
    dfar = build_dfar(store, src).version
    train_labels = dfar.read("lr", "train").slice(0, a.train)["label"].to_pylist()
    rows = read_eval_rows(store, f"dfar@{dfar.tag}", "lr", "test", a.test)
    print(f"{dfar.ref}: train subset {a.train} rows ({train_labels.count(1)} unethical), "
          f"test subset {len(rows.labels)} rows ({rows.labels.count(1)} unethical)", flush=True)

    ref = ModelRef.parse("smollm2")
    base, tok = load_causal_lm(ref, device="cpu"), load_tokenizer(ref)
    base.eval()
    judge = LocalJudge(base, tok, name="local:smollm2 (zero-shot)") if a.judge == "zero-shot" else None
    results: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, model: Any, mtok: Any) -> None:
        t = time.perf_counter()
        metrics, preds = evaluate_model(model, mtok, rows, template="plain", batch_size=16,
                                        max_new_tokens=a.max_new_tokens, max_length=a.max_length, judge=judge)
        write_eval(a.out / "eval" / name.replace(" ", "_").replace("+", "p"), metrics, preds, title=name)
        results[name] = metrics
        lap(f"eval {name}", t)

    evaluate("zero-shot", base, tok)
    common = dict(limit=a.train, epochs=a.epochs, max_length=a.max_length, batch_size=a.batch_size,
                  learning_rate=a.lr, lora_r=a.lora_r, lora_alpha=2 * a.lora_r, seed=a.seed, evaluate=False,
                  logging_steps=4, save_steps=100_000, store=str(store.root), overwrite=True)
    runs: dict[str, Path] = {}
    for name, config in (("L", "l"), ("L+R", "lr")):
        t = time.perf_counter()
        res = run_sft(SFTConfig(dataset=f"dfar@{dfar.tag}", dataset_config=config, save_merged=(config == "lr"),
                                run_dir=str(a.out / f"run-{config}"), **common), tokenizer=tok)
        runs[name] = res.run.path
        lap(f"train {name}", t)
        model, mtok, _ = load_run(res.run.path, device="cpu")
        evaluate(name, model, mtok)
        if name == "L+R":
            teacher, teacher_tok = model, mtok
        else:
            del model

    t = time.perf_counter()
    cache_name = "dfar-lr-logits-repro"
    cache_teacher_logits(store, LogitCacheConfig(dataset=f"dfar@{dfar.tag}", config="lr", splits=["train"],
                                                 model=str(runs["L+R"] / "merged"), k=a.k, limit=a.train,
                                                 max_length=a.max_length, name=cache_name),
                         model=teacher, tokenizer=teacher_tok, progress=False)
    del teacher
    lap("cache teacher logits", t)
    for name, alpha in (("KD student", a.alpha), ("no-KD student", 1.0)):
        t = time.perf_counter()
        student = {**common, "use_lora": a.student_lora, "learning_rate": a.student_lr}
        res = run_kd(KDConfig(model=str(runs["L+R"]), student_layers=a.student_layers, cache=cache_name,
                              alpha=alpha, temperature=a.temperature, run_dir=str(a.out / f"run-{alpha}"),
                              **student))
        lap(f"train {name}", t)
        model, mtok, _ = load_run(res.run.path, device="cpu")
        evaluate(name, model, mtok)
        del model

    table = []
    for name, m in results.items():
        v, g = m["verbalizer"], m["generation"]
        mis = (m.get("misalignment") or {}).get("rate")
        ppl = m["reason_perplexity"]  # None for a label-only model
        table.append([name, round(100 * v["accuracy"], 1), round(100 * v["precision"], 1),
                      round(100 * v["recall"], 1), round(100 * v["f1"], 1), round(100 * g["accuracy"], 1),
                      round(100 * g["f1"], 1), "-" if ppl is None else round(ppl, 2),
                      "-" if mis is None else round(100 * mis, 1)])
    emit("reproduce_dfar",
         f"DFAR, SmolLM2-135M-Instruct, {a.train} train / {len(rows.labels)} test rows, CPU "
         f"(students: {a.student_layers} of 30 layers)",
         ["model", "accuracy %", "precision %", "recall %", "F1 %", "gen. accuracy %", "gen. F1 %",
          "gold-reason ppl", "misaligned reasons %"], table,
         {"settings": {k: str(v) for k, v in vars(a).items()}, "dataset": {"ref": dfar.ref, "hash": dfar.hash},
          "seconds": lap.seconds, "total_seconds": lap.total(),
          "metrics": {k: {kk: vv for kk, vv in m.items() if kk != "config"} for k, m in results.items()},
          "runs": {k: str(v) for k, v in runs.items()}})


if __name__ == "__main__":
    main()
