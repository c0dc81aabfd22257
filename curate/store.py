"""The local dataset store: named datasets with immutable, content-hashed, tagged versions.

Layout (one folder per version is exactly what gets pushed to a Hub dataset repo, so a pushed version
loads with ``datasets.load_dataset(repo, config, revision=tag)``)::

    <store>/datasets/<name>/versions/<hash>/README.md          dataset card (YAML front matter)
    <store>/datasets/<name>/versions/<hash>/manifest.json      provenance + lineage + the file list
    <store>/datasets/<name>/versions/<hash>/<config>/<split>-00000-of-00001.parquet
    <store>/datasets/<name>/versions/<hash>/<extra files>      listed in the manifest's ``extra_files``
    <store>/datasets/<name>/tags.json                          {"v1": "<hash>", ...}
    <store>/datasets/<name>/.lock                              held while tags are assigned (`filelock`)
    <store>/datasets/<name>/.tmp-<hex>/ (+ .tmp-<hex>.lock)    a version being written, locked by its writer
    <store>/staging/<hex>/ (+ <hex>.lock)                      other temp folders inside the store (`staging_dir`)
    <store>/work/<name>/<key>/                                 resumable scratch space for long builders
    <store>/stamps/<name>/<hash>.json                          (size, mtime, inode) of each data file when last
                                                               verified: reads re-hash only files that changed

A version only appears under ``versions/`` once it is complete: writers build in a temp folder in the same
filesystem and rename it into place (`curate.atomic`), then add the tag. A crash between the two leaves an
untagged but complete folder: reads show it and the next write of that dataset adopts it (or replaces it
when damaged). Temp folders whose writer's lock can be taken are stale and removed on the next write.

Every file of a version is listed in its manifest (``data_files`` with their digests, ``extra_files`` with
their sha256, ``metadata_files``): a version holding a symlink or an unlisted file is refused, and
`DatasetStore.verify` re-hashes the files. Reads (`Version.files`, so `read`, the cache loaders and the SQL
views) re-hash every data file whose size, mtime or inode differs from its stamp, and refuse one that does not
match the manifest: an edited, truncated or replaced file is reported, never served. (Media bit rot that keeps
all three is found by `curate verify`, which re-hashes everything.) The content hash is computed over a canonical
form of each file's Arrow data (``hash_scheme``: arrow-canonical-v1), not the parquet bytes, because those embed the
writer's version and layout, so the same rows would hash differently after a pyarrow upgrade. Manifests
without ``hash_scheme`` were hashed over the parquet bytes (file-sha256) and still verify that way.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from curate.atomic import atomic_place_dir, atomic_write_json, is_temp_name
from curate.errors import CurateError

log = logging.getLogger(__name__)

DEFAULT_STORE = ".curate"
STORE_ENV = "CURATE_STORE"
MANIFEST = "manifest.json"
CARD = "README.md"
TAGS = "tags.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
HASH_LEN = 16  # hex chars shown / used in folder names; the full sha256 lives in the manifest
SHORT_RE = re.compile(rf"^[0-9a-f]{{{HASH_LEN}}}$")
HASH_SCHEME = "arrow-canonical-v1"  # sha256 over each data file's Arrow data in a layout-free form
LEGACY_SCHEME = "file-sha256"  # sha256 over each data file's bytes (manifests without `hash_scheme`)
STALE_UNLOCKED_S = 24 * 3600  # a staging folder without a lock file is left alone for a day
STALE_GRACE_S = 60  # younger temps are never removed: a writer may be between creating its lock and taking it


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


# ---- content hashing ---------------------------------------------------------------------------------
def _zero_scalar(t: pa.DataType) -> pa.Scalar:
    return pa.Array.from_buffers(t, 1, [None, pa.py_buffer(bytes(t.byte_width))])[0]


class _Streams:
    """One sha256 per component of a column (values, lengths, string bytes, null positions), so that how the
    rows are split into batches or chunks never changes the result: each stream sees the same bytes."""

    def __init__(self) -> None:
        self.hashes: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def feed(self, key: str, data: bytes | memoryview) -> None:
        if len(data):
            self.hashes.setdefault(key, hashlib.sha256()).update(data)

    def advance(self, key: str, n: int) -> int:
        """Count `n` more elements under `key`; returns the index of the first."""
        start = self.counts.get(key, 0)
        self.counts[key] = start + n
        return start

    def digest_lines(self) -> Iterator[bytes]:
        for key in sorted(set(self.hashes) | set(self.counts)):
            h = self.hashes.get(key)
            yield f"{key}\0{self.counts.get(key, '')}\0{h.hexdigest() if h else ''}\n".encode()


def _canonical_feed(s: _Streams, key: str, arr: pa.Array) -> None:
    """Feed one chunk of a column: null positions, then values with null slots zeroed (parquet readers leave
    whatever bytes they like under nulls). Numbers go in the machine's byte order (little-endian on every
    platform the toolkit supports)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    n = len(arr)
    start = s.advance(key, n)
    if n == 0 or pa.types.is_null(t):
        return
    if arr.null_count:
        nulls = np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False)) + start
        s.feed(f"{key}/nulls", nulls.astype(np.int64).tobytes())
    if pa.types.is_struct(t):
        for i, child in enumerate(arr.flatten()):  # children with the parent's nulls merged in
            _canonical_feed(s, f"{key}/{i}", child)
        return
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        s.feed(f"{key}/lengths", lengths.tobytes())
        _canonical_feed(s, f"{key}/items", pc.list_flatten(arr))  # null lists contribute nothing
        return
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or \
            pa.types.is_large_binary(t):
        if arr.null_count:
            arr = arr.cast(pa.large_binary()).fill_null(b"")
        wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
        offsets = np.frombuffer(arr.buffers()[1], np.int64 if wide else np.int32)[arr.offset: arr.offset + n + 1]
        s.feed(f"{key}/lengths", np.diff(offsets).astype(np.int64).tobytes())
        data = arr.buffers()[2]
        if data is not None and offsets[-1] > offsets[0]:
            s.feed(f"{key}/bytes", memoryview(data)[int(offsets[0]): int(offsets[-1])])
        return
    if pa.types.is_boolean(t):
        s.feed(f"{key}/values", arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
        return
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t) or pa.types.is_decimal(t):
        width = t.byte_width
        filled = arr.fill_null(_zero_scalar(t)) if arr.null_count else arr
        s.feed(f"{key}/values", memoryview(filled.buffers()[1])[filled.offset * width: (filled.offset + n) * width])
        return
    # Rare types (maps, unions, views): one JSON line per value is canonical, if slow.
    s.feed(f"{key}/json", "".join(json.dumps(v, default=str, sort_keys=True) + "\n"
                                  for v in arr.to_pylist()).encode())


def _schema_lines(schema: pa.Schema) -> str:
    return "".join(f"{f.name}\0{f.type}\0{f.nullable}\n" for f in schema)


class ArrowDigester:
    """The arrow-canonical-v1 digest of rows fed in any batching: exactly what `arrow_digest` gives for a parquet
    file holding these rows with this schema. Writers feed what they write, so a commit need not read it back."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema, self.num_rows, self._streams = schema, 0, _Streams()

    def update(self, data: pa.Table | pa.RecordBatch) -> None:
        if _schema_lines(data.schema) != _schema_lines(self.schema):
            raise CurateError(f"rows with schema {data.schema} fed to a digest of {self.schema}")
        if data.num_rows:  # a parquet reader yields no empty batch, and an empty one would add 0-count streams
            self._feed(data)

    def _feed(self, data: pa.Table | pa.RecordBatch) -> None:
        for i, col in enumerate(data.columns):
            for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
                _canonical_feed(self._streams, str(i), chunk)
        self.num_rows += data.num_rows

    def hexdigest(self, num_rows: int | None = None) -> str:
        """`num_rows`: the count the file's footer declares, when hashing a file (the rows fed otherwise)."""
        h = hashlib.sha256()
        rows = self.num_rows if num_rows is None else num_rows
        h.update(f"{HASH_SCHEME}\n{rows}\n{_schema_lines(self.schema)}".encode())
        for line in self._streams.digest_lines():
            h.update(line)
        return h.hexdigest()


def arrow_digest(path: Path, batch_rows: int = 65_536) -> str:
    """sha256 of a parquet file's rows and schema (names, types, nullability; not the file's metadata),
    read in batches (memory stays at one batch) and independent of row groups, pages and compression."""
    pf = pq.ParquetFile(path)
    d = ArrowDigester(pf.schema_arrow)
    for batch in pf.iter_batches(batch_size=batch_rows):
        d._feed(batch)
    return d.hexdigest(pf.metadata.num_rows)


@dataclass(frozen=True)
class WrittenDigest:
    """A digest taken from the rows as they were written, with the file's stat right after: `digest_many`
    trusts it only while the stat is unchanged and the footer agrees (rows, schema)."""

    digest: str
    stamp: tuple[int, ...]
    num_rows: int
    schema: str
    sha256: str | None = None  # of the file's bytes (file-sha256), when the writer took it

    @classmethod
    def of(cls, path: Path, digester: ArrowDigester, sha256: str | None = None) -> WrittenDigest:
        return cls(digester.hexdigest(), tuple(_stamp(path)), digester.num_rows, _schema_lines(digester.schema),
                   sha256)

    def matches(self, path: Path) -> bool:
        """Same stat, and a footer that parses and agrees: a truncated, replaced or rewritten file is re-read."""
        if tuple(_stamp(path)) != self.stamp:
            return False
        pf = pq.ParquetFile(path)
        return pf.metadata.num_rows == self.num_rows and _schema_lines(pf.schema_arrow) == self.schema


def file_digest(path: Path, scheme: str = HASH_SCHEME) -> str:
    if scheme == HASH_SCHEME:
        return arrow_digest(path)
    if scheme == LEGACY_SCHEME:
        return sha256_file(path)
    raise CurateError(f"unknown hash scheme {scheme!r} for {path} (this toolkit knows {HASH_SCHEME}, "
                      f"{LEGACY_SCHEME})")


def combine_digests(digests: dict[str, str]) -> str:
    """The version's content hash: sha256 over sorted (relative path, file digest)."""
    h = hashlib.sha256()
    for rel, digest in sorted(digests.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def digest_many(paths: list[Path], scheme: str = HASH_SCHEME,
                written: dict[Path, WrittenDigest] | None = None) -> list[str | Exception]:
    """`file_digest` of each path on a few threads (parquet decoding, numpy and sha256 release the GIL);
    a file that cannot be read gives its exception in its place. A path in `written` (a builder's digest of
    the rows it wrote, see `WrittenDigest`) is not read back while it still matches; `verify` never passes one."""
    if scheme not in (HASH_SCHEME, LEGACY_SCHEME):
        file_digest(paths[0] if paths else Path("."), scheme)  # raises: unknown scheme
    if scheme == LEGACY_SCHEME and written:
        written = {p: d for p, d in written.items() if d.sha256 is not None}

    def one(p: Path) -> str | Exception:
        try:
            known = written.get(p) if written else None
            if known is not None and known.matches(p):
                return known.digest if scheme == HASH_SCHEME else str(known.sha256)
            return file_digest(p, scheme)
        except Exception as e:  # noqa: BLE001 - reported per file by the caller
            return e

    if written and all(p in written for p in paths):  # footer checks only: no pool needed
        return [one(p) for p in paths]
    if len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(one, paths))


def manifest_scheme(manifest: dict[str, Any]) -> str:
    return str(manifest.get("hash_scheme") or LEGACY_SCHEME)


def data_file_digests(folder: Path, scheme: str = LEGACY_SCHEME) -> dict[str, str]:
    """Digest of every data file (parquet, not following links) under `folder`."""
    paths = [p for p in sorted(folder.rglob("*.parquet")) if p.is_file() and not p.is_symlink()]
    out = {}
    for p, d in zip(paths, digest_many(paths, scheme), strict=True):
        if isinstance(d, Exception):
            raise CurateError(f"{p}: cannot be read ({_reason(d, p)})")
        out[p.relative_to(folder).as_posix()] = d
    return out


def content_hash(folder: Path, scheme: str | None = None) -> str:
    """Content hash of a folder's data files. Cards and manifests are excluded (timestamps, own hash).

    Without `scheme`: the scheme its manifest names (old manifests: file-sha256), else the current one.
    """
    if scheme is None:
        manifest_path = folder / MANIFEST
        scheme = manifest_scheme(_read_json(manifest_path)) if manifest_path.is_file() else HASH_SCHEME
    return combine_digests(data_file_digests(folder, scheme))


# ---- folder checks ---------------------------------------------------------------------------------
def _safe_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and all(part not in ("", ".") for part in p.parts)


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Every file a version may hold, per its manifest (data, extra, card and manifest)."""
    files = {f for splits in manifest.get("configs", {}).values() for s in splits.values() for f in s["files"]}
    files |= set(manifest.get("extra_files") or {})
    files |= set(manifest.get("metadata_files") or [CARD, MANIFEST])
    return files


def check_folder(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Structural problems, one line each naming the path: symlinks, files the manifest does not list,
    listed files that are missing. Cheap (no hashing); run before anything reads or ships the folder.

    Manifests from before the file lists (no ``extra_files``) only have their unlisted parquet refused.
    """
    if folder.is_symlink():
        return [f"{folder}: version folder is a symbolic link (refused)"]
    if not folder.is_dir():
        return [f"{folder}: version folder is missing"]
    try:
        expected = listed_files(manifest)
    except (AttributeError, KeyError, TypeError):
        return [f"{folder / MANIFEST}: malformed configs/file lists"]
    problems = [f"{folder / MANIFEST}: unsafe path {rel!r} listed" for rel in sorted(expected, key=str)
                if not _safe_rel(rel)]
    strict = "extra_files" in manifest
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if (here / d).is_symlink():
                problems.append(f"{here / d}: symbolic link (refused)")
        for f in sorted(filenames):
            p = here / f
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                problems.append(f"{p}: symbolic link (refused)")
            elif rel not in expected and (strict or rel.endswith(".parquet")):
                problems.append(f"{p}: not listed in the manifest (refused)")
    for rel in sorted(r for r in expected if _safe_rel(r)):
        p = folder / rel
        if not p.is_symlink() and not p.is_file():
            problems.append(f"{p}: missing")
    return problems


def verify_folder(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """`check_folder` plus a re-hash of every data and extra file against the manifest."""
    problems = check_folder(folder, manifest)
    if folder.is_symlink() or not folder.is_dir():
        return problems
    scheme = manifest_scheme(manifest)
    listed: dict[str, str] | None = manifest.get("data_files")
    if listed is None:  # old manifests: only the combined hash over the parquet bytes
        digests: dict[str, str] = {}
        for p in sorted(folder.rglob("*.parquet")):
            if p.is_file() and not p.is_symlink():
                digests[p.relative_to(folder).as_posix()] = sha256_file(p)
        if combine_digests(digests) != manifest.get("content_hash"):
            problems.append(f"{folder}: data files hash to {combine_digests(digests)[:HASH_LEN]}, manifest says "
                            f"{str(manifest.get('content_hash'))[:HASH_LEN]} ({LEGACY_SCHEME})")
    else:
        todo = [(folder / rel, want) for rel, want in sorted(listed.items())
                if _safe_rel(rel) and not (folder / rel).is_symlink() and (folder / rel).is_file()]
        # (missing, linked or unsafe entries are reported by check_folder)
        for (p, want), got in zip(todo, digest_many([p for p, _ in todo], scheme), strict=True):
            if isinstance(got, Exception):
                problems.append(f"{p}: cannot be read ({_reason(got, p)})")
            elif got != want:
                problems.append(f"{p}: content differs from the manifest ({scheme})")
        if combine_digests(listed) != manifest.get("content_hash"):
            problems.append(f"{folder / MANIFEST}: data_files do not add up to content_hash")
    for rel, want in sorted((manifest.get("extra_files") or {}).items()):
        p = folder / rel
        if _safe_rel(rel) and p.is_file() and not p.is_symlink() and sha256_file(p) != want:
            problems.append(f"{p}: content differs from the manifest (sha256)")
    return problems


def _read_json(path: Path) -> Any:
    """A store JSON file, or a one-line CurateError naming it (missing, truncated, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurateError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CurateError(f"{path}: damaged, not valid JSON ({str(e).splitlines()[0][:120]})") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("content_hash"), str) \
            or not isinstance(manifest.get("configs"), dict):
        raise CurateError(f"{path / MANIFEST}: damaged, not a curate manifest (no content_hash/configs)")
    return manifest


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

    def check(self) -> None:
        """Refuse (one line naming the path) a version holding a symlink or a file its manifest does not list."""
        problems = check_folder(self.path, self.manifest)
        if problems:
            more = f" (+{len(problems) - 1} more; see `curate verify {self.ref}`)" if len(problems) > 1 else ""
            raise CurateError(f"{self.ref}: {problems[0]}{more}")

    def files(self, config: str, split: str | None = None) -> list[Path]:
        splits = self._config(config)
        if split is not None and split not in splits:
            raise CurateError(f"{self.ref} config {config!r} has no split {split!r} (splits: {', '.join(splits)})")
        self.check()
        chosen = [split] if split is not None else list(splits)
        paths = [self.path / f for s in chosen for f in splits[s]["files"]]
        self.ensure_intact(paths)
        return paths

    def ensure_intact(self, paths: list[Path]) -> None:
        """Refuse (one line naming the file) a data file that changed since it was last verified and no longer
        matches the manifest. Files whose stamp still matches are not re-hashed, so a read costs a `stat`."""
        listed = self.manifest.get("data_files")
        if not isinstance(listed, dict):
            return  # manifests before per-file digests: only `curate verify`'s combined hash applies
        stamps = Stamps.for_version(self)
        todo = []
        for p in paths:
            rel = p.relative_to(self.path).as_posix()
            try:
                now = _stamp(p)
            except OSError as e:
                raise CurateError(f"{self.ref}: {p}: cannot be read ({_reason(e, p)})") from None
            if stamps.get(rel) != now:
                todo.append((p, rel, now))
        if not todo:
            return
        scheme = manifest_scheme(self.manifest)
        for (p, rel, now), got in zip(todo, digest_many([p for p, _, _ in todo], scheme), strict=True):
            if isinstance(got, Exception):
                raise CurateError(f"{self.ref}: {p}: cannot be read ({_reason(got, p)}); not served "
                                  f"(`curate verify {self.ref}`)")
            if got != listed.get(rel):
                raise CurateError(f"{self.ref}: {p}: content differs from the manifest ({scheme}); not served "
                                  f"(`curate verify {self.ref}`; an identical rebuild or `curate pull` repairs it)")
            stamps.set(rel, now)
        stamps.save()

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


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass
class Stamps:
    """`<store>/stamps/<name>/<hash>.json`: the stat of each data file of one version when it last matched its
    digest. Outside the version folder (which holds only listed files); a damaged or missing stamp file only
    means the next read re-hashes, and a read-only store simply re-hashes on every read."""

    path: Path | None
    content_hash: str
    entries: dict[str, list[int]] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def for_version(cls, version: Version) -> Stamps:
        parts = version.path.parts
        if len(parts) < 4 or parts[-2] != "versions" or parts[-4] != "datasets":
            return cls(None, version.hash)  # not inside a store layout: always re-hash
        path = version.path.parents[3] / "stamps" / version.name / f"{version.path.name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("content_hash") == version.hash and isinstance(data.get("files"), dict):
                return cls(path, version.hash, data["files"])
        except (OSError, ValueError, AttributeError):
            pass
        return cls(path, version.hash)

    def get(self, rel: str) -> list[int] | None:
        return self.entries.get(rel)

    def set(self, rel: str, stamp: list[int]) -> None:
        self.entries[rel] = stamp
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"content_hash": self.content_hash, "files": self.entries})
        except OSError as e:  # a read-only store: the next read re-hashes instead
            log.debug("could not write %s: %s", self.path, e)


def stamp_verified(version: Version, rels: list[str] | None = None) -> None:
    """Record the current stat of `version`'s data files (all, or `rels`) as verified: call only right after
    their digests were checked (commit, import, verify, repair)."""
    listed = version.manifest.get("data_files")
    if not isinstance(listed, dict):
        return
    stamps = Stamps.for_version(version)
    for rel in (rels if rels is not None else list(listed)):
        p = version.path / rel
        if _safe_rel(rel) and p.is_file() and not p.is_symlink():
            stamps.set(rel, _stamp(p))
    stamps.save()


@dataclass
class SourceFile:
    """Where a builder's input came from; recorded in the manifest for provenance."""

    location: str  # URL or absolute path
    sha256: str
    bytes: int

    @classmethod
    def from_path(cls, path: Path, location: str | None = None) -> SourceFile:
        return cls(location or str(path.resolve()), sha256_file(path), path.stat().st_size)


@dataclass
class CommitResult:
    version: Version
    created: bool  # False: identical content already existed, nothing new was written
    repaired: bool = False  # the identical stored version was damaged and its files were replaced


class VersionWriter:
    """Collects a version's files in a temp folder; `DatasetStore.new_version` commits it atomically."""

    result: CommitResult | None  # set by `new_version` once the version is committed (or found)

    def __init__(self, tmp: Path, params: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.params: dict[str, Any] = params if params is not None else {}
        self.configs: dict[str, dict[str, dict[str, Any]]] = {}
        self.schemas: dict[str, dict[str, str]] = {}
        self.features: dict[str, list[dict[str, Any]]] = {}
        self.extra_files: list[str] = []
        self.written: dict[Path, WrittenDigest] = {}  # digests of the rows as written: the commit reads no file back
        self.result = None

    def add_params(self, params: dict[str, Any]) -> None:
        """Add manifest params known only after writing (sizes, token counts); the commit serialises them."""
        self.params.update(params)

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
        files, digests = [], {}
        for i, start in enumerate(starts):
            rel = f"{config}/{split}-{i:05d}-of-{len(starts):05d}.parquet"
            part = table.slice(start, step)
            # Fixed writer options keep bytes stable across runs (the content hash does not depend on them).
            pq.write_table(part, self.tmp / rel, compression="zstd", write_statistics=True)
            digests[rel] = ArrowDigester(table.schema)
            digests[rel].update(part)
            files.append(rel)
        self.add_split_files(config, split, files, n, table.schema, digests)

    def add_split_files(self, config: str, split: str, files: list[str], num_rows: int, schema: pa.Schema,
                        digests: dict[str, ArrowDigester] | None = None,
                        file_sha256: dict[str, str] | None = None) -> None:
        """Register parquet files a builder placed under `tmp/<config>/` itself (e.g. resumable shards).

        `digests`: for files written just now, the digest of the rows written to each (`ArrowDigester`), and
        optionally `file_sha256` of their bytes, so the commit need not read them back; both are trusted only
        while the file's stat is the one recorded here."""
        for rel, digester in (digests or {}).items():
            if rel not in files:
                raise CurateError(f"digest given for {rel!r}, which is not among the files of {config}/{split}")
            self.written[self.tmp / rel] = WrittenDigest.of(self.tmp / rel, digester, (file_sha256 or {}).get(rel))
        self.configs.setdefault(config, {})[split] = {"num_rows": num_rows, "files": sorted(files)}
        self.schemas[config] = {f.name: str(f.type) for f in schema}
        self.features[config] = _hf_features(schema)

    def add_file(self, rel: str, data: bytes | Path) -> Path:
        """Extra files shipped with the version (plots, prompt files...). Listed with their sha256 in the
        manifest (so they are checked), not part of the content hash."""
        if not _safe_rel(rel) or rel in (CARD, MANIFEST) or rel.endswith(".parquet"):
            raise CurateError(f"extra file name {rel!r} is not allowed (a relative path without '..', not "
                              f"{CARD}, {MANIFEST} or parquet)")
        dest = self.tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, dest)
        else:
            dest.write_bytes(data)
        if rel not in self.extra_files:
            self.extra_files.append(rel)
        return dest


class DatasetStore:
    """A directory of named datasets, each a sequence of immutable versions."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_store_root(root)
        if self.root.exists() and not self.root.is_dir():
            raise CurateError(f"store {self.root} is a file, not a folder")

    # ---- paths ---------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """Every path the store touches stays inside its root (no symlinked or `..` escapes)."""
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise CurateError(f"{path} resolves to {resolved}, outside the store {self.root}; refused")
        return path

    def _ds_dir(self, name: str) -> Path:
        return self._inside(self.root / "datasets" / check_name(name))

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Datasets with tags, or with a version folder a crash left untagged."""
        base = self.root / "datasets"
        if not base.is_dir():
            return []
        out = []
        for p in base.iterdir():
            if not NAME_RE.match(p.name) or not p.is_dir():
                continue
            versions = p / "versions"
            if (p / TAGS).is_file() or (versions.is_dir() and any(SHORT_RE.match(v.name)
                                                                  for v in versions.iterdir())):
                out.append(p.name)
        return sorted(out)

    def versions(self, name: str) -> list[Version]:
        """All versions of a dataset, oldest first (including a complete one whose tag a crash lost).

        A version holding a symlink, an unlisted file or missing a listed one makes this a `CurateError`
        naming the path: nothing (queries, pushes, training) reads a tampered or damaged dataset.
        """
        out = self._versions(name)
        for v in out:
            v.check()
        return out

    def _versions(self, name: str) -> list[Version]:
        """`versions` without the folder checks (for verify and repair, which look at damage)."""
        ds_dir = self._ds_dir(name)
        tags = self._read_tags(name)
        out = [self._load(name, tag, h) for tag, h in tags.items()]
        for short, manifest in self._orphans(ds_dir, tags).items():
            if manifest is None:
                log.warning("%s: untagged version folder with a damaged manifest; ignored (the next write of "
                            "%s removes it)", ds_dir / "versions" / short, name)
                continue
            tag = _orphan_tag(manifest, tags)
            tags[tag] = short
            out.append(Version(name=name, tag=tag, hash=manifest["content_hash"], path=ds_dir / "versions" / short,
                               manifest=manifest))
        return sorted(out, key=lambda v: _tag_number(v.tag))

    def get(self, spec: str, ref: str | None = None) -> Version:
        """Resolve `name`, `name@v2`, `name@<hash-prefix>` (or name + ref) to a version (checked: no
        symlinks, no unlisted files)."""
        v = self._resolve(spec, ref)
        v.check()
        return v

    def _resolve(self, spec: str, ref: str | None = None, checked: bool = True) -> Version:
        name, parsed = parse_ref(spec)
        ref = ref or parsed
        versions = self.versions(name) if checked else self._versions(name)
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
        """Every version of every dataset; a damaged dataset is skipped with a warning, not fatal."""
        out = []
        for n in self.names():
            try:
                out.extend(self.versions(n))
            except CurateError as e:
                log.warning("skipping dataset %s: %s", n, e)
        return out

    def verify(self, version: Version) -> list[str]:
        """Re-hash every file of `version` against its manifest: one line per problem, naming the file."""
        problems = verify_folder(version.path, version.manifest)
        if not problems:
            stamp_verified(version)
        return problems

    def verify_dataset(self, name: str, ref: str | None = None) -> tuple[int, list[str]]:
        """(versions checked, problems) for one dataset, or one version of it; a damaged tags file or
        manifest is a problem line, not an exception."""
        try:
            ds_dir = self._ds_dir(name)
            tags = self._read_tags(name)
        except CurateError as e:
            return 0, [str(e)]
        if ref is not None:
            try:
                return 1, self.verify(self._resolve(name, ref, checked=False))
            except CurateError as e:
                return 1, [str(e)]
        checked, problems = 0, []
        for tag, short in tags.items():
            checked += 1
            try:
                problems += self.verify(self._load(name, tag, short))
            except CurateError as e:
                problems.append(str(e))
        for short, manifest in self._orphans(ds_dir, tags).items():
            checked += 1
            path = ds_dir / "versions" / short
            problems += (verify_folder(path, manifest) if manifest else
                         [f"{path / MANIFEST}: damaged (untagged version folder)"])
        return checked, problems

    # ---- writing -------------------------------------------------------------------------
    def work_dir(self, name: str, key: str) -> Path:
        """Persistent scratch space for a resumable build (shards survive a crash, keyed by inputs)."""
        check_name(name)
        if not _safe_rel(key) or "/" in key or key.startswith("."):
            raise CurateError(f"work key {key!r} is not allowed (one plain folder name)")
        d = self._inside(self.root / "work" / name / key)
        d.mkdir(parents=True, exist_ok=True)
        return self._inside(d)

    def writable(self, path: Path | None = None) -> bool:
        """Whether the store (or `path` in it) can be written: the nearest existing folder is writable."""
        p = path or self.root
        while not p.exists() and p != p.parent:
            p = p.parent
        return p.is_dir() and os.access(p, os.W_OK)

    def _not_writable(self, what: str) -> CurateError:
        return CurateError(f"store {self.root} is not writable: cannot {what}")

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A temp folder inside the store (same file system as the versions), locked while in use so the
        next write's clean-up leaves it alone, and removed afterwards."""
        base = self.root / "staging"
        base.mkdir(parents=True, exist_ok=True)
        with self._locked_temp(base, "") as tmp:
            yield tmp

    @contextmanager
    def _locked_temp(self, parent: Path, prefix: str) -> Iterator[Path]:
        """A fresh folder `parent/<prefix><hex>` whose lock (`<folder>.lock`) this process holds until exit."""
        tmp = parent / f"{prefix}{uuid.uuid4().hex}"
        lock = FileLock(str(tmp) + ".lock")
        lock.acquire()
        try:
            tmp.mkdir()
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
            Path(str(tmp) + ".lock").unlink(missing_ok=True)

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
        the writer as ``writer.result`` (a `CommitResult`). In a store that cannot be written the files go
        to a temp folder outside it: an identical rebuild still reports the existing version, writing nothing.
        """
        ds_dir = self._ds_dir(name)
        if self.writable(ds_dir / "versions"):
            (ds_dir / "versions").mkdir(parents=True, exist_ok=True)
            temp = self._locked_temp(ds_dir, ".tmp-")
        else:
            temp = _outside_temp()
        with temp as tmp:
            writer = VersionWriter(tmp, params)
            yield writer
            if not writer.configs:
                raise CurateError(f"builder {builder} produced no data for {name!r}")
            writer.result = self._commit(
                name, ds_dir, writer, builder, builder_version, sources, parents or [],
                card if card is not None else {},
            )

    def _commit(
        self,
        name: str,
        ds_dir: Path,
        writer: VersionWriter,
        builder: str,
        builder_version: str,
        sources: list[SourceFile],
        parents: list[dict[str, Any]],
        card: dict[str, Any],
    ) -> CommitResult:
        from curate.cards import render_dataset_card
        from curate.provenance import now_iso, toolkit_info

        listed = {f for splits in writer.configs.values() for s in splits.values() for f in s["files"]}
        stray = sorted(p.relative_to(writer.tmp).as_posix() for p in writer.tmp.rglob("*")
                       if (p.is_file() or p.is_symlink()) and p.relative_to(writer.tmp).as_posix()
                       not in listed | set(writer.extra_files))
        if stray:
            raise CurateError(f"builder {builder} left {writer.tmp / stray[0]} in the version without registering "
                              "it (write_table / add_split_files / add_file)")
        rels = sorted(listed)
        digests = {}
        for rel, d in zip(rels, digest_many([writer.tmp / rel for rel in rels], written=writer.written), strict=True):
            if isinstance(d, Exception):
                raise CurateError(f"{writer.tmp / rel}: the builder wrote a file that cannot be read back "
                                  f"({_reason(d, writer.tmp / rel)})")
            digests[rel] = d
        full_hash = combine_digests(digests)
        legacy = dict(zip(rels, digest_many([writer.tmp / rel for rel in rels], LEGACY_SCHEME, writer.written),
                          strict=True))
        for d in legacy.values():
            if isinstance(d, Exception):
                raise d
        legacy_hash = combine_digests(legacy)  # type: ignore[arg-type]  # no exception left
        if not self.writable(ds_dir / "versions"):
            existing = self._find_existing(name, full_hash, legacy_hash)
            if existing is not None and not _verify_rebuild(existing, writer, digests):
                return CommitResult(existing, created=False)
            raise self._not_writable(f"write a new version of {name!r}")
        with self._lock(ds_dir):
            self._clean_stale(ds_dir)
            tags = self._read_tags(name)
            self._adopt_orphans(name, ds_dir, tags, keep=full_hash[:HASH_LEN])
            found = self._find_existing(name, full_hash, legacy_hash)
            if found is not None:
                problems = _verify_rebuild(found, writer, digests)
                if not problems:
                    if found.path.name not in tags.values():  # a crash lost its tag: adopt it now
                        tags[found.tag] = found.path.name
                        atomic_write_json(ds_dir / TAGS, tags)
                    stamp_verified(found)
                    return CommitResult(found, created=False)
                _repair(found, writer, problems)
                log.warning("repaired %s: %d damaged file(s) replaced by this identical rebuild (%s)",
                            found.ref, len(problems), problems[0])
                if found.path.name not in tags.values():
                    tags[found.tag] = found.path.name
                    atomic_write_json(ds_dir / TAGS, tags)
                repaired_version = self._load(name, found.tag, found.path.name)
                stamp_verified(repaired_version)
                return CommitResult(repaired_version, created=False, repaired=True)
            final = ds_dir / "versions" / full_hash[:HASH_LEN]
            old_tag = next((t for t, h in tags.items() if h == final.name), None)
            repaired = final.exists() or final.is_symlink()
            if repaired:  # same hash but its manifest is damaged: replace the whole folder, keep the tag
                log.warning("repaired %s: its folder %s was damaged and is replaced by this identical rebuild",
                            f"{name}@{old_tag}" if old_tag else name, final)
                _remove_path(final)
            tag = old_tag or f"v{max((_tag_number(t) for t in tags), default=0) + 1}"
            manifest = {
                "name": name,
                "tag": tag,
                "content_hash": full_hash,
                "hash_scheme": HASH_SCHEME,
                "builder": {"name": builder, "version": builder_version},
                "params": writer.params,
                "sources": [s.__dict__ for s in sources],
                "configs": writer.configs,
                "schema": writer.schemas,
                "features": writer.features,
                "data_files": digests,
                "extra_files": {rel: sha256_file(writer.tmp / rel) for rel in sorted(writer.extra_files)},
                "metadata_files": [CARD, MANIFEST],
                "created_at": now_iso(),
                "toolkit": toolkit_info(),
                "parents": parents,
                "card": card,
            }
            (writer.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n",
                                               encoding="utf-8")
            (writer.tmp / CARD).write_text(render_dataset_card(manifest), encoding="utf-8")
            atomic_place_dir(writer.tmp, final)
            tags[tag] = final.name
            atomic_write_json(ds_dir / TAGS, tags)
            version = self._load(name, tag, final.name)
            stamp_verified(version)  # the digests were just computed from these very files (renamed, not copied)
        return CommitResult(version, created=not repaired, repaired=repaired)

    def import_version(self, name: str, folder: Path, expected_hash: str) -> CommitResult:
        """Adopt a complete version folder (e.g. downloaded from the Hub) after verifying its hash."""
        ds_dir = self._ds_dir(name)
        manifest = _read_manifest(folder)
        problems = check_folder(folder, manifest)
        if problems:
            raise CurateError(f"{problems[0]}; nothing written")
        actual = content_hash(folder, manifest_scheme(manifest))
        if actual != expected_hash:
            raise CurateError(
                f"content hash mismatch for {name}: manifest says {expected_hash[:HASH_LEN]}, "
                f"files hash to {actual[:HASH_LEN]}; nothing written"
            )
        problems = verify_folder(folder, manifest)
        if problems:
            raise CurateError(f"{problems[0]}; nothing written")
        if not self.writable(ds_dir / "versions"):
            existing = self._find_existing(name, actual, actual)
            if existing is not None and not self.verify(existing):
                return CommitResult(existing, created=False)
            raise self._not_writable(f"import a version of {name!r}")
        (ds_dir / "versions").mkdir(parents=True, exist_ok=True)
        with self._lock(ds_dir):
            self._clean_stale(ds_dir)
            tags = self._read_tags(name)
            self._adopt_orphans(name, ds_dir, tags, keep=actual[:HASH_LEN])
            existing = self._find_existing(name, actual, actual)
            if existing is not None and not self.verify(existing):
                return CommitResult(existing, created=False)
            final = ds_dir / "versions" / actual[:HASH_LEN]
            old_tag = next((t for t, h in tags.items() if h == final.name), None)
            with self._locked_temp(ds_dir, ".tmp-") as tmp:
                shutil.rmtree(tmp)
                shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(".cache", ".gitattributes"))
                wanted = manifest.get("tag")
                tag = old_tag or (wanted if isinstance(wanted, str) and re.fullmatch(r"v\d+", wanted)
                                  and wanted not in tags else f"v{max(map(_tag_number, tags), default=0) + 1}")
                repaired = final.exists() or final.is_symlink()
                if repaired:
                    log.warning("repaired %s@%s: replaced its damaged folder %s", name, tag, final)
                    _remove_path(final)
                atomic_place_dir(tmp, final)
            tags[tag] = final.name
            atomic_write_json(ds_dir / TAGS, tags)
            version = self._load(name, tag, final.name)
            stamp_verified(version)  # copied from the folder verified above, inside the store's lock
        return CommitResult(version, created=not repaired, repaired=repaired)

    # ---- internals -----------------------------------------------------------------------
    def _read_tags(self, name: str) -> dict[str, str]:
        path = self._ds_dir(name) / TAGS
        if not path.is_file() and not path.is_symlink():
            return {}
        if path.is_symlink():
            raise CurateError(f"{path}: symbolic link (refused)")
        tags = _read_json(path)
        if not isinstance(tags, dict) or not all(
            isinstance(t, str) and isinstance(h, str) and SHORT_RE.match(h) for t, h in tags.items()
        ):
            raise CurateError(f"{path}: damaged, expected {{\"v1\": \"<{HASH_LEN} hex chars>\", ...}}")
        return tags

    def _load(self, name: str, tag: str, short_hash: str) -> Version:
        path = self._ds_dir(name) / "versions" / short_hash
        if path.is_symlink():
            raise CurateError(f"{path}: version folder is a symbolic link (refused)")
        if not path.is_dir():
            raise CurateError(f"{path}: missing (listed as {name}@{tag} in {TAGS})")
        manifest = _read_manifest(path)
        if not manifest["content_hash"].startswith(short_hash):
            raise CurateError(f"{path / MANIFEST}: content_hash {manifest['content_hash'][:HASH_LEN]} does not "
                              f"match its folder {short_hash}")
        return Version(name=name, tag=tag, hash=manifest["content_hash"], path=self._inside(path), manifest=manifest)

    def _orphans(self, ds_dir: Path, tags: dict[str, str]) -> dict[str, dict[str, Any] | None]:
        """Version folders not in tags.json (a crash between the rename and the tags write): short hash ->
        manifest, or None when the folder is not a complete version."""
        versions = ds_dir / "versions"
        if not versions.is_dir():
            return {}
        out: dict[str, dict[str, Any] | None] = {}
        known = set(tags.values())
        for p in sorted(versions.iterdir()):
            if not SHORT_RE.match(p.name) or p.name in known:
                continue
            manifest = None
            if p.is_dir() and not p.is_symlink():
                try:
                    manifest = _read_manifest(p)
                except CurateError:
                    manifest = None
            if manifest is not None and not manifest["content_hash"].startswith(p.name):
                manifest = None
            out[p.name] = manifest
        return out

    def _adopt_orphans(self, name: str, ds_dir: Path, tags: dict[str, str], keep: str) -> None:
        """Under the dataset lock: tag complete untagged versions, remove damaged ones (except `keep`,
        which the caller is about to repair or reuse)."""
        changed = False
        for short, manifest in self._orphans(ds_dir, tags).items():
            path = ds_dir / "versions" / short
            if manifest is not None and not verify_folder(path, manifest):
                tag = _orphan_tag(manifest, tags)
                tags[tag] = short
                changed = True
                log.info("adopted %s@%s (%s), left untagged by an interrupted write", name, tag, short)
            elif short != keep:
                log.warning("removing %s: an untagged, damaged version folder", path)
                _remove_path(path)
        if changed:
            atomic_write_json(ds_dir / TAGS, tags)

    def _find_existing(self, name: str, full_hash: str, legacy_hash: str) -> Version | None:
        """The stored version with this content (current scheme, or an old manifest with the same bytes),
        tagged or left untagged by a crash. Looked up by folder name, so a damaged sibling does not matter;
        a folder that is a symlink or has a damaged manifest is not a match (the caller replaces it)."""
        ds_dir = self._ds_dir(name)
        tags = self._read_tags(name)
        for h, scheme in ((full_hash, HASH_SCHEME), (legacy_hash, LEGACY_SCHEME)):
            path = ds_dir / "versions" / h[:HASH_LEN]
            if path.is_symlink() or not path.is_dir():
                continue
            try:
                manifest = _read_manifest(path)
            except CurateError:
                continue
            if manifest["content_hash"] != h or manifest_scheme(manifest) != scheme:
                continue
            tag = next((t for t, short in tags.items() if short == path.name), None) or _orphan_tag(manifest, tags)
            return Version(name=name, tag=tag, hash=h, path=path, manifest=manifest)
        return None

    def _clean_stale(self, ds_dir: Path) -> None:
        """Remove temp folders/files no live writer holds: a `.tmp-*` entry whose `.lock` can be taken."""
        for entry in sorted(ds_dir.iterdir()):
            if entry.name.endswith(".lock") or not (entry.name.startswith(".tmp-") or is_temp_name(entry.name)):
                continue
            _remove_if_unlocked(entry)
        for lock in ds_dir.glob(".tmp-*.lock"):
            if not Path(str(lock)[: -len(".lock")]).exists():
                _remove_if_unlocked(Path(str(lock)[: -len(".lock")]))
        staging = self.root / "staging"
        if staging.is_dir():
            for entry in sorted(staging.iterdir()):
                if entry.name.endswith(".lock"):
                    if not Path(str(entry)[: -len(".lock")]).exists():
                        _remove_if_unlocked(Path(str(entry)[: -len(".lock")]))
                    continue
                if Path(str(entry) + ".lock").exists():
                    _remove_if_unlocked(entry)
                elif time.time() - entry.lstat().st_mtime > STALE_UNLOCKED_S:  # an old writer without a lock
                    _remove_path(entry)

    @contextmanager
    def _lock(self, ds_dir: Path) -> Iterator[None]:
        """Serialise tag assignment between concurrent builders of the same dataset (any OS: `filelock`)."""
        with FileLock(str(ds_dir / ".lock")):
            yield


def _reason(e: BaseException, path: Path) -> str:
    """A reader's error as a short clause (the path is already at the start of the line)."""
    text = (str(e).splitlines() or [""])[0].replace(f"'{path}'", "").replace(str(path), "").strip()
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_if_unlocked(entry: Path) -> None:
    """Remove `entry` (and its lock file) when its writer's lock can be taken, i.e. the writer is gone."""
    lock_path = Path(str(entry) + ".lock")
    now = time.time()
    if any(now - p.lstat().st_mtime < STALE_GRACE_S for p in (entry, lock_path) if p.exists() or p.is_symlink()):
        return
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return  # a live writer
    try:
        if entry.exists() or entry.is_symlink():
            log.info("removing stale temp %s", entry)
            _remove_path(entry)
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)


@contextmanager
def _outside_temp() -> Iterator[Path]:
    """For a store that cannot be written: build in the system temp folder (nothing touches the store)."""
    tmp = Path(tempfile.mkdtemp(prefix="curate-readonly-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify_rebuild(version: Version, writer: VersionWriter, digests: dict[str, str]) -> list[str]:
    """`verify_folder` for a stored version an identical rebuild just matched: a stored file byte-equal to
    the fresh one (the usual case) needs no re-hash, since the fresh file's digest is known."""
    problems = check_folder(version.path, version.manifest)
    if version.path.is_symlink() or not version.path.is_dir():
        return problems
    scheme = manifest_scheme(version.manifest)
    for rel, digest in sorted(digests.items()):
        stored = version.path / rel
        if stored.is_symlink() or not stored.is_file() or filecmp.cmp(writer.tmp / rel, stored, shallow=False):
            continue  # missing/linked: reported by check_folder
        if scheme != HASH_SCHEME:
            problems.append(f"{stored}: content differs from the manifest ({scheme})")
            continue
        try:
            same = file_digest(stored, scheme) == digest
        except Exception as e:  # noqa: BLE001 - any unreadable parquet is one problem line
            problems.append(f"{stored}: cannot be read ({_reason(e, stored)})")
            continue
        if not same:
            problems.append(f"{stored}: content differs from the manifest ({scheme})")
    for rel, want in sorted((version.manifest.get("extra_files") or {}).items()):
        p = version.path / rel
        if _safe_rel(rel) and p.is_file() and not p.is_symlink() and sha256_file(p) != want:
            problems.append(f"{p}: content differs from the manifest (sha256)")
    return problems


def _repair(version: Version, writer: VersionWriter, problems: list[str]) -> None:
    """Put the fresh files of an identical rebuild in place of a stored version's damaged ones, file by file
    (each `os.replace` is atomic, so an interrupted repair leaves a mix a later rebuild repairs again)."""
    expected = listed_files(version.manifest)
    for dirpath, dirnames, filenames in os.walk(version.path):  # symlinks and unlisted files go
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                (here / d).unlink()
                dirnames.remove(d)
        for f in filenames:
            p = here / f
            if p.is_symlink() or p.relative_to(version.path).as_posix() not in expected:
                p.unlink()
    fresh = [f for splits in writer.configs.values() for s in splits.values() for f in s["files"]]
    for rel in fresh + writer.extra_files:
        src, dest = writer.tmp / rel, version.path / rel
        if dest.is_file() and not dest.is_symlink() and filecmp.cmp(src, dest, shallow=False):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(src, dest)
    if not (version.path / CARD).is_file():
        from curate.cards import render_dataset_card

        (version.path / CARD).write_text(render_dataset_card(version.manifest), encoding="utf-8")


def _orphan_tag(manifest: dict[str, Any], tags: dict[str, str]) -> str:
    wanted = manifest.get("tag")
    if isinstance(wanted, str) and re.fullmatch(r"v\d+", wanted) and wanted not in tags:
        return wanted
    return f"v{max((_tag_number(t) for t in tags), default=0) + 1}"


def _hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The `dataset_info.features` YAML the Hub viewer and `datasets` expect, via `datasets` itself."""
    from datasets import Features

    return Features.from_arrow_schema(schema)._to_yaml_list()


def _tag_number(tag: str) -> int:
    m = re.fullmatch(r"v(\d+)", tag)
    return int(m.group(1)) if m else 0
