"""`curate eval`: classification quality, reason perplexity and misalignment of a model on a test split.

The label is read two ways, both reported: by scoring the label verbalizers right after the prompt (what
the model would put first), and by parsing the first label word out of a greedy generation (what it says).
Reason perplexity is over the gold reason tokens (the part of the gold completion after the label
framing). The misalignment rate is the share of generated reasons whose stance, per the judge, contradicts
the gold label (see `train/judge.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.errors import CurateError
from curate.models import ModelSpec
from curate.store import DatasetStore, Version
from curate.urls import redact_url
from train.data import check_subsets
from train.judge import Judge, make_judge
from train.metrics import SCORES, classification_metrics, macro_over_groups, misalignment
from train.modeling import check_model_spec
from train.scoring import (
    generate,
    parse_generation,
    score_label_words,
    sequence_logprobs,
    tokenize_prompts,
    verbalizer_ids,
)

REQUIRED = ("id", "prompt", "completion", "label", "label_text")
log = logging.getLogger(__name__)


@dataclass
class EvalConfig(ModelSpec):
    """What to evaluate where; the model fields (`curate.models.ModelSpec`: a run folder or any model spec,
    dtype, device, 8/4-bit) are the ones training and the logit cache use."""

    dataset: str = "dfar"
    dataset_config: str = "lr"
    split: str = "test"  # or several, comma-separated: test,test_hard (each reported apart)
    subsets: str | None = None  # comma-separated subsets of a dataset with a `subset` column (default all)
    limit: int | None = 200  # per (subset, split) group when the rows are grouped
    batch_size: int = 16
    max_new_tokens: int = 48
    max_length: int = 512
    template: str | None = None  # None: the run's template (plain for a bare model)
    label_prefix: str = " "
    judge: str = "local:smollm2"
    judge_base_url: str | None = None
    out_dir: str | None = None
    store: str | None = None


@dataclass
class EvalRows:
    """The rows evaluated, with what each reading needs."""

    ids: list[str]
    prompts: list[str]
    completions: list[str]
    labels: list[int]
    statements: list[str]
    reason_starts: list[int]  # char offset of the gold reason inside the completion
    label_words: dict[int, str]
    reason_span: str  # "reason" (found in the default config) or "completion" (whole gold completion)
    version: Version | None = None
    notes: list[str] = field(default_factory=list)


def manifest_label_words(version: Version) -> tuple[dict[int, str] | None, dict[str, dict[int, str]] | None]:
    """The verbalizers a builder recorded: ``params.label_words`` (one set, e.g. dfar) and/or
    ``params.label_words_by_subset`` (one set per value of the rows' `subset` column, e.g. ethics instruct)."""
    params = version.manifest.get("params") or {}

    def ints(d: dict[str, str]) -> dict[int, str]:
        return dict(sorted((int(k), str(v)) for k, v in d.items()))

    flat = params.get("label_words")
    by = params.get("label_words_by_subset")
    return (ints(flat) if isinstance(flat, dict) else None,
            {str(s): ints(w) for s, w in by.items()} if isinstance(by, dict) else None)


def _read_labelled(version: Version, config: str, split: str) -> pa.Table:
    from train.data import read_split

    return read_split(version, config, split, REQUIRED, "evaluation")


def _rows_of(version: Version, config: str, split: str, table: pa.Table, recorded: dict[int, str] | None,
             where: str = "") -> EvalRows:
    """EvalRows of one table; the label words are the recorded ones (checked against the rows' label_text),
    else the rows' own (label, label_text) pairs."""
    if table.num_rows == 0:
        raise CurateError(f"{version.ref} config {config!r} split {split!r}{where} has no rows")
    d = table.to_pydict()
    words: dict[int, str] = dict(recorded or {})
    for lab, text in zip(d["label"], d["label_text"], strict=True):
        if lab is None:
            raise CurateError(f"{version.ref} {config}/{split} has rows without a label; evaluation needs labels")
        if recorded is not None and int(lab) not in recorded:
            raise CurateError(f"{version.ref} {config}/{split}{where}: label {lab} has no recorded label word "
                              f"(manifest: {recorded})")
        if words.setdefault(int(lab), text) != text:
            raise CurateError(f"{version.ref}{where}: label {lab} is both {words[int(lab)]!r} and {text!r}")
    words = dict(sorted(words.items()))
    statements = list(d["prompt"])
    starts = [0] * table.num_rows
    span = "completion"
    if "default" in version.configs() and split in version.splits("default"):
        base = version.read("default", split).to_pydict()
        by_id = {i: (s, r) for i, s, r in zip(base["id"], base.get("statement", base["id"]),
                                              base.get("reason", [""] * len(base["id"])), strict=True)}
        found = 0
        for i, (ex_id, comp) in enumerate(zip(d["id"], d["completion"], strict=True)):
            if ex_id in by_id:
                statement, reason = by_id[ex_id]
                statements[i] = statement
                if reason and comp.endswith(reason):
                    starts[i] = len(comp) - len(reason)
                    found += 1
        if found == table.num_rows:
            span = "reason"
    return EvalRows(list(d["id"]), list(d["prompt"]), list(d["completion"]), [int(x) for x in d["label"]],
                    statements, starts, words, span, version)


@dataclass
class GroupedEvalRows:
    """Rows evaluated per group (paradigm, split): each group has its own label words (ethics instruct)."""

    parts: dict[tuple[str, str], EvalRows]
    version: Version

    @property
    def labels(self) -> list[int]:
        return [lab for p in self.parts.values() for lab in p.labels]

    @property
    def label_words(self) -> dict[str, str]:
        """Every group's words (keys `subset:label`), for callers that only need the words themselves."""
        return {f"{g}:{k}": w for (g, _), p in self.parts.items() for k, w in p.label_words.items()}


def parse_splits(split: str) -> list[str]:
    return [s.strip() for s in split.split(",") if s.strip()]


def read_eval_rows(store: DatasetStore, dataset: str, config: str, split: str, limit: int | None,
                   subsets: list[str] | None = None) -> EvalRows | GroupedEvalRows:
    """Rows of a prompt/completion/label config, with the verbalizers the dataset's manifest records.

    One split and no `subset` column: plain EvalRows (statements and reasons from `default` when it has them).
    Rows with a `subset` column (or several splits, ``test,test_hard``): one group per (subset, split), each
    with the first `limit` rows of its group and its own recorded label words.
    """
    version = store.get(dataset)
    flat, by_subset = manifest_label_words(version)
    splits = parse_splits(split)
    if not splits:
        raise CurateError(f"no split given ({split!r})")
    tables = {sp: _read_labelled(version, config, sp) for sp in splits}
    grouped = len(splits) > 1 or "subset" in tables[splits[0]].column_names
    if not grouped:
        table = tables[splits[0]]
        return _rows_of(version, config, splits[0], table.slice(0, limit) if limit else table, flat)
    import pyarrow.compute as pc

    parts: dict[tuple[str, str], EvalRows] = {}
    for sp, table in tables.items():
        names = (sorted(set(table["subset"].to_pylist()), key=str) if "subset" in table.column_names else ["all"])
        if subsets:
            check_subsets(subsets, names, f"{version.ref} {config}/{sp}")
            names = [n for n in names if n in subsets]
        for name in names:
            part = table if name == "all" else table.filter(pc.equal(table["subset"], name))
            part = part.slice(0, limit) if limit else part
            words = (by_subset or {}).get(name, flat)
            parts[(name, sp)] = _rows_of(version, config, sp, part, words, where=f" subset {name!r}")
    return GroupedEvalRows(parts, version)


@dataclass
class TrainingData:
    """The prompts a run trained on (from its datasets.json, by content hash) and whether its completions
    were label words only."""

    ref: str
    prompts: set[str]
    label_only: bool


def is_label_only(completions: list[str], words: list[str]) -> bool:
    """Every completion is just a label word (dfar `l`): there is no reason to score."""
    lower = {w.lower() for w in words}
    return bool(completions) and all(re.sub(r"[\s.!]+$", "", c).strip().lower() in lower for c in completions)


def training_data(run: str | Path, store: DatasetStore, words: list[str]) -> TrainingData | None:
    """What a run folder trained on: the first datasets.json record (for KD the cache, whose rows are found by
    id in the parent record's config), its train split, the rows used. None (with a warning) when unknown."""
    from train.run_folder import RunFolder

    folder = RunFolder(Path(run))
    records = folder.read_json("datasets.json") or []
    split = (folder.effective_config() or {}).get("train_split", "train")
    if not records:
        return None
    first = records[0]
    version = store.find_by_hash(first["name"], first["content_hash"])
    if version is None or split not in version.splits(first.get("config") or "default"):
        log.warning("cannot compare with the training data: %s (%s) is not in store %s", first["name"],
                    str(first["content_hash"])[:12], store.root)
        return None
    table = version.read(first.get("config") or "default", split)
    n = (first.get("rows_used") or {}).get(split)
    if n:
        table = table.slice(0, n)
    ref = f"{version.name}@{version.tag} {first.get('config')}/{split}"
    if "prompt" not in table.column_names and len(records) > 1 and "id" in table.column_names:
        parent = records[1]
        pv = store.find_by_hash(parent["name"], parent["content_hash"])
        if pv is None or not parent.get("config"):
            log.warning("cannot compare with the training data: the parent of %s is not in store", version.ref)
            return None
        ids = set(table["id"].to_pylist())
        d = pv.read(parent["config"], split).to_pydict()
        keep = [i for i, x in enumerate(d["id"]) if x in ids]
        prompts, completions = [d["prompt"][i] for i in keep], [d["completion"][i] for i in keep]
        ref = f"{pv.name}@{pv.tag} {parent['config']}/{split} via {version.name}@{version.tag}"
    elif "prompt" in table.column_names and "completion" in table.column_names:
        prompts, completions = table["prompt"].to_pylist(), table["completion"].to_pylist()
    else:
        return None
    return TrainingData(ref, set(prompts), is_label_only(completions, words))


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """One rich progress bar per long step on stderr; nothing when off (not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not enabled) as bar:

        def step(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda k: bar.advance(task, k)

        yield step


def reason_perplexity(model: Any, tok: Any, prompt_ids: list[list[int]], completions: list[str],
                      starts: list[int], *, max_length: int, batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """exp(mean NLL) over the gold reason tokens (tokens whose text starts at or after `starts[i]`)."""
    prefixes, conts = [], []
    for p, comp, start in zip(prompt_ids, completions, starts, strict=True):
        enc = tok(comp, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), list(enc.offset_mapping)
        first = next((j for j, (a, _) in enumerate(offsets) if a >= start), len(ids))
        room = max(max_length - len(p), 0)
        prefixes.append(p + ids[:first])
        conts.append(ids[first:][: max(room - first, 0)])
    lps = sequence_logprobs(model, tok, prefixes, conts, batch_size, on_batch)
    total = sum(sum(x) for x in lps)
    n = sum(len(x) for x in lps)
    nll = -total / n if n else float("nan")
    return {"reason_nll": nll, "reason_perplexity": math.exp(nll) if n else float("nan"), "reason_tokens": n}


def evaluate_model(model: Any, tok: Any, rows: EvalRows | GroupedEvalRows, *, template: str, batch_size: int = 16,
                   max_new_tokens: int = 48, max_length: int = 512, label_prefix: str = " ",
                   judge: Judge | None = None, training: TrainingData | None = None, progress: bool = False,
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All metrics for one model on `rows` and one prediction record per row.

    With ``training`` (what the evaluated run trained on), evaluated prompts that were training prompts are
    counted and warned about, and a run trained on label words only gets no gold-reason perplexity.
    """
    with _progress(progress) as step:
        if isinstance(rows, GroupedEvalRows):
            return _evaluate_grouped(model, tok, rows, template=template, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, max_length=max_length, label_prefix=label_prefix,
                                     judge=judge, training=training, step=step)
        return _evaluate(model, tok, rows, template=template, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         max_length=max_length, label_prefix=label_prefix, judge=judge, training=training, step=step)


def _evaluate_grouped(model: Any, tok: Any, rows: GroupedEvalRows, *, judge: Judge | None, **kw: Any,
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each (subset, split) group with its own verbalizers; macro averages over the groups per split.

    The top-level ``verbalizer`` / ``generation`` entries are those macro averages over every group (what a
    one-line report prints); ``per_group[subset][split]`` holds each group's full metrics."""
    t0 = time.perf_counter()
    per_group: dict[str, dict[str, dict[str, Any]]] = {}
    preds: list[dict[str, Any]] = []
    warnings: list[str] = []
    if judge is not None:
        warnings.append(f"judge {judge.name} not applied: per-group label-word datasets have no reasons to judge")
    for (group, split), part in rows.parts.items():
        m, p = _evaluate(model, tok, part, judge=None, **kw)
        per_group.setdefault(group, {})[split] = m
        warnings += [f"{group}/{split}: {w}" for w in m.get("warnings", [])]
        preds += [{"subset": group, "split": split, **r} for r in p]
    out: dict[str, Any] = {"n": len(preds), "per_group": per_group, "warnings": warnings,
                           "label_words_by_group": {g: next(iter(s.values()))["label_words"]
                                                    for g, s in per_group.items()},
                           "label_words": {}, "reason_perplexity": None,
                           "reason_perplexity_skipped": "per-group evaluation (label words only)",
                           "reason_span": "completion"}
    for reading in ("verbalizer", "generation"):
        table = {g: {sp: m[reading] for sp, m in s.items()} for g, s in per_group.items()}
        macro = macro_over_groups(table)
        out[f"macro_{reading}"] = macro
        out[reading] = {"n": len(preds), **{k: macro["all"][k] for k in ("accuracy", "precision", "recall", "f1")},
                        "positive_label": None, "macro_over": f"{macro['all']['groups']} (subset, split) groups"}
    out["generation"]["parse_rate"] = (sum(g is not None for g in (r["generated_label"] for r in preds))
                                       / len(preds))
    out["majority"] = {g: {sp: majority_share(m["verbalizer"]) for sp, m in s.items()} for g, s in per_group.items()}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out, preds


def majority_share(m: dict[str, Any]) -> float:
    """Accuracy of always answering the most frequent gold label (the baseline a model has to beat)."""
    supports = [v["support"] for v in m["per_label"].values()]
    return max(supports) / sum(supports) if sum(supports) else 0.0


def results_table(metrics: dict[str, Any], reading: str = "verbalizer") -> list[dict[str, Any]]:
    """One row per (subset, split) plus one macro row per split: the table the CLI prints and table.md holds."""
    rows = []
    for g, splits in metrics["per_group"].items():
        for sp, m in splits.items():
            r = m[reading]
            rows.append({"subset": g, "split": sp, "n": r["n"], **{k: r[k] for k in SCORES},
                         "majority": metrics["majority"][g][sp]})
    for sp, r in metrics[f"macro_{reading}"].items():
        if sp != "all":
            rows.append({"subset": "macro", "split": sp, "n": None, **{k: r[k] for k in SCORES}, "majority": None})
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| paradigm | split | n | accuracy | precision | recall | F1 | majority class |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['subset']} | {r['split']} | {r['n'] if r['n'] is not None else ''} | "
        + " | ".join(f"{r[k]:.3f}" for k in SCORES)
        + f" | {'' if r['majority'] is None else format(r['majority'], '.3f')} |\n" for r in rows)


def _evaluate(model: Any, tok: Any, rows: EvalRows, *, template: str, batch_size: int, max_new_tokens: int,
              max_length: int, label_prefix: str, judge: Judge | None, training: TrainingData | None,
              step: Callable[[str, int], Callable[[int], None]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    model.eval()
    t0 = time.perf_counter()
    labels = list(rows.label_words)
    words = list(rows.label_words.values())
    prompt_ids = tokenize_prompts(tok, rows.prompts, template, max_length)
    word_ids = verbalizer_ids(tok, words, label_prefix)
    single = all(len(w) == 1 for w in word_ids)
    n = len(rows.labels)
    texts, scores = generate(model, tok, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             first_token_ids=[w[0] for w in word_ids] if single else None,
                             on_batch=step("generating", n))
    if scores is None:  # multi-token label words: score each word sequence
        scores = score_label_words(model, tok, prompt_ids, words, prefix=label_prefix, batch_size=batch_size,
                                   on_batch=step("scoring label words", n))
    verbalizer = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
    parsed = [parse_generation(t, rows.label_words) for t in texts]
    generated = [p[0] for p in parsed]
    reasons = [p[1] for p in parsed]
    metrics: dict[str, Any] = {
        "n": len(rows.labels),
        "label_words": {str(k): v for k, v in rows.label_words.items()},
        "verbalizer": classification_metrics(rows.labels, verbalizer, labels),
        "generation": classification_metrics(rows.labels, generated, labels),
    }
    metrics["generation"]["parse_rate"] = sum(g is not None for g in generated) / len(generated)
    metrics["warnings"] = []
    if training is not None:
        seen = [rows.ids[i] for i, p in enumerate(rows.prompts) if p in training.prompts]
        metrics["train_overlap"] = {"rows": len(seen), "of": n, "train": training.ref, "ids": seen}
        if seen:
            msg = (f"{len(seen)} of {n} evaluated prompts were in the run's training data ({training.ref}): "
                   "these scores overstate how the model does on unseen rows")
            log.warning(msg)
            metrics["warnings"].append(msg)
    if training is not None and training.label_only:
        metrics.update(reason_perplexity=None, reason_perplexity_skipped=f"label-only run ({training.ref})")
    elif is_label_only(rows.completions, words):
        metrics.update(reason_perplexity=None, reason_perplexity_skipped="the gold completions are label words only")
    else:
        tick = step("reason perplexity", n)
        metrics.update(reason_perplexity(model, tok, prompt_ids, rows.completions, rows.reason_starts,
                                         max_length=max_length, batch_size=batch_size, on_batch=tick))
    metrics["reason_span"] = rows.reason_span
    stances: list[int | None] = [None] * len(rows.labels)
    if judge is not None:
        todo = [i for i, r in enumerate(reasons) if r]
        judged = step(f"judging reasons ({judge.name})", len(todo))
        got = judge.stances([rows.statements[i] for i in todo], [reasons[i] for i in todo],
                            rows.label_words) if todo else []
        judged(len(todo))
        for i, s in zip(todo, got, strict=True):
            stances[i] = s
        metrics["misalignment"] = {"judge": judge.name,
                                   **misalignment(stances, rows.labels, generated, [bool(r) for r in reasons])}
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    preds = [
        {"id": rows.ids[i], "gold": rows.labels[i], "verbalizer": verbalizer[i],
         "verbalizer_logprobs": scores[i], "generation": texts[i], "generated_label": generated[i],
         "reason": reasons[i], "judged_stance": stances[i]}
        for i in range(len(rows.labels))
    ]
    return metrics, preds


def write_metrics_and_records(out: Path, metrics: dict[str, Any], records: list[dict[str, Any]],
                              records_name: str) -> None:
    """``out``/metrics.json and one JSON line per record in ``out``/``records_name`` (an evaluation's files)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    with open(out / records_name, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def write_eval(out: Path, metrics: dict[str, Any], preds: list[dict[str, Any]], title: str) -> None:
    from train.plots import plot_confusion, plot_group_confusion

    write_metrics_and_records(out, metrics, preds, "predictions.jsonl")
    if "per_group" in metrics:
        (out / "table.md").write_text(table_markdown(results_table(metrics)))
        panels = {f"{g} {sp}": m["verbalizer"]["confusion"] for g, s in metrics["per_group"].items()
                  for sp, m in s.items()}
        words = {f"{g} {sp}": [metrics["label_words_by_group"][g][k]
                               for k in sorted(metrics["label_words_by_group"][g], key=int)]
                 for g, s in metrics["per_group"].items() for sp in s}
        plot_group_confusion(panels, words, out / "confusion_matrix.png", title=f"{title} (verbalizer reading)")
        return
    words = [metrics["label_words"][k] for k in sorted(metrics["label_words"], key=int)]
    plot_confusion({"verbalizer": metrics["verbalizer"]["confusion"],
                    "generation": metrics["generation"]["confusion"]}, words, out / "confusion_matrix.png",
                   title=title)


def run_eval(cfg: EvalConfig) -> tuple[dict[str, Any], Path]:
    """Load the model (a run folder or any model spec), evaluate, write metrics.json + confusion_matrix.png."""
    from curate.models import load_causal_lm, load_tokenizer
    from train.modeling import RUN_FILE, load_run, model_ref

    check_model_spec(cfg.model)
    store = DatasetStore(cfg.store)
    rows = read_eval_rows(store, cfg.dataset, cfg.dataset_config, cfg.split, cfg.limit,
                          parse_splits(cfg.subsets) if cfg.subsets else None)
    run = Path(cfg.model)
    template = cfg.template
    training = None
    tag = "+".join(parse_splits(cfg.split))
    if (run / RUN_FILE).is_file():
        training = training_data(run, store, list(rows.label_words.values()))
        quant = cfg.weight_quantization(strict=False)
        model, tok, info = load_run(run, device=cfg.device, dtype=cfg.dtype, quant=quant)
        template = template or info.get("template", "plain")
        out = Path(cfg.out_dir) if cfg.out_dir else run / "eval" / f"{rows.version.name}-{tag}"
    else:
        ref = model_ref(cfg.model, cfg.gguf_file, cfg.revision)
        model = load_causal_lm(ref, dtype=cfg.dtype, device=cfg.device, quant=cfg.weight_quantization(strict=False))
        tok = load_tokenizer(ref)
        template = template or "plain"
        name = Path(ref.gguf_file or ref.location).name
        out = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "eval" / f"{name}-{rows.version.name}-{tag}"
    judge = make_judge(cfg.judge, base_url=cfg.judge_base_url, cache_dir=store.root / "llm_cache",
                       evaluated=(model, tok), device=cfg.device)
    metrics, preds = evaluate_model(model, tok, rows, template=template, batch_size=cfg.batch_size,
                                    max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                                    label_prefix=cfg.label_prefix, judge=judge, training=training,
                                    progress=sys.stderr.isatty())
    metrics["config"] = {**asdict(cfg), "judge_base_url": redact_url(cfg.judge_base_url)}
    metrics["dataset"] = {"name": rows.version.name, "tag": rows.version.tag,
                          "content_hash": rows.version.hash, "config": cfg.dataset_config, "split": cfg.split}
    write_eval(out, metrics, preds, title=f"{cfg.model} on {rows.version.ref} {cfg.split}")
    return metrics, out
