"""`curate query`: SQL over every dataset in the store (or a Hub repo) through DuckDB."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.measure import Measurement
from rich.table import Table

from curate.commands._app import Format, StoreOpt, app, console, friendly_errors, safe
from curate.commands.hub import EndpointOpt
from curate.errors import CurateError
from curate.store import DatasetStore


@app.command("query")
@friendly_errors
def query_cmd(
    sql: Annotated[str | None, typer.Argument(help="SQL; views are named after datasets (see --list).")] = None,
    store: StoreOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    hub: Annotated[
        str | None, typer.Option("--hub", help="Query a Hub dataset repo instead: ORG/NAME\\[@REVISION].")
    ] = None,
    endpoint: EndpointOpt = None,
    list_views: Annotated[bool, typer.Option("--list", help="List the view names and exit.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown by --format table.")] = 50,
) -> None:
    """Run SQL over the store. `dfar` is the latest version's default config, `dfar__lr` its lr config,
    `"dfar@v1"` / `"dfar@v1__lr"` a specific version; every config view has a `split` column."""
    from curate.sql_views import describe_views, query

    st = DatasetStore(store)
    if list_views:
        t = Table("view", "version [config]", "rows")
        for name, ref, rows in describe_views(st):
            shown = name if name.isidentifier() else f'"{name}"'
            t.add_row(safe(shown), safe(ref), "" if rows is None else f"{rows:,}")  # a subset view: not counted
        _print_table(t)
        return
    if not sql:
        raise CurateError("give a SQL query, e.g. curate query \"SELECT split, count(*) FROM dfar GROUP BY ALL\"")
    if endpoint and not hub:
        raise CurateError("--endpoint only applies with --hub ORG/NAME[@REVISION]")
    df = query(sql, st, hub=hub, endpoint=endpoint)
    if fmt is Format.csv:
        _write_raw(df.write_csv())
    elif fmt is Format.json:
        _write_raw(df.write_json() + "\n")
    else:
        t = Table(*(safe(c) for c in df.columns))
        for row in df.head(limit).iter_rows():
            t.add_row(*("" if v is None else safe(v) for v in row))
        _print_table(t)
        if df.height > limit:
            console.print(f"… {df.height - limit:,} more rows (use --format csv for all)", highlight=False)


def _print_table(t: Table) -> None:
    """Off a terminal the table is as wide as its widest row, so no cell is wrapped or cut with `…`."""
    if console.is_terminal:
        console.print(t)
        return
    before = console.width
    console.width = max(before, Measurement.get(console, console.options.update_width(1 << 20), t).maximum)
    try:
        console.print(t, crop=False)
    finally:
        console.width = before


def _write_raw(text: str) -> None:
    """csv/json go out exactly as they are, except that a terminal gets control characters made visible
    (a pipe or file gets the bytes unchanged). Not `safe()`: escaping Rich markup would change the data."""
    if sys.stdout.isatty():
        text = "".join(ch if ch in "\n\t" or (ch.isprintable() and ord(ch) >= 32) else f"\\x{ord(ch):02x}"
                       for ch in text)
    sys.stdout.write(text)
