"""DFAR (Dataset for Aligning Reasons): ethical/unethical labels with a written reason per statement.

Configs written:
- ``default``: one normalised row per statement: id, statement, label, label_text, reason, split.
- ``l``:  SFT view, prompt -> label word (the "label only" baseline of the DFAR paper).
- ``lr``: SFT view, prompt -> label word + reason (the L+R fine-tuning that beats label only).

Train statements that also appear in test are dropped from train by default (the report and the manifest
say how many); ``drop_overlap=False`` (`--keep-overlap`) keeps the upstream layout. Within-split duplicates
are reported, and dropped with ``dedupe="within-split"``.

The build streams: DuckDB parses the CSVs in parallel and computes ids, labels and the SFT texts in SQL;
batches are checked, filtered and written straight to parquet, so memory stays flat at any size. When
DuckDB rejects a file (or a batch holds a bad row) the exact reader re-reads it to name the row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders.base import BuildResult, IdSet, ParquetSink
from curate.csvfile import (
    check_whole_file,
    csv_batches_sql,
    csv_header,
    diagnose,
    quote_ident,
    sql_strip,
)
from curate.errors import CurateError, InputError
from curate.sources import resolve_files, source_record
from curate.store import DatasetStore, SourceFile

log = logging.getLogger(__name__)

BUILDER_VERSION = "1.1.0"
UPSTREAM_COMMIT = "main"
UPSTREAM = {
    name: f"https://raw.githubusercontent.com/apurba-nsu-rnd-lab/DFAR/{UPSTREAM_COMMIT}/DFAR%20dataset/{name}"
    for name in ("DFAR_trainset.csv", "DFAR_testset.csv")
}
FILES = {"train": "DFAR_trainset.csv", "test": "DFAR_testset.csv"}
REQUIRED = ["Statement", "Label", "Reason"]
LABEL_WORDS = {0: "ethical", 1: "unethical"}
DEDUPE_POLICIES = ("none", "within-split")
LEGACY_DEDUPE = "train-test"  # before overlap dropping became the default: within-split + drop the overlap
TEMPLATE_FIELDS = ("statement", "label", "label_text", "reason", "id")
BATCH_ROWS = 32_768
WRITE_AHEAD = 3  # batches read ahead of the parquet writers (each ~50 MB of DFAR text at most)
CONFIGS = ("default", "l", "lr")
MAX_ROW_NOTES = 20  # per-row notes per kind and split; the rest are counted

DEFAULT_PROMPT = (
    "Is the following statement ethical or unethical? Answer with one word, then explain why.\n"
    "Statement: {statement}\nAnswer:"
)
DEFAULT_L_COMPLETION = " {label_text}"
DEFAULT_LR_COMPLETION = " {label_text}. Reason: {reason}"

DEFAULT_SCHEMA = pa.schema(
    [("id", pa.string()), ("statement", pa.string()), ("label", pa.int8()), ("label_text", pa.string()),
     ("reason", pa.string()), ("split", pa.string())]
)
SFT_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()), ("label", pa.int8()),
     ("label_text", pa.string()), ("split", pa.string())]
)


@dataclass
class DfarConfig:
    """Everything that changes the output; recorded verbatim in the manifest."""

    prompt_template: str = DEFAULT_PROMPT
    l_completion_template: str = DEFAULT_L_COMPLETION
    lr_completion_template: str = DEFAULT_LR_COMPLETION
    label_words: dict[int, str] = field(default_factory=lambda: dict(LABEL_WORDS))
    dedupe: str = "none"  # none (report within-split duplicates) | within-split (drop them)
    drop_overlap: bool = True  # drop train statements that also appear in test; False keeps upstream's layout
    limit: int | None = None  # keep only the first N rows of each split (quick runs)


def statement_id(statement: str) -> str:
    return hashlib.sha256(statement.strip().encode()).hexdigest()[:16]


def normalise_params(params: DfarConfig) -> DfarConfig:
    """Accept the legacy ``dedupe="train-test"`` (= within-split + overlap drop); refuse contradictions."""
    if params.dedupe == LEGACY_DEDUPE:
        if not params.drop_overlap:
            raise CurateError("--dedupe train-test drops the train/test overlap, which --keep-overlap keeps; "
                              "use --dedupe within-split --keep-overlap")
        params.dedupe = "within-split"
    if params.dedupe not in DEDUPE_POLICIES:
        raise CurateError(f"--dedupe must be one of {', '.join(DEDUPE_POLICIES)} (or the legacy "
                          f"{LEGACY_DEDUPE}), not {params.dedupe!r}")
    return params


def check_row(path: Path, row_no: int, rec: dict[str, str], label_words: dict[int, str]) -> None:
    """The per-row rules, in Python: the reference the SQL path must agree with, and its diagnostic."""
    if not rec["Statement"].strip():
        raise InputError(path, "empty Statement", row=row_no)
    if rec["Label"].strip() not in {str(k) for k in label_words}:
        raise InputError(path, f"Label {rec['Label']!r} is not one of {sorted(label_words)}", row=row_no)


def _template_sql(template: str, sql_params: dict[str, Any]) -> str:
    """A `str.format` template as a SQL concatenation; literals travel as bound parameters."""
    parts = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise CurateError(f"template {template!r} is malformed: {e}") from None
    for literal, name, spec, conversion in parsed:
        if literal:
            key = f"lit{len(sql_params)}"
            sql_params[key] = literal
            parts.append(f"${key}")
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise CurateError(f"template field {name!r} unknown; available: {', '.join(TEMPLATE_FIELDS)}")
        if spec or conversion:
            raise CurateError(f"template field {{{name}}}: format specs and conversions are not supported")
        parts.append("CAST(label AS VARCHAR)" if name == "label" else name)
    return " || ".join(parts) or "''"


def _split_sql(names: list[str], params: DfarConfig, sql_params: dict[str, Any]) -> str:
    """One query per split: parse, strip (exactly as `str.strip`), label, id, and the three SFT texts."""
    col = {c: sql_strip(f"coalesce({quote_ident(c)}, '')") for c in REQUIRED}
    label_text = " ".join(f"WHEN $k{i} THEN $w{i}" for i in range(len(params.label_words)))
    label_num = " ".join(f"WHEN $k{i} THEN $n{i}" for i in range(len(params.label_words)))
    for i, (k, w) in enumerate(params.label_words.items()):
        sql_params |= {f"k{i}": str(k), f"w{i}": w, f"n{i}": int(k)}
    prompt = _template_sql(params.prompt_template, sql_params)
    l_completion = _template_sql(params.l_completion_template, sql_params)
    lr_completion = _template_sql(params.lr_completion_template, sql_params)
    limit = f"LIMIT {int(params.limit)}" if params.limit else ""
    return f"""
    WITH src AS (
        SELECT {col['Statement']} AS statement, {col['Label']} AS label_str, {col['Reason']} AS reason
        FROM {csv_batches_sql(names)} {limit}),
    lab AS (
        SELECT statement, reason, CASE label_str {label_text} END AS label_text,
               CAST(CASE label_str {label_num} END AS TINYINT) AS label, left(sha256(statement), 16) AS id
        FROM src)
    SELECT id, statement, label, label_text, reason, $split AS split,
           statement <> '' AND label_text IS NOT NULL AS ok, reason <> '' AS has_reason,
           CAST('0x' || id AS UBIGINT) AS id64,
           {prompt} AS prompt, {l_completion} AS l_completion, {lr_completion} AS lr_completion
    FROM lab
    """


def _read_batches(con: Any, sql: str, sql_params: dict[str, Any], path: Path,
                  check: Callable[[int, dict[str, str]], None]) -> Iterator[pa.RecordBatch]:
    """DuckDB's batches; a reader failure (raised by DuckDB, or by Arrow's stream over it) becomes the exact error."""
    import duckdb

    try:
        reader = con.sql(sql, params=sql_params).to_arrow_reader(BATCH_ROWS)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield batch
    except (duckdb.Error, pa.ArrowException, OSError) as e:  # Arrow re-raises DuckDB errors as OSError
        raise diagnose(path, REQUIRED, check, str(e)) from None


@dataclass
class _SplitStats:
    rows_read: int = 0
    rows_kept: int = 0
    duplicates: int = 0
    overlap: int = 0
    empty_reasons: int = 0
    empty_reason_rows: list[int] = field(default_factory=list)  # the first ten, for the note
    reasons_seen: int = 0


def _row_notes(split: str, what: str, rows: np.ndarray, texts: pa.Array, budget: int) -> list[str]:
    return [f"{split}: {what} at row {int(r)}: {str(t)[:60]!r}" for r, t in
            zip(rows[:budget], texts.slice(0, budget).to_pylist(), strict=False)]


def _stream_split(con: Any, path: Path, split: str, names: list[str], params: DfarConfig,
                  sinks: dict[str, ParquetSink], writers: dict[str, ThreadPoolExecutor], test_ids: IdSet | None,
                  notes: list[str]) -> tuple[_SplitStats, IdSet]:
    """Read, check, dedupe and write one split; returns its counts and the set of its statement ids."""
    sql_params: dict[str, Any] = {"path": str(path), "split": split}
    sql = _split_sql(names, params, sql_params)
    stats = _SplitStats()
    seen = IdSet()

    def bad_row(row_no: int, rec: dict[str, str]) -> None:
        check_row(path, row_no, rec, params.label_words)

    pending: deque[Future[None]] = deque()
    for batch in _read_batches(con, sql, sql_params, path, bad_row):
        n = batch.num_rows
        if n == 0:
            continue
        if not pc.all(batch.column("ok")).as_py():
            raise diagnose(path, REQUIRED, bad_row)
        rows = np.arange(stats.rows_read + 2, stats.rows_read + 2 + n)  # header is row 1
        stats.rows_read += n
        stats.reasons_seen += pc.sum(batch.column("has_reason")).as_py() or 0
        ids = batch.column("id64").to_numpy()
        order = np.argsort(ids, kind="stable")
        ordered = ids[order]
        if (ordered[1:] == ordered[:-1]).any():  # rare: repeats within the batch; mark all but the first
            uniq, first_in_batch = np.unique(ids, return_index=True)
            dup = np.ones(n, dtype=bool)
            dup[first_in_batch] = False
        else:
            uniq, dup = ordered, np.zeros(n, dtype=bool)
        dup |= seen.contains(ids, order)
        seen.add_sorted(uniq)
        keep = np.ones(n, dtype=bool)
        if dup.any():
            where = np.flatnonzero(dup)
            notes.extend(_row_notes(split, "duplicate statement", rows[where],
                                    batch.column("statement").take(where),
                                    max(0, MAX_ROW_NOTES - stats.duplicates)))
            stats.duplicates += len(where)
            if params.dedupe == "within-split":
                keep &= ~dup
        if test_ids is not None:
            in_test = test_ids.contains(ids, order) & keep
            stats.overlap += int(in_test.sum())
            if params.drop_overlap:
                keep &= ~in_test
        table = pa.Table.from_batches([batch])
        if not keep.all():
            table = table.filter(pa.array(keep))
            rows = rows[keep]
        no_reason = np.flatnonzero(~table.column("has_reason").to_numpy(zero_copy_only=False))
        stats.empty_reasons += len(no_reason)
        stats.empty_reason_rows.extend(int(r) for r in rows[no_reason[: 10 - len(stats.empty_reason_rows)]])
        stats.rows_kept += table.num_rows
        views = {
            "default": table,
            "l": table.rename_columns({"l_completion": "completion"}),
            "lr": table.rename_columns({"lr_completion": "completion"}),
        }
        # One serial writer per config keeps each sink's batches in order; reading runs up to WRITE_AHEAD
        # batches ahead, so DuckDB and the writers (zstd) keep both cores busy through uneven row-group flushes.
        pending.extend(writers[c].submit(sinks[c].write, t) for c, t in views.items())
        while len(pending) > WRITE_AHEAD * len(views):
            pending.popleft().result()
    while pending:
        pending.popleft().result()
    check_whole_file(path, stats.rows_read, [] if stats.reasons_seen else ["Reason"])
    return stats, seen


def build_dfar(store: DatasetStore, source: str | Path, params: DfarConfig | None = None,
               name: str = "dfar") -> BuildResult:
    """Read the two DFAR CSVs from `source` (folder or 'upstream') and write a new version of `name`."""
    import duckdb

    params = normalise_params(params or DfarConfig())
    _split_sql(REQUIRED, params, {})  # a bad template fails here, before anything is read
    found = resolve_files(source, list(FILES.values()), UPSTREAM)
    missing = [f for f in FILES.values() if f not in found]
    if missing:
        raise CurateError(f"DFAR source {source} lacks {', '.join(missing)}")
    notes: list[str] = []
    headers = {split: csv_header(found[f][0], REQUIRED) for split, f in FILES.items()}
    for split, names in headers.items():
        extra = [c for c in names if c not in REQUIRED]
        if extra:
            notes.append(f"{FILES[split]}: extra column(s) {', '.join(extra)} dropped")

    card: dict[str, Any] = {
        "pretty_name": "DFAR: Dataset for Aligning Reasons",
        "description": "Statements labelled ethical (0) or unethical (1), each with a human-written reason. "
        "The `l` and `lr` configs are ready-made SFT views for label-only and label+reason fine-tuning.",
        "license": "mit",
        "task_categories": ["text-classification", "text-generation"],
        "tags": ["ethics", "alignment", "dfar"],
        "label_mapping": {k: v for k, v in params.label_words.items()},
        "default_config": "default",
        "config_notes": {
            "default": "normalised rows: id (sha256 of the statement), statement, label, label_text, reason, split",
            "l": "prompt -> label word (label-only SFT)",
            "lr": "prompt -> label word + reason (L+R SFT)",
        },
        "license_notes": "DFAR is MIT licensed (apurba-nsu-rnd-lab/DFAR) and derived from ETHICS (MIT).",
    }
    run_params = _params_dict(params)
    sources: list[SourceFile] = []
    started = time.perf_counter()
    # The store renders `card` and records `sources` when the block exits, so what the stream finds goes in the
    # card (and in add_params), and the inputs' sha256 (seconds at 10 M rows) is taken while the stream runs.
    with store.new_version(
        name, builder="dfar", builder_version=BUILDER_VERSION, params=run_params,
        sources=sources, card=card,
    ) as w, ExitStack() as stack, duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)}) as con:
        hashing = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="dfar-sources"))
        source_records = [hashing.submit(source_record, *found[f]) for f in FILES.values()]
        writers = {c: stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix=f"dfar-{c}")) for c in CONFIGS}
        sinks = {
            (config, split): ParquetSink(w, config, split, DEFAULT_SCHEMA if config == "default" else SFT_SCHEMA)
            for config in CONFIGS for split in FILES
        }
        stats: dict[str, _SplitStats] = {}
        test_ids: IdSet | None = None
        for split in sorted(FILES, key=lambda s: s != "test"):  # test first: train is filtered against it
            path = found[FILES[split]][0]
            split_sinks = {c: s for (c, sp), s in sinks.items() if sp == split}
            stats[split], ids = _stream_split(con, path, split, headers[split], params, split_sinks, writers,
                                              test_ids if split == "train" else None, notes)
            if split == "test":
                test_ids = ids
        _summarise(stats, params, notes)
        for split, st in stats.items():
            if st.rows_kept == 0:
                raise CurateError(f"{found[FILES[split]][0]}: no rows left after dropping duplicates/overlap")
        for sink in sinks.values():  # registration order = manifest order: default, l, lr x train, test
            sink.close()
        log.debug("dfar: streamed %d rows (%d kept) in %.2f s; committing", sum(s.rows_read for s in stats.values()),
                 sum(s.rows_kept for s in stats.values()), time.perf_counter() - started)
        sources.extend(r.result() for r in source_records)
        overlap = stats["train"].overlap
        w.add_params({"train_test_overlap": {"train_statements_in_test": overlap,
                                             "dropped": overlap if params.drop_overlap else 0}})
        card["build_notes"] = "\n".join(f"- {n}" for n in notes[:50]) if notes else \
            "No duplicates, overlap, empty reasons or extra columns found."
    return BuildResult(w.result.version, w.result.created, notes, repaired=w.result.repaired)


def _summarise(stats: dict[str, _SplitStats], params: DfarConfig, notes: list[str]) -> None:
    for split, st in stats.items():
        if st.duplicates:
            verb = "dropped" if params.dedupe == "within-split" else "kept (use --dedupe within-split)"
            notes.append(f"{split}: {st.duplicates} duplicate statements; {verb}")
    overlap = stats["train"].overlap
    if overlap:
        notes.append(f"{overlap} train statements also appear in test (train/test overlap)"
                     + ("; dropped from train (--keep-overlap keeps them)" if params.drop_overlap
                        else "; kept (--keep-overlap)"))
    for split, st in stats.items():
        if st.empty_reasons:
            rows = ", ".join(map(str, st.empty_reason_rows))
            notes.append(f"{split}: {st.empty_reasons} empty reasons (rows {rows}…); kept")


def _params_dict(params: DfarConfig) -> dict[str, Any]:
    d = asdict(params)
    d["label_words"] = {str(k): v for k, v in params.label_words.items()}
    return d
