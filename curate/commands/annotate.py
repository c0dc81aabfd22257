"""`curate annotate create|export|agreement`: human pair judgments and label reviews, and their agreement."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from curate.commands._app import StoreOpt, app, console, friendly_errors, safe
from curate.store import DatasetStore

annotate_app = typer.Typer(help="Human annotation: pair (same meaning? Y/N/NA) and label (correct? reason "
                                "supports it?) tasks; judge them in `curate view`.", no_args_is_help=True)
app.add_typer(annotate_app, name="annotate")


class Kind(StrEnum):
    pair = "pair"
    label = "label"


@annotate_app.command("create")
@friendly_errors
def create_cmd(
    name: Annotated[str, typer.Argument(help="Task name (lower-case letters, digits, '_', '-').")],
    source: Annotated[str, typer.Option(help="Source version: sage-responses / sage-eval for pair tasks, "
                                             "dfar / ethics for label tasks (name or name@tag).")],
    kind: Annotated[Kind, typer.Option(help="pair: two answers -> same meaning?; label: statement + label + "
                                            "reason -> correct? supports?")] = Kind.pair,
    n: Annotated[int, typer.Option("-n", "--n", help="Items to sample.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the sample and of the item order (recorded).")] = 0,
    config: Annotated[str | None, typer.Option(help="Config to sample from (default: responses for pair "
                                                    "tasks, the default config for label tasks).")] = None,
    split: Annotated[str | None, typer.Option(help="Label tasks: only this split.")] = None,
    strata: Annotated[int, typer.Option(help="Pair tasks: similarity bands sampled evenly.")] = 4,
    predictions: Annotated[Path | None, typer.Option(help="Label tasks: a `curate eval` predictions.jsonl; the "
                                                          "model's label and reason are reviewed (rows it covers)."
                                                     )] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a task of the same name (its "
                                                                "judgments file is kept).")] = False,
    store: StoreOpt = None,
) -> None:
    """Sample a task's items from a store version and write <store>/annotations/<name>/task.json."""
    from curate.annotate import create_label_task, create_pair_task

    st = DatasetStore(store)
    if kind is Kind.pair:
        task = create_pair_task(st, name, source, n=n, seed=seed, config=config or "responses", strata=strata,
                                overwrite=overwrite)
    else:
        task = create_label_task(st, name, source, n=n, seed=seed, config=config, split=split,
                                 predictions=predictions, overwrite=overwrite)
    console.print(f"created task {safe(task.name)}: {len(task.items)} {task.kind} items from "
                  f"{safe(task.source['name'])}@{safe(task.source['tag'])} ({safe(task.source['config'])}), seed "
                  f"{task.seed}; judge at /annotate/{safe(task.name)} in `curate view`", highlight=False)


@annotate_app.command("export")
@friendly_errors
def export_cmd(
    name: Annotated[str, typer.Argument(help="Task name.")],
    dataset: Annotated[str, typer.Option(help="Dataset the judgments are written to.")] = "annotations",
    store: StoreOpt = None,
) -> None:
    """Write the task's items, final judgments and full history as a store version (lineage: task + source)."""
    from curate.annotate import export_task

    r = export_task(DatasetStore(store), name, dataset)
    word = "exported" if r.created else "unchanged, already stored as"
    console.print(f"{word} {safe(r.version.ref)} ({r.version.hash[:12]}…, "
                  f"{r.version.num_rows('judgments')} judgments)", highlight=False)


@annotate_app.command("agreement")
@friendly_errors
def agreement_cmd(
    name: Annotated[str, typer.Argument(help="Task name.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the items for the 95% interval.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    threshold: Annotated[float | None, typer.Option(help="Pair tasks: similarity at or above which SaGE says "
                                                         "'same' (default: the source's min_threshold, else "
                                                         "0.6).")] = None,
    figure: Annotated[Path | None, typer.Option(help="Pair tasks: where to write the SaGE-vs-human figure "
                                                     "(default <store>/annotations/<task>/sage_vs_human.png).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    store: StoreOpt = None,
) -> None:
    """Krippendorff's α (nominal, NA = missing) per question and annotator pair, bootstrap 95% interval; for pair
    tasks, ROC AUC and accuracy of SaGE's similarity against the human majority."""
    from curate.agreement import compute_agreement
    from curate.annotate import Judgments, load_task

    st = DatasetStore(store)
    task = load_task(st, name)
    fig = figure if figure is not None else (task.path / "sage_vs_human.png" if task.kind == "pair" else None)
    res = compute_agreement(task, Judgments(task), bootstrap=bootstrap, seed=seed, threshold=threshold, figure=fig)
    if as_json:
        console.print_json(json.dumps(res))
        return
    table = Table(title=f"agreement · {safe(task.name)} ({task.kind}, {len(task.items)} items, "
                        f"annotators: {safe(', '.join(res['annotators']) or 'none')})")
    for col in ("question", "annotators", "α", "95% interval", "items"):
        table.add_column(col)
    for field, entry in res["fields"].items():
        ci = entry["ci95"]
        table.add_row(field, "all", _num(entry["alpha"]), f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "–",
                      str(entry["pairable_items"]))
        for p in entry["pairs"]:
            ci = p["ci95"]
            table.add_row("", safe(" & ".join(p["annotators"])), _num(p["alpha"]),
                          f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "–", str(p["items"]))
    console.print(table)
    sv = res.get("sage_vs_human")
    if sv:
        console.print(f"SaGE similarity vs human majority ({sv['items_with_majority']} items): ROC AUC "
                      f"{_num(sv['roc_auc'])}, accuracy at threshold {sv['threshold']:g} {_num(sv['accuracy'])}"
                      + (f"; figure {safe(sv['figure'])}" if sv.get("figure") else ""), highlight=False)


def _num(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"
