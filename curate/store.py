"""The local dataset store: named datasets with immutable, content-hashed, tagged versions.

Layout (one folder per version is exactly what gets pushed to a Hub dataset repo, so a pushed version
loads with ``datasets.load_dataset(repo, config, revision=tag)``)::

    <store>/datasets/<name>/versions/<hash>/README.md          dataset card (YAML front matter)
    <store>/datasets/<name>/versions/<hash>/manifest.json      provenance + lineage
    <store>/datasets/<name>/versions/<hash>/<config>/<split>-00000-of-00001.parquet
    <store>/datasets/<name>/tags.json                          {"v1": "<hash>", ...}
    <store>/work/<name>/<key>/                                 resumable scratch space for long builders

A version only appears under ``versions/`` once it is complete: writers build in a temp folder in the same
filesystem and ``os.rename`` it into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_place_dir, atomic_write_json
from curate.errors import CurateError

DEFAULT_STORE = ".curate"
STORE_ENV = "CURATE_STORE"
MANIFEST = "manifest.json"
CARD = "README.md"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
HASH_LEN = 16  # hex chars shown / used in folder names; the full sha256 lives in the manifest


def check_name(name: object, what: str = "dataset name") -> str:
    """The one name rule for anything that becomes a folder in the store (CLI, pulled manifests, `--name`).

    Lower-case letters, digits, `_` and `-`, starting with a letter or digit: no `/`, `..`, absolute paths.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CurateError(f"{what} {str(name)!r} is not allowed: use lower-case letters, digits, '_' and '-' "
                          f"(matching {NAME_RE.pattern})")
    return name


def resolve_store_root(root: str | os.PathLike[str] | None = None) -> Path:
    """`--store` beats `$CURATE_STORE` beats `./.curate`."""
    if root is None:
        root = os.environ.get(STORE_ENV) or DEFAULT_STORE
    return Path(root).expanduser().resolve()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(folder: Path) -> str:
    """sha256 over (relative path, file sha256) of every data file: parquet under config folders.

    Cards and manifests are excluded: they carry timestamps and the version's own hash.
    """
    h = hashlib.sha256()
    for rel, digest in sorted(data_file_digests(folder).items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def data_file_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in folder.rglob("*.parquet")
        if p.is_file()
    }


def parse_ref(spec: str) -> tuple[str, str | None]:
    """`name` or `name@ref` (ref: a tag like `v2`, a hash prefix, or `latest`)."""
    name, _, ref = spec.partition("@")
    return name, (ref or None)


@dataclass(frozen=True)
class Version:
    """One complete, immutable dataset version on disk."""

    name: str
    tag: str
    hash: str
    path: Path
    manifest: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.tag}"

    def configs(self) -> list[str]:
        return list(self.manifest["configs"])

    def splits(self, config: str) -> list[str]:
        return list(self._config(config))

    def _config(self, config: str) -> dict[str, Any]:
        try:
            return self.manifest["configs"][config]
        except KeyError:
            raise CurateError(
                f"{self.ref} has no config {config!r} (configs: {', '.join(self.configs())})"
            ) from None

    def files(self, config: str, split: str | None = None) -> list[Path]:
        splits = self._config(config)
        if split is not None and split not in splits:
            raise CurateError(f"{self.ref} config {config!r} has no split {split!r} (splits: {', '.join(splits)})")
        chosen = [split] if split is not None else list(splits)
        return [self.path / f for s in chosen for f in splits[s]["files"]]

    def num_rows(self, config: str | None = None) -> int:
        configs = [config] if config else self.configs()
        return sum(s["num_rows"] for c in configs for s in self._config(c).values())

    def read(self, config: str, split: str | None = None) -> pa.Table:
        """All rows of a config (optionally one split) as one Arrow table."""
        return pa.concat_tables([pq.read_table(p) for p in self.files(config, split)])

    def read_polars(self, config: str, split: str | None = None):  # -> polars.DataFrame
        import polars as pl

        return pl.from_arrow(self.read(config, split))

    @property
    def card_path(self) -> Path:
        return self.path / CARD


@dataclass
class SourceFile:
    """Where a builder's input came from; recorded in the manifest for provenance."""

    location: str  # URL or absolute path
    sha256: str
    bytes: int

    @classmethod
    def from_path(cls, path: Path, location: str | None = None) -> SourceFile:
        return cls(location or str(path.resolve()), sha256_file(path), path.stat().st_size)


class VersionWriter:
    """Collects a version's files in a temp folder; `DatasetStore.new_version` commits it atomically."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.configs: dict[str, dict[str, dict[str, Any]]] = {}
        self.schemas: dict[str, dict[str, str]] = {}
        self.features: dict[str, list[dict[str, Any]]] = {}

    def write_table(self, config: str, split: str, table: pa.Table, rows_per_shard: int | None = None) -> None:
        """Write one split of one config as parquet shard(s) named the way the Hub expects."""
        if not NAME_RE.match(config):
            raise CurateError(f"config name {config!r} must match {NAME_RE.pattern}")
        if split in self.configs.get(config, {}):
            raise CurateError(f"config {config!r} split {split!r} written twice")
        n = table.num_rows
        step = rows_per_shard or max(n, 1)
        starts = list(range(0, max(n, 1), step))
        (self.tmp / config).mkdir(parents=True, exist_ok=True)
        files = []
        for i, start in enumerate(starts):
            rel = f"{config}/{split}-{i:05d}-of-{len(starts):05d}.parquet"
            # Fixed writer options keep bytes stable across runs, which keeps content hashes stable.
            pq.write_table(table.slice(start, step), self.tmp / rel, compression="zstd", write_statistics=True)
            files.append(rel)
        self.add_split_files(config, split, files, n, table.schema)

    def add_split_files(self, config: str, split: str, files: list[str], num_rows: int, schema: pa.Schema) -> None:
        """Register parquet files a builder placed under `tmp/<config>/` itself (e.g. resumable shards)."""
        self.configs.setdefault(config, {})[split] = {"num_rows": num_rows, "files": sorted(files)}
        self.schemas[config] = {f.name: str(f.type) for f in schema}
        self.features[config] = _hf_features(schema)

    def add_file(self, rel: str, data: bytes | Path) -> Path:
        """Extra files shipped with the version (plots, prompt files...). Not part of the content hash."""
        dest = self.tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, dest)
        else:
            dest.write_bytes(data)
        return dest


@dataclass
class CommitResult:
    version: Version
    created: bool  # False: identical content already existed, nothing was written


class DatasetStore:
    """A directory of named datasets, each a sequence of immutable versions."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_store_root(root)

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        base = self.root / "datasets"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "tags.json").is_file())

    def versions(self, name: str) -> list[Version]:
        """All versions of a dataset, oldest first."""
        tags = self._read_tags(name)
        out = [self._load(name, tag, h) for tag, h in tags.items()]
        return sorted(out, key=lambda v: _tag_number(v.tag))

    def get(self, spec: str, ref: str | None = None) -> Version:
        """Resolve `name`, `name@v2`, `name@<hash-prefix>` (or name + ref) to a version."""
        name, parsed = parse_ref(spec)
        ref = ref or parsed
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise CurateError(f"no dataset named {name!r} in store {self.root} (datasets: {known})")
        if ref in (None, "latest"):
            return versions[-1]
        for v in versions:
            if v.tag == ref:
                return v
        matches = [v for v in versions if v.hash.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        tags = ", ".join(v.tag for v in versions)
        raise CurateError(f"dataset {name!r} has no version {ref!r} (versions: {tags})")

    def find_by_hash(self, name: str, full_hash: str) -> Version | None:
        for v in self.versions(name):
            if v.manifest.get("content_hash") == full_hash:
                return v
        return None

    def all_versions(self) -> list[Version]:
        return [v for n in self.names() for v in self.versions(n)]

    # ---- writing -------------------------------------------------------------------------
    def work_dir(self, name: str, key: str) -> Path:
        """Persistent scratch space for a resumable build (shards survive a crash, keyed by inputs)."""
        d = self.root / "work" / name / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def new_version(
        self,
        name: str,
        *,
        builder: str,
        builder_version: str,
        params: dict[str, Any],
        sources: list[SourceFile],
        parents: list[dict[str, Any]] | None = None,
        card: dict[str, Any] | None = None,
    ) -> Iterator[VersionWriter]:
        """Yield a writer; on clean exit hash, manifest, card and rename into place.

        On an exception the temp folder is removed and the store is untouched. The result is left on
        the writer as ``writer.result`` (a `CommitResult`).
        """
        if not NAME_RE.match(name):
            raise CurateError(f"dataset name {name!r} must match {NAME_RE.pattern}")
        ds_dir = self.root / "datasets" / name
        (ds_dir / "versions").mkdir(parents=True, exist_ok=True)
        tmp = ds_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        writer = VersionWriter(tmp)
        try:
            yield writer
            if not writer.configs:
                raise CurateError(f"builder {builder} produced no data for {name!r}")
            writer.result = self._commit(  # type: ignore[attr-defined]
                name, ds_dir, writer, builder, builder_version, params, sources, parents or [], card or {}
            )
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _commit(
        self,
        name: str,
        ds_dir: Path,
        writer: VersionWriter,
        builder: str,
        builder_version: str,
        params: dict[str, Any],
        sources: list[SourceFile],
        parents: list[dict[str, Any]],
        card: dict[str, Any],
    ) -> CommitResult:
        from curate.cards import render_dataset_card
        from curate.provenance import now_iso, toolkit_info

        full_hash = content_hash(writer.tmp)
        with self._lock(ds_dir):
            existing = self.find_by_hash(name, full_hash)
            if existing is not None:
                return CommitResult(existing, created=False)
            tags = self._read_tags(name)
            tag = f"v{max((_tag_number(t) for t in tags), default=0) + 1}"
            manifest = {
                "name": name,
                "tag": tag,
                "content_hash": full_hash,
                "builder": {"name": builder, "version": builder_version},
                "params": params,
                "sources": [s.__dict__ for s in sources],
                "configs": writer.configs,
                "schema": writer.schemas,
                "features": writer.features,
                "created_at": now_iso(),
                "toolkit": toolkit_info(),
                "parents": parents,
                "card": card,
            }
            (writer.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            (writer.tmp / CARD).write_text(render_dataset_card(manifest))
            final = ds_dir / "versions" / full_hash[:HASH_LEN]
            atomic_place_dir(writer.tmp, final)
            tags[tag] = full_hash[:HASH_LEN]
            atomic_write_json(ds_dir / "tags.json", tags)
        return CommitResult(self._load(name, tag, full_hash[:HASH_LEN]), created=True)

    def import_version(self, name: str, folder: Path, expected_hash: str) -> CommitResult:
        """Adopt a complete version folder (e.g. downloaded from the Hub) after verifying its hash."""
        actual = content_hash(folder)
        if actual != expected_hash:
            raise CurateError(
                f"content hash mismatch for {name}: manifest says {expected_hash[:HASH_LEN]}, "
                f"files hash to {actual[:HASH_LEN]}; nothing written"
            )
        ds_dir = self.root / "datasets" / name
        (ds_dir / "versions").mkdir(parents=True, exist_ok=True)
        with self._lock(ds_dir):
            existing = self.find_by_hash(name, actual)
            if existing is not None:
                return CommitResult(existing, created=False)
            tmp = ds_dir / f".tmp-{uuid.uuid4().hex}"
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(".cache", ".gitattributes"))
            tags = self._read_tags(name)
            wanted = json.loads((tmp / MANIFEST).read_text()).get("tag")
            tag = wanted if wanted and wanted not in tags else (
                f"v{max((_tag_number(t) for t in tags), default=0) + 1}"
            )
            final = ds_dir / "versions" / actual[:HASH_LEN]
            atomic_place_dir(tmp, final)
            tags[tag] = actual[:HASH_LEN]
            atomic_write_json(ds_dir / "tags.json", tags)
        return CommitResult(self._load(name, tag, actual[:HASH_LEN]), created=True)

    # ---- internals -----------------------------------------------------------------------
    def _read_tags(self, name: str) -> dict[str, str]:
        path = self.root / "datasets" / name / "tags.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text())

    def _load(self, name: str, tag: str, short_hash: str) -> Version:
        path = self.root / "datasets" / name / "versions" / short_hash
        manifest = json.loads((path / MANIFEST).read_text())
        return Version(name=name, tag=tag, hash=manifest["content_hash"], path=path, manifest=manifest)

    @contextmanager
    def _lock(self, ds_dir: Path) -> Iterator[None]:
        """Serialise tag assignment between concurrent builders of the same dataset."""
        with open(ds_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The `dataset_info.features` YAML the Hub viewer and `datasets` expect, via `datasets` itself."""
    from datasets import Features

    return Features.from_arrow_schema(schema)._to_yaml_list()


def _tag_number(tag: str) -> int:
    m = re.fullmatch(r"v(\d+)", tag)
    return int(m.group(1)) if m else 0

