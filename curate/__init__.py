"""ethics-curate: versioned, queryable ethics-alignment datasets, and training on them."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def query(sql: str, store: Any = None, hub: str | None = None, **kwargs: Any) -> Any:
    """Run SQL over the store's (or a Hub repo's) DuckDB views; returns a `polars.DataFrame`.

    `endpoint=` / `token=` apply with `hub=` (see `curate.sql_views.query`).
    """
    from curate.sql_views import query as _query

    return _query(sql, store, hub, **kwargs)


def push(ref: str, repo_id: str, store: Any = None, **kwargs: Any) -> Any:
    """Push a store version to a Hub dataset repo (see `curate.hub.push`)."""
    from curate.hub import push as _push
    from curate.store import DatasetStore

    return _push(store if isinstance(store, DatasetStore) else DatasetStore(store), ref, repo_id, **kwargs)


def pull(repo_spec: str, store: Any = None, **kwargs: Any) -> Any:
    """Pull a Hub dataset revision into the store (see `curate.hub.pull`)."""
    from curate.hub import pull as _pull
    from curate.store import DatasetStore

    return _pull(store if isinstance(store, DatasetStore) else DatasetStore(store), repo_spec, **kwargs)
