"""Training-level fidelity of teacher-logit caches (issue 14), at a small CPU scale.

The same half-depth SmolLM2 student (15 of the teacher's 30 layers, initialised from it), data order, steps
and optimiser, trained with pure distillation (no gold CE) from
  (a) online dense KD: the teacher runs every step, forward KL over the full vocabulary;
  (b) an offline top-64 u8-delta cache;
  (c) an offline ``--preset small`` cache;
  (d) an offline sampled cache (``--select sample``) whose bytes/token are closest to (c)'s among four sizes;
  (e) (c) plus ``--tail-samples`` draws (the unbiased chain-rule tail term);
  (a') (a) through TRL's `GKDTrainer` (lmbda 0, beta 0), the anchor.
Offline runs use the trainer's own pieces (`kd_features`, `KDCollator`, `ce_and_distillation`). Reported:
held-out KL(teacher || student) and CE on DFAR lr test completions, DFAR accuracy / macro-F1 from the label
words at the answer position, median step time and cache size. The teacher is SmolLM2-135M-Instruct (the
GGUF, dequantised), not an L+R fine-tune.

Run: ``python benchmarks/kd_fidelity.py [--train 40 --test 16 --steps 30]`` (about 15 minutes on 2 CPU cores).
Writes benchmarks/results/kd_fidelity.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import SHARED_DATA, emit  # noqa: E402
from builders.dfar import build_dfar  # noqa: E402
from builders.teacher_logits import PRESETS, LogitCacheConfig, cache_teacher_logits, plan_cache  # noqa: E402
from curate.logit_codec import load_cache  # noqa: E402
from curate.models import SMOLLM2, ModelRef, load_causal_lm, load_tokenizer  # noqa: E402
from curate.store import DatasetStore  # noqa: E402
from train.kd import ce_and_distillation  # noqa: E402
from train.kd_data import KDCollator, kd_features  # noqa: E402
from train.losses import get_loss  # noqa: E402
from train.modeling import clear_gguf_marker, keep_layers  # noqa: E402
from train.token_rows import logprobs_at, supervised_positions  # noqa: E402

TRL_ANCHOR = "(a') online dense KD, TRL GKDTrainer"


def make_cache(store: DatasetStore, model: Any, tok: Any, name: str, n: int, **fields: Any) -> tuple[Any, float]:
    params = LogitCacheConfig(model=SMOLLM2, splits=["train"], limit=n, dtype="float32", name=name, **fields)
    t0 = time.perf_counter()
    result = cache_teacher_logits(store, params, model=model, tokenizer=tok, progress=False)
    return result.version, time.perf_counter() - t0


def train(student: Any, teacher: Any, feats: list[dict], order: list[list[int]], collate: KDCollator, *,
          online: bool, lr: float) -> list[float]:
    """Pure-KD steps over the given batches; returns each step's wall time."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, fused=True)  # transformers' default optimiser (Trainer)
    loss_fn = get_loss("forward_kl")
    student.train()
    times = []
    for idx in order:
        t0 = time.perf_counter()
        batch = collate([feats[i] for i in idx])
        rows, pos, targets = supervised_positions(batch["labels"])
        logprobs = logprobs_at(student, batch["input_ids"], batch["attention_mask"], rows, pos)
        if online:
            with torch.no_grad():
                t_lp = logprobs_at(teacher, batch["input_ids"], batch["attention_mask"], rows, pos)
            kd = (t_lp.exp() * (t_lp - logprobs)).sum(-1).mean()
        else:
            _, kd = ce_and_distillation(logprobs, rows, pos, targets, batch, kd_loss=loss_fn, temperature=1.0)
        opt.zero_grad()
        kd.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    student.eval()
    return times


def train_trl(student: Any, teacher: Any, tok: Any, feats: list[dict], order: list[list[int]], pad_id: int, *,
              lr: float, out_dir: str) -> list[float]:
    """The anchor for (a): the same steps through TRL's `GKDTrainer` with lmbda = 0 (the dataset's own
    sequences, no generation) and beta = 0 (forward KL over the full vocabulary, temperature 1, mean over
    completion tokens). Optimiser settings match `train`'s fused torch AdamW (weight decay 0.01, no clipping,
    constant lr); the batches are fed in the same order (a sequential sampler over the batches laid end to end)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from train.data import IGNORE, pad_right

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"input_ids": pad_right([r["input_ids"] for r in rows], pad_id),
                "attention_mask": pad_right([[1] * len(r["input_ids"]) for r in rows], 0),
                "labels": pad_right([r["labels"] for r in rows], IGNORE)}

    batch = len(order[0])
    data = Dataset.from_list([{"input_ids": [int(x) for x in feats[i]["input_ids"]],
                               "labels": [int(x) for x in feats[i]["labels"]]} for idx in order for i in idx])
    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=len(order), learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=0.0,
                     optim="adamw_torch_fused", lmbda=0.0, beta=0.0, bf16=False, fp16=False,
                     gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    timer = StepTimes()
    clear_gguf_marker(student)  # dequantised float weights, as the project's own trainers see them
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collate,
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    student.eval()
    return timer.times


@torch.no_grad()
def evaluate(student: Any, teacher: Any, examples: list[Any], label_ids: list[int]) -> dict[str, float]:
    """Held-out KL(teacher || student) and CE per completion token; label accuracy and macro-F1."""
    kl_sum = ce_sum = 0.0
    tokens = 0
    pred, gold = [], []
    for e in examples:
        ids = torch.tensor([e.input_ids])
        t = torch.log_softmax(teacher(ids).logits[0].double(), -1)[e.prompt_len - 1: -1]
        s = torch.log_softmax(student(ids).logits[0].double(), -1)[e.prompt_len - 1: -1]
        target = ids[0, e.prompt_len:]
        kl_sum += float((t.exp() * (t - s)).sum())
        ce_sum += float(-s.gather(-1, target[:, None]).sum())
        tokens += len(target)
        if e.label is not None:
            pred.append(int(torch.argmax(s[0, label_ids])))
            gold.append(e.label)
    p, g = np.array(pred), np.array(gold)
    f1s = []
    for c in sorted(set(g.tolist())):
        tp, fp, fn = ((p == c) & (g == c)).sum(), ((p == c) & (g != c)).sum(), ((p != c) & (g == c)).sum()
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"heldout_kl": kl_sum / tokens, "heldout_ce": ce_sum / tokens, "accuracy": float((p == g).mean()),
            "macro_f1": float(np.mean(f1s)), "heldout_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=40, help="DFAR lr train examples (cached and trained on)")
    ap.add_argument("--test", type=int, default=16, help="DFAR lr test examples (held out)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tail", type=int, default=4, help="--tail-samples of variant (e)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL GKDTrainer anchor run")
    a = ap.parse_args()
    torch.manual_seed(0)
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(tmp)
        build_dfar(store, SHARED_DATA / "dfar")
        ref = ModelRef.parse(SMOLLM2)
        tok = load_tokenizer(ref)
        teacher = load_causal_lm(ref, dtype="float32", device="cpu").eval()
        caches: dict[str, tuple[Any, float]] = {
            "(b) top-64 u8-delta": make_cache(store, teacher, tok, "c-top64", a.train, k=64),
            "(c) --preset small": make_cache(store, teacher, tok, "c-small", a.train, **PRESETS["small"],
                                             preset="small"),
            f"(e) --preset small --tail-samples {a.tail}": make_cache(
                store, teacher, tok, "c-small-tail", a.train, **PRESETS["small"], preset="small",
                tail_samples=a.tail),
        }
        target = caches["(c) --preset small"][0].manifest["params"]["bytes_per_token"]
        sampled = [make_cache(store, teacher, tok, f"c-sample-{n}", a.train, select="sample", samples=n)
                   for n in (96, 128, 160, 192)]
        best = min(sampled, key=lambda vc: abs(vc[0].manifest["params"]["bytes_per_token"] - target))
        caches[f"(d) sampled N={best[0].manifest['params']['samples']}"] = best
        test_plan = plan_cache(store, LogitCacheConfig(model=SMOLLM2, splits=["test"], limit=a.test), tok)
        label_ids = test_plan.label_token_ids

        base = load_cache(caches["(b) top-64 u8-delta"][0])
        rng = np.random.default_rng(0)
        order = [rng.permutation(len(base))[: a.batch].tolist() for _ in range(a.steps)]  # same for every run
        collate = KDCollator(pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id))
        variants: dict[str, tuple[list[dict], bool, Any]] = {
            "(a) online dense KD": ([kd_features(e, 1024) for e in base], True, None)}
        if not a.no_trl:
            variants[TRL_ANCHOR] = (variants["(a) online dense KD"][0], True, None)
        for name, (version, _) in caches.items():
            exs = load_cache(version)
            assert [e.id for e in exs] == [e.id for e in base]
            variants[name] = ([kd_features(e, 1024) for e in exs], False, version)
        results = []
        for name, (feats, online, version) in variants.items():
            student = copy.deepcopy(teacher)
            keep_layers(student, a.layers)
            print(f"training {name} ...", flush=True)
            if name == TRL_ANCHOR:
                times = train_trl(student, teacher, tok, feats, order, collate.pad_id, lr=a.lr, out_dir=tmp)
            else:
                times = train(student, teacher, feats, order, collate, online=online, lr=a.lr)
            ev = evaluate(student, teacher, test_plan.examples, label_ids)
            p = version.manifest["params"] if version is not None else {}
            secs = dict(caches).get(name, (None, None))[1]
            results.append({"variant": name, **ev, "step_s_median": statistics.median(times[1:] or times),
                            "cache_bytes_per_token": p.get("bytes_per_token"), "cache_seconds": secs})
            print(results[-1], flush=True)
            del student
        untrained = copy.deepcopy(teacher)
        keep_layers(untrained, a.layers)
        results.append({"variant": "(0) half-depth student before training",
                        **evaluate(untrained, teacher, test_plan.examples, label_ids)})
        results.append({"variant": "teacher itself", **evaluate(teacher, teacher, test_plan.examples, label_ids)})

    online = results[0]
    for r in results:
        if "step_s_median" in r:
            r["kl_vs_online_pct"] = 100 * (r["heldout_kl"] / online["heldout_kl"] - 1)
            r["step_time_vs_online"] = r["step_s_median"] / online["step_s_median"]
    columns = ["variant", "held-out KL", "vs online", "held-out CE", "accuracy", "macro-F1", "step s",
               "step vs online", "cache B/token"]
    table = [[r["variant"], round(r["heldout_kl"], 4), f"{r['kl_vs_online_pct']:+.1f}%" if "kl_vs_online_pct" in r
              else "", round(r["heldout_ce"], 4), round(r["accuracy"], 3), round(r["macro_f1"], 3),
              round(r["step_s_median"], 2) if "step_s_median" in r else "",
              round(r["step_time_vs_online"], 2) if "step_time_vs_online" in r else "",
              r.get("cache_bytes_per_token") or ""] for r in results]
    emit("kd_fidelity", f"KD fidelity: {a.steps} steps x {a.batch} of {a.train} DFAR lr train examples, "
         f"{a.test} held out", columns, table,
         {"args": vars(a), "results": results, "total_seconds": time.perf_counter() - wall0,
          "machine_load": os.getloadavg(),
          "notes": "Pure KD (no gold CE), forward KL at temperature 1, fused AdamW (transformers' default; lr "
                   "constant, weight decay 0.01, no clipping), float32 CPU. A small scale (a few dozen steps from "
                   "a pruned student): differences of a percent between variants are within what the step count "
                   "alone moves."})


if __name__ == "__main__":
    main()
