"""SaGE-filtered responses: collect an aligned model's answers to paraphrased moral questions, derive the
Rule of Thumb behind each answer, score each question's moral consistency with SaGE, and keep the answers of
consistent questions as SFT data under a decaying threshold.

The steps below are plain functions over polars frames (datatrove style: what a step does is kept apart
from how it runs); `build_sage_responses` wires them to an `LLMClient` and writes one store version with
configs ``responses`` (every answer, its RoT, the question's score), ``selected`` (prompt/completion rows,
with the threshold in force when each was taken) and ``feedback`` (questions where the target model is more
consistent than the aligned one).

Resuming: every LLM reply lands in the store's response cache (``<store>/llm_cache``) before anything else
happens, and the version is written only at the end, atomically. A run killed midway and started again pays
only for the calls it had not finished, and can never leave duplicate rows.

Untrusted replies: every answer keeps the server's ``finish_reason`` and ``refusal``. One cut by max_tokens,
filtered, empty, null or refused is never cached, gets no RoT, is never scored or selected, and is listed in
the notes and the card (``unusable_answers``); the next run asks for it again.

Replays: against the offline replay server (`curate.replay`, recognised on loopback by ``GET /v1/replay``)
the replies go to their own cache (``<store>/llm_cache/replay-<recording digest>``), never among real paid
replies, and the manifest and card record ``replayed_from`` (the recording files and their sha256).

Endpoints are recorded resolved (``$OPENAI_BASE_URL`` or OpenAI's URL when none is given) and always
through `curate.urls.redact_url`: credentials in a URL's userinfo or query string are never written.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from builders.base import BuildResult
from curate.csvfile import iter_csv_rows
from curate.errors import CurateError, InputError
from curate.llm import Completion, LLMClient, LLMConfig, resolve_base_url, rich_progress
from curate.prompts import (
    ANSWER_PROMPT_TEMPLATE,
    ANSWER_SYSTEM_PROMPT,
    ROT_PROMPT_TEMPLATE,
    ROT_SYSTEM_PROMPT,
    answer_messages,
    clean_answer,
    clean_rot,
    rot_messages,
)
from curate.replay.probe import replay_sources
from curate.selection import DecayingThreshold, usable
from curate.store import DatasetStore, SourceFile
from curate.urls import redact_url

BUILDER_VERSION = "1.0.0"
logger = logging.getLogger(__name__)

PARAPHRASE_PROMPT_TEMPLATE = (
    "Rewrite the question below in {n} different ways that keep exactly its meaning. Reply with one "
    "rewrite per line, no numbering, nothing else.\nQuestion: {question}"
)


@dataclass
class SageResponsesConfig:
    """Everything that shapes the dataset; recorded verbatim in the manifest (no secrets here)."""

    questions: str = ""  # CSV: question_id, question, paraphrased (MCC layout) or question_id, question
    model: str = "gpt-3.5-turbo"
    base_url: str | None = None  # None: $OPENAI_BASE_URL or api.openai.com (recorded resolved, redacted)
    temperature: float = 0.8
    max_tokens: int = 512
    rot_model: str | None = None  # None: the answering model writes the RoTs too
    target_model: str | None = None  # the small model being aligned; enables the feedback set
    target_base_url: str | None = None
    batch: bool = False  # OpenAI Batch API instead of online calls
    concurrency: int = 16
    paraphrases: int = 0  # >0: generate this many paraphrases per plain question
    min_paraphrase_similarity: float = 0.75
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    w_answer: float = 0.8
    w_rot: float = 0.2
    initial_threshold: float = 0.9
    decay_rate: float = 0.99
    min_threshold: float = 0.6
    limit_questions: int | None = None
    answer_prompt: dict[str, str] = field(
        default_factory=lambda: {"system": ANSWER_SYSTEM_PROMPT, "user": ANSWER_PROMPT_TEMPLATE}
    )
    rot_prompt: dict[str, str] = field(
        default_factory=lambda: {"system": ROT_SYSTEM_PROMPT, "user": ROT_PROMPT_TEMPLATE}
    )
    paraphrase_prompt: str = PARAPHRASE_PROMPT_TEMPLATE


# ---- step 1: questions --------------------------------------------------------------------------------
def load_questions(path: Path, limit_questions: int | None = None) -> pl.DataFrame:
    """Rows of (question_id, question, paraphrase_idx, paraphrased); `paraphrased` is null for plain lists.

    Errors name the file and row: missing columns, empty fields, a paraphrase whose question differs from
    the one given earlier for the same id.
    """
    rows: list[dict[str, Any]] = []
    questions: dict[str, str] = {}
    for row_no, rec in iter_csv_rows(path, ["question_id", "question"]):
        qid, question = rec["question_id"].strip(), rec["question"].strip()
        if not qid:
            raise InputError(path, "empty question_id", row=row_no)
        if not question:
            raise InputError(path, f"empty question for question_id {qid}", row=row_no)
        if qid not in questions:
            if limit_questions is not None and len(questions) >= limit_questions:
                break
            questions[qid] = question
        elif questions[qid] != question:
            raise InputError(path, f"question_id {qid} has two different questions", row=row_no)
        para = rec["paraphrased"].strip() if "paraphrased" in rec else None
        if para == "":
            raise InputError(path, f"empty paraphrased text for question_id {qid}", row=row_no)
        rows.append({"question_id": qid, "question": question, "paraphrased": para})
    if not rows:
        raise InputError(path, "no questions")
    df = pl.DataFrame(rows, schema={"question_id": pl.String, "question": pl.String, "paraphrased": pl.String})
    return df.with_columns(pl.int_range(pl.len()).over("question_id").cast(pl.Int16).alias("paraphrase_idx"))


# ---- step 2 (optional): paraphrases -----------------------------------------------------------------------
def generate_paraphrases(
    questions: pl.DataFrame, client: LLMClient, n: int, min_similarity: float, embedding_model: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Ask the LLM for `n` paraphrases per question; keep those whose embedding cosine to the original is at
    least `min_similarity` (drifted rewrites would measure inconsistency the question never had). The
    original question is always paraphrase 0."""
    from curate.sage import embed_texts, resolve_embedding_model

    plain = questions.unique("question_id", keep="first", maintain_order=True)
    prompts = [
        [{"role": "user", "content": PARAPHRASE_PROMPT_TEMPLATE.format(n=n, question=q)}]
        for q in plain["question"]
    ]
    with rich_progress("paraphrasing") as tick:
        replies = client.complete_many(prompts, progress=tick)
    logger.info("paraphrases: embedding %d questions and their rewrites with %s ...", plain.height, embedding_model)
    encoder = resolve_embedding_model(embedding_model)
    rows, dropped = [], 0
    for qid, question, reply in zip(plain["question_id"], plain["question"], replies, strict=True):
        text = reply.text if reply.ok else ""  # a cut or refused reply gives no paraphrases
        candidates = [ln.strip(" -*\t0123456789.)") for ln in text.splitlines()]
        candidates = list(dict.fromkeys(c for c in candidates if c and c != question))[:n]
        kept = [question]
        if candidates:
            emb = embed_texts([question, *candidates], encoder)
            sims = emb[1:] @ emb[0]
            kept += [c for c, s in zip(candidates, sims, strict=True) if s >= min_similarity]
            dropped += sum(1 for s in sims if s < min_similarity)
        rows += [{"question_id": qid, "question": question, "paraphrased": p} for p in kept]
    df = pl.DataFrame(rows, schema={"question_id": pl.String, "question": pl.String, "paraphrased": pl.String})
    df = df.with_columns(pl.int_range(pl.len()).over("question_id").cast(pl.Int16).alias("paraphrase_idx"))
    return df, {"paraphrases_dropped_low_similarity": dropped, "paraphrases_kept": df.height - plain.height}


# ---- steps 3 and 4: answers and Rules of Thumb ------------------------------------------------------------
def _complete(client: LLMClient, prompts: list[list[dict[str, str]]], batch: bool, label: str) -> list[Completion]:
    with rich_progress(label) as tick:
        if batch:
            return client.complete_many_batch(prompts, progress=tick)
        return client.complete_many(prompts, progress=tick)


def _finish_col(column: str) -> str:
    """``model_output`` -> ``finish_reason``; ``target_output`` -> ``target_finish_reason``."""
    return "finish_reason" if column == "model_output" else f"{column.removesuffix('_output')}_finish_reason"


def _refusal_col(column: str) -> str:
    return "refusal" if column == "model_output" else f"{column.removesuffix('_output')}_refusal"


def collect_answers(df: pl.DataFrame, client: LLMClient, batch: bool, column: str = "model_output") -> pl.DataFrame:
    """Answers with the server's finish reason and refusal; ``_problem_<column>`` says why one is unusable."""
    replies = _complete(client, [answer_messages(p) for p in df["paraphrased"]], batch, f"answers ({column})")
    return df.with_columns(
        pl.Series(column, [clean_answer(r.text) for r in replies], dtype=pl.String),
        pl.Series(_finish_col(column), [r.finish_reason for r in replies], dtype=pl.String),
        pl.Series(_refusal_col(column), [r.refusal for r in replies], dtype=pl.String),
        pl.Series(f"_problem_{column}", [r.problem for r in replies], dtype=pl.String),
    )


def generate_rots(df: pl.DataFrame, client: LLMClient, batch: bool, answer_col: str = "model_output",
                  column: str = "rot") -> pl.DataFrame:
    """One RoT per usable answer; an empty, cut or refused answer gets an empty RoT without a call."""
    finish, refusal = _finish_col(answer_col), _refusal_col(answer_col)
    ok = df.select(usable(answer_col, finish, refusal, None))
    todo = [i for i, good in enumerate(ok.to_series()) if good]
    prompts = [rot_messages(df["paraphrased"][i], df[answer_col][i]) for i in todo]
    replies = _complete(client, prompts, batch, f"rules of thumb ({column})") if prompts else []
    rots, finishes, problems = [""] * df.height, [None] * df.height, [None] * df.height
    for i, r in zip(todo, replies, strict=True):
        rots[i], finishes[i], problems[i] = clean_rot(r.text), r.finish_reason, r.problem
    return df.with_columns(pl.Series(column, rots, dtype=pl.String),
                           pl.Series(f"{column}_finish_reason", finishes, dtype=pl.String),
                           pl.Series(f"_problem_{column}", problems, dtype=pl.String))


def _usable(answer_col: str = "model_output", rot_col: str = "rot") -> pl.Expr:
    return usable(answer_col, _finish_col(answer_col), _refusal_col(answer_col), f"{rot_col}_finish_reason")


def _unusable_note(df: pl.DataFrame, answer_col: str, rot_col: str) -> tuple[str | None, dict[str, int]]:
    """The build note listing rows left out of scoring and selection, and their count per reason."""
    bad = df.filter(~_usable(answer_col, rot_col)).with_columns(
        pl.coalesce(f"_problem_{answer_col}",
                    pl.when(pl.col(answer_col) == "").then(pl.lit("empty")),
                    pl.format("RoT {}", pl.col(f"_problem_{rot_col}"))).fill_null("unusable").alias("why"))
    if not bad.height:
        return None, {}
    counts = dict(sorted(Counter(bad["why"].to_list()).items()))
    rows = ", ".join(f"{q}#{i} ({w})" for q, i, w in bad.select("question_id", "paraphrase_idx", "why").rows()[:10])
    more = f" and {bad.height - 10} more" if bad.height > 10 else ""
    what = "answers" if answer_col == "model_output" else f"{answer_col} answers"
    return (f"{bad.height} {what} left out of scoring and selection (not cached: a rerun asks again; "
            f"{', '.join(f'{k} {v}' for k, v in counts.items())}): {rows}{more}"), counts


# ---- step 5: SaGE -----------------------------------------------------------------------------------------
def score_questions(df: pl.DataFrame, params: SageResponsesConfig, answer_col: str = "model_output",
                    rot_col: str = "rot") -> pl.DataFrame:
    """Per-question SaGE over the usable answers (empty, cut, filtered or refused ones are left out).

    A question left with a single answer gets the scorer's one-paraphrase value (see `curate.sage`); one
    with none gets NaN and is never selected.
    """
    from curate.sage import sage_scores

    good = df.filter(_usable(answer_col, rot_col)).select(
        "question_id", pl.col(answer_col).alias("model_output"), pl.col(rot_col).alias("rot")
    )
    order = df.select("question_id").unique(maintain_order=True)
    if good.height == 0:
        return order.with_columns(pl.lit(float("nan")).alias("sage"))
    scores = sage_scores(good, model=params.embedding_model, w_answer=params.w_answer, w_rot=params.w_rot)
    return order.join(scores.select("question_id", "sage"), on="question_id", how="left").with_columns(
        pl.col("sage").fill_null(float("nan"))
    )


# ---- the build ------------------------------------------------------------------------------------------
@dataclass
class SageBuildResult(BuildResult):
    """`BuildResult` plus what *this* run spent per step (a rerun of a stored version spends nothing)."""

    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    replayed_from: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class _Endpoint:
    """One resolved endpoint: the URL used for calls (may hold credentials) and what is recorded."""

    url: str
    replayed_from: list[dict[str, Any]] | None

    @classmethod
    def resolve(cls, base_url: str | None) -> _Endpoint:
        url = resolve_base_url(base_url)
        return cls(url, replay_sources(url))

    @property
    def recorded(self) -> str:
        return redact_url(self.url) or ""

    def cache_dir(self, store: DatasetStore) -> Path:
        """The real cache, or for a replay server one per recording, so replies never mix."""
        root = store.root / "llm_cache"
        if not self.replayed_from:
            return root
        digest = hashlib.sha256("".join(sorted(s["sha256"] for s in self.replayed_from)).encode()).hexdigest()
        return root / f"replay-{digest[:16]}"


def _client(params: SageResponsesConfig, store: DatasetStore, model: str, endpoint: _Endpoint,
            execution: dict[str, Any]) -> LLMClient:
    return LLMClient(
        LLMConfig(model=model, base_url=endpoint.url, temperature=params.temperature,
                  max_tokens=params.max_tokens, concurrency=params.concurrency,
                  cache_dir=endpoint.cache_dir(store)),
        **execution,
    )


def build_sage_responses(store: DatasetStore, params: SageResponsesConfig, name: str = "sage-responses",
                         figures: bool = True, execution: dict[str, Any] | None = None) -> SageBuildResult:
    """Run every step and write one version.

    ``execution`` holds `LLMConfig` fields that change how calls are made but not what they return
    (timeout, request_timeout, max_retries, max_retry_wait, max_response_bytes, retry_truncated, backoff,
    batch polling); they are kept out of the manifest's parameters.
    """
    execution = execution or {}
    path = Path(params.questions)
    if not path.is_file():
        raise CurateError(f"--questions {redact_url(params.questions)} is not a file")
    notes: list[str] = []
    questions = load_questions(path, params.limit_questions)
    usage: dict[str, Any] = {}
    endpoint = _Endpoint.resolve(params.base_url)
    target = _Endpoint.resolve(params.target_base_url or params.base_url) if params.target_model else None
    replayed = _replayed_from(endpoint, target)
    if replayed:
        logger.info("replaying recorded answers from %s (own response cache: %s)",
                    ", ".join(Path(s["location"]).name for s in replayed), endpoint.cache_dir(store))
    with _client(params, store, params.model, endpoint, execution) as client:
        if questions["paraphrased"].null_count():
            if params.paraphrases <= 0:
                raise InputError(path, "no 'paraphrased' column: give --paraphrases N to generate them")
            questions, stats = generate_paraphrases(
                questions, client, params.paraphrases, params.min_paraphrase_similarity, params.embedding_model
            )
            notes.append(f"paraphrases: {stats}")
        df = collect_answers(questions, client, params.batch)
        usage["answers"] = _summary(client, params.model, endpoint)
    rot_model = params.rot_model or params.model
    with _client(params, store, rot_model, endpoint, execution) as client:
        df = generate_rots(df, client, params.batch)
        usage["rots"] = _summary(client, rot_model, endpoint)
    note, unusable_counts = _unusable_note(df, "model_output", "rot")
    if note:
        notes.append(note)
    scores = score_questions(df, params)

    target_scores = None
    if params.target_model and target is not None:
        with _client(params, store, params.target_model, target, execution) as client:
            tdf = collect_answers(df.select(questions.columns), client, params.batch, column="target_output")
            tdf = generate_rots(tdf, client, params.batch, answer_col="target_output", column="target_rot")
            usage["target"] = _summary(client, params.target_model, target)
        tnote, _ = _unusable_note(tdf, "target_output", "target_rot")
        if tnote:
            notes.append(tnote)
        tcols = ["target_output", "target_finish_reason", "target_refusal", "target_rot", "target_rot_finish_reason",
                 "_problem_target_output"]
        df = df.join(tdf.select("question_id", "paraphrase_idx", *tcols),
                     on=["question_id", "paraphrase_idx"], how="left", maintain_order="left")
        tscores = score_questions(tdf, params, "target_output", "target_rot").rename({"sage": "target_sage"})
        scores = scores.join(tscores, on="question_id", how="left", maintain_order="left")
        target_scores = scores["target_sage"].to_list()

    strategy = DecayingThreshold(params.initial_threshold, params.decay_rate, params.min_threshold)
    decisions = strategy.select(scores["question_id"].to_list(), scores["sage"].to_list(), target_scores)
    dec = pl.DataFrame(
        {
            "question_id": [d.question_id for d in decisions],
            "order": list(range(len(decisions))),
            "threshold": [d.threshold for d in decisions],
            "selected": [d.selected for d in decisions],
            "feedback": [d.feedback for d in decisions],
        },
        schema={"question_id": pl.String, "order": pl.Int32, "threshold": pl.Float64, "selected": pl.Boolean,
                "feedback": pl.Boolean},
    )
    scored = df.join(scores, on="question_id", how="left", maintain_order="left").join(
        dec, on="question_id", how="left", maintain_order="left"
    )
    tables = _tables(scored, params)
    n_sel = int(dec["selected"].sum())
    notes.append(f"{n_sel} of {dec.height} questions selected ({tables['selected'].num_rows} answers); "
                 f"{int(dec['feedback'].sum())} in the feedback set")

    recorded = _recorded_params(params, endpoint, target, replayed)
    card = _card(params, scores, notes, usage, replayed, unusable_counts)
    sources = [SourceFile.from_path(path, redact_url(str(path.resolve())))]
    sources += [SourceFile(s["location"], s["sha256"], s["bytes"]) for s in replayed or []]
    with store.new_version(
        name, builder="sage_responses", builder_version=BUILDER_VERSION, params=recorded,
        sources=sources, card=card,
    ) as w:
        for config, table in tables.items():
            w.write_table(config, "train", table)
        if figures:
            from builders.sage_figures import selection_figure

            w.add_file("figures/sage_selection.png", selection_figure(scores["sage"].to_list(), dec))
    return SageBuildResult(w.result.version, w.result.created, notes, usage=usage, replayed_from=replayed)


def _summary(client: LLMClient, model: str, endpoint: _Endpoint) -> dict[str, Any]:
    """This client's usage; a replay costs nothing, whatever the recorded model's price."""
    out = client.usage.summary(model)
    if endpoint.replayed_from:
        out["estimated_cost_usd"] = 0.0
        out["replayed"] = True
    return out


def _replayed_from(endpoint: _Endpoint, target: _Endpoint | None) -> list[dict[str, Any]] | None:
    found = [s for e in (endpoint, target) if e is not None for s in e.replayed_from or []]
    return list({s["sha256"]: s for s in found}.values()) or None


def _recorded_params(params: SageResponsesConfig, endpoint: _Endpoint, target: _Endpoint | None,
                     replayed: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The manifest's parameters: endpoints resolved and redacted, and what a replay replayed."""
    out = asdict(params)
    out["base_url"] = endpoint.recorded
    out["target_base_url"] = target.recorded if target is not None else redact_url(params.target_base_url)
    out["questions"] = redact_url(params.questions)
    if replayed:
        out["replayed_from"] = replayed
    return out


def _tables(scored: pl.DataFrame, params: SageResponsesConfig) -> dict[str, pa.Table]:
    resp_cols = ["question_id", "question", "paraphrase_idx", "paraphrased", "model_output", "finish_reason",
                 "refusal", "rot", "rot_finish_reason", "sage", "threshold", "selected", "feedback"]
    if "target_output" in scored.columns:
        resp_cols += ["target_output", "target_finish_reason", "target_refusal", "target_rot", "target_sage"]
    # `selected` per answer: its question was taken and the answer itself is usable
    responses = scored.with_columns(pl.col("selected") & _usable()).select(resp_cols).with_columns(
        pl.lit(params.model).alias("model"))
    # only complete answers (finish reason `stop`, not empty, not refused, with a complete RoT) become SFT rows
    selected = scored.filter(pl.col("selected") & _usable()).select(
        "question_id",
        "paraphrase_idx",
        pl.col("paraphrased").map_elements(
            lambda p: ANSWER_PROMPT_TEMPLATE.format(question=p), return_dtype=pl.String).alias("prompt"),
        pl.col("model_output").alias("completion"),
        "sage",
        "threshold",
        "order",
    )
    fb_cols = ["question_id", "question", "paraphrase_idx", "paraphrased", "model_output", "rot", "sage"]
    if "target_output" in scored.columns:
        fb_cols += ["target_output", "target_rot", "target_sage"]
    feedback = scored.filter(pl.col("feedback") & _usable()).select(fb_cols)
    return {"responses": responses.to_arrow(), "selected": selected.to_arrow(), "feedback": feedback.to_arrow()}


def _card(params: SageResponsesConfig, scores: pl.DataFrame, notes: list[str], usage: dict[str, Any],
          replayed: list[dict[str, Any]] | None = None, unusable: dict[str, int] | None = None) -> dict:
    valid = scores.filter(pl.col("sage").is_not_nan())["sage"]
    mean = float(valid.mean()) if valid.len() else float("nan")  # type: ignore[arg-type]
    cost = [u.get("estimated_cost_usd") for u in usage.values()]
    unknown = sum(u.get("unknown_usage", 0) for u in usage.values())
    if unknown:
        cost_s = f"unknown ({unknown} replies reported no valid token usage)"
    elif None in cost:
        cost_s = "unknown (model not in the price table)"
    else:
        cost_s = f"${sum(cost):.4f}"  # type: ignore[arg-type]
    calls = sum(u["completed"] + u.get("batch_completed", 0) + u.get("unusable", 0) for u in usage.values())
    hits = sum(u["cache_hits"] for u in usage.values())
    replay_note = ""
    if replayed:
        replay_note = "\n- replayed offline (no model was called): recorded answers from " + ", ".join(
            f"`{Path(s['location']).name}` (sha256 `{s['sha256'][:16]}…`)" for s in replayed)
    card: dict[str, Any] = {
        "pretty_name": "SaGE-filtered responses",
        "description": f"Answers of `{params.model}` to paraphrased moral questions, each with the Rule of Thumb "
        f"it follows, scored for moral consistency with SaGE (semantic graph entropy; mean {mean:.4f} over "
        f"{valid.len()} questions) and selected for SFT with a decaying threshold "
        f"({params.initial_threshold} × {params.decay_rate} per question, floor {params.min_threshold}).",
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["ethics", "alignment", "sage", "moral-consistency"],
        "default_config": "selected",
        "config_notes": {
            "responses": "every answer with its RoT, the question's SaGE score and the selection decision",
            "selected": "prompt/completion rows for SFT, with the threshold in force when each was taken",
            "feedback": "questions where the target model is more consistent than the aligned model "
            "(empty unless a target model was given)",
        },
        "license_notes": "Questions from the Moral Consistency Corpus (research use); answers are model outputs "
        "subject to the provider's terms.",
        "build_notes": "\n".join(f"- {n}" for n in notes)
        + f"\n- LLM calls made: {calls}, cache hits: {hits}, estimated cost: {cost_s}" + replay_note,
        "figures": ["figures/sage_selection.png"],
        "usage": usage,
        "unusable_answers": unusable or {},
    }
    if replayed:
        card["replayed_from"] = replayed
    return card
