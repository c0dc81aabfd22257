"""Reproduce the SaGE consistency loop at a small, CPU-sized scale.

SmolLM2-135M-Instruct is the target; the recorded GPT-3.5 answers of ``quality100`` (served by the offline
replay server) are the aligned source. Mean SaGE (answers only: the replay has no Rules of Thumb for new
SmolLM2 answers; RoT-aware with ``--rot-model`` when OPENAI_BASE_URL / OPENAI_API_KEY reach a real model) on
held-out ``moral100`` questions with bootstrap 95 % intervals, for the base model, each loop round and the RL
model, plus DFAR accuracy (``curate eval``'s verbalizer reading) for each. Says whether consistency rose
beyond the base model's interval.

Run: ``python benchmarks/reproduce_sage_loop.py [--heldout-limit 10 --rounds 2 --sft-steps 20 --rl-steps 8]``
(writes benchmarks/results/reproduce_sage_loop.{json,md,png}; a store and runs under --work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, SHARED_DATA, machine  # noqa: E402


def dfar_accuracy(store: str, model: str, limit: int, out: Path) -> dict[str, float]:
    """Verbalizer and generation accuracy on DFAR lr test, and the majority-label share (a model that always
    says one label scores exactly that)."""
    from train.evaluate import EvalConfig, majority_share, run_eval

    metrics, _ = run_eval(EvalConfig(model=model, dataset="dfar", dataset_config="lr", split="test", limit=limit,
                                     judge="none", store=store, out_dir=str(out), device="cpu"))
    return {"dfar_accuracy": float(metrics["verbalizer"]["accuracy"]),
            "dfar_generation_accuracy": float(metrics["generation"]["accuracy"]),
            "dfar_majority_share": float(majority_share(metrics["verbalizer"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/reproduce_sage_loop"), help="store and runs folder")
    ap.add_argument("--heldout", default="moral100-low")
    ap.add_argument("--heldout-limit", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--rl-steps", type=int, default=8)
    ap.add_argument("--rl-questions", type=int, default=8)
    ap.add_argument("--dfar-limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rot-model", default=None, help="RoT-aware scoring through a real endpoint (OPENAI_*)")
    args = ap.parse_args()

    import torch

    from builders.dfar import build_dfar
    from builders.sage_eval import SageEvalConfig, build_sage_eval
    from curate.replay.server import OpenAIServer
    from curate.store import DatasetStore
    from train.config import RLSageConfig
    from train.rl_sage import run_rl_sage
    from train.sage_loop import SageLoopConfig, run_sage_loop, write_report

    torch.set_num_threads(1)  # on a busy 2-core machine two contending OpenMP threads are several times slower
    args.work.mkdir(parents=True, exist_ok=True)
    store_dir = str(args.work / "store")
    store = DatasetStore(store_dir)
    build_dfar(store, SHARED_DATA / "dfar")
    t0 = time.perf_counter()
    with OpenAIServer(SHARED_DATA) as server:
        loop = run_sage_loop(SageLoopConfig(
            model="smollm2", base_url=server.base_url, heldout=args.heldout, heldout_limit=args.heldout_limit,
            rounds=args.rounds, max_steps=args.sft_steps, max_new_tokens=args.max_new_tokens,
            rot_model=args.rot_model, loop_dir=str(args.work / "loop"), store=store_dir, device="cpu"))
    rows: list[dict[str, Any]] = [dict(r, name="base" if r["round"] == 0 else f"loop round {r['round']}")
                                  for r in loop.rounds]
    rl = run_rl_sage(RLSageConfig(model="smollm2", questions=str(SHARED_DATA / "sage/quality100/q100.csv"),
                                  limit_questions=args.rl_questions, max_steps=args.rl_steps,
                                  run_dir=str(args.work / "rl"), overwrite=True, store=store_dir, device="cpu"))
    res = build_sage_eval(store, SageEvalConfig(model=str(rl.run.path), questions=args.heldout,
                                                limit_questions=args.heldout_limit, no_rots=not args.rot_model,
                                                rot_model=args.rot_model, max_new_tokens=args.max_new_tokens,
                                                device="cpu"))
    rows.append({"round": len(rows), "name": "RL (GRPO)", "mean_sage": res.mean, "ci_low": res.ci_low,
                 "ci_high": res.ci_high, "n_questions": res.n_scored, "model": str(rl.run.path), "threshold": None,
                 "rows_selected": 0, "rl_reward_per_step": rl.metrics["reward_per_step"]})
    for r in rows:
        r.update(dfar_accuracy(store_dir, r["model"], args.dfar_limit,
                               args.work / "dfar-eval" / r["name"].replace(" ", "-")))
    base = rows[0]
    for r in rows:
        r["beyond_base_interval"] = bool(r["ci_low"] > base["ci_high"])
    seconds = time.perf_counter() - t0

    lines = [f"# SaGE loop reproduction ({args.heldout}, first {args.heldout_limit} questions, "
             f"{'answers + RoTs' if args.rot_model else 'answers only'})", "",
             "| model | threshold | rows | mean SaGE | 95% CI | DFAR acc (verbalizer / generation) | above base CI |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(f"| {r['name']} | {t} | {r['rows_selected']} | {r['mean_sage']:.4f} | "
                     f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {r['dfar_accuracy']:.3f} / "
                     f"{r['dfar_generation_accuracy']:.3f} | "
                     f"{'yes' if r['beyond_base_interval'] else 'no'} |")
    rose = [r["name"] for r in rows[1:] if r["beyond_base_interval"]]
    lines += ["", ("Consistency rose beyond the base model's 95% interval for: " + ", ".join(rose)) if rose else
              "No trained model's interval lies above the base model's: at this scale consistency did not rise "
              "beyond the interval."]
    majority = [r["name"] for r in rows if abs(r["dfar_accuracy"] - r["dfar_majority_share"]) < 1e-9]
    if majority:
        lines.append(f"DFAR verbalizer accuracy equals the majority-label share ({rows[0]['dfar_majority_share']:.3f}) "
                     f"for {', '.join(majority)}: those models always give one label, so 'no regression' there says "
                     "little; the generation reading differs.")
    lines += [f"RL reward per step: {', '.join(f'{x:.3f}' for x in rl.metrics['reward_per_step'])}",
              f"\n{seconds / 60:.1f} min on {machine()}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reproduce_sage_loop.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "reproduce_sage_loop.json").write_text(json.dumps(
        {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "seconds": seconds}, indent=2, default=str) + "\n")
    write_report(args.work / "report", rows, None)
    (RESULTS / "reproduce_sage_loop.png").write_bytes((args.work / "report" / "rounds.png").read_bytes())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
