"""`curate eval`: classification quality, reason perplexity and misalignment of a model on a test split.

The label is read two ways, both reported: by scoring the label verbalizers right after the prompt (what
the model would put first), and by parsing the first label word out of a greedy generation (what it says).
Reason perplexity is over the gold reason tokens (the part of the gold completion after the label
framing). The misalignment rate is the share of generated reasons whose stance, per the judge, contradicts
the gold label (see `train/judge.py`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.models import ModelSpec
from curate.store import DatasetStore, Version
from train.judge import Judge, make_judge
from train.metrics import classification_metrics, misalignment
from train.scoring import (
    generate,
    parse_generation,
    score_label_words,
    sequence_logprobs,
    tokenize_prompts,
    verbalizer_ids,
)

REQUIRED = ("id", "prompt", "completion", "label", "label_text")


@dataclass
class EvalConfig(ModelSpec):
    """What to evaluate where; the model fields (`curate.models.ModelSpec`: a run folder or any model spec,
    dtype, device, 8/4-bit) are the ones training and the logit cache use."""

    dataset: str = "dfar"
    dataset_config: str = "lr"
    split: str = "test"
    limit: int | None = 200
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


def read_eval_rows(store: DatasetStore, dataset: str, config: str, split: str, limit: int | None) -> EvalRows:
    """Rows of a prompt/completion/label config; statements and reasons from `default` when it has them."""
    version = store.get(dataset)
    table = version.read(config, split)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CurateError(f"{version.ref} config {config!r} lacks column(s) {', '.join(missing)} "
                          f"(evaluation needs {', '.join(REQUIRED)})")
    if limit:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise CurateError(f"{version.ref} config {config!r} split {split!r} has no rows")
    d = table.to_pydict()
    words: dict[int, str] = {}
    for lab, text in zip(d["label"], d["label_text"], strict=True):
        if lab is None:
            raise CurateError(f"{version.ref} {config}/{split} has rows without a label; evaluation needs labels")
        if words.setdefault(int(lab), text) != text:
            raise CurateError(f"{version.ref}: label {lab} is both {words[int(lab)]!r} and {text!r}")
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


def reason_perplexity(model: Any, tok: Any, prompt_ids: list[list[int]], completions: list[str],
                      starts: list[int], *, max_length: int, batch_size: int) -> dict[str, float]:
    """exp(mean NLL) over the gold reason tokens (tokens whose text starts at or after `starts[i]`)."""
    prefixes, conts = [], []
    for p, comp, start in zip(prompt_ids, completions, starts, strict=True):
        enc = tok(comp, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), list(enc.offset_mapping)
        first = next((j for j, (a, _) in enumerate(offsets) if a >= start), len(ids))
        room = max(max_length - len(p), 0)
        prefixes.append(p + ids[:first])
        conts.append(ids[first:][: max(room - first, 0)])
    lps = sequence_logprobs(model, tok, prefixes, conts, batch_size)
    total = sum(sum(x) for x in lps)
    n = sum(len(x) for x in lps)
    nll = -total / n if n else float("nan")
    return {"reason_nll": nll, "reason_perplexity": math.exp(nll) if n else float("nan"), "reason_tokens": n}


def evaluate_model(model: Any, tok: Any, rows: EvalRows, *, template: str, batch_size: int = 16,
                   max_new_tokens: int = 48, max_length: int = 512, label_prefix: str = " ",
                   judge: Judge | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All metrics for one model on `rows` and one prediction record per row."""
    model.eval()
    t0 = time.perf_counter()
    labels = list(rows.label_words)
    words = list(rows.label_words.values())
    prompt_ids = tokenize_prompts(tok, rows.prompts, template, max_length)
    word_ids = verbalizer_ids(tok, words, label_prefix)
    single = all(len(w) == 1 for w in word_ids)
    texts, scores = generate(model, tok, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             first_token_ids=[w[0] for w in word_ids] if single else None)
    if scores is None:  # multi-token label words: score each word sequence
        scores = score_label_words(model, tok, prompt_ids, words, prefix=label_prefix, batch_size=batch_size)
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
    metrics.update(reason_perplexity(model, tok, prompt_ids, rows.completions, rows.reason_starts,
                                     max_length=max_length, batch_size=batch_size))
    metrics["reason_span"] = rows.reason_span
    stances: list[int | None] = [None] * len(rows.labels)
    if judge is not None:
        todo = [i for i, r in enumerate(reasons) if r]
        got = judge.stances([rows.statements[i] for i in todo], [reasons[i] for i in todo],
                            rows.label_words) if todo else []
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


def write_eval(out: Path, metrics: dict[str, Any], preds: list[dict[str, Any]], title: str) -> None:
    from train.plots import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    with open(out / "predictions.jsonl", "w") as fh:
        for p in preds:
            fh.write(json.dumps(p) + "\n")
    words = [metrics["label_words"][k] for k in sorted(metrics["label_words"], key=int)]
    plot_confusion({"verbalizer": metrics["verbalizer"]["confusion"],
                    "generation": metrics["generation"]["confusion"]}, words, out / "confusion_matrix.png",
                   title=title)


def run_eval(cfg: EvalConfig) -> tuple[dict[str, Any], Path]:
    """Load the model (a run folder or any model spec), evaluate, write metrics.json + confusion_matrix.png."""
    from curate.models import load_causal_lm, load_tokenizer
    from train.modeling import RUN_FILE, load_run, model_ref

    store = DatasetStore(cfg.store)
    rows = read_eval_rows(store, cfg.dataset, cfg.dataset_config, cfg.split, cfg.limit)
    run = Path(cfg.model)
    template = cfg.template
    if (run / RUN_FILE).is_file():
        quant = cfg.weight_quantization(strict=False)
        model, tok, info = load_run(run, device=cfg.device, dtype=cfg.dtype, quant=quant)
        template = template or info.get("template", "plain")
        out = Path(cfg.out_dir) if cfg.out_dir else run / "eval" / f"{rows.version.name}-{cfg.split}"
    else:
        ref = model_ref(cfg.model, cfg.gguf_file, cfg.revision)
        model = load_causal_lm(ref, dtype=cfg.dtype, device=cfg.device, quant=cfg.weight_quantization(strict=False))
        tok = load_tokenizer(ref)
        template = template or "plain"
        name = Path(ref.gguf_file or ref.location).name
        out = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "eval" / f"{name}-{rows.version.name}-{cfg.split}"
    judge = make_judge(cfg.judge, base_url=cfg.judge_base_url, cache_dir=store.root / "llm_cache",
                       evaluated=(model, tok), device=cfg.device)
    metrics, preds = evaluate_model(model, tok, rows, template=template, batch_size=cfg.batch_size,
                                    max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                                    label_prefix=cfg.label_prefix, judge=judge)
    metrics["config"] = asdict(cfg)
    metrics["dataset"] = {"name": rows.version.name, "tag": rows.version.tag,
                          "content_hash": rows.version.hash, "config": cfg.dataset_config, "split": cfg.split}
    write_eval(out, metrics, preds, title=f"{cfg.model} on {rows.version.ref} {cfg.split}")
    return metrics, out
