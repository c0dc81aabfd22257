"""A Hugging Face Hub look-alike, small enough for tests, honest enough to trust.

The real ``huggingface_hub`` client (and ``datasets``) talk to it through ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``.
Everything a client commits is stored on disk under ``root`` and served back exactly:

* ``root/blobs/<sha256[:2]>/<sha256>``: content-addressed store for every file (regular or LFS).
* ``root/repos/datasets/<namespace>/<name>/repo.json``: visibility, branches, tags and the LFS objects uploaded to
  that repo (LFS objects are scoped per repo, as on the Hub).
* ``root/repos/.../commits/<oid>.json``: one snapshot per commit (the full file tree, parents, message).

Commit, tree and blob ids are computed the way git does (blob oid = sha1 of ``blob <len>\\0<content>``, LFS files
are hashed through their pointer file), so ETags and cache keys look like the Hub's.

Routing is done on the *raw* (still percent-encoded) request path: the client quotes revisions with ``safe=""``,
so ``refs%2Fheads%2Fmain`` is one path segment and must not be split on the decoded ``/``.

Only what the toolkit, ``huggingface_hub`` (``HfApi``, ``hf_hub_download``, ``snapshot_download``, ``HfFileSystem``)
and ``datasets`` call in the tests is implemented, for dataset repos: create repo, repo info (with file metadata),
validate-yaml, preupload, commit (with ``parentCommit``: 412 when the branch moved, as on the Hub), LFS batch +
object upload, tree, paths-info, refs, commits, tag create/delete, branch create, resolve (GET/HEAD, ``Range``).
Not implemented: model/space repos, PR refs, listing pagination, settings, whoami, Xet
(clients must run with ``HF_HUB_DISABLE_XET=1``), LFS multipart and verify, gated repos, discussions, and
``hf://`` access from DuckDB (hard-codes huggingface.co).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlencode

import yaml
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPO_TYPE = "dataset"  # the only repo type the toolkit publishes
DEFAULT_BRANCH = "main"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LFS_POINTER_VERSION = "https://git-lfs.github.com/spec/v1"

# Written by the server into the "initial commit" of every new repo, like the Hub does. Files matching these
# patterns are uploaded through LFS (the preupload endpoint reads the .gitattributes of the target revision).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lance",
        "*.lz4", "*.mds", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
        "*.mp3", "*.wav", "*.flac", "*.ogg", "*.jpg", "*.jpeg", "*.png", "*.webp", "*.gif", "*.mp4",
    )
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An HTTP error shaped like the Hub's: JSON body + ``X-Error-Code`` / ``X-Error-Message`` headers.

    ``huggingface_hub.utils.hf_raise_for_status`` maps the error code to ``RepositoryNotFoundError``,
    ``RevisionNotFoundError`` or ``RemoteEntryNotFoundError``; without a code it raises a plain ``HfHubHTTPError``.
    """

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def response(self) -> Response:
        """Render the error the way the Hub does."""
        headers = {"X-Error-Message": _ascii(self.message), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


def _ascii(text: str) -> str:
    """Header values must be latin-1; keep them plain ASCII to be safe."""
    return text.encode("ascii", "replace").decode("ascii").replace("\n", " ")


def repo_not_found() -> HubError:
    """Same answer for 'missing' and 'private, not allowed', so existence does not leak (as on the Hub)."""
    return HubError(404, "Repository not found", code="RepoNotFound")


def revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")


def entry_not_found(path: str, commit: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)


# --------------------------------------------------------------------------------------------------------------
# Git-like objects
# --------------------------------------------------------------------------------------------------------------


def git_oid(kind: bytes, data: bytes) -> str:
    """The git object id (sha1 of ``<kind> <len>\\0<data>``), so ids look like the Hub's."""
    return hashlib.sha1(kind + b" " + str(len(data)).encode() + b"\0" + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS object; its git oid is the file's blob id."""
    return f"version {LFS_POINTER_VERSION}\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit snapshot. ``oid`` is the git blob id (of the pointer file for LFS files)."""

    sha256: str
    size: int
    lfs: bool
    oid: str

    @classmethod
    def regular(cls, data: bytes) -> FileEntry:
        return cls(hashlib.sha256(data).hexdigest(), len(data), False, git_oid(b"blob", data))

    @classmethod
    def large(cls, sha256: str, size: int) -> FileEntry:
        return cls(sha256, size, True, git_oid(b"blob", lfs_pointer(sha256, size)))

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> list[Any]:
        return [self.sha256, self.size, self.lfs, self.oid]

    @classmethod
    def from_json(cls, raw: list[Any]) -> FileEntry:
        return cls(str(raw[0]), int(raw[1]), bool(raw[2]), str(raw[3]))


@dataclass
class Commit:
    """A full snapshot: every commit maps to the complete file tree (no diffs to replay)."""

    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, FileEntry]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "tree": {path: entry.to_json() for path, entry in sorted(self.tree.items())},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Commit:
        tree = {path: FileEntry.from_json(value) for path, value in raw["tree"].items()}
        return cls(raw["id"], raw["parents"], raw["title"], raw["message"], raw["author"], raw["date"], tree)


def dir_oids(tree: dict[str, FileEntry]) -> dict[str, str]:
    """Git tree ids of every folder of a snapshot (``""`` is the root), computed bottom-up."""
    nested: dict[str, Any] = {}
    for path, entry in tree.items():
        node = nested
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = entry
    out: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> str:
        items: list[tuple[str, bytes, str]] = []
        for name, child in node.items():
            if isinstance(child, dict):
                items.append((name + "/", b"40000 " + name.encode(), walk(child, f"{prefix}{name}/")))
            else:
                items.append((name, b"100644 " + name.encode(), child.oid))
        items.sort(key=lambda item: item[0])
        oid = git_oid(b"tree", b"".join(head + b"\0" + bytes.fromhex(oid) for _, head, oid in items))
        out[prefix.rstrip("/")] = oid
        return oid

    walk(nested, "")
    return out


def commit_oid(tree_oid: str, parents: list[str], author: str, timestamp: int, message: str) -> str:
    """A git-format commit id, so a commit hash from this server passes the client's 40-hex checks."""
    who = f"{author} <{author}@hub-server.invalid> {timestamp} +0000"
    lines = [f"tree {tree_oid}", *(f"parent {p}" for p in parents), f"author {who}", f"committer {who}"]
    return git_oid(b"commit", ("\n".join(lines) + "\n\n" + message).encode())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RepoMeta:
    """Everything about a repo that is not a snapshot: visibility, refs, uploaded LFS objects."""

    type: str
    namespace: str
    name: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "namespace": self.namespace,
            "name": self.name,
            "private": self.private,
            "createdAt": self.created_at,
            "branches": self.branches,
            "tags": self.tags,
            "lfsObjects": sorted(self.lfs_objects),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RepoMeta:
        return cls(
            type=raw["type"],
            namespace=raw["namespace"],
            name=raw["name"],
            private=raw["private"],
            created_at=raw["createdAt"],
            branches=dict(raw["branches"]),
            tags=dict(raw["tags"]),
            lfs_objects=set(raw["lfsObjects"]),
        )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so a crash never leaves half a JSON document behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


class Storage:
    """On-disk state of the server; all mutations go through ``lock``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self._commit_cache: dict[tuple[str, str], Commit] = {}
        self._dir_cache: dict[tuple[str, str], dict[str, str]] = {}
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "repos").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    # blobs ----------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha, len(data)):
            _write_atomic(self.blob_path(sha), data)
        return sha

    def adopt_file(self, tmp: Path, sha256: str) -> None:
        """Move a fully received and verified upload into the blob store."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def tmp_file(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    # repos ----------------------------------------------------------------------------------------------------
    def repo_dir(self, rtype: str, namespace: str, name: str) -> Path:
        return self.root / "repos" / f"{rtype}s" / namespace / name

    def load_repo(self, rtype: str, namespace: str, name: str) -> RepoMeta | None:
        path = self.repo_dir(rtype, namespace, name) / "repo.json"
        if not path.is_file():
            return None
        return RepoMeta.from_json(json.loads(path.read_text()))

    def save_repo(self, meta: RepoMeta) -> None:
        path = self.repo_dir(meta.type, meta.namespace, meta.name) / "repo.json"
        _write_atomic(path, json.dumps(meta.to_json(), indent=1).encode())

    def _key(self, meta: RepoMeta) -> str:
        return f"{meta.type}s/{meta.repo_id}"

    def load_commit(self, meta: RepoMeta, oid: str) -> Commit | None:
        key = (self._key(meta), oid)
        if key not in self._commit_cache:
            path = self.repo_dir(meta.type, meta.namespace, meta.name) / "commits" / f"{oid}.json"
            if not path.is_file():
                return None
            self._commit_cache[key] = Commit.from_json(json.loads(path.read_text()))
        return self._commit_cache[key]

    def save_commit(self, meta: RepoMeta, commit: Commit) -> None:
        path = self.repo_dir(meta.type, meta.namespace, meta.name) / "commits" / f"{commit.id}.json"
        _write_atomic(path, json.dumps(commit.to_json()).encode())
        self._commit_cache[(self._key(meta), commit.id)] = commit

    def dirs(self, meta: RepoMeta, commit: Commit) -> dict[str, str]:
        key = (self._key(meta), commit.id)
        if key not in self._dir_cache:
            self._dir_cache[key] = dir_oids(commit.tree)
        return self._dir_cache[key]

    def new_commit(
        self, meta: RepoMeta, parents: list[str], tree: dict[str, FileEntry], title: str, message: str, author: str
    ) -> Commit:
        now = time.time()
        oid = commit_oid(dir_oids(tree)[""], parents, author, int(now), f"{title}\n\n{message}".strip())
        commit = Commit(oid, parents, title, message, author, iso(now), dict(tree))
        self.save_commit(meta, commit)
        return commit


# --------------------------------------------------------------------------------------------------------------
# Path rules (LFS)
# --------------------------------------------------------------------------------------------------------------


def _glob_match(path: str, pattern: str) -> bool:
    """Gitattributes-style match: patterns without '/' match the basename, others the full path."""
    pattern = pattern.lstrip("/")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("**/", ""))


def lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.strip()]


def looks_binary(sample: bytes) -> bool:
    """The Hub treats files whose first bytes are not text as binary (=> LFS)."""
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # a multi-byte character cut at the end of the 512-byte sample is still text
        return err.start < len(sample) - 4
    return False


def validate_path(path: str) -> str:
    """Reject paths git (and the Hub) would refuse."""
    if not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path: '{path}'")
    parts = path.split("/")
    if any(part in ("", ".", "..", ".git") for part in parts):
        raise HubError(400, f"Invalid path: '{path}'")
    return path


# --------------------------------------------------------------------------------------------------------------
# Fault injection and request log
# --------------------------------------------------------------------------------------------------------------

FaultAction = Literal["drop", "status", "truncate"]


@dataclass
class Fault:
    """A fault armed for the next ``times`` requests matching ``method`` and ``path_regex`` (raw path).

    * ``drop``: read ``after_bytes`` of the request body (default: half of Content-Length), then abort the TCP
      connection without answering, i.e. the connection dies in the middle of the upload.
    * ``status``: swallow the request and answer ``status`` (e.g. 500/503: transient server errors).
    * ``truncate``: let the request through, then abort the connection after ``after_bytes`` of the response
      body (default: half of it), i.e. a download that dies midway.
    """

    method: str | None
    path_regex: str
    times: int = 1
    action: FaultAction = "drop"
    status: int = 503
    after_bytes: int | None = None
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path_regex, path) is not None


@dataclass
class RequestRecord:
    """One request as seen by the server (for assertions such as 'no LFS object was re-uploaded')."""

    method: str
    path: str
    query: str
    status: int | None = None
    fault: FaultAction | None = None
    body_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # request headers, lower-case, minus authorization


class FaultInjector:
    """Thread-safe list of armed faults; the test thread arms them, the server thread consumes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.fired < fault.times and fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if f.fired < f.times]


def _transport_of(receive: Receive) -> asyncio.Transport | None:
    """uvicorn's ``receive`` is a bound method of its request cycle, which holds the TCP transport."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class FaultAndLogMiddleware:
    """Outermost ASGI layer: logs every request and applies armed faults at the connection level."""

    def __init__(self, app: ASGIApp, faults: FaultInjector, log: list[RequestRecord]) -> None:
        self.app = app
        self.faults = faults
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        record = RequestRecord(scope["method"], path, scope.get("query_string", b"").decode("latin-1"))
        record.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k.lower() != b"authorization"
        }
        self.log.append(record)
        fault = self.faults.take(scope["method"], path)

        async def counting_receive() -> Message:
            message = await receive()
            record.body_bytes += len(message.get("body", b""))
            return message

        if fault is not None and fault.action == "drop":
            await self._drop_request(fault, scope, receive, send, record)
            return
        if fault is not None and fault.action == "status":
            record.fault = "status"
            more = True
            while more:
                message = await counting_receive()
                more = message.get("more_body", False) and message["type"] == "http.request"
            record.status = fault.status
            await HubError(fault.status, "Injected fault").response()(scope, receive, send)
            return

        sent = 0
        limit: int | None = None

        async def watching_send(message: Message) -> None:
            nonlocal sent, limit
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if fault is not None:  # truncate
                    length = dict(message.get("headers", [])).get(b"content-length")
                    limit = fault.after_bytes if fault.after_bytes is not None else int(length or 2) // 2
            elif message["type"] == "http.response.body" and limit is not None:
                body = message.get("body", b"")
                if sent + len(body) >= limit:
                    await send({**message, "body": body[: limit - sent], "more_body": True})
                    record.fault = "truncate"
                    await _abort(receive, send, graceful=True)
                    raise _Aborted
                sent += len(body)
            await send(message)

        with contextlib.suppress(_Aborted):
            await self.app(scope, counting_receive, watching_send)

    async def _drop_request(
        self, fault: Fault, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> None:
        record.fault = "drop"
        headers = dict(scope.get("headers", []))
        target = fault.after_bytes
        if target is None:
            target = int(headers.get(b"content-length", b"0") or 0) // 2
        more = True
        while more and record.body_bytes < target:
            message = await receive()
            if message["type"] != "http.request":
                return
            record.body_bytes += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _abort(receive, send)


class _Aborted(Exception):
    """Raised to unwind the app after the connection has been killed under it."""


async def _abort(receive: Receive, send: Send, graceful: bool = False) -> None:
    """Kill the TCP connection, as a crashing server or a proxy timeout would.

    ``abort()`` discards what is buffered and resets the connection if request bytes are still unread (a dead
    upload); ``graceful`` flushes what was already written and sends FIN (a response cut short: the client sees
    fewer bytes than Content-Length promised).
    """
    transport = _transport_of(receive)
    if transport is None:  # not uvicorn: promise a body, never deliver it, and let the server close the socket
        with contextlib.suppress(RuntimeError):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
        raise ConnectionAbortedError("hub_server: injected connection drop")
    if graceful:
        transport.close()
    else:
        transport.abort()
    # let uvicorn notice the disconnect so it does not try to answer on the dead connection
    with contextlib.suppress(Exception):
        for _ in range(100):
            message = await asyncio.wait_for(receive(), timeout=1.0)
            if message["type"] == "http.disconnect":
                break


# --------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]
REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
API_REPO = r"/api/datasets/" + REPO
URL_REPO = r"/datasets/(?P<ns>[^/]+)/(?P<name>[^/]+?)"
LFS_REPO = r"/__lfs/datasets/" + REPO  # our stand-in for the S3 bucket


@dataclass
class HubConfig:
    """Knobs a test may want to turn."""

    tokens: dict[str, str]  # token -> user name
    lfs_threshold: int = 10 * 1024 * 1024  # files larger than this go through LFS whatever their type


class HubApp:
    """Route table + handlers. Build it with :func:`create_app`."""

    def __init__(self, root: Path, config: HubConfig) -> None:
        self.storage = Storage(root)
        self.config = config
        self.faults = FaultInjector()
        self.log: list[RequestRecord] = []
        self._secret = secrets.token_bytes(32)
        self.routes: list[tuple[frozenset[str], re.Pattern[str], Handler]] = []
        for methods, pattern, handler in (
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/repos/create", self.create_repo),
            ("GET", API_REPO, self.repo_info),
            ("GET", API_REPO + r"/revision/(?P<rev>[^/]+)", self.repo_info),
            ("GET", API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            ("POST", API_REPO + r"/paths-info/(?P<rev>[^/]+)", self.paths_info),
            ("POST", API_REPO + r"/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", API_REPO + r"/commit/(?P<rev>[^/]+)", self.commit),
            ("GET", API_REPO + r"/refs", self.refs),
            ("GET", API_REPO + r"/commits/(?P<rev>[^/]+)", self.commits),
            ("POST", API_REPO + r"/tag/(?P<rev>[^/]+)", self.create_tag),
            ("DELETE", API_REPO + r"/tag/(?P<rev>[^/]+)", self.delete_tag),
            ("POST", API_REPO + r"/branch/(?P<rev>[^/]+)", self.create_branch),
            ("POST", URL_REPO + r"\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", LFS_REPO + r"/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("GET HEAD", URL_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ):
            self.routes.append((frozenset(methods.split()), re.compile(pattern), handler))

    # plumbing -------------------------------------------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        """Match the raw path against the route table; handlers get percent-decoded parameters."""
        raw = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        allowed = False
        for methods, pattern, handler in self.routes:
            match = pattern.fullmatch(raw)
            if match is None:
                continue
            if request.method not in methods:
                allowed = True
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            try:
                response = await handler(request, params)
            except HubError as err:
                response = err.response()
            response.headers.setdefault("X-Request-Id", uuid.uuid4().hex)
            return response
        if allowed:
            return HubError(405, f"Method {request.method} not allowed on {raw}").response()
        return HubError(404, f"Not found: {request.method} {raw}").response()

    def user(self, request: Request) -> str | None:
        """The user behind the Authorization header; a present-but-unknown token is a 401 (as on the Hub)."""
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        token = value.strip()
        if scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                token = base64.b64decode(token).decode().partition(":")[2]
        user = self.config.tokens.get(token) if scheme.lower() in ("bearer", "basic") else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def require_user(self, request: Request) -> str:
        user = self.user(request)
        if user is None:
            raise HubError(401, "You must be authenticated to perform this action (pass a token)")
        return user

    def readable(self, request: Request, p: dict[str, str]) -> RepoMeta:
        """Load a repo the caller may read. Unauthenticated callers get 401 RepoNotFound, like on the Hub."""
        user = self.user(request)
        meta = self.storage.load_repo(REPO_TYPE, p["ns"], p["name"])
        if meta is None or (meta.private and user is None):
            err = repo_not_found()
            if user is None:
                err.status = 401
            raise err
        return meta

    def writable(self, request: Request, p: dict[str, str]) -> tuple[RepoMeta, str]:
        """Any valid token may write anywhere: the server is single-tenant on purpose."""
        user = self.require_user(request)
        meta = self.storage.load_repo(REPO_TYPE, p["ns"], p["name"])
        if meta is None:
            raise repo_not_found()
        return meta, user

    @staticmethod
    def base_url(request: Request) -> str:
        return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"

    def repo_url(self, request: Request, meta: RepoMeta) -> str:
        return f"{self.base_url(request)}/datasets/{meta.repo_id}"

    def resolve_rev(self, meta: RepoMeta, rev: str | None) -> Commit:
        """Branch names, tag names, refs/heads|tags/..., and full commit ids (in that order)."""
        rev = rev or DEFAULT_BRANCH
        oid: str | None = None
        if rev.startswith("refs/heads/"):
            oid = meta.branches.get(rev[len("refs/heads/") :])
        elif rev.startswith("refs/tags/"):
            tag = meta.tags.get(rev[len("refs/tags/") :])
            oid = tag["commit"] if tag else None
        elif rev in meta.branches:
            oid = meta.branches[rev]
        elif rev in meta.tags:
            oid = meta.tags[rev]["commit"]
        elif COMMIT_RE.fullmatch(rev):
            oid = rev
        commit = self.storage.load_commit(meta, oid) if oid else None
        if commit is None:
            raise revision_not_found(rev)
        return commit

    def read_text(self, commit: Commit, path: str) -> str | None:
        entry = commit.tree.get(path)
        if entry is None:
            return None
        return self.storage.read_blob(entry.sha256).decode("utf-8", "replace")

    # misc -----------------------------------------------------------------------------------------------------
    async def validate_yaml(self, request: Request, p: dict[str, str]) -> Response:
        """Called by ``create_commit`` whenever README.md is part of the commit."""
        body = await request.json()
        try:
            card_data(str(body.get("content", "")))
        except yaml.YAMLError as err:
            message = f"Invalid YAML in README.md metadata: {err}"
            return JSONResponse({"errors": [{"message": message}], "warnings": []}, status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    # repos ----------------------------------------------------------------------------------------------------
    async def create_repo(self, request: Request, p: dict[str, str]) -> Response:
        user = self.require_user(request)
        body = await request.json()
        name = str(body.get("name") or "")
        namespace = str(body.get("organization") or user)
        rtype = str(body.get("type") or "model")
        if rtype != REPO_TYPE:
            raise HubError(400, f"This test server only hosts dataset repos, not {rtype!r}")
        for part in (namespace, name):
            if not NAME_RE.fullmatch(part) or "--" in part or ".." in part or part.endswith(".git"):
                raise HubError(400, f"Invalid repo name: '{namespace}/{name}'")
        if "visibility" in body:
            private = body["visibility"] == "private"
        else:
            private = bool(body.get("private", False))
        with self.storage.lock:
            existing = self.storage.load_repo(rtype, namespace, name)
            if existing is not None:
                url = self.repo_url(request, existing)
                return JSONResponse(
                    {"error": f"You already created this {rtype} repo", "url": url},
                    status_code=409,
                    headers={"X-Error-Message": f"You already created this {rtype} repo"},
                )
            meta = RepoMeta(rtype, namespace, name, private, iso(time.time()))
            data = DEFAULT_GITATTRIBUTES.encode()
            self.storage.put_bytes(data)
            first = self.storage.new_commit(
                meta, [], {".gitattributes": FileEntry.regular(data)}, "initial commit", "", "system"
            )
            meta.branches[DEFAULT_BRANCH] = first.id
            self.storage.save_repo(meta)
        url = self.repo_url(request, meta)
        return JSONResponse({"url": url, "name": meta.repo_id, "id": meta.repo_id})

    async def repo_info(self, request: Request, p: dict[str, str]) -> Response:
        meta = self.readable(request, p)
        commit = self.resolve_rev(meta, p.get("rev"))
        blobs = request.query_params.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        readme = self.read_text(commit, "README.md")
        card: dict[str, Any] | None = None
        with contextlib.suppress(yaml.YAMLError):
            card = card_data(readme) if readme is not None else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(meta.repo_id.encode()).hexdigest()[:24],
            "id": meta.repo_id,
            "author": meta.namespace,
            "sha": commit.id,
            "createdAt": meta.created_at,
            "lastModified": commit.date,
            "private": meta.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.tree.values()),
        }
        if card is not None:
            info["cardData"] = card
        return JSONResponse(info)

    # listing --------------------------------------------------------------------------------------------------
    def entry_json(self, meta: RepoMeta, commit: Commit, path: str, expand: bool) -> dict[str, Any] | None:
        """One tree item as the Hub's tree / paths-info endpoints return it (None if the path does not exist)."""
        entry = commit.tree.get(path)
        dirs = self.storage.dirs(meta, commit)
        if entry is not None:
            out: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            if entry.lfs:
                out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        elif path in dirs and path != "":
            out = {"type": "directory", "oid": dirs[path], "size": 0, "path": path}
        else:
            return None
        if expand:  # `HfFileSystem.modified()` (which DuckDB calls through fsspec) reads lastCommit
            last = self.last_commit(meta, commit, path)
            out["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return out

    def last_commit(self, meta: RepoMeta, commit: Commit, path: str) -> Commit:
        """The most recent commit (first-parent walk) that changed ``path``."""

        def state(c: Commit) -> str | None:
            entry = c.tree.get(path)
            return entry.oid if entry is not None else self.storage.dirs(meta, c).get(path)

        current = commit
        while current.parents:
            parent = self.storage.load_commit(meta, current.parents[0])
            if parent is None or state(parent) != state(current):
                return current
            current = parent
        return current

    def list_paths(self, meta: RepoMeta, commit: Commit, path: str, recursive: bool) -> list[str]:
        """Children (or all descendants) of a folder; 404 EntryNotFound if the folder does not exist."""
        dirs = self.storage.dirs(meta, commit)
        if path not in dirs:
            raise entry_not_found(path, commit.id)
        prefix = f"{path}/" if path else ""
        found = [p for p in [*dirs, *commit.tree] if p and p.startswith(prefix)]
        if not recursive:
            found = [p for p in found if "/" not in p[len(prefix) :]]
        return sorted(found)

    async def tree(self, request: Request, p: dict[str, str]) -> Response:
        meta = self.readable(request, p)
        commit = self.resolve_rev(meta, p["rev"])
        query = request.query_params
        recursive = query.get("recursive", "").lower() in ("1", "true")
        expand = query.get("expand", "").lower() in ("1", "true")
        paths = self.list_paths(meta, commit, p.get("path", "").strip("/"), recursive)
        return JSONResponse([self.entry_json(meta, commit, path, expand) for path in paths])

    async def paths_info(self, request: Request, p: dict[str, str]) -> Response:
        meta = self.readable(request, p)
        commit = self.resolve_rev(meta, p["rev"])
        form = parse_qs((await request.body()).decode(), keep_blank_values=True)  # the client posts a form
        out = []
        expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        for path in dict.fromkeys(x.strip("/") for x in form.get("paths", [])):
            item = self.entry_json(meta, commit, path, expand)
            if item is not None:
                out.append(item)
        return JSONResponse(out)

    async def refs(self, request: Request, p: dict[str, str]) -> Response:
        meta = self.readable(request, p)

        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        return JSONResponse(
            {
                "branches": [ref("heads", name, oid) for name, oid in sorted(meta.branches.items())],
                "converts": [],
                "tags": [ref("tags", name, tag["commit"]) for name, tag in sorted(meta.tags.items())],
                "pullRequests": [],
            }
        )

    async def commits(self, request: Request, p: dict[str, str]) -> Response:
        meta = self.readable(request, p)
        commit: Commit | None = self.resolve_rev(meta, p["rev"])
        history: list[Commit] = []
        while commit is not None:
            history.append(commit)
            commit = self.storage.load_commit(meta, commit.parents[0]) if commit.parents else None
        items = [
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
            for c in history
        ]
        return JSONResponse(items)

    async def create_tag(self, request: Request, p: dict[str, str]) -> Response:
        body = await request.json()
        tag = str(body.get("tag") or "")
        if not tag or not re.fullmatch(r"[A-Za-z0-9._/-]+", tag) or ".." in tag:
            raise HubError(400, f"Invalid tag name: '{tag}'")
        with self.storage.lock:
            meta, _ = self.writable(request, p)
            commit = self.resolve_rev(meta, p["rev"])
            if tag in meta.tags:
                raise HubError(409, f"Tag {tag} already exists")
            meta.tags[tag] = {"commit": commit.id, "message": str(body.get("message") or "")}
            self.storage.save_repo(meta)
        return JSONResponse({})

    async def delete_tag(self, request: Request, p: dict[str, str]) -> Response:
        with self.storage.lock:
            meta, _ = self.writable(request, p)
            if meta.tags.pop(p["rev"], None) is None:
                raise revision_not_found(p["rev"])
            self.storage.save_repo(meta)
        return JSONResponse({})

    async def create_branch(self, request: Request, p: dict[str, str]) -> Response:
        body = await request.json() if await request.body() else {}
        branch = p["rev"]
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch or branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: '{branch}'")
        with self.storage.lock:
            meta, _ = self.writable(request, p)
            start = self.resolve_rev(meta, body.get("startingPoint") or DEFAULT_BRANCH)
            if branch in meta.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            meta.branches[branch] = start.id
            self.storage.save_repo(meta)
        return JSONResponse({})

    # uploads --------------------------------------------------------------------------------------------------
    def upload_mode(self, commit: Commit, path: str, size: int, sample: bytes) -> Literal["lfs", "regular"]:
        """LFS if the revision's .gitattributes says so, if the file is large, or if it looks binary."""
        if size == 0:
            return "regular"
        attributes = self.read_text(commit, ".gitattributes")
        patterns = lfs_patterns(attributes if attributes is not None else DEFAULT_GITATTRIBUTES)
        if size > self.config.lfs_threshold or looks_binary(sample):
            return "lfs"
        return "lfs" if any(_glob_match(path, pattern) for pattern in patterns) else "regular"

    def target_branch(self, meta: RepoMeta, rev: str) -> tuple[str, Commit]:
        """Commits only go to branches; tags and commit ids are read-only."""
        name = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        if name in meta.branches:
            return name, self.resolve_rev(meta, name)
        if name in meta.tags or COMMIT_RE.fullmatch(name):
            self.resolve_rev(meta, name)
            raise HubError(400, f"Invalid rev id: {name} is not a branch")
        raise revision_not_found(rev)

    async def preupload(self, request: Request, p: dict[str, str]) -> Response:
        meta, _ = self.writable(request, p)
        _, commit = self.target_branch(meta, p["rev"])
        body = await request.json()
        files = []
        for item in body.get("files", []):
            path = validate_path(str(item["path"]))
            sample = base64.b64decode(item.get("sample", ""))
            mode = self.upload_mode(commit, path, int(item["size"]), sample)
            existing = commit.tree.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": files, "commitOid": commit.id})

    async def lfs_batch(self, request: Request, p: dict[str, str]) -> Response:
        """Git LFS batch API: upload actions point back at this server, with a signed (token-less) PUT URL."""
        body = await request.json()
        meta, _ = self.writable(request, p)
        if body.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' operation is supported by this test server")
        ref = (body.get("ref") or {}).get("name")
        if ref:
            self.target_branch(meta, ref)
        base = self.base_url(request)
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}}
                )
                continue
            if oid in meta.lfs_objects and self.storage.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already there: no actions => client skips it
                continue
            where = f"{base}/__lfs/{meta.type}s/{meta.repo_id}"
            query = urlencode({"size": size, "sig": self.sign(meta, oid, size)})
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{where}/{oid}?{query}", "expires_in": 3600},
                    },
                }
            )
        return JSONResponse(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            media_type="application/vnd.git-lfs+json",
        )

    def sign(self, meta: RepoMeta, oid: str, size: int) -> str:
        message = f"{meta.type}/{meta.repo_id}/{oid}/{size}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def lfs_put(self, request: Request, p: dict[str, str]) -> Response:
        """The 'S3' side of LFS: pre-signed URL, body streamed to disk, sha256 and size verified before storing."""
        meta = self.storage.load_repo(REPO_TYPE, p["ns"], p["name"])
        oid = p["oid"]
        size = int(request.query_params.get("size", "-1"))
        sig = request.query_params.get("sig", "")
        if meta is None or not hmac.compare_digest(sig, self.sign(meta, oid, size)):
            raise HubError(403, "Invalid or expired upload signature")
        tmp = self.storage.tmp_file()
        digest = hashlib.sha256()
        received = 0
        try:
            with tmp.open("wb") as handle:
                async for chunk in request.stream():
                    digest.update(chunk)
                    received += len(chunk)
                    handle.write(chunk)
            if received != size or digest.hexdigest() != oid:
                got = f"got {received} bytes, sha256 {digest.hexdigest()}"
                raise HubError(400, f"Uploaded object does not match its oid/size: {got}")
            with self.storage.lock:
                self.storage.adopt_file(tmp, oid)
                fresh = self.storage.load_repo(meta.type, meta.namespace, meta.name)
                if fresh is not None:
                    fresh.lfs_objects.add(oid)
                    self.storage.save_repo(fresh)
        finally:
            tmp.unlink(missing_ok=True)
        return Response(status_code=200, headers={"ETag": f'"{oid}"'})

    async def commit(self, request: Request, p: dict[str, str]) -> Response:
        """NDJSON commit: header, then file / lfsFile / deletedFile lines, applied in order.

        ``parentCommit`` in the header makes the commit conditional, as on the Hub: if the branch has moved
        since, the answer is 412 and nothing is applied (the client raises ``HfHubHTTPError``).
        """
        raw = await request.body()
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header")
        header = lines[0]["value"]
        with self.storage.lock:
            meta, user = self.writable(request, p)
            branch, head = self.target_branch(meta, p["rev"])
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.tree)
            for line in lines[1:]:
                self.apply_operation(meta, head, tree, line.get("key"), line.get("value") or {})
            conflicts = [path for path in tree if any(other.startswith(path + "/") for other in tree)]
            if conflicts:
                raise HubError(400, f"A file and a folder cannot share a path: {conflicts[0]}")
            title = str(header.get("summary") or "").strip() or "Update"
            commit = self.storage.new_commit(meta, [head.id], tree, title, str(header.get("description") or ""), user)
            meta.branches[branch] = commit.id
            self.storage.save_repo(meta)
        url = f"{self.repo_url(request, meta)}/commit/{commit.id}"
        return JSONResponse({"success": True, "commitOid": commit.id, "commitUrl": url, "hookOutput": ""})

    def apply_operation(
        self, meta: RepoMeta, head: Commit, tree: dict[str, FileEntry], key: str | None, value: dict[str, Any]
    ) -> None:
        path = str(value.get("path", ""))
        if key == "file":
            validate_path(path)
            content = str(value.get("content", ""))
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            if self.upload_mode(head, path, len(data), data[:512]) == "lfs":
                raise HubError(400, f"Your push was rejected: {path} must be stored with LFS (see preupload)")
            self.storage.put_bytes(data)
            tree[path] = FileEntry.regular(data)
        elif key == "lfsFile":
            validate_path(path)
            oid = str(value.get("oid", ""))
            size = value.get("size")
            if oid not in meta.lfs_objects or not self.storage.has_blob(oid):
                raise HubError(
                    422, f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})"
                )
            actual = self.storage.blob_path(oid).stat().st_size
            if size is not None and int(size) != actual:
                raise HubError(422, f"LFS object size mismatch for {path}")
            tree[path] = FileEntry.large(oid, actual)
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise entry_not_found(f"A file with this name doesn't exist: {path}", head.id)
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    # downloads ------------------------------------------------------------------------------------------------
    async def resolve(self, request: Request, p: dict[str, str]) -> Response:
        """Serve a file with the headers ``hf_hub_download`` relies on; LFS files are served directly (no CDN)."""
        meta = self.readable(request, p)
        commit = self.resolve_rev(meta, p["rev"])
        entry = commit.tree.get(p["path"])
        if entry is None:
            raise entry_not_found(p["path"], commit.id)
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, entry.size - 1, 200
        range_header = request.headers.get("range")
        if range_header:
            parsed = parse_range(range_header, entry.size)
            if parsed is None:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{entry.size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        path = self.storage.blob_path(entry.sha256)
        return StreamingResponse(_read_range(path, start, length), status_code=status, headers=headers)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, clamped; None if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):
        suffix = int(match.group(2))
        return (max(0, size - suffix), size - 1) if suffix > 0 and size > 0 else None
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _read_range(path: Path, start: int, length: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        while length > 0:
            data = handle.read(min(chunk, length))
            if not data:
                break
            length -= len(data)
            yield data


def card_data(readme: str) -> dict[str, Any] | None:
    """The YAML front matter of a README (what the Hub exposes as ``cardData``)."""
    match = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", readme, flags=re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def create_app(root: Path, config: HubConfig) -> tuple[ASGIApp, HubApp]:
    """Build the ASGI app (FastAPI + the fault/log middleware) and return it with its state object."""
    hub = HubApp(root, config)
    api = FastAPI(title="hub-server (test double of the Hugging Face Hub)", openapi_url=None, docs_url=None)
    api.router.add_route("/{path:path}", hub.dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
    return FaultAndLogMiddleware(api, hub.faults, hub.log), hub


__all__ = [
    "Commit",
    "Fault",
    "FaultInjector",
    "FileEntry",
    "HubApp",
    "HubConfig",
    "HubError",
    "RequestRecord",
    "Storage",
    "create_app",
]
