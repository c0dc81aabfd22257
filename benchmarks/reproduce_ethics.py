"""Small-scale ETHICS fine-tuning and distillation with SmolLM2-135M-Instruct on CPU, per ethical paradigm.

1. zero-shot SmolLM2 on ETHICS `instruct`;
2. the teacher: SmolLM2 + LoRA fine-tuned on the `instruct` train rows of the four paradigms that have train
   files (deontology, justice, utilitarianism, virtue), mixed in a seeded order;
3. its logits cached (top-k) for those rows; a half-depth student (every other decoder layer of the teacher,
   fully fine-tuned) trained with KD (alpha·CE + (1-alpha)·T²·KL) and, as the control, without (alpha = 1:
   same rows, same order, same steps, no teacher term).

KD is label KD by default (the published recipe): the cache mixes four paradigms with different label words, so
it records each row's own label token ids (``label_token_ids_by_subset``) and the teacher's log-probs over them,
and the KD term is the KL between teacher and student over those words at the answer position.
``--kd-target tokens`` distils the sparse top-k next-token distribution of every completion token instead.
Every model is scored on the first ``--test`` rows of each paradigm's test and test_hard (verbalizer reading):
accuracy / P / R / F1 and the majority-class share.

    OMP_NUM_THREADS=1 python benchmarks/reproduce_ethics.py [--rows 48] [--test 20] [--epochs 1] [--kd-target labels]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATA, Laps, emit  # noqa: E402

TRAINED = ["deontology", "justice", "utilitarianism", "virtue"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="first N rows of each source file (train rows per paradigm)")
    ap.add_argument("--test", type=int, default=20, help="first N rows of each paradigm's test / test_hard")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--student-layers", type=int, default=15, help="of SmolLM2's 30")
    ap.add_argument("--student-lr", type=float, default=1e-4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--kd-target", choices=["tokens", "labels"], default="labels",
                    help="labels: KL over each row's label words at the answer; tokens: sparse top-k per token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/repro-ethics"))
    a = ap.parse_args()

    import torch

    from builders.ethics import EthicsConfig, build_ethics
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.models import ModelRef, load_causal_lm, load_tokenizer
    from curate.store import DatasetStore
    from train.config import KDConfig, SFTConfig
    from train.evaluate import evaluate_model, read_eval_rows, results_table, write_eval
    from train.kd import run_kd
    from train.modeling import load_run
    from train.sft import run_sft

    torch.manual_seed(a.seed)
    lap = Laps()

    store = DatasetStore(a.out / "store")
    src = SHARED_DATA / "ethics" if (SHARED_DATA / "ethics").is_dir() else "upstream"
    ethics = build_ethics(store, src, EthicsConfig(limit=max(a.rows, a.test))).version
    ref = f"ethics@{ethics.tag}"
    rows = read_eval_rows(store, ref, "instruct", "test,test_hard", a.test)
    print(f"{ethics.ref}: {a.rows} train rows per paradigm ({', '.join(TRAINED)}), {len(rows.labels)} test rows",
          flush=True)

    mref = ModelRef.parse("smollm2")
    base, tok = load_causal_lm(mref, device="cpu"), load_tokenizer(mref)
    base.eval()
    results: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, model: Any, mtok: Any) -> None:
        t = time.perf_counter()
        metrics, preds = evaluate_model(model, mtok, rows, template="plain", batch_size=16, max_new_tokens=3,
                                        max_length=a.max_length)
        write_eval(a.out / "eval" / name.replace(" ", "_"), metrics, preds, title=name)
        results[name] = metrics
        lap(f"eval {name}", t)

    evaluate("zero-shot", base, tok)
    common = dict(dataset=ref, dataset_config="instruct", subsets=TRAINED, epochs=a.epochs, max_length=a.max_length,
                  batch_size=a.batch_size, seed=a.seed, evaluate=False, logging_steps=4, save_steps=100_000,
                  store=str(store.root), overwrite=True)
    t = time.perf_counter()
    res = run_sft(SFTConfig(learning_rate=a.lr, lora_r=a.lora_r, lora_alpha=2 * a.lora_r, save_merged=True,
                            run_dir=str(a.out / "run-teacher"), **common), tokenizer=tok)
    teacher_run = res.run.path
    lap("train teacher", t)
    teacher, teacher_tok, _ = load_run(teacher_run, device="cpu")
    evaluate("teacher", teacher, teacher_tok)

    t = time.perf_counter()
    cache_name = "ethics-instruct-logits-repro"
    cache_teacher_logits(store, LogitCacheConfig(dataset=ref, config="instruct", splits=["train"], subsets=TRAINED,
                                                 model=str(teacher_run / "merged"), k=a.k, max_length=a.max_length,
                                                 name=cache_name),
                         model=teacher, tokenizer=teacher_tok, progress=False)
    del teacher
    lap("cache teacher logits", t)
    kd_common = {k: v for k, v in common.items() if k not in ("dataset", "dataset_config")}
    for name, alpha in (("KD student", a.alpha), ("no-KD student", 1.0)):
        t = time.perf_counter()
        res = run_kd(KDConfig(model=str(teacher_run), student_layers=a.student_layers, cache=cache_name,
                              alpha=alpha, temperature=a.temperature, kd_target=a.kd_target, use_lora=False,
                              learning_rate=a.student_lr,
                              run_dir=str(a.out / f"run-{alpha}"), **kd_common))
        lap(f"train {name}", t)
        model, mtok, _ = load_run(res.run.path, device="cpu")
        evaluate(name, model, mtok)
        del model

    table, beats = [], {}
    for name, m in results.items():
        won = set()
        for r in results_table(m):
            if r["subset"] != "macro" and r["accuracy"] > r["majority"]:
                won.add(r["subset"])
            table.append([name, r["subset"], r["split"], r["n"] or "", round(100 * r["accuracy"], 1),
                          round(100 * r["precision"], 1), round(100 * r["recall"], 1), round(100 * r["f1"], 1),
                          "" if r["majority"] is None else round(100 * r["majority"], 1)])
        beats[name] = sorted(won)
    for name, won in beats.items():
        print(f"{name}: accuracy above the majority class on some split of {len(won)} paradigm(s): "
              f"{', '.join(won) or 'none'}", flush=True)
    emit("reproduce_ethics",
         f"ETHICS instruct, SmolLM2-135M-Instruct, {a.rows} train rows per paradigm x 4, {a.test} test rows per "
         f"paradigm and split, CPU (students: {a.student_layers} of 30 layers, {a.kd_target} KD)",
         ["model", "paradigm", "split", "n", "accuracy %", "precision %", "recall %", "F1 %", "majority %"], table,
         {"settings": {k: str(v) for k, v in vars(a).items()}, "dataset": {"ref": ethics.ref, "hash": ethics.hash},
          "beats_majority": beats, "seconds": lap.seconds, "total_seconds": lap.total(),
          "metrics": {k: {kk: vv for kk, vv in m.items() if kk != "config"} for k, m in results.items()}})


if __name__ == "__main__":
    main()
