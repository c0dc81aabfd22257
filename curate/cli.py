"""The `curate` command: assembles the command modules (``curate/commands/*.py``) onto one Typer app.

Shared pieces (apps, consoles, `--store`, error handling) live in `curate/commands/_app.py`; each command
module registers its commands there when imported below.
"""

from __future__ import annotations

from curate.commands import annotate, build, cache_logits, datasets, evaluate, hub, query, sage, train, verify, view
from curate.commands._app import app

COMMAND_MODULES = (build, datasets, query, hub, cache_logits, sage, train, evaluate, verify, view, annotate)


def main() -> None:
    app()


__all__ = ["COMMAND_MODULES", "app", "main"]
