"""`curate query`: SQL over every dataset in the store (or a Hub repo) through DuckDB."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.errors import CurateError
from curate.store import DatasetStore

FORMATS = ("table", "csv", "json")


@app.command("query")
@friendly_errors
def query_cmd(
    sql: Annotated[str | None, typer.Argument(help="SQL; views are named after datasets (see --list).")] = None,
    store: StoreOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    hub: Annotated[
        str | None, typer.Option("--hub", help="Query a Hub dataset repo instead: ORG/NAME[@REVISION].")
    ] = None,
    list_views: Annotated[bool, typer.Option("--list", help="List the view names and exit.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown by --format table.")] = 50,
) -> None:
    """Run SQL over the store. `dfar` is the latest version's default config, `dfar__lr` its lr config,
    `"dfar@v1"` / `"dfar@v1__lr"` a specific version; every config view has a `split` column."""
    from curate.sql_views import describe_views, query

    if fmt not in FORMATS:
        raise CurateError(f"--format must be one of {', '.join(FORMATS)}")
    st = DatasetStore(store)
    if list_views:
        t = Table("view", "version [config]", "rows")
        for name, ref, rows in describe_views(st):
            t.add_row(name if name.isidentifier() else f'"{name}"', escape(ref), f"{rows:,}")
        console.print(t)
        return
    if not sql:
        raise CurateError("give a SQL query, e.g. curate query \"SELECT split, count(*) FROM dfar GROUP BY ALL\"")
    df = query(sql, st, hub=hub)
    if fmt == "csv":
        sys.stdout.write(df.write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        t = Table(*df.columns)
        for row in df.head(limit).iter_rows():
            t.add_row(*("" if v is None else str(v) for v in row))
        console.print(t)
        if df.height > limit:
            console.print(f"… {df.height - limit:,} more rows (use --format csv for all)")
