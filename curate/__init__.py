"""ethics-curate: versioned, queryable ethics-alignment datasets, and training on them."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def query(sql: str, store: Any = None, hub: str | None = None) -> Any:
    """Run SQL over the store's DuckDB views; returns a `polars.DataFrame` (see `curate.query`)."""
    from curate.sql_views import query as _query

    return _query(sql, store, hub)
