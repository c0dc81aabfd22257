"""`curate datasets` and `curate show`: what is in the store."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.store import DatasetStore


@app.command("datasets")
@friendly_errors
def datasets_cmd(store: StoreOpt = None) -> None:
    """List every dataset and version: tag, content hash, configs, row counts, builder, creation time."""
    st = DatasetStore(store)
    versions = st.all_versions()
    if not versions:
        console.print(f"store {st.root} is empty; try [bold]curate build dfar[/]")
        return
    table = Table(title=f"datasets in {st.root}")
    for col in ("name", "version", "hash", "configs", "rows", "builder", "created"):
        table.add_column(col, justify="right" if col == "rows" else "left")
    for v in versions:
        m = v.manifest
        table.add_row(
            v.name, v.tag, v.hash[:12], ", ".join(v.configs()), f"{v.num_rows():,}",
            f"{m['builder']['name']} {m['builder']['version']}", m["created_at"],
        )
    console.print(table)


@app.command("show")
@friendly_errors
def show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (tag like v2, or a hash prefix).")],
    store: StoreOpt = None,
    manifest: Annotated[bool, typer.Option("--manifest", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Show one version: provenance, per-split row counts, schema, lineage and where its card is."""
    v = DatasetStore(store).get(ref)
    m = v.manifest
    if manifest:
        console.print_json(json.dumps(m))
        return
    console.print(f"[bold]{v.ref}[/]  hash {v.hash}")
    console.print(f"built by {m['builder']['name']} {m['builder']['version']} at {m['created_at']}"
                  f" (toolkit {m['toolkit']['version']}, commit {str(m['toolkit'].get('git_commit'))[:12]})")
    counts = Table("config", "split", "rows", "columns")
    for config, splits in m["configs"].items():
        cols = ", ".join(m["schema"][config])
        for split, info in splits.items():
            counts.add_row(config, split, f"{info['num_rows']:,}", cols)
    console.print(counts)
    for s in m["sources"]:
        console.print(f"source {s['location']}  sha256 {s['sha256'][:16]}…")
    for p in m["parents"]:
        console.print(f"parent {p.get('name')}@{p.get('tag')} {str(p.get('content_hash'))[:16]} "
                      f"{p.get('origin', '')}")
    if origin := m.get("origin"):
        console.print(f"pulled from {origin['hub']}@{origin['revision']} (commit {origin['commit'][:12]}, "
                      f"{origin.get('endpoint', '')})")
    console.print(f"card: {v.card_path}")
