"""What every command shares: the Typer apps, the two consoles, the `--store` option and error handling.

This is the top floor's own ground: command modules import it, `curate/cli.py` assembles them, and nothing
in `curate/` (outside `commands/`), `builders/` or `train/` imports either. Library code returns facts and
raises `CurateError`; it reports progress and warnings through the standard `logging` / `warnings` modules,
which `setup_output` routes here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from curate import __version__
from curate.errors import CurateError

# A pipe or file gets full-width lines (tables are not cut at 80 columns); a terminal keeps its width.
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="curate",
    help="Curate versioned, queryable ethics-alignment datasets (DFAR, ETHICS, SaGE, teacher logits) "
    "and train small models on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=CONTEXT,
)
build_app = typer.Typer(help="Build a new dataset version from its sources.", no_args_is_help=True,
                        context_settings=CONTEXT)
app.add_typer(build_app, name="build")

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Store folder (default: $CURATE_STORE, else ./.curate).", show_default=False),
]

F = TypeVar("F", bound=Callable[..., Any])


class Format(StrEnum):
    """`--format` of the commands that print a table of results (typer checks the choice)."""

    table = "table"
    csv = "csv"
    json = "json"

LIBRARY_PACKAGES = ("curate", "builders", "train")  # whose `logging` records reach the user

# Library warnings a user can do nothing about (deprecations inside transformers/peft/torch, tokenizer
# fork notices); the toolkit's own warnings go through `logging` and stay visible.
_QUIET_WARNINGS = [
    (FutureWarning, None),
    (DeprecationWarning, None),
    (UserWarning, r"(torch|transformers|peft|accelerate|huggingface_hub|datasets|gguf|sentence_transformers)"),
]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"curate (ethics-curate) {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Show the version and exit.", callback=_version_callback,
                           is_eager=True)
    ] = False,
) -> None:
    setup_output()


def setup_output() -> None:
    """Route the library's `logging` to stderr through Rich and silence warnings users cannot act on."""
    for package in LIBRARY_PACKAGES:
        logger = logging.getLogger(package)
        if not any(isinstance(h, RichHandler) for h in logger.handlers):
            handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    for category, module in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module or "")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _visible(ch: str) -> str:
    # C0/C1 controls (ESC, 8-bit CSI/OSC) and format characters such as bidi overrides are shown as escapes.
    if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"):
        return ch
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def safe(text: object) -> str:
    """Data text as it is: Rich markup escaped and control characters made visible (no ANSI/OSC-8 through)."""
    return escape("".join(_visible(ch) for ch in str(text)))


def error_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {safe(message)}", highlight=False, soft_wrap=True)


def _os_error_message(e: OSError) -> str:
    path = e.filename if e.filename is not None else ""
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "no such file or directory",
        errno.ENOTDIR: "not a directory",
        errno.EISDIR: "is a directory",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno or 0, e.strerror or type(e).__name__)
    return f"{path}: {reason}" if path else reason


def friendly_errors(fn: F) -> F:
    """A user-caused failure ends as one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CurateError as e:
            error_line(str(e))
            raise typer.Exit(1) from None
        except OSError as e:
            error_line(_os_error_message(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: no partial version was written; run the same command "
                              "again to resume")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
