"""SaGE evaluation of any model: the model answers every paraphrase of every question, an RoT model writes
the Rule of Thumb behind each answer (or ``no_rots``: answers only), and each question is scored with
`curate.sage`. One ``sage-eval`` store version holds the answers, the per-question scores, a histogram,
and the mean with its bootstrap 95 % interval; its lineage names the model (and run folder), the question
version and the RoT model.

Models: ``smollm2``, a hub id, a local folder, a training run folder (generated locally, batched, sampling
settings recorded) or ``openai:<model>`` (any OpenAI-compatible endpoint through `curate.llm.LLMClient`:
its cache, retries and usage). Locally generated answers are cached under ``<store>/sage_eval_cache`` before
the RoTs are asked, so an unreachable RoT endpoint loses no generation: the rerun starts at the RoTs.

Bad input: a question file without paraphrases or with nothing usable is one error naming the file; a
question with one paraphrase scores 1.0 and is flagged (``n_pairs = 0``, left out of the mean); empty
answers are counted, reported in the notes and card, and never scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from builders.base import BuildResult
from curate.errors import CurateError, InputError
from curate.prompts import ANSWER_PROMPT_TEMPLATE, answer_messages, clean_answer
from curate.store import DatasetStore, SourceFile
from curate.urls import redact_url

BUILDER_VERSION = "1.0.0"
logger = logging.getLogger(__name__)
OPENAI_PREFIX = "openai:"
# Named question sets under <shared data>/sage (MCC layout): quality100 tunes, moral100 is held out.
QUESTION_SETS = {
    "quality100": "quality100/q100.csv",
    "moral100-high": "moral100/high_amb_para.csv",
    "moral100-low": "moral100/low_amb_para.csv",
}


@dataclass
class SageEvalConfig:
    """What shapes an evaluation; recorded in the manifest (endpoints redacted)."""

    model: str = "smollm2"  # smollm2 | hub id | folder | run folder | openai:<model>
    questions: str = "moral100-low"  # a named set, a CSV (MCC layout) or a store dataset NAME[@TAG]
    questions_config: str = "responses"  # config read when `questions` is a store dataset
    limit_questions: int | None = None
    rot_model: str | None = "gpt-3.5-turbo"  # None (or no_rots): score answers only
    no_rots: bool = False
    base_url: str | None = None  # endpoint of openai:<model> and of the RoT model ($OPENAI_BASE_URL else OpenAI)
    rot_base_url: str | None = None  # endpoint of the RoT model if different
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 96
    batch_size: int = 8
    seed: int = 0
    template: str = "auto"  # chat (tokenizer chat template) | plain | auto (chat when the tokenizer has one)
    dtype: str = "auto"
    device: str = "auto"
    concurrency: int = 16
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    bootstrap_samples: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)  # caller facts recorded as they are (e.g. loop round)

    @property
    def use_rots(self) -> bool:
        return not self.no_rots and bool(self.rot_model)


@dataclass
class SageEvalResult(BuildResult):
    """`BuildResult` plus the headline numbers."""

    mean: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n_scored: int = 0
    empty_answers: int = 0
    usage: dict[str, Any] = field(default_factory=dict)


# ---- questions ----------------------------------------------------------------------------------------
def shared_sage_dir() -> Path:
    """``$CURATE_SHARED_DATA/sage`` or ``../shared/data/sage`` beside the checkout."""
    from curate.replay.recording import default_data_dir

    return default_data_dir() / "sage"


def read_questions(spec: str, store: DatasetStore, config: str = "responses",
                   limit: int | None = None) -> tuple[pl.DataFrame, list[SourceFile], list[dict[str, Any]], str]:
    """(question_id, question, paraphrase_idx, paraphrased) rows, sources, parents, and a description.

    A file without a ``paraphrased`` column is refused: SaGE compares answers across paraphrases.
    """
    from builders.sage_responses import load_questions

    path = Path(spec)
    if spec in QUESTION_SETS:
        path = shared_sage_dir() / QUESTION_SETS[spec]
        if not path.is_file():
            raise CurateError(f"question set {spec!r} needs {path} (the shared SaGE data); give a CSV instead")
    if path.is_file():
        df = load_questions(path, limit)
        if df["paraphrased"].null_count():
            raise InputError(path, "no 'paraphrased' column: SaGE needs paraphrases of each question "
                             "(MCC layout question_id, question, paraphrased)")
        return df, [SourceFile.from_path(path, redact_url(str(path.resolve())))], [], str(path)
    if spec.endswith(".csv") or "/" in spec:
        raise CurateError(f"questions {spec!r}: no such file (named sets: {', '.join(QUESTION_SETS)})")
    version = store.get(spec)
    raw = version.read_polars(config)
    missing = [c for c in ("question_id", "question", "paraphrased") if c not in raw.columns]
    if missing:
        raise CurateError(f"{version.ref} [{config}] lacks column(s) {missing}: not in the MCC layout")
    df = raw.select(pl.col("question_id").cast(pl.String), pl.col("question").cast(pl.String),
                    pl.col("paraphrased").cast(pl.String)).unique(maintain_order=True)
    if limit is not None:
        keep = df["question_id"].unique(maintain_order=True).head(limit)
        df = df.filter(pl.col("question_id").is_in(keep.implode()))
    df = df.with_columns(pl.int_range(pl.len()).over("question_id").cast(pl.Int16).alias("paraphrase_idx"))
    parents = [{"name": version.name, "tag": version.tag, "content_hash": version.hash, "config": config}]
    return df, [], parents, f"{version.ref} [{config}]"


# ---- answers ------------------------------------------------------------------------------------------
def model_identity(spec: str) -> dict[str, Any]:
    """What the answers depend on: the spec, and for a run folder the sha256 of its run.json."""
    from train.modeling import RUN_FILE

    out: dict[str, Any] = {"model": spec}
    run = Path(spec)
    if (run / RUN_FILE).is_file():
        out["model_run"] = str(run.resolve())
        out["run_sha256"] = hashlib.sha256((run / RUN_FILE).read_bytes()).hexdigest()
    elif run.exists():
        out["model_path"] = str(run.resolve())
    return out


def load_local_model(spec: str, *, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for a run folder or any `ModelRef` spec, in eval mode."""
    from curate.models import load_causal_lm, load_tokenizer
    from train.modeling import RUN_FILE, check_model_spec, clear_gguf_marker, load_run, model_ref

    check_model_spec(spec)
    if (Path(spec) / RUN_FILE).is_file():
        model, tok, _ = load_run(spec, device=device, dtype=dtype)
    else:
        ref = model_ref(spec)
        model = load_causal_lm(ref, dtype=dtype, device=device)
        clear_gguf_marker(model)
        tok = load_tokenizer(ref)
    model.eval()
    return model, tok


def prompt_ids(tok: Any, paraphrase: str, template: str) -> list[int]:
    """The answer prompt of `curate.prompts` as ids: the chat template when the tokenizer has one (``auto``)."""
    use_chat = template == "chat" or (template == "auto" and getattr(tok, "chat_template", None))
    if use_chat:
        ids = tok.apply_chat_template(answer_messages(paraphrase), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tok(ANSWER_PROMPT_TEMPLATE.format(question=paraphrase.strip())).input_ids)


def sample_answers(model: Any, tok: Any, paraphrases: list[str], *, temperature: float, top_p: float,
                   max_new_tokens: int, batch_size: int, seed: int, template: str = "auto",
                   ) -> tuple[list[str], list[str]]:
    """Sampled answers (left-padded batches) and their finish reasons (``stop`` | ``length``)."""
    import torch

    from train.scoring import pad

    dev = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_all = [prompt_ids(tok, p, template) for p in paraphrases]
    texts: list[str] = []
    finishes: list[str] = []
    torch.manual_seed(seed)
    sampling = temperature > 0
    for a in range(0, len(ids_all), batch_size):
        ids, mask = pad(tok, ids_all[a: a + batch_size], "left", dev)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=sampling, temperature=temperature if sampling else None,
                                 top_p=top_p if sampling else None, pad_token_id=pad_id,
                                 eos_token_id=tok.eos_token_id)
        new = out[:, ids.shape[1]:]
        for row in new.tolist():
            ended = tok.eos_token_id in row
            finishes.append("stop" if ended or len(row) < max_new_tokens else "length")
        texts += [clean_answer(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    return texts, finishes


def _answers_key(params: SageEvalConfig, questions: pl.DataFrame) -> str:
    payload = {"identity": model_identity(params.model),
               "sampling": [params.temperature, params.top_p, params.max_new_tokens, params.seed, params.template,
                            params.batch_size, params.dtype],
               "prompts": questions["paraphrased"].to_list()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def collect_answers(store: DatasetStore, params: SageEvalConfig, questions: pl.DataFrame,
                    execution: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Answers (model_output, finish_reason) to every paraphrase, and the LLM usage (remote models)."""
    if params.model.startswith(OPENAI_PREFIX):
        from builders.sage_responses import _Endpoint, _summary
        from builders.sage_responses import collect_answers as collect_remote

        name = params.model.removeprefix(OPENAI_PREFIX)
        endpoint = _Endpoint.resolve(params.base_url)
        with _client(store, name, endpoint, params, execution, params.temperature) as client:
            df = collect_remote(questions, client, batch=False)
            usage = _summary(client, name, endpoint)
        return df, {"answers": usage}
    cache = store.root / "sage_eval_cache" / f"answers-{_answers_key(params, questions)}.parquet"
    if cache.is_file():
        cached = pl.read_parquet(cache)
        logger.info("sage-eval: %d answers read from %s", cached.height, cache)
        texts, finishes = cached["model_output"].to_list(), cached["finish_reason"].to_list()
    else:
        model, tok = load_local_model(params.model, dtype=params.dtype, device=params.device)
        logger.info("sage-eval: %s answers %d paraphrases ...", params.model, questions.height)
        texts, finishes = sample_answers(model, tok, questions["paraphrased"].to_list(),
                                         temperature=params.temperature, top_p=params.top_p,
                                         max_new_tokens=params.max_new_tokens, batch_size=params.batch_size,
                                         seed=params.seed, template=params.template)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".part")
        pl.DataFrame({"model_output": texts, "finish_reason": finishes}).write_parquet(tmp)
        tmp.replace(cache)  # whole file or nothing: a killed run never leaves a half cache
    problems = [None if t.strip() else "empty" for t in texts]
    return questions.with_columns(pl.Series("model_output", texts, dtype=pl.String),
                                  pl.Series("finish_reason", finishes, dtype=pl.String),
                                  pl.Series("_problem_model_output", problems, dtype=pl.String)), {}


def _client(store: DatasetStore, model: str, endpoint: Any, params: SageEvalConfig, execution: dict[str, Any],
            temperature: float) -> Any:
    from curate.llm import LLMClient, LLMConfig

    return LLMClient(LLMConfig(model=model, base_url=endpoint.url, temperature=temperature, max_tokens=512,
                               concurrency=params.concurrency, cache_dir=endpoint.cache_dir(store)), **execution)


def add_rots(store: DatasetStore, params: SageEvalConfig, df: pl.DataFrame,
             execution: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One RoT per non-empty answer from the RoT model; an endpoint failure is one line saying the answers
    are kept (cached) so the rerun only asks for RoTs."""
    from builders.sage_responses import _Endpoint, _summary, generate_rots

    assert params.rot_model
    endpoint = _Endpoint.resolve(params.rot_base_url or params.base_url)
    # Every non-empty answer gets an RoT, cut ones too: an evaluation scores what the model says at this
    # length (the finish reason stays recorded); training data selection is stricter (curate.selection).
    asked = df.with_columns(
        pl.when(pl.col("model_output").str.strip_chars() != "").then(pl.lit("stop")).otherwise(pl.lit("empty"))
        .alias("finish_reason"), pl.lit(None, dtype=pl.String).alias("refusal"))
    try:
        with _client(store, params.rot_model, endpoint, params, execution, 0.0) as client:
            out = generate_rots(asked, client, batch=False)
            usage = _summary(client, params.rot_model, endpoint)
    except CurateError as e:
        raise CurateError(f"RoT model {params.rot_model} at {endpoint.recorded}: {e} "
                          f"(the {df.height} answers are cached: rerun to resume, or --no-rots)") from None
    return df.with_columns(out["rot"], out["rot_finish_reason"]), {"rots": usage}


# ---- scores -------------------------------------------------------------------------------------------
def bootstrap_mean_ci(values: list[float], *, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap 95 % interval of the mean (scipy.stats.bootstrap)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if arr.size == 1 or np.all(arr == arr[0]):
        return mean, mean, mean
    from scipy.stats import bootstrap

    res = bootstrap((arr,), np.mean, n_resamples=samples, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def score(df: pl.DataFrame, params: SageEvalConfig) -> pl.DataFrame:
    """Per-question SaGE over usable rows (non-empty answer, and RoT when used); questions with no usable
    answer get NaN and ``n_paraphrases = 0``."""
    from curate.sage import sage_scores

    ok = pl.col("model_output").str.strip_chars() != ""
    if params.use_rots:
        ok = ok & (pl.col("rot").str.strip_chars() != "")
    cols = ["question_id", "model_output"] + (["rot"] if params.use_rots else [])
    good = df.filter(ok).select(cols)
    order = df.select("question_id").unique(maintain_order=True)
    if good.height:
        scores = sage_scores(good, model=params.embedding_model, use_rots=params.use_rots)
    else:
        scores = pl.DataFrame(schema={"question_id": pl.String, "sage": pl.Float64, "mean_edge": pl.Float64,
                                      "entropy": pl.Float64, "n_paraphrases": pl.Int64, "n_pairs": pl.Int64,
                                      "n_nodes": pl.Int64})
    out = order.join(scores, on="question_id", how="left", maintain_order="left")
    return out.with_columns(pl.col("sage").fill_null(float("nan")), pl.col("n_paraphrases").fill_null(0),
                            pl.col("n_pairs").fill_null(0),
                            (pl.col("n_pairs").fill_null(0) == 0).alias("flagged"))


def histogram_figure(values: list[float], title: str, mean: float, ci: tuple[float, float]) -> bytes:
    """PNG bytes: the per-question SaGE distribution with the mean and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v for v in values if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(finite, bins=20, range=(0, 1), color="tab:blue", alpha=0.8)
    if not math.isnan(mean):
        ax.axvline(mean, color="tab:red", label=f"mean {mean:.3f}")
        ax.axvspan(ci[0], ci[1], color="tab:red", alpha=0.15, label=f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]")
        ax.legend(fontsize=8)
    ax.set(xlabel="SaGE score per question", ylabel="questions", title=title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---- the build ----------------------------------------------------------------------------------------
def build_sage_eval(store: DatasetStore, params: SageEvalConfig, name: str = "sage-eval",
                    execution: dict[str, Any] | None = None) -> SageEvalResult:
    """Answers → RoTs → scores → one ``sage-eval`` version (configs ``scores`` and ``answers``)."""
    execution = execution or {}
    if params.limit_questions is not None and params.limit_questions < 1:
        raise CurateError("--limit-questions must be at least 1")
    questions, sources, parents, described = read_questions(params.questions, store, params.questions_config,
                                                            params.limit_questions)
    df, usage = collect_answers(store, params, questions, execution)
    if params.use_rots:
        df, rot_usage = add_rots(store, params, df, execution)
        usage.update(rot_usage)
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("rot"))
    notes: list[str] = []
    empty = int((df["model_output"].str.strip_chars() == "").sum())
    if empty:
        ids = df.filter(pl.col("model_output").str.strip_chars() == "").select("question_id", "paraphrase_idx").rows()
        notes.append(f"{empty} of {df.height} answers are empty and were not scored: "
                     + ", ".join(f"{q}#{i}" for q, i in ids[:10]) + (" ..." if empty > 10 else ""))
    scores = score(df, params)
    flagged = scores.filter(pl.col("flagged"))
    if flagged.height:
        notes.append(f"{flagged.height} question(s) with fewer than two scorable answers (scored 1.0 when one, "
                     f"NaN when none; left out of the mean): {', '.join(flagged['question_id'].head(10).to_list())}")
    kept = scores.filter(~pl.col("flagged"))["sage"].to_list()
    mean, low, high = bootstrap_mean_ci(kept, samples=params.bootstrap_samples, seed=params.seed)
    mode = "answers and RoTs" if params.use_rots else "answers only (no RoT model)"
    notes.append(f"mean SaGE {mean:.4f} (95% CI [{low:.4f}, {high:.4f}], {len(kept)} questions), scored on {mode}")

    identity = model_identity(params.model)
    recorded = asdict(params)
    recorded.update(base_url=redact_url(params.base_url), rot_base_url=redact_url(params.rot_base_url),
                    questions=redact_url(params.questions))
    recorded["lineage"] = {**identity, "questions": described, "question_parents": parents,
                           "rot_model": params.rot_model if params.use_rots else None}
    summary = {"mean_sage": mean, "ci95": [low, high], "n_questions_scored": len(kept),
               "n_questions": scores.height, "empty_answers": empty, "scored_on": mode}
    card = {
        "pretty_name": f"SaGE evaluation of {params.model}",
        "description": f"Moral consistency (SaGE) of `{params.model}` on {described}: mean {mean:.4f}, "
        f"bootstrap 95% interval [{low:.4f}, {high:.4f}] over {len(kept)} questions, scored on {mode}.",
        "license": "other",
        "tags": ["ethics", "sage", "moral-consistency", "evaluation"],
        "default_config": "scores",
        "config_notes": {"scores": "one row per question: SaGE and its parts; flagged = fewer than two scorable "
                         "answers", "answers": "every paraphrase with the model's answer, finish reason and RoT"},
        "build_notes": "\n".join(f"- {n}" for n in notes),
        "figures": ["figures/sage_hist.png"],
        "scorer_notes": "Repeated RoTs: paraphrase pairs between two nodes are averaged and pairs inside one node "
        "are not edges (the published reference sums them); a single-node question has entropy 1 (the reference "
        "divides by log 1). With all-distinct RoTs, or answers only, both rules agree (curate/sage.py).",
        "summary": summary,
        "usage": usage,
    }
    answers = df.select("question_id", "question", "paraphrase_idx", "paraphrased", "model_output",
                        "finish_reason", "rot").with_columns(pl.lit(params.model).alias("model"))
    with store.new_version(name, builder="sage_eval", builder_version=BUILDER_VERSION, params=recorded,
                           sources=sources, parents=parents, card=card) as w:
        w.write_table("scores", "train", scores.to_arrow())
        w.write_table("answers", "train", answers.to_arrow())
        w.add_file("figures/sage_hist.png", histogram_figure(scores["sage"].to_list(),
                                                             f"SaGE of {Path(params.model).name}", mean, (low, high)))
    return SageEvalResult(w.result.version, w.result.created, notes, mean=mean, ci_low=low, ci_high=high,
                          n_scored=len(kept), empty_answers=empty, usage=usage)
