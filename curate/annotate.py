"""Human annotation tasks: pair judgments (SaGE's "same meaning?" study) and label reviews (DFAR / ETHICS).

A task lives in the store's annotation folder, ``<store>/annotations/<task>/``:

- ``task.json``       kind, source version (name, tag, content hash, config), seed, fields and the items in the
                      order annotators see them (the order is seeded and recorded here);
- ``judgments.jsonl`` every judgment ever made, one JSON line each, appended and fsynced before the answer
                      is acknowledged, so a closed tab or a killed server loses nothing. For one
                      (item, annotator, field) the later line wins; the earlier ones stay as history.

`export_task` turns a task into an ``annotations`` store version whose lineage names the task and its source.
Agreement lives in `curate.agreement`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from filelock import FileLock

from curate.errors import CurateError, InputError
from curate.provenance import now_iso
from curate.store import DatasetStore, SourceFile, Version, check_name

log = logging.getLogger(__name__)

ANNOTATIONS_DIR = "annotations"
TASK_FILE = "task.json"
JUDGMENTS_FILE = "judgments.jsonl"
ANSWERS = ("Y", "N", "NA")
FIELDS: dict[str, tuple[str, ...]] = {"pair": ("same",), "label": ("correct", "supports")}
QUESTIONS = {
    "same": "Do the two answers mean the same?",
    "correct": "Is the label correct?",
    "supports": "Does the reason support the label?",
}
ANNOTATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BUILDER_VERSION = "1"


def check_annotator(name: object) -> str:
    if not isinstance(name, str) or not ANNOTATOR_RE.match(name):
        raise CurateError(f"annotator name {str(name)!r} is not allowed: letters, digits, '_', '.', '-' (1-64)")
    return name


@dataclass
class Task:
    """One annotation task as stored in ``task.json``."""

    name: str
    kind: str
    source: dict[str, Any]
    seed: int
    items: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    path: Path = Path()

    @property
    def fields(self) -> tuple[str, ...]:
        return FIELDS[self.kind]

    def item_ids(self) -> list[str]:
        return [it["id"] for it in self.items]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "seed": self.seed,
                "fields": list(self.fields), "params": self.params, "created_at": self.created_at,
                "items": self.items}


def tasks_root(store: DatasetStore) -> Path:
    return store.root / ANNOTATIONS_DIR


def task_dir(store: DatasetStore, name: str) -> Path:
    return store._inside(tasks_root(store) / check_name(name, "task name"))


def list_tasks(store: DatasetStore) -> list[str]:
    root = tasks_root(store)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / TASK_FILE).is_file())


def load_task(store: DatasetStore, name: str) -> Task:
    """Read and check a task file; anything malformed is one line naming the file (and the item)."""
    path = task_dir(store, name) / TASK_FILE
    if not path.is_file():
        known = ", ".join(list_tasks(store)) or "none"
        raise CurateError(f"no annotation task {name!r} in store {store.root} (tasks: {known})")
    return parse_task(path)


def parse_task(path: Path) -> Task:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"malformed task file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, "malformed task file (not a JSON object)")
    for key in ("name", "kind", "source", "seed", "items"):
        if key not in data:
            raise InputError(path, f"malformed task file (no {key!r})")
    kind = data["kind"]
    if kind not in FIELDS:
        raise InputError(path, f"malformed task file (kind {kind!r}; expected one of {', '.join(FIELDS)})")
    items = data["items"]
    if not isinstance(items, list) or not items:
        raise InputError(path, "malformed task file ('items' must be a non-empty list)")
    need = ("text_a", "text_b") if kind == "pair" else ("statement", "label")
    seen: set[str] = set()
    for i, it in enumerate(items, 1):
        if not isinstance(it, dict) or not isinstance(it.get("id"), str):
            raise InputError(path, f"malformed task file (item {i} has no string 'id')")
        missing = [k for k in need if k not in it]
        if missing:
            raise InputError(path, f"malformed task file (item {i} {it['id']!r} lacks {missing[0]!r})")
        if it["id"] in seen:
            raise InputError(path, f"malformed task file (item {i}: duplicate id {it['id']!r})")
        seen.add(it["id"])
    return Task(name=str(data["name"]), kind=kind, source=dict(data["source"]), seed=int(data["seed"]), items=items,
                params=dict(data.get("params") or {}), created_at=str(data.get("created_at", "")), path=path.parent)


def _write_task(store: DatasetStore, task: Task, overwrite: bool) -> Task:
    folder = task_dir(store, task.name)
    if (folder / TASK_FILE).exists() and not overwrite:
        raise CurateError(f"annotation task {task.name!r} already exists ({folder}); pick another name")
    folder.mkdir(parents=True, exist_ok=True)
    from curate.atomic import atomic_write_text

    atomic_write_text(folder / TASK_FILE, json.dumps(task.to_json(), ensure_ascii=False, indent=1) + "\n")
    task.path = folder
    return task


def _source_facts(v: Version, config: str) -> dict[str, Any]:
    return {"name": v.name, "tag": v.tag, "content_hash": v.hash, "config": config}


# ---- creating tasks ----------------------------------------------------------------------------------------
def pair_similarities(rows: list[dict[str, Any]], model: Any = None) -> dict[tuple[int, int], float]:
    """SaGE's edge weight for every pair of rows of one question: 0.8 cos(answers) + 0.2 cos(RoTs)."""
    from curate.sage import DEFAULT_EMBEDDING_MODEL, W_ANSWER, W_ROT, embed_texts, resolve_embedding_model

    encoder = resolve_embedding_model(model or DEFAULT_EMBEDDING_MODEL)
    answers = embed_texts([r["model_output"] or "" for r in rows], encoder)
    a = answers @ answers.T
    if all(r.get("rot") for r in rows):
        rots = embed_texts([r["rot"] for r in rows], encoder)
        w = W_ANSWER * a + W_ROT * (rots @ rots.T)
    else:
        w = a
    return {(i, j): float(w[i, j]) for i, j in itertools.combinations(range(len(rows)), 2)}


def create_pair_task(store: DatasetStore, name: str, source: str, *, n: int = 40, seed: int = 0,
                     config: str = "responses", strata: int = 4, model: Any = None,
                     overwrite: bool = False) -> Task:
    """Pairs of answers to paraphrases of one question, sampled evenly from `strata` similarity bands."""
    check_name(name, "task name")
    v = store.get(source)
    df = v.read_polars(config)
    for col in ("question_id", "model_output"):
        if col not in df.columns:
            raise CurateError(f"{v.ref} config {config!r} has no column {col!r}: pair tasks need a sage-responses "
                             "or sage-eval version (question_id, paraphrased, model_output[, rot])")
    df = df.filter(df["model_output"].is_not_null() & (df["model_output"] != ""))
    text_col = "paraphrased" if "paraphrased" in df.columns else None
    candidates: list[dict[str, Any]] = []
    for (qid,), group in df.group_by("question_id", maintain_order=True):
        rows = group.to_dicts()
        if len(rows) < 2:
            continue
        for (i, j), sim in pair_similarities(rows, model).items():
            a, b = rows[i], rows[j]
            ia, ib = a.get("paraphrase_idx", i), b.get("paraphrase_idx", j)
            candidates.append({
                "id": f"{qid}:{ia}-{ib}", "question_id": str(qid),
                "question_a": a.get(text_col) if text_col else None,
                "question_b": b.get(text_col) if text_col else None,
                "text_a": a["model_output"], "text_b": b["model_output"], "rot_a": a.get("rot"), "rot_b": b.get("rot"),
                "similarity": round(sim, 6),
            })
    if not candidates:
        raise CurateError(f"{v.ref} config {config!r} has no question with two non-empty answers")
    rng = np.random.default_rng(seed)
    order = np.argsort([c["similarity"] for c in candidates], kind="stable")
    bands = [list(b) for b in np.array_split(order, min(strata, len(candidates)))]
    chosen: list[int] = []
    per_band = [n // len(bands) + (1 if b < n % len(bands) else 0) for b in range(len(bands))]
    for band, want in zip(bands, per_band, strict=True):
        chosen += [int(x) for x in rng.permutation(band)[:want]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    items = [dict(candidates[i], band=next(b for b, band in enumerate(bands) if i in band)) for i in chosen]
    task = Task(name=name, kind="pair", source=_source_facts(v, config), seed=seed, items=items,
                params={"n": n, "strata": strata, "candidates": len(candidates),
                        "similarity": "0.8 cos(answers) + 0.2 cos(RoTs), all-MiniLM-L6-v2 (SaGE edge weight)",
                        "threshold": (v.manifest.get("params") or {}).get("min_threshold", 0.6)},
                created_at=now_iso())
    return _write_task(store, task, overwrite)


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """`curate eval`'s predictions.jsonl: id -> {generated_label, reason, ...}; a bad line names the file and line."""
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not JSON ({e.msg})", line=n) from None
        if not isinstance(rec, dict) or "id" not in rec or "generated_label" not in rec:
            raise InputError(path, "a prediction needs 'id' and 'generated_label' (curate eval's predictions.jsonl)",
                             line=n)
        out[str(rec["id"])] = rec
    if not out:
        raise InputError(path, "no predictions")
    return out


def create_label_task(store: DatasetStore, name: str, source: str, *, n: int = 40, seed: int = 0,
                      config: str | None = None, split: str | None = None, predictions: Path | None = None,
                      overwrite: bool = False) -> Task:
    """Statements with a label and (when the data has one) a reason: is the label right, does the reason hold?

    With `predictions` (a `curate eval` predictions.jsonl) the label and reason shown are the model's, for the
    qualitative review of its ethical reasoning; the gold label is kept in the item."""
    check_name(name, "task name")
    v = store.get(source)
    from curate.sql_views import default_config

    config = config or default_config(v.manifest)
    df = v.read_polars(config, split)
    text = next((c for c in ("statement", "text", "scenario", "input", "prompt") if c in df.columns), None)
    label = next((c for c in ("label_text", "label") if c in df.columns), None)
    if text is None or label is None:
        raise CurateError(f"{v.ref} config {config!r} needs a statement/text column and a label column for a label "
                         f"task (columns: {', '.join(df.columns)})")
    ids = df["id"].cast(str).to_list() if "id" in df.columns else [str(i) for i in range(df.height)]
    rows = df.to_dicts()
    params: dict[str, Any] = {"n": n, "split": split, "text_column": text, "label_column": label}
    pool = list(range(df.height))
    preds: dict[str, dict[str, Any]] = {}
    if predictions is not None:
        preds = read_predictions(predictions)
        pool = [i for i in pool if ids[i] in preds]
        if not pool:
            raise InputError(predictions, f"no prediction id matches a row of {v.ref} {config!r}"
                                          + (f" split {split!r}" if split else ""))
        params["predictions"] = {"path": str(Path(predictions).resolve()),
                                 "sha256": hashlib.sha256(Path(predictions).read_bytes()).hexdigest()}
    words = ({int(r["label"]): str(r["label_text"]) for r in rows if r.get("label") is not None}
             if {"label", "label_text"} <= set(df.columns) else {})
    rng = np.random.default_rng(seed)
    items = []
    for i in (pool[int(x)] for x in rng.permutation(len(pool))[:n]):
        item = {"id": ids[i], "statement": rows[i][text], "label": str(rows[i][label]),
                "reason": rows[i].get("reason"), "split": rows[i].get("split")}
        if preds:
            p = preds[ids[i]]
            g = p.get("generated_label")
            item.update(gold=item["label"], label=words.get(g, str(g)) if g is not None else "(no label)",
                        reason=p.get("reason") or "")
        items.append(item)
    task = Task(name=name, kind="label", source=_source_facts(v, config), seed=seed, items=items, params=params,
                created_at=now_iso())
    return _write_task(store, task, overwrite)


# ---- judgments -------------------------------------------------------------------------------------------
class Judgments:
    """The append-only judgment log of one task (safe across threads and processes: a file lock per write)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.path = task.path / JUDGMENTS_FILE
        self._lock = FileLock(str(self.path) + ".lock")
        self._fields = set(task.fields)
        self._items = set(task.item_ids())

    def record(self, item: str, annotator: str, field_name: str, value: str) -> dict[str, Any]:
        """Append one judgment and fsync it before returning (a killed server keeps every answered one)."""
        check_annotator(annotator)
        if item not in self._items:
            raise CurateError(f"task {self.task.name!r} has no item {item!r}")
        if field_name not in self._fields:
            raise CurateError(f"task {self.task.name!r} has no question {field_name!r} "
                             f"(questions: {', '.join(self.task.fields)})")
        if value not in ANSWERS:
            raise CurateError(f"answer {value!r} is not one of {', '.join(ANSWERS)}")
        line = {"item": item, "annotator": annotator, "field": field_name, "value": value, "at": now_iso()}
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return line

    def history(self) -> list[dict[str, Any]]:
        """Every judgment in the order made (a torn last line from a crash mid-write is skipped, with a warning)."""
        if not self.path.is_file():
            return []
        out = []
        with self._lock:
            lines = self.path.read_bytes().splitlines()
        for n, raw in enumerate(lines, 1):
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or not {"item", "annotator", "field", "value"} <= rec.keys():
                    raise ValueError("missing keys")
            except ValueError:
                log.warning("%s line %d: unreadable judgment skipped", self.path, n)
                continue
            rec["seq"] = len(out)
            out.append(rec)
        return out

    def latest(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(item, annotator, field) -> the judgment that counts (the later one wins)."""
        final: dict[tuple[str, str, str], dict[str, Any]] = {}
        for rec in self.history():
            final[(rec["item"], rec["annotator"], rec["field"])] = rec
        return final

    def annotators(self) -> list[str]:
        return sorted({a for _, a, _ in self.latest()})

    def progress(self, annotator: str) -> tuple[int, int | None]:
        """(items this annotator finished, position of the first unfinished item or None when all are done)."""
        final = self.latest()
        done = [all((it, annotator, f) in final for f in self.task.fields) for it in self.task.item_ids()]
        return sum(done), next((i for i, d in enumerate(done) if not d), None)


# ---- export ---------------------------------------------------------------------------------------------
def _item_table(task: Task) -> pa.Table:
    cols = sorted({k for it in task.items for k in it if k != "id"})
    rows = [{"position": i, "item_id": it["id"], **{c: it.get(c) for c in cols}} for i, it in enumerate(task.items)]
    return pa.Table.from_pylist(rows)


_JUDGMENT_SCHEMA = pa.schema([("item_id", pa.string()), ("annotator", pa.string()), ("field", pa.string()),
                              ("value", pa.string()), ("at", pa.string()), ("seq", pa.int64())])


def export_task(store: DatasetStore, name: str, dataset: str = "annotations"):  # -> CommitResult
    """Write the task's items, final judgments and full history as a store version (lineage: task + source)."""
    check_name(dataset)
    task = load_task(store, name)
    log_ = Judgments(task)
    history = log_.history()
    if not history:
        raise CurateError(f"task {name!r} has no judgments yet: nothing to export")
    final = sorted(log_.latest().values(), key=lambda r: r["seq"])

    def table(recs: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist([{"item_id": r["item"], "annotator": r["annotator"], "field": r["field"],
                                      "value": r["value"], "at": r.get("at"), "seq": r["seq"]} for r in recs],
                                    schema=_JUDGMENT_SCHEMA)

    task_file = task.path / TASK_FILE
    task_sha = hashlib.sha256(task_file.read_bytes()).hexdigest()
    params = {"task": task.name, "kind": task.kind, "seed": task.seed, "task_sha256": task_sha,
              "fields": list(task.fields), "annotators": log_.annotators(), "items": len(task.items)}
    parent = dict(task.source, role="annotated source")
    card = {"description": f"Human judgments of annotation task `{task.name}` ({task.kind}: "
                       f"{', '.join(QUESTIONS[f] for f in task.fields)}) over {task.source.get('name')}@"
                       f"{task.source.get('tag')}.",
            "tags": ["annotations", "human-judgments", task.kind]}
    with store.new_version(dataset, builder="annotate", builder_version=BUILDER_VERSION, params=params,
                           sources=[SourceFile.from_path(task_file), SourceFile.from_path(log_.path)],
                           parents=[parent], card=card) as w:
        w.write_table("judgments", "train", table(final))
        w.write_table("history", "train", table(history))
        w.write_table("items", "train", _item_table(task))
    return w.result


def check_source_exists(store: DatasetStore, task: Task) -> Version | None:
    """The task's source version when it is still in the store (looked up by content hash)."""
    name = task.source.get("name")
    if not isinstance(name, str):
        return None
    try:
        return store.find_by_hash(name, task.source.get("content_hash", ""))
    except CurateError:
        return None
