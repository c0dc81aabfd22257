"""SQL over the store (and over Hub repos) through DuckDB views.

View names, for a dataset ``dfar`` whose default config is ``default``:

- ``dfar``               latest version, default config (all splits; a ``split`` column tells them apart)
- ``dfar__lr``           latest version, config ``lr``
- ``"dfar@v1"``          version v1, default config (quote it: ``@`` is not a bare SQL identifier)
- ``"dfar@v1__lr"``      version v1, config ``lr``
- a name with ``-`` (``sage-responses``) is also reachable as ``sage_responses``.

Views are lazy: nothing is read until a query touches it, so registering every version is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from curate.errors import CurateError
from curate.store import MANIFEST, DatasetStore, Version


@dataclass(frozen=True)
class ViewSpec:
    """One SQL view: its name and, per split, the parquet paths (local files or `hf://` globs)."""

    name: str
    splits: dict[str, list[str]]
    has_split_column: bool

    def sql(self) -> str:
        parts = []
        for split, paths in self.splits.items():
            files = "[" + ", ".join(_sql_str(p) for p in paths) + "]"
            extra = "" if self.has_split_column else f", {_sql_str(split)} AS split"
            parts.append(f"SELECT *{extra} FROM read_parquet({files})")
        return f"CREATE OR REPLACE VIEW {_ident(self.name)} AS " + " UNION ALL BY NAME ".join(parts)


def default_config(manifest: dict[str, Any]) -> str:
    configs = list(manifest["configs"])
    wanted = manifest.get("card", {}).get("default_config")
    return wanted if wanted in configs else configs[0]


def view_names(name: str, tag: str | None, config: str, default: str) -> list[str]:
    base = name if tag is None else f"{name}@{tag}"
    names = [base if config == default else f"{base}__{config}"]
    if tag is None and "-" in name:
        alias = name.replace("-", "_")
        names.append(alias if config == default else f"{alias}__{config}")
    return names


def views_for_manifest(
    manifest: dict[str, Any], path_for: Any, tags: Iterable[str | None]
) -> list[ViewSpec]:
    """Views for one version; `path_for(relative_file) -> str` maps manifest paths to local or hf:// paths."""
    default = default_config(manifest)
    specs = []
    for config, splits in manifest["configs"].items():
        has_split = "split" in manifest.get("schema", {}).get(config, {})
        files = {s: [path_for(f) for f in info["files"]] for s, info in splits.items()}
        for tag in tags:
            for vname in view_names(manifest["name"], tag, config, default):
                specs.append(ViewSpec(vname, files, has_split))
    return specs


def store_views(store: DatasetStore) -> list[ViewSpec]:
    specs: list[ViewSpec] = []
    for name in store.names():
        versions = store.versions(name)
        for v in versions:
            tags: list[str | None] = [v.tag] + ([None] if v is versions[-1] else [])
            specs += views_for_manifest(v.manifest, lambda f, v=v: str(v.path / f), tags)
    return specs


# ---- Hub -----------------------------------------------------------------------------------
def parse_hub_ref(spec: str) -> tuple[str, str | None]:
    """`org/name` or `org/name@rev` → (repo_id, revision or None)."""
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1:
        raise CurateError(f"--hub wants ORG/NAME[@REVISION], got {spec!r}")
    return repo, rev or None


def hf_path(repo_id: str, revision: str | None, rel: str) -> str:
    """DuckDB's Hub path: ``hf://datasets/{repo}@{rev}/{path}``.

    DuckDB splits the revision at the first ``/`` after ``@``, so a revision containing ``/`` must be
    URL-encoded (``refs/convert/parquet`` is written ``~parquet`` by the Hub's own convention).
    """
    rev = ""
    if revision:
        enc = "~parquet" if revision == "refs/convert/parquet" else revision.replace("/", "%2F")
        rev = f"@{enc}"
    return f"hf://datasets/{repo_id}{rev}/{rel}"


def hub_views(repo_spec: str, manifest: dict[str, Any] | None = None, endpoint: str | None = None) -> list[ViewSpec]:
    """Views over a Hub repo, from its `manifest.json` (downloaded with huggingface_hub if not given).

    The views use split globs (``lr/train-*.parquet``) like the card's `configs`, so they also cover a
    repo whose shards were re-uploaded under other names.
    """
    repo_id, revision = parse_hub_ref(repo_spec)
    if manifest is None:
        manifest = fetch_hub_manifest(repo_id, revision, endpoint)
    default = default_config(manifest)
    specs = []
    for config, splits in manifest["configs"].items():
        has_split = "split" in manifest.get("schema", {}).get(config, {})
        files = {s: [hf_path(repo_id, revision, f"{config}/{s}-*.parquet")] for s in splits}
        for vname in view_names(manifest["name"], None, config, default):
            specs.append(ViewSpec(vname, files, has_split))
    return specs


def fetch_hub_manifest(repo_id: str, revision: str | None, endpoint: str | None = None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        path = hf_hub_download(repo_id, MANIFEST, repo_type="dataset", revision=revision, endpoint=endpoint)
    except HfHubHTTPError as e:
        raise CurateError(f"could not read {MANIFEST} of dataset repo {repo_id}@{revision or 'main'}: {e}") from None
    return json.loads(Path(path).read_text())


# ---- running ---------------------------------------------------------------------------------
def connect(store: DatasetStore | None = None, hub: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per dataset/version/config."""
    con = duckdb.connect()
    specs = hub_views(hub) if hub else store_views(store or DatasetStore())
    if hub:
        _hub_secret(con)
    for spec in specs:
        con.execute(spec.sql())
    return con


def _hub_secret(con: duckdb.DuckDBPyConnection) -> None:
    """Let DuckDB read private repos with the user's token, without writing the token anywhere."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        con.execute("CREATE OR REPLACE TEMPORARY SECRET hf_token (TYPE huggingface, TOKEN ?)", [token])


def query(sql: str, store: DatasetStore | str | Path | None = None, hub: str | None = None):  # -> pl.DataFrame
    """Run SQL against the store's views and return a polars DataFrame."""
    if not isinstance(store, DatasetStore):
        store = DatasetStore(store)
    con = connect(store, hub)
    try:
        return con.sql(sql).pl()
    except duckdb.Error as e:
        msg = str(e).strip().splitlines()[0]
        raise CurateError(f"query failed: {msg}") from None
    finally:
        con.close()


def describe_views(store: DatasetStore) -> list[tuple[str, str, int]]:
    """(view name, version ref, rows) for `curate query --list`."""
    out = []
    for name in store.names():
        versions: list[Version] = store.versions(name)
        for v in versions:
            tags: list[str | None] = [v.tag] + ([None] if v is versions[-1] else [])
            default = default_config(v.manifest)
            for config in v.configs():
                for tag in tags:
                    for vn in view_names(name, tag, config, default):
                        out.append((vn, f"{v.ref} [{config}]", v.num_rows(config)))
    return out


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
