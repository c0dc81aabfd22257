"""`curate eval`: accuracy / precision / recall / F1 (verbalizer and generation readings), gold-reason
perplexity and the misalignment rate of generated reasons, for a run folder or any model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.commands._options import config_options
from curate.configs import COMMAND_LINE, build_config
from curate.models import ModelSpec

# A group that runs its own callback when no subcommand is given: `curate eval --model …` is unchanged and
# `curate eval sage …` (curate/commands/sage.py) sits beside it.
eval_app = typer.Typer(invoke_without_command=True)
app.add_typer(eval_app, name="eval")


def _unless_subcommand(fn: Any) -> Any:
    """Run the plain evaluation only without a subcommand; before `curate eval sage …` options would be dropped."""
    import functools

    from curate.errors import CurateError

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        ctx = kwargs["typer_ctx"]  # the click context `config_options` asks Typer for
        if not ctx.invoked_subcommand:
            return fn(**kwargs)
        given = [p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", "DEFAULT") != "DEFAULT"]
        if given:
            raise CurateError(f"options before `{ctx.invoked_subcommand}` belong to `curate eval` "
                              f"({', '.join('--' + p.replace('_', '-') for p in given)}); put them after it")
        return None

    return wrapper


@eval_app.callback()
@friendly_errors
@_unless_subcommand
@config_options(ModelSpec)  # --model, --gguf-file, --dtype, --device, --load-in-8bit ... as for cache-logits
def eval_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset (name or name@tag).")] = "dfar",
    dataset_config: Annotated[str, typer.Option(help="Config with prompt, completion, label, label_text.")] = "lr",
    split: Annotated[str, typer.Option(help="Split(s) to evaluate, comma-separated (ethics: test,test_hard).")] = (
        "test"),
    subsets: Annotated[str | None, typer.Option(help="Comma-separated subsets (rows with a subset column; "
                                                     "default all).")] = None,
    limit: Annotated[int | None, typer.Option(help="First N rows only, per subset and split (0: all).")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward / generate call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length.")] = 48,
    template: Annotated[str | None, typer.Option(help="plain or chat (default: the run's, else plain).")] = None,
    judge: Annotated[str, typer.Option(help="Misalignment judge: none, self, local:<model>, openai:<model>.")] = (
        "local:smollm2"),
    judge_base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint for openai:<model>.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run>/eval/… or runs/eval/…).")] = None,
    store: StoreOpt = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Evaluate a model on a labelled split; writes metrics.json, predictions.jsonl, confusion_matrix.png.
    `curate eval sage --help`: SaGE moral consistency of a model instead."""
    from train.evaluate import EvalConfig, run_eval

    given = dict(dataset=dataset, dataset_config=dataset_config, split=split, subsets=subsets, limit=limit or None,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, template=template, judge=judge,
                 judge_base_url=judge_base_url, out_dir=str(out) if out else None,
                 store=str(store) if store else None, **(options or {}))
    cfg = build_config(EvalConfig, [(given, COMMAND_LINE)])
    metrics, folder = run_eval(cfg)
    if "per_group" in metrics:
        print_group_table(metrics)
    for reading in ("verbalizer", "generation"):
        r = metrics[reading]
        label = reading if "per_group" not in metrics else f"{reading} macro"
        console.print(f"{label:<11} acc {r['accuracy']:.3f}  P {r['precision']:.3f}  R {r['recall']:.3f}  "
                      f"F1 {r['f1']:.3f}  (n={r['n']})", highlight=False)
    ppl = metrics.get("reason_perplexity")
    console.print(f"generation parse rate {metrics['generation']['parse_rate']:.3f}"
                  + (f"; gold-reason perplexity {ppl:.2f}" if ppl is not None else ""), highlight=False)
    mis = metrics.get("misalignment")
    if mis:
        rate = "n/a" if mis["rate"] is None else f"{mis['rate']:.3f}"
        console.print(f"misalignment rate {rate} ({mis['judged']} reasons judged by {mis['judge']})",
                      highlight=False)
    console.print(f"[green]wrote[/] {folder}/metrics.json, confusion_matrix.png", highlight=False)


def print_group_table(metrics: dict[str, Any]) -> None:
    """Accuracy / P / R / F1 per (subset, split) and the macro rows, verbalizer reading."""
    from rich.table import Table

    from curate.commands._app import safe
    from train.evaluate import results_table

    t = Table("paradigm", "split", "n", "acc", "P", "R", "F1", "majority", title="verbalizer reading")
    for r in results_table(metrics):
        t.add_row(safe(r["subset"]), safe(r["split"]), "" if r["n"] is None else str(r["n"]),
                  *(f"{r[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1")),
                  "" if r["majority"] is None else f"{r['majority']:.3f}")
    console.print(t)


@eval_app.command("preferences")
@friendly_errors
@config_options(ModelSpec)  # --model (the evaluated model), --dtype, --device, ... as for `curate eval`
def eval_preferences_cmd(
    teacher: Annotated[str | None, typer.Option(help="A DPO run folder: supplies the reference and beta, and its "
                                                     "own margin is reported beside the model's.")] = None,
    reference: Annotated[str | None, typer.Option(help="pi_ref of the margin (default: the teacher's recorded "
                                                       "reference, or the model's when it is a DPO run).")] = None,
    beta: Annotated[float | None, typer.Option(help="beta of the margin (default: the DPO run's).")] = None,
    dataset: Annotated[str, typer.Option(help="Preference dataset (name or name@tag).")] = "preferences",
    dataset_config: Annotated[str, typer.Option(help="Config with id, prompt, chosen, rejected.")] = "pairs",
    split: Annotated[str, typer.Option(help="Held-out split.")] = "test",
    limit: Annotated[int | None, typer.Option(help="First N pairs only (0: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt + response (responses are cut).")] = 512,
    template: Annotated[str | None, typer.Option(help="plain or chat (default: the run's, else plain).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run>/eval/preferences-… or "
                                                  "runs/eval/…).")] = None,
    store: StoreOpt = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Preference accuracy on held-out pairs (log-prob of chosen > rejected, summed and per token) and the mean
    reward margin beta·[(log pi − log pi_ref)(chosen) − (…)(rejected)]; writes metrics.json, pairs.jsonl,
    margins.png."""
    from rich.table import Table

    from curate.commands._app import safe
    from train.preference_eval import PreferenceEvalConfig, run_preference_eval

    given = dict(teacher=teacher, reference=reference, beta=beta, dataset=dataset, dataset_config=dataset_config,
                 split=split, limit=limit or None, batch_size=batch_size, max_length=max_length, template=template,
                 out_dir=str(out) if out else None, store=str(store) if store else None, **(options or {}))
    cfg = build_config(PreferenceEvalConfig, [(given, COMMAND_LINE)])
    m, folder = run_preference_eval(cfg)
    t = Table("model", "pairs", "acc (summed)", "acc (per token)", "mean margin", "reward acc",
              title=f"preferences {safe(m['dataset']['name'])}@{safe(str(m['dataset']['tag']))} {safe(split)}")
    rows = [(cfg.model, m)] + ([(f"{teacher} (teacher)", m["teacher"])] if "teacher" in m else [])
    for name, r in rows:
        has = "margin" in r
        t.add_row(safe(name), str(m["n"]), f"{r['accuracy_sum']:.3f}", f"{r['accuracy_mean']:.3f}",
                  f"{r['margin']:.4f}" if has else "n/a", f"{r['reward_accuracy']:.3f}" if has else "n/a")
    console.print(t)
    if "beta" in m:
        console.print(f"margins against {safe(str(m['reference']))}, beta {m['beta']}", highlight=False)
    console.print(f"[green]wrote[/] {safe(str(folder))}/metrics.json, pairs.jsonl, margins.png", highlight=False)
