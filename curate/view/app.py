"""`curate view`: a local web app to look at a store (datasets, versions, cards, lineage, rows, teacher logits,
SaGE questions) and to annotate (pair and label tasks).

Server-rendered Jinja pages (autoescaped) plus one small script (`static/app.js`, no build step) that writes
data into the page only through `textContent`. Every URL names a dataset through `check_name` and a version
through the store's own tag / hash lookup, so no URL reaches a path outside the store. The rows page's `WHERE`
box runs on a DuckDB connection that can read only the version's own folder and has file access otherwise
switched off (and locked), after a check that the clause parses as one plain `SELECT`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from curate import annotate as ann
from curate.errors import CurateError
from curate.sql_views import ViewSpec, default_config
from curate.store import DatasetStore, Version, check_name

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TAG_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
PAGE_SIZE = 50
MAX_CELL = 400  # characters of a cell shown in the rows table (the full text is in the title)


class NotFound(CurateError):
    """A dataset, version, row or task a URL names does not exist."""


class FilterError(CurateError):
    """A WHERE clause or search that is refused or fails (shown in one line above the rows)."""


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---- data access ------------------------------------------------------------------------------------------
def get_version(store: DatasetStore, name: str, tag: str) -> Version:
    check_name(name)
    if not TAG_RE.match(tag):
        raise NotFound(f"version {tag!r} is not a tag or hash prefix")
    if name not in store.names():
        raise NotFound(f"no dataset named {name!r}")
    return store.get(name, tag)


def lineage(store: DatasetStore) -> dict[str, Any]:
    """Nodes (every version) and edges (parent -> child by content hash) across all builders."""
    versions = store.all_versions()
    by_hash = {v.hash: v for v in versions}
    nodes = [{"id": v.hash[:16], "ref": v.ref, "name": v.name, "tag": v.tag,
              "builder": (v.manifest.get("builder") or {}).get("name")} for v in versions]
    edges = []
    for v in versions:
        for p in v.manifest.get("parents") or []:
            h = p.get("content_hash") or p.get("hash") or ""
            parent = by_hash.get(h)
            edges.append({"from": parent.hash[:16] if parent else None, "to": v.hash[:16],
                          "parent": parent.ref if parent else f"{p.get('name')}@{p.get('tag')} (not in store)"})
    return {"nodes": nodes, "edges": edges}


def where_is_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT statement (DuckDB's own parser, via json_serialize_sql)."""
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if parsed.get("error"):
        raise FilterError(f"WHERE: {_first_line(parsed.get('error_message', 'does not parse'))}")
    stmts = parsed.get("statements") or []
    if len(stmts) != 1 or stmts[0].get("node", {}).get("type") != "SELECT_NODE":
        raise FilterError("WHERE: only a filter expression is allowed (one SELECT, no other statements)")


def read_rows(v: Version, config: str, *, split: str | None = None, where: str = "", q: str = "",
              page: int = 0, size: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of a config's rows, filtered by a DuckDB WHERE clause and/or a case-insensitive text search."""
    splits = v.splits(config)
    if split and split not in splits:
        raise NotFound(f"{v.ref} config {config!r} has no split {split!r}")
    has_split = "split" in (v.manifest.get("schema") or {}).get(config, {})
    spec = ViewSpec("rows", {s: [str(p) for p in v.files(config, s)] for s in ([split] if split else splits)},
                    has_split)
    con = duckdb.connect()
    try:
        con.execute(spec.sql())
        # From here the connection reads only this version's folder; the settings cannot be changed back.
        con.execute(f"SET allowed_directories=['{str(v.path).replace(chr(39), chr(39) * 2)}/']")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
        cols = [r[0] for r in con.execute("DESCRIBE rows").fetchall()]
        types = {r[0]: r[1] for r in con.execute("DESCRIBE rows").fetchall()}
        clauses, args = [], []
        if where.strip():
            if ";" in where:
                raise FilterError("WHERE: ';' is not allowed (one filter expression only)")
            where_is_select(con, f"SELECT * FROM rows WHERE ({where})")
            clauses.append(f"({where})")
        if q.strip():
            text_cols = [c for c in cols if types[c] in ("VARCHAR",)]
            if text_cols:
                clauses.append("(" + " OR ".join(f'"{c}" ILIKE ?' for c in text_cols) + ")")
                args += [f"%{q}%"] * len(text_cols)
            else:
                clauses.append("FALSE")
        cond = " WHERE " + " AND ".join(clauses) if clauses else ""
        try:
            total = con.execute(f"SELECT count(*) FROM rows{cond}", args).fetchall()[0][0]
            res = con.execute(f"SELECT * FROM rows{cond} LIMIT {int(size)} OFFSET {int(page) * int(size)}", args)
            rows = res.fetchall()
        except duckdb.Error as e:
            raise FilterError(f"WHERE: {_first_line(e)}") from None
    finally:
        con.close()
    return {"columns": cols, "types": types, "rows": [[_cell(x) for x in r] for r in rows], "total": total,
            "page": page, "size": size, "pages": max(1, -(-total // size))}


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, list | tuple | dict):
        text = json.dumps(x, default=str)
    else:
        text = str(x)
    return text


@functools.lru_cache(maxsize=4)
def _tokenizer(teacher: str, fingerprint: str | None) -> Any:
    """The cache's tokenizer when it loads and matches the recorded fingerprint; None otherwise (ids only)."""
    from curate.models import ModelRef, load_tokenizer, tokenizer_fingerprint

    try:
        tok = load_tokenizer(ModelRef.parse(teacher))
    except Exception as e:  # noqa: BLE001 - any load failure just means "show ids"
        log.warning("view: tokenizer of %s not loaded (%s); showing token ids", teacher, _first_line(e))
        return None
    if fingerprint and tokenizer_fingerprint(tok) != fingerprint:
        log.warning("view: tokenizer of %s differs from the cache's; showing token ids", teacher)
        return None
    return tok


def logit_row(v: Version, index: int, split: str | None) -> dict[str, Any]:
    """One cache row: completion tokens with entropy, and per token its top-k ids, texts, probabilities, residual."""
    from curate.logit_codec import cache_params, iter_cache

    params = cache_params(v)
    ex = next(itertools.islice(iter_cache(v, split), max(index, 0), None), None)
    if ex is None:
        raise NotFound(f"{v.ref} has no cache row {index}" + (f" in split {split!r}" if split else ""))
    tok = _tokenizer(str(params.get("teacher")), params.get("tokenizer_fingerprint"))

    def text(ids: list[int]) -> list[str]:
        return [tok.decode([i]) for i in ids] if tok is not None else [f"#{i}" for i in ids]

    targets = ex.target_ids.tolist()
    entropy = ex.entropy.tolist() if ex.entropy is not None else [0.0] * len(targets)
    tokens = []
    for t, target in enumerate(targets):
        kept = np.isfinite(ex.topk_logprobs[t])  # variable-length cache rows are padded with -inf
        ids, lps = ex.topk_ids[t][kept].tolist(), ex.topk_logprobs[t][kept].tolist()
        tokens.append({"id": int(target), "text": text([target])[0], "entropy": round(float(entropy[t]), 4),
                       "residual": float(ex.residual[t]), "topk": [
                           {"id": int(i), "text": s, "prob": float(np.exp(lp))}
                           for i, s, lp in zip(ids, text(ids), lps, strict=True)]})
    return {"id": ex.id, "split": ex.split, "label": ex.label, "prompt": "".join(text(ex.input_ids[:ex.prompt_len]
                                                                                       .tolist())),
            "tokens": tokens, "k": params.get("k"), "teacher": params.get("teacher"),
            "decoded": tok is not None}


def sage_question(v: Version, question_id: str, config: str = "responses") -> dict[str, Any]:
    """A question's paraphrases, answers, RoTs, score and the pairwise SaGE edge weights."""
    import polars as pl

    df = v.read_polars(config)
    if "question_id" not in df.columns:
        raise NotFound(f"{v.ref} config {config!r} has no question_id column")
    rows = df.filter(pl.col("question_id").cast(pl.String) == question_id).to_dicts()
    if not rows:
        raise NotFound(f"{v.ref} has no question {question_id!r}")
    usable = [r for r in rows if r.get("model_output")]
    sims = ann.pair_similarities(usable) if len(usable) > 1 else {}
    idx = {id(r): i for i, r in enumerate(rows)}
    edges = [{"a": idx[id(usable[i])], "b": idx[id(usable[j])], "w": round(w, 4)} for (i, j), w in sims.items()]
    return {"question_id": question_id, "question": rows[0].get("question"), "sage": rows[0].get("sage"),
            "threshold": rows[0].get("threshold"), "selected": rows[0].get("selected"),
            "nodes": [{"i": i, "paraphrased": r.get("paraphrased"), "answer": r.get("model_output"),
                       "rot": r.get("rot")} for i, r in enumerate(rows)], "edges": edges}


def question_ids(v: Version, config: str = "responses") -> list[str]:
    if config not in v.configs():
        return []
    t = v.read(config)
    if "question_id" not in t.column_names:
        return []
    return [str(x) for x in dict.fromkeys(t.column("question_id").to_pylist())]


# ---- the app --------------------------------------------------------------------------------------------
def create_app(store: DatasetStore) -> FastAPI:
    app = FastAPI(title="curate view", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # .html: autoescaped
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"store": str(store.root), **ctx}, status_code=status)

    @app.exception_handler(CurateError)
    async def _curate_error(request: Request, exc: CurateError) -> Any:
        text = str(exc)
        missing = text.startswith(("no dataset named", "no annotation task")) or " has no version " in text \
            or " has no config " in text or " has no split " in text
        status = 404 if isinstance(exc, NotFound) or missing else 400
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": _first_line(exc)}, status_code=status)
        return page(request, "error.html", status=status, message=_first_line(exc))

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        datasets = []
        for name in store.names():
            try:
                datasets.append({"name": name, "versions": store.versions(name), "error": None})
            except CurateError as e:
                datasets.append({"name": name, "versions": [], "error": _first_line(e)})
        return page(request, "index.html", datasets=datasets, tasks=ann.list_tasks(store), lineage=lineage(store))

    @app.get("/d/{name}")
    def dataset(name: str) -> RedirectResponse:
        v = get_version(store, name, "latest")
        return RedirectResponse(f"/d/{v.name}/{v.tag}", status_code=307)

    @app.get("/d/{name}/{tag}", response_class=HTMLResponse)
    def version(request: Request, name: str, tag: str) -> HTMLResponse:
        v = get_version(store, name, tag)
        graph = lineage(store)
        me = v.hash[:16]
        refs = {n["id"]: n["ref"] for n in graph["nodes"]}
        parents = [e["parent"] for e in graph["edges"] if e["to"] == me]
        children = [refs[e["to"]] for e in graph["edges"] if e["from"] == me]
        card = v.card_path.read_text(encoding="utf-8", errors="replace") if v.card_path.is_file() else ""
        is_cache = "k" in (v.manifest.get("params") or {}) and "quantization" in (v.manifest.get("params") or {})
        return page(request, "version.html", v=v, versions=store.versions(v.name), card=card, parents=parents,
                    children=children, default=default_config(v.manifest), is_cache=is_cache,
                    questions=question_ids(v)[:200], params=json.dumps(v.manifest.get("params"), indent=1,
                                                                         default=str))

    @app.get("/d/{name}/{tag}/rows/{config}", response_class=HTMLResponse)
    def rows(request: Request, name: str, tag: str, config: str, split: str = "", where: str = "", q: str = "",
             page_no: int = Query(0, alias="page"), size: int = Query(PAGE_SIZE, ge=1, le=500)) -> HTMLResponse:
        v = get_version(store, name, tag)
        v.splits(config)  # unknown config -> one line
        error, data = None, None
        try:
            data = read_rows(v, config, split=split or None, where=where, q=q, page=max(page_no, 0), size=size)
        except FilterError as e:
            error = _first_line(e)
        is_cache = "quantization" in (v.manifest.get("params") or {})
        return page(request, "rows.html", v=v, config=config, split=split, where=where, q=q, data=data,
                    error=error, max_cell=MAX_CELL, is_cache=is_cache)

    @app.get("/d/{name}/{tag}/logits/{index}", response_class=HTMLResponse)
    def logits(request: Request, name: str, tag: str, index: int, split: str = "") -> HTMLResponse:
        v = get_version(store, name, tag)
        return page(request, "logits.html", v=v, row=logit_row(v, index, split or None), index=index, split=split)

    @app.get("/d/{name}/{tag}/sage/{question_id}", response_class=HTMLResponse)
    def sage(request: Request, name: str, tag: str, question_id: str) -> HTMLResponse:
        v = get_version(store, name, tag)
        return page(request, "sage.html", v=v, q=sage_question(v, question_id))

    # ---- annotation ----
    def task_and_log(task: str) -> tuple[ann.Task, ann.Judgments]:
        t = ann.load_task(store, task)
        return t, ann.Judgments(t)

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate_index(request: Request) -> HTMLResponse:
        tasks = []
        for name in ann.list_tasks(store):
            try:
                t, j = task_and_log(name)
                tasks.append({"name": name, "kind": t.kind, "items": len(t.items), "source": t.source,
                              "annotators": j.annotators(), "error": None})
            except CurateError as e:
                tasks.append({"name": name, "error": _first_line(e)})
        return page(request, "annotate_index.html", tasks=tasks)

    @app.get("/annotate/{task}", response_class=HTMLResponse)
    def annotate_page(request: Request, task: str, annotator: str = "") -> HTMLResponse:
        t, _ = task_and_log(task)
        if annotator:
            ann.check_annotator(annotator)
        return page(request, "annotate.html", task=t, annotator=annotator, questions=ann.QUESTIONS)

    @app.get("/api/annotate/{task}/state")
    def annotate_state(task: str, annotator: str) -> dict[str, Any]:
        t, j = task_and_log(task)
        ann.check_annotator(annotator)
        final = j.latest()
        mine = {f"{it}|{f}": rec["value"] for (it, a, f), rec in final.items() if a == annotator}
        done, nxt = j.progress(annotator)
        return {"task": t.name, "kind": t.kind, "fields": list(t.fields), "items": t.items, "judgments": mine,
                "done": done, "next": nxt}

    @app.post("/api/annotate/{task}/judge")
    async def annotate_judge(task: str, request: Request) -> dict[str, Any]:
        t, j = task_and_log(task)
        try:
            body = await request.json()
        except ValueError:
            raise FilterError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise FilterError("the request body must be a JSON object")
        rec = j.record(str(body.get("item")), body.get("annotator"), str(body.get("field")), str(body.get("value")))
        done, nxt = j.progress(rec["annotator"])
        return {"saved": rec, "done": done, "next": nxt, "total": len(t.items)}

    @app.post("/api/annotate/{task}/export")
    def annotate_export(task: str) -> dict[str, Any]:
        r = ann.export_task(store, task)
        return {"ref": r.version.ref, "hash": r.version.hash, "created": r.created}

    @app.get("/api/annotate/{task}/agreement")
    def annotate_agreement(task: str, bootstrap: int = 200) -> dict[str, Any]:
        from curate.agreement import compute_agreement

        t, j = task_and_log(task)
        return compute_agreement(t, j, bootstrap=min(max(bootstrap, 0), 2000))

    return app
