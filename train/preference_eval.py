"""Preference evaluation on held-out pairs: does a model prefer the chosen response, and by how much under a
DPO teacher's implicit reward.

Per pair (prompt x, chosen c, rejected r), with log pi(y) the model's summed log-prob of y's tokens after x:
- preference accuracy (summed): fraction of pairs with log pi(c) > log pi(r);
- preference accuracy (length-normalised): the same with the mean log-prob per token of each side;
- reward margin against a DPO teacher's reference pi_ref and beta (TRL's ``rewards/margins``, with pi the
  evaluated model): beta · [(log pi(c) − log pi_ref(c)) − (log pi(r) − log pi_ref(r))]; for the DPO teacher
  itself this is its own implicit-reward margin.

Token ids follow the house rule (`train.data`, the logit caches): prompt ids under the template, then the
response ids without special tokens, no EOS unless asked; so a teacher, its cache and this evaluation score
the same tokens. Ties count as not preferring the chosen side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import CurateError
from curate.models import ModelSpec, prompt_token_ids

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")
PROGRESS_MIN_PAIRS = 32  # below this a scoring pass takes a few seconds at most: no bar


@dataclass
class PairIds:
    """One pair as token ids: the shared prompt and each response (no prompt tokens)."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class TokenizedPairs:
    pairs: list[PairIds]
    notes: list[str] = field(default_factory=list)


def read_pairs(version: Any, config: str, split: str, limit: int | None = None) -> Any:
    """The pyarrow table of one split of a pairs config, refusing a missing split / column or no rows."""
    from train.data import read_split

    table = read_split(version, config, split, PAIR_COLUMNS, "preference evaluation")
    if limit:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise CurateError(f"{version.ref} {config}/{split} has no rows")
    return table


def tokenize_pairs(tok: Any, table: Any, *, template: str, max_length: int, append_eos: bool = False,
                   where: str = "pairs") -> TokenizedPairs:
    """Pairs as ids: ``prompt_token_ids`` + each response's ids (cut so prompt + response <= max_length).

    A prompt that alone fills ``max_length`` drops its pair (counted in the notes); a response with no tokens
    is refused, naming the row (its mean log-prob has no meaning).
    """
    d = table.to_pydict()
    eos = [tok.eos_token_id] if append_eos and tok.eos_token_id is not None else []
    out = TokenizedPairs([])
    dropped = cut = 0
    for i, (pid, prompt, chosen, rejected) in enumerate(zip(*(d[c] for c in PAIR_COLUMNS), strict=True)):
        p = prompt_token_ids(tok, prompt, template)
        if len(p) >= max_length:
            dropped += 1
            continue
        sides = []
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            ids = list(tok(text or "", add_special_tokens=False).input_ids) + eos
            if not ids:
                raise CurateError(f"{where} row {i} (id {pid}): {name} has no tokens")
            if len(p) + len(ids) > max_length:
                ids = ids[: max_length - len(p)]
                cut += 1
            sides.append(ids)
        out.pairs.append(PairIds(str(pid), p, sides[0], sides[1]))
    if cut:
        out.notes.append(f"{cut} responses cut to max_length {max_length}")
    if dropped:
        out.notes.append(f"{dropped} pairs dropped: the prompt alone fills max_length {max_length}")
    if not out.pairs:
        raise CurateError(f"{where}: no pairs left, every prompt is at least max_length ({max_length}) tokens")
    return out


@dataclass
class SideScores:
    """Per pair: summed log-prob of one side's response tokens and their number."""

    sums: np.ndarray  # [N] float64
    lengths: np.ndarray  # [N] int

    @property
    def means(self) -> np.ndarray:
        return self.sums / self.lengths


@dataclass
class PairScores:
    chosen: SideScores
    rejected: SideScores


def score_pairs(model: Any, tok: Any, pairs: Sequence[PairIds], *, batch_size: int = 16,
                on_batch: Callable[[int], None] | None = None) -> PairScores:
    """Summed log-probs of both responses of every pair (batched, no grad; chosen and rejected of a pair sit
    in the same batch, sharing the prompt)."""
    from train.scoring import sequence_logprobs

    prefixes = [p.prompt_ids for p in pairs for _ in (0, 1)]
    conts = [ids for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    was_training = model.training
    model.eval()
    try:
        lps = sequence_logprobs(model, tok, prefixes, conts, batch_size, on_batch)
    finally:
        model.train(was_training)
    sums = np.array([float(np.sum(np.asarray(x, dtype=np.float64))) for x in lps])
    lengths = np.array([len(x) for x in lps])
    return PairScores(SideScores(sums[0::2], lengths[0::2]), SideScores(sums[1::2], lengths[1::2]))


def reward_margins(policy: PairScores, reference: PairScores, beta: float) -> np.ndarray:
    """beta · [(log pi(c) − log pi_ref(c)) − (log pi(r) − log pi_ref(r))] per pair (TRL's rewards/margins)."""
    return beta * ((policy.chosen.sums - reference.chosen.sums) - (policy.rejected.sums - reference.rejected.sums))


def _margin_stats(policy: PairScores, reference: PairScores, beta: float) -> dict[str, float]:
    m = reward_margins(policy, reference, beta)
    return {"margin": float(m.mean()), "margin_std": float(m.std()), "reward_accuracy": float((m > 0).mean()),
            "reward_chosen": float(beta * (policy.chosen.sums - reference.chosen.sums).mean()),
            "reward_rejected": float(beta * (policy.rejected.sums - reference.rejected.sums).mean())}


def preference_metrics(ids: Sequence[str], policy: PairScores, reference: PairScores | None = None,
                       beta: float | None = None, teacher: PairScores | None = None,
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracies (summed, length-normalised) and, with a reference and beta, the reward margin of the
    evaluated model (and of the teacher when its scores are given); plus one record per pair."""
    n = len(ids)
    out: dict[str, Any] = {
        "n": n,
        "accuracy_sum": float((policy.chosen.sums > policy.rejected.sums).mean()),
        "accuracy_mean": float((policy.chosen.means > policy.rejected.means).mean()),
        "logp_chosen": float(policy.chosen.sums.mean()), "logp_rejected": float(policy.rejected.sums.mean()),
        "tokens_chosen": float(policy.chosen.lengths.mean()), "tokens_rejected": float(policy.rejected.lengths.mean()),
    }
    records = [{"id": ids[i], "logp_chosen": float(policy.chosen.sums[i]),
                "logp_rejected": float(policy.rejected.sums[i]), "tokens_chosen": int(policy.chosen.lengths[i]),
                "tokens_rejected": int(policy.rejected.lengths[i])} for i in range(n)]
    if reference is not None and beta is not None:
        out["beta"] = beta
        out.update(_margin_stats(policy, reference, beta))
        margins = reward_margins(policy, reference, beta)
        for i, r in enumerate(records):
            r.update(ref_logp_chosen=float(reference.chosen.sums[i]),
                     ref_logp_rejected=float(reference.rejected.sums[i]), margin=float(margins[i]))
        if teacher is not None:
            t = reward_margins(teacher, reference, beta)
            out["teacher"] = {"accuracy_sum": float((teacher.chosen.sums > teacher.rejected.sums).mean()),
                              "accuracy_mean": float((teacher.chosen.means > teacher.rejected.means).mean()),
                              **_margin_stats(teacher, reference, beta)}
            for i, r in enumerate(records):
                r["teacher_margin"] = float(t[i])
    elif teacher is not None:
        raise CurateError("a teacher margin needs the teacher's reference and beta")
    return out, records


def plot_margins(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Histogram of the per-pair reward margins (and the teacher's), else of the summed log-prob differences."""
    from train.plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if "margin" in records[0]:
        series = {"evaluated model": [r["margin"] for r in records]}
        if "teacher_margin" in records[0]:
            series["DPO teacher"] = [r["teacher_margin"] for r in records]
        xlabel = "reward margin  beta·[(log pi − log pi_ref)(chosen) − (…)(rejected)]"
    else:
        series = {"evaluated model": [r["logp_chosen"] - r["logp_rejected"] for r in records]}
        xlabel = "log pi(chosen) − log pi(rejected)  (summed over tokens)"
    bins = np.histogram_bin_edges(np.concatenate([np.asarray(v) for v in series.values()]), bins="auto")
    for name, values in series.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (mean {np.mean(values):.3g})")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title or "per-pair preference margins")
    ax.legend()
    return _save(fig, path)


def write_preference_eval(out: Path, metrics: dict[str, Any], records: list[dict[str, Any]], title: str) -> Path:
    """metrics.json, pairs.jsonl (one record per pair) and margins.png in ``out``."""
    from train.evaluate import write_metrics_and_records

    write_metrics_and_records(out, metrics, records, "pairs.jsonl")
    return plot_margins(records, out / "margins.png", title)


@contextlib.contextmanager
def scoring_progress(n_pairs: int, enabled: bool | None = None) -> Any:
    """A rich bar over the 2·N sequences on stderr when it is a terminal and the pass is more than a few seconds."""
    from train.evaluate import _progress

    on = (sys.stderr.isatty() and n_pairs >= PROGRESS_MIN_PAIRS) if enabled is None else enabled
    with _progress(on) as step:
        yield lambda what: step(what, 2 * n_pairs)


# ---------------------------------------------------------------- `curate eval preferences`


@dataclass
class PreferenceEvalConfig(ModelSpec):
    """What `curate eval preferences` evaluates: a model (run folder or any spec) on held-out pairs, against the
    reference and beta of a DPO teacher (taken from the teacher's or the model's run.json unless given)."""

    teacher: str | None = None  # a DPO run folder: its reference and beta, and its own margin for comparison
    reference: str | None = None  # pi_ref (default: the teacher's recorded reference)
    beta: float | None = None  # default: the teacher's recorded beta
    dataset: str = "preferences"
    dataset_config: str = "pairs"
    split: str = "test"
    limit: int | None = None
    batch_size: int = 16
    max_length: int = 512
    template: str | None = None  # default: the model run's template, else the teacher's, else plain
    append_eos: bool | None = None  # default: the teacher's (or the model run's) setting, else no EOS
    out_dir: str | None = None
    store: str | None = None


def run_info(spec: str | None) -> dict[str, Any] | None:
    from train.modeling import RUN_FILE

    if spec and (Path(spec) / RUN_FILE).is_file():
        return json.loads((Path(spec) / RUN_FILE).read_text())
    return None


def dpo_facts(info: dict[str, Any] | None) -> tuple[str | None, float | None]:
    """(reference path, beta) a DPO run recorded, or (None, None)."""
    if not info or info.get("method") != "dpo":
        return None, None
    return (info.get("reference") or {}).get("path"), (info.get("config") or {}).get("beta")


def load_model(spec: str, cfg: PreferenceEvalConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of a run folder (merged, or base + adapter) or any model spec."""
    from curate.models import load_causal_lm, load_tokenizer
    from train.modeling import RUN_FILE, check_model_spec, load_run, model_ref

    check_model_spec(spec)
    quant = cfg.weight_quantization(strict=False)
    if (Path(spec) / RUN_FILE).is_file():
        model, tok, _ = load_run(spec, device=cfg.device, dtype=cfg.dtype, quant=quant)
        return model, tok
    ref = model_ref(spec, cfg.gguf_file, cfg.revision)
    return load_causal_lm(ref, dtype=cfg.dtype, device=cfg.device, quant=quant), load_tokenizer(ref)


def run_preference_eval(cfg: PreferenceEvalConfig, *, tokenizer: Any | None = None,
                        progress: bool | None = None) -> tuple[dict[str, Any], Path]:
    """Score the pairs with the model, its reference and the teacher (one model in memory at a time), write
    metrics.json / pairs.jsonl / margins.png, return (metrics, folder)."""
    import gc

    from curate.models import tokenizer_fingerprint
    from curate.store import DatasetStore

    model_info, teacher_info = run_info(cfg.model), run_info(cfg.teacher)
    if cfg.teacher and (teacher_info is None or teacher_info.get("method") != "dpo"):
        raise CurateError(f"--teacher {cfg.teacher} is not a DPO run folder (run.json with method dpo)")
    t_ref, t_beta = dpo_facts(teacher_info)
    m_ref, m_beta = dpo_facts(model_info)
    reference = cfg.reference or t_ref or m_ref
    beta = cfg.beta if cfg.beta is not None else (t_beta if t_beta is not None else m_beta)
    if reference is not None and beta is None:
        raise CurateError("a reward margin needs --beta (or a DPO --teacher run that records it)")
    if reference is None and cfg.beta is not None:
        raise CurateError("--beta without a reference: give --reference or a DPO --teacher run")
    template = cfg.template or (model_info or {}).get("template") or (teacher_info or {}).get("template") or "plain"
    recorded = [i["config"].get("append_eos") for i in (teacher_info, model_info) if i and i.get("method") == "dpo"]
    append_eos = cfg.append_eos if cfg.append_eos is not None else bool(recorded and recorded[0])
    store = DatasetStore(cfg.store)
    version = store.get(cfg.dataset)
    table = read_pairs(version, cfg.dataset_config, cfg.split, cfg.limit)
    scored: dict[str, PairScores] = {}
    fingerprint = None
    pairs: TokenizedPairs | None = None
    roles = [("model", cfg.model), ("reference", reference), ("teacher", cfg.teacher)]
    for role, spec in roles:
        if spec is None:
            continue
        model, tok = load_model(spec, cfg)
        tok = tokenizer if tokenizer is not None else tok
        fp = tokenizer_fingerprint(tok)
        if fingerprint is None:
            fingerprint = fp
            pairs = tokenize_pairs(tok, table, template=template, max_length=cfg.max_length, append_eos=append_eos,
                                   where=f"{version.ref} {cfg.dataset_config}/{cfg.split}")
        elif fp != fingerprint:
            raise CurateError(f"the {role} {spec} has a different tokenizer from the model {cfg.model}: the pairs "
                              "would not be the same tokens")
        assert pairs is not None
        with scoring_progress(len(pairs.pairs), progress) as bar:
            scored[role] = score_pairs(model, tok, pairs.pairs, batch_size=cfg.batch_size,
                                       on_batch=bar(f"scoring {len(pairs.pairs)} pairs with the {role}"))
        del model
        gc.collect()
    assert pairs is not None
    metrics, records = preference_metrics([p.id for p in pairs.pairs], scored["model"], scored.get("reference"),
                                          beta if reference is not None else None, scored.get("teacher"))
    metrics.update(model=cfg.model, reference=reference, teacher_run=cfg.teacher, template=template,
                   append_eos=append_eos, notes=pairs.notes, config=asdict(cfg),
                   dataset={"name": version.name, "tag": version.tag, "content_hash": version.hash,
                            "config": cfg.dataset_config, "split": cfg.split})
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    elif model_info is not None:
        out = Path(cfg.model) / "eval" / f"preferences-{version.name}-{cfg.split}"
    else:
        out = Path("runs") / "eval" / f"{Path(cfg.model).name}-preferences-{version.name}-{cfg.split}"
    write_preference_eval(out, metrics, records, title=f"{Path(cfg.model).name} on {version.ref} {cfg.split}")
    return metrics, out
