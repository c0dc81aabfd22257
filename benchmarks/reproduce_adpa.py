"""Preference distillation at SmolLM2 scale on CPU: does ADPA+ >= ADPA > DCKD > DPO-on-student show?

1. DFAR pairs: chosen = the gold label + reason (`lr`), rejected = SmolLM2's answer for the opposite label;
   the first ``--pairs`` train rows and ``--test`` test rows (held out: no prompt of test is in train).
2. Teacher: SmolLM2-135M L+R SFT (LoRA, merged; the reference pi_ref), then TRL DPO on the train pairs.
3. Caches: the DPO teacher's top-k on both sides, the reference scored at exactly those ids, the advantage table.
4. Student: a half-depth SmolLM2 (15 of 30 layers) after the same L+R SFT = the "SFT" row and every method's init.
5. From that init, same pairs, steps, batch and seed: DPO on the student (TRL), DCKD, ADPA and ADPA+ (from the
   DCKD student), ADPA / ADPA+ in both advantage-clamp modes.
Every model is scored on the held-out pairs (preference accuracy, summed and per token; reward margin under
the DPO teacher's beta and reference) and on DFAR test (verbalizer accuracy / F1).

    OMP_NUM_THREADS=1 python benchmarks/reproduce_adpa.py [--pairs 96] [--test 48] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATA, Laps, emit  # noqa: E402

ORDER = "ADPA+ >= ADPA > DCKD > DPO-on-student"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=96, help="train pairs (first N DFAR train rows)")
    ap.add_argument("--test", type=int, default=48, help="held-out pairs / DFAR test rows scored")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of every training run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/repro-adpa"))
    a = ap.parse_args()

    from builders.advantage import build_advantage
    from builders.dfar import build_dfar
    from builders.preferences import PreferencesConfig, build_preferences
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.configs import load_config
    from curate.store import DatasetStore
    from train.adpa import run_adpa
    from train.config import ADPAConfig, DCKDConfig, DPOTeacherConfig, SFTConfig
    from train.dckd import run_dckd
    from train.dpo import run_dpo
    from train.evaluate import evaluate_model, read_eval_rows
    from train.modeling import load_run
    from train.preference_eval import preference_metrics, read_pairs, score_pairs, tokenize_pairs
    from train.sft import run_sft

    lap = Laps()
    out = a.out.resolve()
    store = DatasetStore(out / "store")
    src = SHARED_DATA / "dfar" if (SHARED_DATA / "dfar").is_dir() else "upstream"
    dfar = build_dfar(store, src).version
    t0 = lap.start
    prefs = build_preferences(store, PreferencesConfig(from_dataset=dfar.ref, rejected="model:smollm2",
                                                       limit=max(a.pairs, a.test), max_new_tokens=40,
                                                       device="cpu")).version
    lap("preference pairs (SmolLM2 rejected answers)", t0)
    common = dict(store=str(store.root), seed=a.seed, batch_size=a.batch_size, max_length=a.max_length,
                  max_steps=a.steps, evaluate=False, logging_steps=4, save_steps=10_000, overwrite=True)

    def run(fn: Any, cls: type, name: str, **kw: Any) -> Path:
        import time

        t = time.perf_counter()
        result = fn(load_config(cls, None, {**common, "run_dir": str(out / name), **kw}))
        lap(name, t)
        return result.run.path

    sft_kw = dict(dataset=dfar.ref, dataset_config="lr", limit=a.pairs, save_merged=True)
    teacher_sft = run(run_sft, SFTConfig, "sft-teacher", learning_rate=5e-4, **sft_kw)
    teacher = run(run_dpo, DPOTeacherConfig, "dpo-teacher", model=str(teacher_sft), dataset=prefs.ref,
                  limit=a.pairs)
    import time

    t = time.perf_counter()
    cache_kw = dict(dataset=prefs.ref.split("@")[0], config="sides", k=a.k, max_length=a.max_length,
                    splits=["train"])
    cache_teacher_logits(store, LogitCacheConfig(model=str(teacher), name="teacher-logits", **cache_kw),
                         progress=False)
    cache_teacher_logits(store, LogitCacheConfig(model=str(teacher_sft), name="reference-logits",
                                                 at_ids="teacher-logits", **cache_kw), progress=False)
    adv = build_advantage(store, "teacher-logits", "reference-logits", name="advantage")
    lap("teacher cache, reference at its ids, advantage table", t)

    # The half-depth model starts far from a language model (SFT loss ~12): fully fine-tuned, as in reproduce_dfar.
    student = run(run_sft, SFTConfig, "sft-student", student_layers=a.student_layers, use_lora=False,
                  learning_rate=1e-4, **sft_kw)
    init = dict(model=str(student), limit=a.pairs)
    runs: dict[str, Path] = {"SFT (student init)": student}
    runs["DPO-on-student"] = run(run_dpo, DPOTeacherConfig, "dpo-student", dataset=prefs.ref, **init)
    runs["DCKD"] = run(run_dckd, DCKDConfig, "dckd", cache="teacher-logits", save_merged=True, **init)
    for clamp in ("none", "reference"):
        runs[f"ADPA ({clamp})"] = run(run_adpa, ADPAConfig, f"adpa-{clamp}", advantage="advantage",
                                      advantage_clamp=clamp, **init)
        runs[f"ADPA+ ({clamp})"] = run(run_adpa, ADPAConfig, f"adpa-plus-{clamp}", advantage="advantage",
                                       advantage_clamp=clamp, init=str(runs["DCKD"]), **init)

    # ---- evaluation: every model on the same held-out pairs and DFAR test rows ---------------------------
    t = time.perf_counter()
    info = json.loads((teacher / "run.json").read_text())
    beta = float(info["config"]["beta"])
    model, tok, _ = load_run(str(teacher_sft), device="cpu")
    table = read_pairs(prefs, "pairs", "test", a.test)
    pairs = tokenize_pairs(tok, table, template="plain", max_length=a.max_length, append_eos=False,
                           where=f"{prefs.ref} pairs/test").pairs
    ids = [p.id for p in pairs]
    reference = score_pairs(model, tok, pairs)
    teacher_model, _, _ = load_run(str(teacher), device="cpu")
    teacher_scores = score_pairs(teacher_model, tok, pairs)
    dfar_rows = read_eval_rows(store, dfar.ref, "lr", "test", a.test, None)
    results: dict[str, dict[str, Any]] = {}
    for name, path in {"DPO teacher (135M)": teacher, **runs}.items():
        m, mtok, _ = load_run(str(path), device="cpu")
        pm, _ = preference_metrics(ids, score_pairs(m, mtok, pairs), reference, beta)
        ev, _ = evaluate_model(m, mtok, dfar_rows, template="plain", batch_size=8, max_new_tokens=8,
                               max_length=a.max_length, label_prefix=" ")
        results[name] = {"pref_acc_sum": pm["accuracy_sum"], "pref_acc_mean": pm["accuracy_mean"],
                         "margin": pm["margin"], "dfar_acc": ev["verbalizer"]["accuracy"],
                         "dfar_f1": ev["verbalizer"]["f1"], "run": str(path)}
        print(name, {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    lap("evaluation", t)
    teacher_own, _ = preference_metrics(ids, teacher_scores, reference, beta)

    def acc(n: str) -> float:
        return results[n]["pref_acc_mean"]

    def margin(n: str) -> float:
        return results[n]["margin"]

    shows = {clamp: acc(f"ADPA+ ({clamp})") >= acc(f"ADPA ({clamp})") > acc("DCKD") > acc("DPO-on-student")
             for clamp in ("none", "reference")}
    shows_margin = {clamp: margin(f"ADPA+ ({clamp})") >= margin(f"ADPA ({clamp})") > margin("DCKD")
                    > margin("DPO-on-student") for clamp in ("none", "reference")}
    columns = ["model", "pref acc (summed)", "pref acc (per token)", "reward margin", "DFAR acc", "DFAR F1"]
    rows = [[n, r["pref_acc_sum"], r["pref_acc_mean"], r["margin"], r["dfar_acc"], r["dfar_f1"]]
            for n, r in results.items()]
    emit("reproduce_adpa", f"Preference distillation, SmolLM2 scale, CPU ({len(ids)} held-out pairs, "
         f"{a.steps} steps each)", columns, rows,
         {"args": {k: str(v) for k, v in vars(a).items()}, "beta": beta, "teacher_margin": teacher_own["margin"],
          "advantage_bytes_per_token": adv.version.manifest.get("params", {}).get("bytes_per_token"),
          "expected_order": ORDER, "order_shows_per_token_accuracy": shows,
          "order_shows_reward_margin": shows_margin, "seconds": lap.seconds,
          "total_seconds": lap.total(), "held_out_pairs": len(ids), "dfar_test_rows": len(dfar_rows.labels)})
    for clamp in ("none", "reference"):
        for what, ok in (("per-token preference accuracy", shows[clamp]), ("reward margin", shows_margin[clamp])):
            print(f"{ORDER} on {what}, clamp {clamp}: {'shows' if ok else 'does NOT show'}")


if __name__ == "__main__":
    main()
