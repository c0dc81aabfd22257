"""`curate build dfar|ethics|preferences`: run a builder and report the version it wrote (or found)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from builders.base import BuildResult
from builders.preferences import PreferencesConfig
from curate.commands._app import StoreOpt, build_app, console, friendly_errors, safe
from curate.commands._options import config_options
from curate.configs import COMMAND_LINE, build_config
from curate.store import DatasetStore

SourceOpt = Annotated[
    str,
    typer.Option("--source", help="Folder holding the upstream files, or 'upstream' to download them."),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="Keep only the first N rows of each split (quick runs).")
]


def report(result: BuildResult) -> None:
    for note in result.notes[:20]:  # notes quote data rows: escaped (safe) so they print as they are
        console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    if len(result.notes) > 20:
        console.print(f"[yellow]note:[/] … {len(result.notes) - 20} more in the card")
    style = "green" if result.created else "cyan"
    console.print(f"[{style}]{safe(result.summary())}[/]")
    console.print(f"  {safe(result.version.path)}", highlight=False)


@build_app.command("dfar")
@friendly_errors
def build_dfar_cmd(
    source: SourceOpt = "upstream",
    store: StoreOpt = None,
    name: Annotated[str, typer.Option(help="Dataset name in the store.")] = "dfar",
    dedupe: Annotated[
        str, typer.Option(help="Within-split duplicate statements: none (report only) or within-split (drop "
                               "repeats). Legacy train-test = within-split (dropping the overlap is now the default).")
    ] = "none",
    keep_overlap: Annotated[
        bool, typer.Option("--keep-overlap", help="Keep train statements that also appear in test (upstream's "
                                                  "layout); by default they are dropped from train and counted.")
    ] = False,
    prompt_template: Annotated[
        str | None, typer.Option(help="Prompt for the l/lr configs; fields: {statement}.")
    ] = None,
    l_template: Annotated[str | None, typer.Option(help="Completion of the l config; {label_text}.")] = None,
    lr_template: Annotated[
        str | None, typer.Option(help="Completion of the lr config; {label_text}, {reason}.")
    ] = None,
    limit: LimitOpt = None,
) -> None:
    """Build DFAR (label + reason): configs default, l (label only) and lr (label + reason)."""
    from builders.dfar import DfarConfig, build_dfar

    params = DfarConfig(dedupe=dedupe, drop_overlap=not keep_overlap, limit=limit)
    if prompt_template:
        params.prompt_template = prompt_template
    if l_template:
        params.l_completion_template = l_template
    if lr_template:
        params.lr_completion_template = lr_template
    report(build_dfar(DatasetStore(store), source, params, name=name))


@build_app.command("ethics")
@friendly_errors
def build_ethics_cmd(
    source: SourceOpt = "upstream",
    store: StoreOpt = None,
    name: Annotated[str, typer.Option(help="Dataset name in the store.")] = "ethics",
    subsets: Annotated[
        str, typer.Option(help="Comma-separated subsets.")
    ] = "commonsense,deontology,justice,utilitarianism,virtue",
    limit: LimitOpt = None,
) -> None:
    """Build ETHICS: one config per subset plus a common text_label view."""
    from builders.ethics import EthicsConfig, build_ethics

    params = EthicsConfig(subsets=tuple(s.strip() for s in subsets.split(",") if s.strip()), limit=limit)
    report(build_ethics(DatasetStore(store), source, params, name=name))


@build_app.command("preferences")
@friendly_errors
@config_options(PreferencesConfig)
def build_preferences_cmd(store: StoreOpt = None, options: dict[str, Any] | None = None) -> None:
    """Build preference pairs (configs pairs and sides) from a DFAR version plus a rejected-answer generator
    (--from dfar --rejected model:|openai:|student:), or from a prompt/chosen/rejected file or Hub dataset."""
    from builders.preferences import build_preferences

    params = build_config(PreferencesConfig, [(options or {}, COMMAND_LINE)])
    report(build_preferences(DatasetStore(store), params))
