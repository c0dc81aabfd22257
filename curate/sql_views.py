"""SQL over the store (and over Hub repos) through DuckDB views.

View names, for a dataset ``dfar`` whose default config is ``default``:

- ``dfar``               latest version, default config (all splits; a ``split`` column tells them apart)
- ``dfar__lr``           latest version, config ``lr``
- ``"dfar@v1"``          version v1, default config (quote it: ``@`` is not a bare SQL identifier)
- ``"dfar@v1__lr"``      version v1, config ``lr``
- a name with ``-`` (``sage-responses``) is also reachable as ``sage_responses``.

DuckDB reads a parquet footer when a view is created, so views are created lazily: only the views a query
names. A damaged dataset (unreadable tags/manifest, bad parquet) therefore fails only the queries that touch
it, with one line naming the file; queries of the other datasets never see it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb

from curate.errors import CurateError
from curate.store import MANIFEST, DatasetStore, Version

log = logging.getLogger(__name__)

# What reading a damaged tags.json / manifest.json can raise (JSONDecodeError and UnicodeDecodeError are
# ValueErrors; a manifest missing a field gives KeyError/TypeError/AttributeError).
DAMAGE_ERRORS = (CurateError, OSError, ValueError, KeyError, TypeError, AttributeError)
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class ViewSpec:
    """One SQL view: its name and, per split, the parquet paths (local files or `hf://` globs)."""

    name: str
    splits: dict[str, list[str]]
    has_split_column: bool
    where: tuple[tuple[str, str], ...] = ()  # column = value filters (a builder's `params.views`)
    # Checks the files before the view is created (local versions: `Version.ensure_intact`, a damaged file is
    # refused rather than served); None for Hub views, which read the remote files as served (`curate pull`
    # is what verifies a repo's files against its manifest).
    check: Callable[[], object] | None = field(default=None, compare=False, repr=False)

    def sql(self) -> str:
        parts = []
        for split, paths in self.splits.items():
            files = "[" + ", ".join(_sql_str(p) for p in paths) + "]"
            extra = "" if self.has_split_column else f", {_sql_str(split)} AS split"
            parts.append(f"SELECT *{extra} FROM read_parquet({files})")
        body = " UNION ALL BY NAME ".join(parts)
        if self.where:
            cond = " AND ".join(f"{_ident(c)} = {_sql_str(v)}" for c, v in self.where)
            body = f"SELECT * FROM ({body}) WHERE {cond}"
        return f"CREATE OR REPLACE VIEW {_ident(self.name)} AS " + body


@dataclass
class Catalog:
    """The views a store (or Hub repo) offers, and its datasets that could not be read.

    ``damaged`` maps a dataset name to one line naming the file that is wrong with it.
    """

    views: dict[str, ViewSpec] = field(default_factory=dict)  # key: lower-case view name (DuckDB ignores case)
    damaged: dict[str, str] = field(default_factory=dict)

    def add(self, specs: Iterable[ViewSpec]) -> None:
        for s in specs:
            self.views[s.name.lower()] = s

    def referenced(self, sql: str) -> tuple[list[ViewSpec], list[str]]:
        """The views `sql` names, and the damage lines of the damaged datasets it names."""
        idents, strings = _names_in(sql)
        views = [self.views[n] for n in sorted(idents | strings) if n in self.views]
        hurt = [msg for ds, msg in sorted(self.damaged.items()) if any(_names_dataset(n, ds) for n in idents)]
        return views, hurt


def default_config(manifest: dict[str, Any]) -> str:
    configs = list(manifest["configs"])
    wanted = (manifest.get("card") or {}).get("default_config")
    return wanted if wanted in configs else configs[0]


def view_names(name: str, tag: str | None, config: str, default: str) -> list[str]:
    base = name if tag is None else f"{name}@{tag}"
    names = [base if config == default else f"{base}__{config}"]
    if tag is None and "-" in name:
        alias = name.replace("-", "_")
        names.append(alias if config == default else f"{alias}__{config}")
    return names


def views_for_manifest(
    manifest: dict[str, Any], path_for: Any, tags: Iterable[str | None], name: str | None = None,
    check_for: Callable[[str], Callable[[], object]] | None = None,
) -> list[ViewSpec]:
    """Views for one version; `path_for(relative_file) -> str` maps manifest paths to local or hf:// paths.

    `name` is the store's name for the dataset (a version pulled with `--name` keeps its manifest's name);
    `check_for(config)` gives the integrity check run before a view of that config is created.
    """
    default = default_config(manifest)
    specs = []
    for config, splits in manifest["configs"].items():
        has_split = "split" in (manifest.get("schema") or {}).get(config, {})
        files = {str(s): [path_for(str(f)) for f in info["files"]] for s, info in splits.items()}
        check = check_for(config) if check_for else None
        for tag in tags:
            for vname in view_names(name or manifest["name"], tag, config, default):
                specs.append(ViewSpec(vname, files, has_split, check=check))
    # Row subsets a builder declares (ethics: instruct_<subset>): views over the same files, not copies.
    for view, spec in ((manifest.get("params") or {}).get("views") or {}).items():
        config = spec.get("config") if isinstance(spec, dict) else None
        if config not in manifest["configs"]:
            continue
        has_split = "split" in (manifest.get("schema") or {}).get(config, {})
        files = {str(s): [path_for(str(f)) for f in info["files"]] for s, info in manifest["configs"][config].items()}
        where = tuple((str(c), str(v)) for c, v in (spec.get("where") or {}).items())
        check = check_for(config) if check_for else None
        for tag in tags:
            for vname in view_names(name or manifest["name"], tag, view, default):
                specs.append(ViewSpec(vname, files, has_split, where, check))
    return specs


def _version_views(name: str, versions: list[Version]) -> list[ViewSpec]:
    specs: list[ViewSpec] = []
    for v in versions:
        tags: list[str | None] = [v.tag] + ([None] if v is versions[-1] else [])
        specs += views_for_manifest(v.manifest, lambda f, v=v: str(v.path / f), tags, name,
                                    lambda c, v=v: partial(v.files, c))  # files() checks them
    return specs


# ---- reading the store, damage and all -------------------------------------------------------
def checked_versions(store: DatasetStore, name: str) -> list[Version]:
    """`store.versions(name)`, but a damaged tags.json or manifest.json is a `CurateError` naming the file."""
    try:
        versions = store.versions(name)
        _version_views(name, versions)  # a manifest missing `configs`/`files` is damage too
        return versions
    except DAMAGE_ERRORS as e:
        raise CurateError(describe_damage(store, name, e)) from None


def checked_get(store: DatasetStore, ref: str) -> Version:
    """`store.get(ref)` with damage reported as one line naming the file (see `checked_versions`)."""
    name = ref.partition("@")[0]
    try:
        return store.get(ref)
    except CurateError:
        raise
    except DAMAGE_ERRORS as e:
        raise CurateError(describe_damage(store, name, e)) from None


def describe_damage(store: DatasetStore, name: str, error: BaseException) -> str:
    """One line naming the file that makes dataset `name` unreadable (found by re-reading its files in order)."""
    if isinstance(error, CurateError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or type(error).__name__}"
    ds = store.root / "datasets" / name
    tags_path = ds / "tags.json"
    try:
        tags = json.loads(tags_path.read_text())
        if not isinstance(tags, dict):
            return f"{tags_path}: not a JSON object of tag -> hash"
    except (OSError, ValueError) as e:
        return f"{tags_path}: unreadable ({_first_line(e)})"
    for tag, short in tags.items():
        path = ds / "versions" / str(short) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            views_for_manifest(manifest, str, [tag], name)
        except (OSError, ValueError) as e:
            return f"{path}: unreadable ({_first_line(e)})"
        except (KeyError, TypeError, AttributeError) as e:
            return f"{path}: missing or malformed field ({type(e).__name__}: {_first_line(e)})"
    return f"dataset {name} in {ds}: {type(error).__name__}: {_first_line(error)}"


def store_catalog(store: DatasetStore) -> Catalog:
    """Every dataset's views; a dataset whose tags or manifests cannot be read goes to `damaged`."""
    cat = Catalog()
    for name in store.names():
        try:
            cat.add(_version_views(name, checked_versions(store, name)))
        except CurateError as e:
            cat.damaged[name] = str(e)
    return cat


def store_views(store: DatasetStore) -> list[ViewSpec]:
    return list(store_catalog(store).views.values())


def describe_views(store: DatasetStore) -> list[tuple[str, str, int | None]]:
    """(view name, version ref, rows) for `curate query --list`; a damaged dataset is (name, damage line, None)."""
    out: list[tuple[str, str, int | None]] = []
    for name in store.names():
        try:
            versions = checked_versions(store, name)
        except CurateError as e:
            out.append((name, f"damaged: {e}", None))
            continue
        for v in versions:
            tags: list[str | None] = [v.tag] + ([None] if v is versions[-1] else [])
            default = default_config(v.manifest)
            for config in v.configs():
                for tag in tags:
                    for vn in view_names(name, tag, config, default):
                        out.append((vn, f"{v.ref} [{config}]", v.num_rows(config)))
            # the row-subset views a builder declares (ethics: instruct_<subset>), as `views_for_manifest` makes them
            for view, spec in ((v.manifest.get("params") or {}).get("views") or {}).items():
                config = spec.get("config") if isinstance(spec, dict) else None
                if config not in v.manifest["configs"]:
                    continue
                where = {str(c): val for c, val in (spec.get("where") or {}).items()}
                shown = ", ".join(f"{c} = {val!r}" for c, val in where.items())
                for tag in tags:
                    for vn in view_names(name, tag, view, default):
                        out.append((vn, f"{v.ref} [{config}: {shown}]", None))
    return out


# ---- Hub -----------------------------------------------------------------------------------
def parse_hub_ref(spec: str) -> tuple[str, str | None]:
    """`org/name` or `org/name@rev` → (repo_id, revision or None)."""
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1:
        raise CurateError(f"--hub wants ORG/NAME[@REVISION], got {spec!r}")
    return repo, rev or None


def hf_path(repo_id: str, revision: str | None, rel: str, native: bool = True) -> str:
    """A Hub path: ``hf://datasets/{repo}@{rev}/{path}``, for DuckDB's own hf:// or `HfFileSystem`.

    Both split the revision at the first ``/`` after ``@``, so a revision containing ``/`` is URL-encoded;
    DuckDB's native reader spells ``refs/convert/parquet`` as ``~parquet`` (the Hub's own convention).
    """
    rev = ""
    if revision:
        enc = "~parquet" if native and revision == "refs/convert/parquet" else quote(revision, safe="")
        rev = f"@{enc}"
    return f"hf://datasets/{repo_id}{rev}/{rel}"


def hub_views(
    repo_spec: str,
    manifest: dict[str, Any] | None = None,
    endpoint: str | None = None,
    native: bool = True,
    token: str | None = None,
) -> list[ViewSpec]:
    """Views over a Hub repo, from its `manifest.json` (downloaded if not given).

    The views use split globs (``lr/train-*.parquet``) like the card's `configs`, so they also cover a
    repo whose shards were re-uploaded under other names.
    """
    repo_id, revision = parse_hub_ref(repo_spec)
    if manifest is None:
        manifest = fetch_hub_manifest(repo_id, revision, endpoint, token)
    try:
        default = default_config(manifest)
        specs = []
        for config, splits in manifest["configs"].items():
            has_split = "split" in (manifest.get("schema") or {}).get(config, {})
            files = {s: [hf_path(repo_id, revision, f"{config}/{s}-*.parquet", native)] for s in splits}
            for vname in view_names(manifest["name"], None, config, default):
                specs.append(ViewSpec(vname, files, has_split))
    except (KeyError, TypeError, AttributeError) as e:
        raise CurateError(f"{MANIFEST} of dataset repo {repo_id}@{revision or 'main'} is malformed "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    return specs


def hub_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else `$HF_ENDPOINT` as set now (huggingface_hub read it once, at import), else the Hub's."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_filesystem(endpoint: str | None = None, token: str | None = None) -> Any:
    """`HfFileSystem` for `endpoint` (fresh: no listing cached from an earlier call in this process)."""
    from huggingface_hub import HfFileSystem, get_token

    return HfFileSystem(endpoint=hub_endpoint(endpoint), token=token or get_token(), skip_instance_cache=True)


def fetch_hub_manifest(
    repo_id: str, revision: str | None, endpoint: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """The repo's `manifest.json`; any failure (offline, refused, 404, bad JSON) is one line."""
    where = f"dataset repo {repo_id}@{revision or 'main'} at {hub_endpoint(endpoint)}"
    path = hf_path(repo_id, revision, MANIFEST, native=False)
    try:
        text = hub_filesystem(endpoint, token).read_text(path, encoding="utf-8")
    except FileNotFoundError:
        raise CurateError(f"could not read {MANIFEST} of {where}: no such repo, revision or file "
                          "(or the repo is private and no valid token was given)") from None
    except Exception as e:  # noqa: BLE001 - network/HTTP/offline errors of whichever client: one line
        raise CurateError(f"could not read {MANIFEST} of {where}: {_net_reason(e)}") from None
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CurateError(f"{MANIFEST} of {where} is not valid JSON ({_first_line(e)})") from None
    return manifest


def _net_reason(e: BaseException) -> str:
    """The first line of a network error, walking causes (httpx wraps the OS's 'connection refused')."""
    seen = e
    while seen.__cause__ is not None and not str(seen).strip():
        seen = seen.__cause__
    return f"{type(seen).__name__}: {_first_line(seen)}"


def hub_catalog(repo_spec: str, con: duckdb.DuckDBPyConnection, endpoint: str | None = None,
                token: str | None = None) -> Catalog:
    """Views over a Hub repo and what `con` needs to read them (a filesystem, or DuckDB's own hf://)."""
    url = hub_endpoint(endpoint)
    native = _native_hf_usable(con, url)
    if native:
        _hub_secret(con, token)
    else:
        con.register_filesystem(hub_filesystem(url, token))
    cat = Catalog()
    cat.add(hub_views(repo_spec, endpoint=url, native=native, token=token))
    return cat


def _native_hf_usable(con: duckdb.DuckDBPyConnection, endpoint: str) -> bool:
    """DuckDB's own hf:// reads with parallel C++ range requests (no Python callback per read, no GIL), so it
    is faster than `HfFileSystem`; but it always talks to huggingface.co and its httpfs extension must already
    be installed (installing it is a download). Use it only when both hold and the Hub is not set offline."""
    from huggingface_hub import constants

    if endpoint != HF_DEFAULT_ENDPOINT or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    row = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
    return bool(row and row[0])


def _hub_secret(con: duckdb.DuckDBPyConnection, token: str | None = None) -> None:
    """Let DuckDB read private repos with the user's token, without writing the token anywhere."""
    from huggingface_hub import get_token

    token = token or get_token()
    if token:
        con.execute("CREATE OR REPLACE TEMPORARY SECRET hf_token (TYPE huggingface, TOKEN ?)", [token])


# ---- running ---------------------------------------------------------------------------------
def _create(con: duckdb.DuckDBPyConnection, spec: ViewSpec) -> None:
    """Create one view; DuckDB reads the parquet footers here, so a damaged file fails here, named."""
    if spec.check is not None:
        spec.check()  # a changed file that no longer matches its manifest: refused, never served
    try:
        con.execute(spec.sql())
    except duckdb.Error as e:
        raise CurateError(f"view {spec.name}: {_first_line(e)}") from None


def _create_all(con: duckdb.DuckDBPyConnection, cat: Catalog) -> None:
    """Every view; a damaged dataset or file is skipped with a one-line warning instead of failing all."""
    for name, msg in sorted(cat.damaged.items()):
        log.warning("skipped dataset %s: %s", name, msg)
    for spec in cat.views.values():
        try:
            _create(con, spec)
        except CurateError as e:
            log.warning("skipped %s", e)


def _open(store: DatasetStore | None, hub: str | None, endpoint: str | None,
          token: str | None) -> tuple[duckdb.DuckDBPyConnection, Catalog]:
    con = duckdb.connect()
    try:
        cat = hub_catalog(hub, con, endpoint, token) if hub else store_catalog(store or DatasetStore())
    except BaseException:
        con.close()
        raise
    return con, cat


def connect(store: DatasetStore | None = None, hub: str | None = None, endpoint: str | None = None,
            token: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every view (damaged datasets skipped with a warning)."""
    con, cat = _open(store, hub, endpoint, token)
    _create_all(con, cat)
    return con


def query(sql: str, store: DatasetStore | str | Path | None = None, hub: str | None = None,
          endpoint: str | None = None, token: str | None = None):  # -> pl.DataFrame
    """Run SQL against the views it names and return a polars DataFrame.

    A query that names no known view (``SHOW TABLES``, ``SELECT 1``) or whose table is not found by name
    (e.g. built with a string) runs again with every view created, damaged ones skipped with a warning.
    """
    if not isinstance(store, DatasetStore) and not hub:
        store = DatasetStore(store)
    con, cat = _open(store if isinstance(store, DatasetStore) else None, hub, endpoint, token)
    try:
        views, hurt = cat.referenced(sql)
        if hurt:
            raise CurateError(f"query failed: {hurt[0]}")
        if views:
            for spec in views:
                _create(con, spec)
            try:
                return _run(con, sql)
            except duckdb.CatalogException:
                if len(views) == len(cat.views):
                    raise
            con.close()
            con, cat = _open(store if isinstance(store, DatasetStore) else None, hub, endpoint, token)
        _create_all(con, cat)
        return _run(con, sql)
    except duckdb.CatalogException as e:  # an unknown view: say why there is none, or where the names are
        if isinstance(store, DatasetStore) and not hub and not store.names():
            raise CurateError(f"query failed: store {store.root} has no datasets yet (build one first, e.g. "
                              "just build-dfar, or pass --store)") from None
        raise CurateError(f"query failed: {_first_line(e)} (view names: curate query --list)") from None
    except duckdb.Error as e:
        raise CurateError(f"query failed: {_first_line(e)}") from None
    finally:
        con.close()


def _run(con: duckdb.DuckDBPyConnection, sql: str):  # -> pl.DataFrame
    rel = con.sql(sql)
    if rel is None:  # a statement without a result (CREATE, SET ...)
        import polars as pl

        return pl.DataFrame()
    return rel.pl()


# ---- helpers ---------------------------------------------------------------------------------
# A tokenizer rather than `duckdb.get_table_names`, which binds the statement: it reads the very files (and
# fails on the damaged ones) that lazy views are there to avoid. Over-matching only creates a spare view.
_TOKEN = re.compile(r"\"((?:[^\"]|\"\")*)\"|'((?:[^']|'')*)'|([A-Za-z_][A-Za-z0-9_$]*)")


def _names_in(sql: str) -> tuple[set[str], set[str]]:
    """(identifiers, string literals) in `sql`, lower-cased: candidates for view names."""
    idents: set[str] = set()
    strings: set[str] = set()
    for quoted, literal, bare in _TOKEN.findall(sql):
        if literal:
            strings.add(literal.replace("''", "'").lower())
        else:
            idents.add((quoted.replace('""', '"') if quoted else bare).lower())
    return idents, strings


def _names_dataset(ident: str, dataset: str) -> bool:
    """Does view name `ident` belong to `dataset` (``dfar``, ``dfar__lr``, ``dfar@v1``, ``sage_responses``)?"""
    for base in {dataset.lower(), dataset.lower().replace("-", "_")}:
        if ident == base or ident.startswith((base + "@", base + "__")):
            return True
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    head, marker, frames = text.partition("Traceback (most recent call last):")
    if marker:  # a Python error raised inside DuckDB (the Hub filesystem): its exception line, not its frames
        exc = next((line for line in frames.splitlines() if line.strip() and not line.startswith(" ")), "")
        text = f"{head.strip()} {exc}".strip()
    lines = text.splitlines()
    return lines[0] if lines else type(e).__name__


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
