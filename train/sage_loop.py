"""`curate sage-loop`: iterate {select consistent aligned answers → LoRA SFT of the base target (fresh from the
base every round) → SaGE of the trained target on held-out questions → keep the best}.

Round ``r`` (1-based) selects with the decaying threshold (`curate.selection.DecayingThreshold`) starting at
``max(min_threshold, initial_threshold × round_decay^(r-1))``: each round admits a little more data. Round 0
is the untrained base model, so "best" can be "no training helped".

Everything a round makes is kept: its selection is a store version (``sage-loop-selection``), its training
a run folder (``<loop_dir>/round-<r>/run``), its evaluation a ``sage-eval`` version. ``<loop_dir>/state.json``
records each finished round, written atomically after the round's last step; a killed loop started again
skips finished rounds and, inside the first unfinished one, reuses what is complete (an identical selection
is the same version, a run folder with its adapter is reused, generated answers come from the eval cache).
Per-round table (``rounds.md``) and figure (``rounds.png``: mean SaGE ± 95 % interval, threshold, rows).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import annotated_types as at
import polars as pl

from curate.atomic import atomic_write_text
from curate.configs import ConfigError, opt
from curate.errors import CurateError
from curate.store import DatasetStore

log = logging.getLogger(__name__)
STATE = "state.json"


@dataclass
class SageLoopConfig:
    """The loop's settings (every field is a `curate sage-loop` option)."""

    model: str = opt("smollm2", "Base target model: smollm2, a hub id or a folder.")
    responses: str = opt("sage-responses", "Store dataset of aligned-model answers (its `responses` config, from "
                                           "`curate build sage-responses`); built from --aligned-questions if absent.")
    aligned_questions: str = opt("quality100", "Questions to collect aligned answers for when --responses is absent.")
    aligned_limit: Annotated[int, at.Ge(1)] | None = opt(None, "Collect aligned answers for the first N questions.")
    base_url: str | None = opt(None, "Endpoint of the aligned model and the RoT model (default $OPENAI_BASE_URL).")
    heldout: str = opt("moral100-low", "Held-out questions for the per-round SaGE evaluation.")
    heldout_limit: Annotated[int, at.Ge(1)] | None = opt(20, "Evaluate on the first N held-out questions.")
    rounds: Annotated[int, at.Ge(1)] = opt(2, "Training rounds.")
    initial_threshold: Annotated[float, at.Interval(ge=0, le=1)] = opt(0.9, "Threshold of round 1's first question.")
    round_decay: Annotated[float, at.Interval(gt=0, le=1)] = opt(0.9, "Factor on the starting threshold per round.")
    decay_rate: Annotated[float, at.Interval(gt=0, le=1)] = opt(0.99, "Per-question threshold decay.")
    min_threshold: Annotated[float, at.Interval(ge=0, le=1)] = opt(0.6, "Threshold floor.")
    rot_model: str | None = opt(None, "RoT model for the evaluations (default: answers only, offline).")
    template: str = opt("chat", "Prompt template of SFT (chat or plain).")
    max_steps: Annotated[int, at.Ge(1)] = opt(20, "SFT optimizer steps per round.")
    batch_size: Annotated[int, at.Ge(1)] = opt(4, "SFT batch size.")
    learning_rate: Annotated[float, at.Gt(0)] = opt(2e-4, "SFT learning rate (LoRA).", flags=("--lr",))
    max_length: Annotated[int, at.Ge(8)] = opt(256, "SFT max tokens per example.")
    max_new_tokens: Annotated[int, at.Ge(1)] = opt(48, "Answer length in the evaluations.")
    temperature: Annotated[float, at.Ge(0)] = opt(0.8, "Answer sampling temperature in the evaluations.")
    seed: int = opt(0, "Seed of training and sampling.")
    loop_dir: str = opt("runs/sage-loop", "Folder of the loop: state.json, rounds.md, rounds.png, round-<r>/.")
    selection_name: str = opt("sage-loop-selection", "Store dataset name of the per-round selections.")
    device: str = opt("auto", "auto, cpu, cuda ...")
    store: str | None = opt(None, "Store folder (default: $CURATE_STORE, else ./.curate).")

    def validate(self) -> None:
        if self.min_threshold > self.initial_threshold:
            raise ConfigError("min_threshold", "min_threshold must not exceed initial_threshold")
        if self.template not in ("chat", "plain"):
            raise ConfigError("template", "template must be chat or plain")

    def round_threshold(self, r: int) -> float:
        return max(self.min_threshold, self.initial_threshold * self.round_decay ** (r - 1))


@dataclass
class LoopResult:
    loop_dir: Path
    rounds: list[dict[str, Any]]  # round 0 (base) first
    best: dict[str, Any]
    actions: list[str]  # what this invocation did ("round 1 sft: reused", ...): resume is visible


# ---- pieces -------------------------------------------------------------------------------------------
def aligned_responses(cfg: SageLoopConfig, store: DatasetStore, actions: list[str]) -> Any:
    """The aligned answers' version: reused when stored, else collected once with `build_sage_responses`."""
    try:
        v = store.get(cfg.responses)
        actions.append(f"aligned answers: reused {v.ref}")
        return v
    except CurateError:
        pass
    from builders.sage_eval import QUESTION_SETS, shared_sage_dir
    from builders.sage_responses import SageResponsesConfig, build_sage_responses

    questions = cfg.aligned_questions
    if questions in QUESTION_SETS:
        questions = str(shared_sage_dir() / QUESTION_SETS[questions])
    res = build_sage_responses(store, SageResponsesConfig(questions=questions, base_url=cfg.base_url,
                                                          limit_questions=cfg.aligned_limit), name=cfg.responses)
    actions.append(f"aligned answers: built {res.version.ref}")
    return res.version


def select_round(cfg: SageLoopConfig, store: DatasetStore, responses: Any, r: int) -> tuple[Any, float, int, int]:
    """Round r's selection as a store version (prompt/completion); returns (version, threshold, questions, rows)."""
    from curate.prompts import ANSWER_PROMPT_TEMPLATE
    from curate.selection import DecayingThreshold, usable

    df = responses.read_polars("responses")
    scores = df.group_by("question_id", maintain_order=True).agg(pl.col("sage").first())
    t0 = cfg.round_threshold(r)
    strategy = DecayingThreshold(t0, cfg.decay_rate, min(cfg.min_threshold, t0))
    decisions = strategy.select([str(q) for q in scores["question_id"]], scores["sage"].to_list())
    taken = [d.question_id for d in decisions if d.selected]
    rows = df.with_columns(pl.col("question_id").cast(pl.String)).filter(
        pl.col("question_id").is_in(taken) & usable())
    table = rows.select(
        "question_id", "paraphrase_idx",
        pl.col("paraphrased").map_elements(lambda p: ANSWER_PROMPT_TEMPLATE.format(question=p),
                                           return_dtype=pl.String).alias("prompt"),
        pl.col("model_output").alias("completion"), "sage")
    if table.height == 0:
        raise CurateError(f"round {r}: no question of {responses.ref} beats the threshold {t0:.3f}; lower "
                          "--initial-threshold or --min-threshold")
    parents = [{"name": responses.name, "tag": responses.tag, "content_hash": responses.hash,
                "config": "responses"}]
    params = {"round_threshold": t0, "decay_rate": cfg.decay_rate, "min_threshold": cfg.min_threshold,
              "responses": responses.ref}
    card = {"pretty_name": "SaGE loop selection", "description": f"Aligned answers of {len(taken)} questions of "
            f"{responses.ref} selected with the decaying threshold from {t0:.3f}.", "default_config": "selected"}
    with store.new_version(cfg.selection_name, builder="sage_loop_selection", builder_version="1.0.0",
                           params=params, sources=[], parents=parents, card=card) as w:
        w.write_table("selected", "train", table.to_arrow())
    return w.result.version, t0, len(taken), table.height


def train_round(cfg: SageLoopConfig, selection: Any, run_dir: Path, console: Any) -> str:
    """LoRA SFT of the *base* model on the round's selection; a complete run folder is reused."""
    from train.config import SFTConfig
    from train.sft import run_sft

    if (run_dir / "adapter").is_dir() and (run_dir / "run.json").is_file():
        return "reused"
    sft = SFTConfig(model=cfg.model, dataset=f"{selection.name}@{selection.tag}", dataset_config="selected",
                    eval_split="none", evaluate=False, template=cfg.template, max_steps=cfg.max_steps,
                    batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, max_length=cfg.max_length,
                    seed=cfg.seed, run_dir=str(run_dir), overwrite=run_dir.exists(), store=cfg.store,
                    device=cfg.device, save_steps=max(cfg.max_steps, 1))
    run_sft(sft, console=console)
    return "trained"


def eval_round(cfg: SageLoopConfig, store: DatasetStore, model: str, r: int) -> Any:
    from builders.sage_eval import SageEvalConfig, build_sage_eval

    params = SageEvalConfig(model=model, questions=cfg.heldout, limit_questions=cfg.heldout_limit,
                            rot_model=cfg.rot_model, no_rots=not cfg.rot_model, base_url=cfg.base_url,
                            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                            device=cfg.device, extra={"sage_loop_round": r})
    return build_sage_eval(store, params)


def _row(r: int, res: Any, **kw: Any) -> dict[str, Any]:
    return {"round": r, "mean_sage": res.mean, "ci_low": res.ci_low, "ci_high": res.ci_high,
            "n_questions": res.n_scored, "empty_answers": res.empty_answers, "eval": res.version.ref,
            "eval_hash": res.version.hash, **kw}


def _read_state(path: Path, cfg: SageLoopConfig) -> dict[str, Any]:
    if not path.is_file():
        return {"config": _identity(cfg), "rounds": []}
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise CurateError(f"{path}: not valid JSON ({e}); delete it to start the loop again") from None
    if state.get("config") != _identity(cfg):
        raise CurateError(f"{path} belongs to a loop with other settings; use another --loop-dir or delete it")
    return state


def _identity(cfg: SageLoopConfig) -> dict[str, Any]:
    """Settings that change what a round computes (rounds may be raised to extend a loop; the endpoint is where
    answers come from, not what they are: the aligned answers are a store version, a replay server's port varies)."""
    d = asdict(cfg)
    for k in ("rounds", "loop_dir", "device", "store", "base_url"):
        d.pop(k)
    return d


def run_sage_loop(cfg: SageLoopConfig, console: Any = None) -> LoopResult:
    """Run (or resume) the loop; returns every round's row and the best."""
    cfg.validate()
    say = console.print if console is not None else (lambda *a, **k: None)
    store = DatasetStore(cfg.store)
    loop = Path(cfg.loop_dir).resolve()
    loop.mkdir(parents=True, exist_ok=True)
    state_path = loop / STATE
    state = _read_state(state_path, cfg)
    done = {row["round"]: row for row in state["rounds"]}
    actions: list[str] = []

    def save() -> None:
        state["rounds"] = [done[k] for k in sorted(done)]
        finite = [row for row in state["rounds"] if not math.isnan(row["mean_sage"])]
        state["best"] = max(finite, key=lambda row: row["mean_sage"]) if finite else None
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
        write_report(loop, state["rounds"], state["best"])

    if 0 not in done:
        res = eval_round(cfg, store, cfg.model, 0)
        done[0] = _row(0, res, model=cfg.model, threshold=None, questions_selected=0, rows_selected=0)
        save()
        actions.append("round 0 (base) eval: done")
    else:
        actions.append("round 0 (base): finished earlier, skipped")
    say(f"round 0 (base): mean SaGE {done[0]['mean_sage']:.4f}", highlight=False)
    responses = None
    for r in range(1, cfg.rounds + 1):
        if r in done:
            actions.append(f"round {r}: finished earlier, skipped")
            continue
        responses = responses or aligned_responses(cfg, store, actions)
        selection, threshold, n_q, n_rows = select_round(cfg, store, responses, r)
        actions.append(f"round {r} selection: {selection.ref}")
        run_dir = loop / f"round-{r}" / "run"
        if run_dir.exists() and not (run_dir / "adapter").is_dir():
            shutil.rmtree(run_dir)  # a kill during training: start this round's SFT again from the base
        actions.append(f"round {r} sft: {train_round(cfg, selection, run_dir, console)}")
        res = eval_round(cfg, store, str(run_dir), r)
        actions.append(f"round {r} eval: {res.version.ref}")
        done[r] = _row(r, res, model=str(run_dir), threshold=threshold, questions_selected=n_q,
                       rows_selected=n_rows, selection=selection.ref)
        save()
        say(f"round {r}: threshold {threshold:.3f}, {n_rows} rows selected, mean SaGE {res.mean:.4f} "
            f"[{res.ci_low:.4f}, {res.ci_high:.4f}]", highlight=False)
    save()
    rounds = [done[k] for k in sorted(done) if k <= cfg.rounds]
    return LoopResult(loop, rounds, state["best"], actions)


def write_report(loop: Path, rounds: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """rounds.md (the per-round table) and rounds.png (mean ± interval, threshold, rows selected)."""
    lines = ["| round | threshold | rows selected | mean SaGE | 95% CI | questions | model |",
             "|---|---|---|---|---|---|---|"]
    for row in rounds:
        t = "base" if row["threshold"] is None else f"{row['threshold']:.3f}"
        lines.append(f"| {row['round']} | {t} | {row['rows_selected']} | {row['mean_sage']:.4f} | "
                     f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}] | {row['n_questions']} | `{row['model']}` |")
    if best is not None:
        lines.append(f"\nBest: round {best['round']} (mean SaGE {best['mean_sage']:.4f}), `{best['model']}`.")
    loop.mkdir(parents=True, exist_ok=True)
    atomic_write_text(loop / "rounds.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [row["round"] for row in rounds]
    means = [row["mean_sage"] for row in rounds]
    err = [[max(m - row["ci_low"], 0) for m, row in zip(means, rounds, strict=True)],
           [max(row["ci_high"] - m, 0) for m, row in zip(means, rounds, strict=True)]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(xs, means, yerr=err, marker="o", capsize=4, label="mean SaGE (95% CI)")
    for row in rounds:
        label = row.get("name") or ("base" if row["threshold"] is None
                                    else f"t={row['threshold']:.2f}\n{row['rows_selected']} rows")
        ax.annotate(label, (row["round"], row["mean_sage"]), textcoords="offset points", xytext=(6, -18), fontsize=7)
    ax.set(xlabel="round (0 = base model)", ylabel="mean SaGE on held-out", title="SaGE loop", xticks=xs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(loop / "rounds.png", dpi=110, metadata={"Software": None})
    plt.close(fig)
