"""The `curate` command: build, list, show and query versioned ethics datasets.

Each group of commands lives in its own module (``curate/commands/*.py``) and registers itself on the
shared Typer apps defined here.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from curate.errors import CurateError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="curate",
    help="Curate versioned, queryable ethics-alignment datasets (DFAR, ETHICS, SaGE, teacher logits) "
    "and train small models on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
build_app = typer.Typer(help="Build a new dataset version from its sources.", no_args_is_help=True)
app.add_typer(build_app, name="build")

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Store folder (default: $CURATE_STORE, else ./.curate).", show_default=False),
]

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn a `CurateError` into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CurateError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: no partial version was written; rerun to resume")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def main() -> None:
    app()


# Register the command modules (import for their side effect of adding commands).
from curate.commands import build as _build  # noqa: E402,F401
from curate.commands import datasets as _datasets  # noqa: E402,F401
from curate.commands import query as _query  # noqa: E402,F401
from curate.commands import hub as _hub  # noqa: E402,F401
from curate.commands import cache_logits as _cache_logits  # noqa: E402,F401
from curate.commands import sage as _sage  # noqa: E402,F401
from curate.commands import train as _train  # noqa: E402,F401
from curate.commands import evaluate as _evaluate  # noqa: E402,F401
