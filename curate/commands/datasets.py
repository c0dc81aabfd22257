"""`curate datasets` and `curate show`: what is in the store.

Everything printed from a manifest is passed through `safe()`: a pulled repo's manifest is anyone's text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from curate.commands._app import StoreOpt, app, console, err_console, friendly_errors, safe
from curate.errors import CurateError
from curate.store import MANIFEST, DatasetStore, Version


@app.command("datasets")
@friendly_errors
def datasets_cmd(store: StoreOpt = None) -> None:
    """List every dataset and version: tag, content hash, configs, row counts, builder, creation time."""
    from curate.sql_views import checked_versions

    st = DatasetStore(store)
    names = st.names()
    if not names:
        console.print(f"store {safe(st.root)} is empty; try [bold]curate build dfar[/]", highlight=False)
        return
    table = Table(title=safe(f"datasets in {st.root}"))
    for col in ("name", "version", "hash", "configs", "rows", "builder", "created"):
        table.add_column(col, justify="right" if col == "rows" else "left")
    damaged = []
    for name in names:
        try:
            versions = checked_versions(st, name)
        except CurateError as e:
            damaged.append(str(e))
            table.add_row(safe(name), "[red]damaged[/]", "", "", "", safe(e), "")
            continue
        for v in versions:
            try:
                m = v.manifest
                table.add_row(
                    safe(v.name), safe(v.tag), safe(v.hash[:12]), safe(", ".join(map(str, v.configs()))),
                    f"{v.num_rows():,}", safe(f"{m['builder']['name']} {m['builder']['version']}"),
                    safe(m["created_at"]),
                )
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                damaged.append(_malformed(v, e))
                table.add_row(safe(v.name), safe(v.tag), "[red]damaged[/]", "", "", safe(_malformed(v, e)), "")
    console.print(table)
    for line in damaged:
        err_console.print(f"[yellow]warning:[/] {safe(line)}", highlight=False, soft_wrap=True)


@app.command("show")
@friendly_errors
def show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (tag like v2, or a hash prefix).")],
    store: StoreOpt = None,
    manifest: Annotated[bool, typer.Option("--manifest", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Show one version: provenance, per-split row counts, schema, lineage and where its card is."""
    from curate.sql_views import checked_get

    v = checked_get(DatasetStore(store), ref)
    if manifest:
        # ASCII JSON shows every control character as \uXXXX; print_json highlights but never parses markup
        console.print_json(json.dumps(v.manifest), ensure_ascii=True)
        return
    try:
        _show(v)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CurateError(_malformed(v, e)) from None


def _show(v: Version) -> None:
    m: dict[str, Any] = v.manifest
    out = console.print
    out(f"[bold]{safe(v.ref)}[/]  hash {safe(v.hash)}", highlight=False)
    out(f"built by {safe(m['builder']['name'])} {safe(m['builder']['version'])} at {safe(m['created_at'])}"
        f" (toolkit {safe(m['toolkit']['version'])}, commit {safe(str(m['toolkit'].get('git_commit'))[:12])})",
        highlight=False)
    counts = Table("config", "split", "rows", "columns")
    for config, splits in m["configs"].items():
        cols = ", ".join(map(str, m["schema"][config]))
        for split, info in splits.items():
            counts.add_row(safe(config), safe(split), f"{int(info['num_rows']):,}", safe(cols))
    out(counts)
    for s in m["sources"]:
        out(f"source {safe(s['location'])}  sha256 {safe(str(s['sha256'])[:16])}…", highlight=False)
    for p in m["parents"]:
        out(f"parent {safe(p.get('name'))}@{safe(p.get('tag'))} {safe(str(p.get('content_hash'))[:16])} "
            f"{safe(p.get('origin', ''))}", highlight=False)
    if origin := m.get("origin"):
        out(f"pulled from {safe(origin['hub'])}@{safe(origin['revision'])} (commit {safe(str(origin['commit'])[:12])}"
            f", {safe(origin.get('endpoint', ''))})", highlight=False)
    out(f"card: {safe(v.card_path)}", highlight=False)


def _malformed(v: Version, e: BaseException) -> str:
    return f"{v.path / MANIFEST}: missing or malformed field ({type(e).__name__}: {e})"
