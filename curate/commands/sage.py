"""`curate build sage-responses` and `curate sage score`: SaGE moral-consistency data and scores."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from curate.commands._app import Format, StoreOpt, app, build_app, console, err_console, friendly_errors, safe
from curate.commands._options import config_options
from curate.commands.build import report
from curate.commands.evaluate import eval_app
from curate.errors import CurateError
from curate.store import DatasetStore
from train.sage_loop import SageLoopConfig

sage_app = typer.Typer(help="SaGE (semantic graph entropy): moral consistency across paraphrases.",
                       no_args_is_help=True)
app.add_typer(sage_app, name="sage")


@build_app.command("sage-responses")
@friendly_errors
def build_sage_responses_cmd(
    questions: Annotated[str, typer.Option(help="CSV with question_id, question[, paraphrased] (MCC layout).")],
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL, "
                                                      "else api.openai.com). Key from $OPENAI_API_KEY.")] = None,
    model: Annotated[str, typer.Option(help="Aligned model whose answers are collected.")] = "gpt-3.5-turbo",
    temperature: float = 0.8,
    rot_model: Annotated[str | None, typer.Option(help="Model that writes the Rules of Thumb (default: --model).")]
    = None,
    target_model: Annotated[str | None, typer.Option(help="Small model being aligned: enables the feedback set.")]
    = None,
    target_base_url: Annotated[str | None, typer.Option(help="Endpoint of --target-model (default --base-url).")]
    = None,
    batch: Annotated[bool, typer.Option("--batch", help="Use the Batch API (half price, slower).")] = False,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 16,
    paraphrases: Annotated[int, typer.Option(help="Generate N paraphrases per question (plain lists).")] = 0,
    min_paraphrase_similarity: Annotated[float, typer.Option(help="Keep generated paraphrases at least this "
                                                                  "similar to the question.")] = 0.75,
    embedding_model: Annotated[str, typer.Option(help="sentence-transformers id or path.")]
    = "sentence-transformers/all-MiniLM-L6-v2",
    initial_threshold: float = 0.9,
    decay_rate: float = 0.99,
    min_threshold: float = 0.6,
    limit_questions: Annotated[int | None, typer.Option(help="Only the first N questions (quick runs).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before a request counts as stalled and is retried.")]
    = 60.0,
    max_retries: Annotated[int, typer.Option(help="Retries per request (429 / 5xx / timeouts / malformed "
                                                   "bodies).")] = 6,
    request_timeout: Annotated[float, typer.Option(help="Hard deadline in seconds for one request, body "
                                                        "included (a server dripping bytes cannot hold it).")]
    = 300.0,
    max_retry_wait: Annotated[float, typer.Option(help="Longest Retry-After honoured, in seconds.")] = 60.0,
    max_response_bytes: Annotated[int, typer.Option(help="Largest reply body read; a larger one fails the "
                                                         "request.")] = 1_000_000,
    retry_truncated: Annotated[bool, typer.Option(help="Ask an answer cut by max_tokens once more with twice "
                                                       "the max_tokens.")] = False,
    name: Annotated[str, typer.Option(help="Dataset name in the store.")] = "sage-responses",
    store: StoreOpt = None,
) -> None:
    """Collect answers + Rules of Thumb, score SaGE per question, select with a decaying threshold.

    Every complete reply is cached under <store>/llm_cache: a rerun or a resumed run never pays for a call
    twice. Answers cut by max_tokens, filtered, empty or refused are never cached, scored or selected.
    Against the offline replay server (`python -m curate.replay`) replies are cached apart and the version
    records `replayed_from`. Credentials in --base-url (user:password@, ?api_key=) are never written.
    """
    from builders.sage_responses import SageResponsesConfig, build_sage_responses

    params = SageResponsesConfig(
        questions=questions, model=model, base_url=base_url, temperature=temperature, rot_model=rot_model,
        target_model=target_model, target_base_url=target_base_url, batch=batch, concurrency=concurrency,
        paraphrases=paraphrases, min_paraphrase_similarity=min_paraphrase_similarity,
        embedding_model=embedding_model, initial_threshold=initial_threshold, decay_rate=decay_rate,
        min_threshold=min_threshold, limit_questions=limit_questions,
    )
    execution = {"timeout": timeout, "max_retries": max_retries, "request_timeout": request_timeout,
                 "max_retry_wait": max_retry_wait, "max_response_bytes": max_response_bytes,
                 "retry_truncated": retry_truncated}
    result = build_sage_responses(DatasetStore(store), params, name=name, execution=execution)
    report(result)
    for step, u in result.usage.items():
        console.print(f"  {step}: {usage_line(u, result.created)}", highlight=False)


def usage_line(u: dict, created: bool = True) -> str:
    """One step's usage as this run spent it: ``0 calls (all cached)`` when nothing was asked."""
    calls = u["completed"] + u.get("batch_completed", 0) + u.get("unusable", 0)
    if calls == 0 and u.get("failures", 0) == 0:
        built = "" if created else " (version already built)"
        return f"0 calls (all cached), {u['cache_hits']} replies from the cache, cost $0{built}"
    cost = u.get("estimated_cost_usd")
    cost_s = "unknown" if cost is None else f"${cost:.4f}" + (" (replayed)" if u.get("replayed") else "")
    unknown = f" ({u['unknown_usage']} replies reported no usage)" if u.get("unknown_usage") else ""
    unusable = f", {u['unusable']} unusable (cut/filtered/empty/refused)" if u.get("unusable") else ""
    return (f"{calls} calls, {u['cache_hits']} cached, {u['retries']} retries{unusable}, "
            f"{u['prompt_tokens'] + u.get('batch_prompt_tokens', 0):,} prompt + "
            f"{u['completion_tokens'] + u.get('batch_completion_tokens', 0):,} completion tokens{unknown}, "
            f"cost {cost_s}")


@sage_app.command("score")
@friendly_errors
def score_cmd(
    source: Annotated[str, typer.Argument(help="CSV/parquet file, or a store dataset NAME[@VERSION] "
                                               "(its `responses` config).")],
    model: Annotated[str, typer.Option("--model", help="Embedding model id or path.")]
    = "sentence-transformers/all-MiniLM-L6-v2",
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    config: Annotated[str, typer.Option(help="Config to read when SOURCE is a dataset.")] = "responses",
    w_answer: float = 0.8,
    w_rot: float = 0.2,
    store: StoreOpt = None,
) -> None:
    """SaGE per question_id (rows need question_id and model_output, optionally rot), then the mean."""
    import polars as pl

    from curate.sage import mean_sage, sage_scores

    path = Path(source)
    if path.is_file():
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema=False)
        origin = str(path)
    elif path.suffix.lower() in (".csv", ".parquet") or "/" in source:
        raise CurateError(f"no such file: {source}")
    else:
        v = DatasetStore(store).get(source)
        df, origin = v.read_polars(config), f"{v.ref} [{config}]"
    try:
        with err_console.status(f"SaGE: loading {safe(model)} and embedding {df.height:,} rows of {safe(origin)} ..."):
            scores = sage_scores(df, model=model, w_answer=w_answer, w_rot=w_rot, source=origin)
    except ValueError as e:
        raise CurateError(str(e)) from None
    mean = mean_sage(scores)
    out = scores.select(pl.col("question_id").cast(pl.String), "sage")
    if fmt == "csv":
        sys.stdout.write(out.write_csv())
        sys.stdout.write(f"mean,{mean}\n")
    elif fmt == "json":
        sys.stdout.write(json.dumps({"scores": out.to_dicts(), "mean": mean}) + "\n")
    else:
        t = Table("question_id", "sage", "paraphrases", "nodes", title=f"SaGE of {origin}")
        for r in scores.iter_rows(named=True):
            t.add_row(str(r["question_id"]), f"{r['sage']:.4f}", str(r["n_paraphrases"]), str(r["n_nodes"]))
        t.add_row("[bold]mean[/]", f"[bold]{mean:.4f}[/]", "", "")
        console.print(t)


@eval_app.command("sage")
@sage_app.command("eval")
@friendly_errors
def eval_sage_cmd(
    model: Annotated[str, typer.Option(help="smollm2, a hub id, a folder, a training run folder, or "
                                            "openai:<model> (OpenAI-compatible endpoint).")] = "smollm2",
    questions: Annotated[str, typer.Option(help="quality100, moral100-high, moral100-low, a CSV (MCC layout "
                                                "question_id, question, paraphrased) or a store dataset.")]
    = "moral100-low",
    questions_config: Annotated[str, typer.Option(help="Config read when --questions is a store dataset.")]
    = "responses",
    limit_questions: Annotated[int | None, typer.Option(help="Only the first N questions (quick runs).")] = None,
    rot_model: Annotated[str, typer.Option(help="Model that writes the Rules of Thumb (LLM client).")]
    = "gpt-3.5-turbo",
    no_rots: Annotated[bool, typer.Option("--no-rots/--rots", help="Score answers only (no RoT model is called).")]
    = False,
    base_url: Annotated[str | None, typer.Option(help="Endpoint of openai:<model> and the RoT model (default "
                                                      "$OPENAI_BASE_URL, else api.openai.com).")] = None,
    rot_base_url: Annotated[str | None, typer.Option(help="Endpoint of the RoT model (default --base-url).")]
    = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the answers (0: greedy).")] = 0.8,
    top_p: float = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length (local models).")] = 96,
    batch_size: Annotated[int, typer.Option(help="Paraphrases per generate call (local models).")] = 8,
    seed: int = 0,
    template: Annotated[str, typer.Option(help="auto | chat | plain prompt for local models.")] = "auto",
    device: str = "auto",
    embedding_model: Annotated[str, typer.Option(help="sentence-transformers id or path.")]
    = "sentence-transformers/all-MiniLM-L6-v2",
    name: Annotated[str, typer.Option(help="Dataset name in the store.")] = "sage-eval",
    store: StoreOpt = None,
) -> None:
    """SaGE of any model: answers to every paraphrase, RoTs, per-question scores, mean with a bootstrap 95 %
    interval, a histogram; one `sage-eval` store version whose lineage names the model and questions."""
    from builders.sage_eval import SageEvalConfig, build_sage_eval

    if template not in ("auto", "chat", "plain"):
        raise CurateError("--template must be auto, chat or plain")
    if max_new_tokens < 1 or batch_size < 1:
        raise CurateError("--max-new-tokens and --batch-size must be at least 1")
    params = SageEvalConfig(model=model, questions=questions, questions_config=questions_config,
                            limit_questions=limit_questions, rot_model=rot_model, no_rots=no_rots,
                            base_url=base_url, rot_base_url=rot_base_url, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, template=template,
                            device=device, embedding_model=embedding_model)
    result = build_sage_eval(DatasetStore(store), params, name=name)
    report(result)
    for step, u in result.usage.items():
        console.print(f"  {step}: {usage_line(u, result.created)}", highlight=False)
    mode = "answers + RoTs" if params.use_rots else "answers only (--no-rots)"
    t = Table("model", "questions scored", "mean SaGE", "95% CI", "empty answers", "scored on",
              title="SaGE evaluation")
    t.add_row(safe(model), str(result.n_scored), f"{result.mean:.4f}", f"[{result.ci_low:.4f}, {result.ci_high:.4f}]",
              str(result.empty_answers), mode)
    console.print(t)


@app.command("sage-loop")
@friendly_errors
@config_options(SageLoopConfig, exclude=["store"])
def sage_loop_cmd(store: StoreOpt = None, options: dict[str, Any] | None = None) -> None:
    """Rounds of {select consistent aligned answers → LoRA SFT of the base target → SaGE on held-out questions},
    keeping the best; resumes at the first unfinished round. Writes <loop-dir>/rounds.md and rounds.png."""
    from curate.configs import COMMAND_LINE, build_config
    from train.sage_loop import run_sage_loop

    given = {**(options or {}), "store": str(store) if store else None}
    cfg = build_config(SageLoopConfig, [(given, COMMAND_LINE)])
    result = run_sage_loop(cfg, console=console)
    t = Table("round", "threshold", "rows", "mean SaGE", "95% CI", "questions", title="SaGE loop")
    for row in result.rounds:
        t.add_row(str(row["round"]), "base" if row["threshold"] is None else f"{row['threshold']:.3f}",
                  str(row["rows_selected"]), f"{row['mean_sage']:.4f}",
                  f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]", str(row["n_questions"]))
    console.print(t)
    if result.best:
        console.print(f"best: round {result.best['round']} ({safe(result.best['model'])})", highlight=False)
    console.print(f"[green]wrote[/] {safe(str(result.loop_dir))}/rounds.md, rounds.png, state.json", highlight=False)
