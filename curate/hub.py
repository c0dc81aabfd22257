"""Push store versions to Hugging Face Hub dataset repos and pull them back, lineage intact.

A version folder is already a Hub dataset repo (card with `configs`, parquet per config/split, manifest), so a
push is one commit of exactly the version's files plus a git tag named after the version; a pull is a download
of the files the manifest lists at one commit, a content-hash check, and an atomic import into the store.

The token comes from `HF_TOKEN` or the standard `hf auth login` store, read by huggingface_hub itself; we
never handle, print or persist it. The endpoint comes from `HF_ENDPOINT` the same way (or `endpoint=`).

Push/pull guarantees
--------------------
* push, before anything is sent: the local version passes `DatasetStore.verify` (every listed file present,
  regular, hashing to the manifest); a damaged version is refused and the repo is not touched.
* push, the commit: one `create_commit` holding exactly the manifest's files (data files, manifest.json,
  README.md, listed extra files), with deletions of every other remote file (`.gitattributes` aside) in the
  same commit, made with `parent_commit=` the head it was computed from. A concurrent commit makes the Hub
  answer 412; the push re-reads the head and tries again (`CONFLICT_ATTEMPTS`), so two pushes never mix files.
* push, the tag: created only after that commit's file list and each file's LFS sha256 + size (git blob id
  for small files) were checked against the local files. "Already there" means the tag's commit passes the
  same check; the remote manifest.json is never trusted on its own. A tag whose files do not match is
  reported; `repair=True` (`--repair`) moves it to a checked commit (delete + create: the Hub has no tag move).
* pull: repo, revision and the dataset name (`--name`, else the manifest's) are checked before anything is
  written; files land in a `.pull.tmp-*` folder in the store, are hash-verified, then imported atomically.
  Any failure removes that folder (and a store folder the pull itself created): nothing partial remains.
* caches: remote files (the manifest read before a pull) are cached per endpoint under
  `<HF_HOME>/curate-endpoints/<host>-<hash>/`, never under the bare repo id in the shared hub cache, so two
  servers hosting the same `org/name` cannot answer for each other.
* transient failures (dropped connection, 5xx, 429) are retried (`TRANSIENT_ATTEMPTS`); every other Hub error
  becomes one `CurateError` line (offline, connection refused, 401/403, missing repo or revision).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from curate.errors import CurateError
from curate.store import HASH_LEN, MANIFEST, DatasetStore, Version, check_name, listed_files, sha256_file
from curate.urls import redact_url

log = logging.getLogger(__name__)

TRANSIENT_ATTEMPTS = 3
CONFLICT_ATTEMPTS = 10  # optimistic-concurrency rounds (412 from a concurrent commit) before giving up
KEPT_REMOTE_FILES = frozenset({".gitattributes"})  # repo plumbing a push neither uploads nor deletes


@dataclass
class PushResult:
    repo_id: str
    tag: str
    commit: str | None  # None: nothing was committed or tagged (already there)
    created_commit: bool
    url: str
    repaired: bool = False  # an existing, mismatching tag was moved to the checked commit


@dataclass
class PullResult:
    version: Version
    created: bool
    commit: str


@dataclass(frozen=True)
class LocalFile:
    """What the remote copy of one version file must match."""

    sha256: str
    size: int
    git_oid: str | None  # git blob id (for files the Hub keeps as plain git blobs); None for large files


# ---- endpoints, caches, errors -------------------------------------------------------------------------------
def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def endpoint_cache_dir(endpoint: str | None = None) -> Path:
    """The huggingface_hub cache folder for one endpoint: `<HF_HOME>/curate-endpoints/<host>-<hash8>`.

    The shared hub cache is keyed by repo id only, so a file cached from one server would answer for another.
    """
    from huggingface_hub import constants

    url = (endpoint or _default_endpoint()).rstrip("/")
    host = urlparse(url).netloc or "local"
    slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return Path(constants.HF_HOME) / "curate-endpoints" / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _explain(e: Exception, repo_id: str, revision: str | None = None, endpoint: str | None = None) -> CurateError:
    """Map huggingface_hub / transport errors to one clear line (never including the token)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or _default_endpoint()
    if isinstance(e, OfflineModeIsEnabled):
        return CurateError(f"cannot reach {where} for {repo_id}: offline mode is on (unset HF_HUB_OFFLINE)")
    if isinstance(e, RevisionNotFoundError):
        return CurateError(f"dataset repo {repo_id} has no revision {revision!r}")
    if isinstance(e, RepositoryNotFoundError):
        return CurateError(
            f"dataset repo {repo_id} not found, or it is private and no valid token was given "
            "(set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(e, LocalEntryNotFoundError):  # the client could not connect and had nothing cached
        return CurateError(f"cannot reach {where} for {repo_id}@{revision or 'main'}: {_first_line(e)}")
    if isinstance(e, EntryNotFoundError):
        return CurateError(f"dataset repo {repo_id}@{revision or 'main'} has no {MANIFEST}: not a curate version")
    if isinstance(e, HfHubHTTPError):
        status = _status(e)
        if status in (401, 403):
            return CurateError(
                f"not authorised for {repo_id} (HTTP {status}): set HF_TOKEN to a valid token (with write access "
                "to push) or run `hf auth login`"
            )
        detail = getattr(e, "server_message", None) or _first_line(e)
        return CurateError(f"Hub request for {repo_id} failed (HTTP {status}): {_first_line(Exception(detail))}")
    if isinstance(e, HFValidationError):
        return CurateError(f"invalid Hub repo or revision {repo_id}@{revision or 'main'}: {_first_line(e)}")
    if isinstance(e, _transport_errors()):
        return CurateError(f"cannot reach {where} for {repo_id}: {type(e).__name__}: {_first_line(e)}")
    return CurateError(f"Hub request for {repo_id} failed: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of whichever HTTP client huggingface_hub uses (httpx, or httpx2 in 2.x)."""
    import importlib

    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx", "httpx2", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        cls = getattr(mod, "TransportError", None) or getattr(getattr(mod, "exceptions", None), "ConnectionError", None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def _is_transient(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, _transport_errors()):
        return True
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return e.response.status_code >= 500 or e.response.status_code == 429
    return False


def _with_retries(
    fn: Any, repo_id: str, revision: str | None = None, endpoint: str | None = None,
    attempts: int = TRANSIENT_ATTEMPTS,
) -> Any:
    """Retry transient failures (dropped connection, 5xx, 429) with backoff; others fail at once, as one line."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CurateError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as one clear line
            if attempt < attempts and _is_transient(e):
                time.sleep(min(2 ** attempt * 0.25, 4))
                continue
            raise _explain(e, repo_id, revision, endpoint) from None
    raise AssertionError("unreachable")


# ---- what a version consists of ------------------------------------------------------------------------------
def version_files(version: Version) -> list[str]:
    """Every file a version consists of, relative to its folder: data files, manifest, card, listed extras.

    Manifests from before `extra_files` get the other regular files of the folder as extras (the store accepts
    unlisted non-parquet files in those), so a pushed version still carries its figures.
    """
    files = listed_files(version.manifest)
    if "extra_files" not in version.manifest:
        for p in version.path.rglob("*"):
            rel = p.relative_to(version.path).as_posix()
            hidden = any(part.startswith(".") for part in rel.split("/"))
            if p.is_file() and not p.is_symlink() and not p.name.endswith(".parquet") and not hidden:
                files.add(rel)
    return sorted(files)


def _local_index(version: Version, lfs_threshold: int = 10 * 1024 * 1024) -> dict[str, LocalFile]:
    from huggingface_hub.utils.sha import git_hash

    out: dict[str, LocalFile] = {}
    for rel in version_files(version):
        path = version.path / rel
        size = path.stat().st_size
        oid = git_hash(path.read_bytes()) if size <= lfs_threshold else None
        out[rel] = LocalFile(sha256_file(path), size, oid)
    return out


def _remote_problems(siblings: list[Any], expected: dict[str, LocalFile]) -> list[str]:
    """How a commit's file list (`repo_info(files_metadata=True).siblings`) differs from the version's files."""
    remote = {s.rfilename: s for s in siblings if s.rfilename not in KEPT_REMOTE_FILES}
    problems = [f"{rel}: missing" for rel in sorted(set(expected) - set(remote))]
    problems += [f"{rel}: not part of this version" for rel in sorted(set(remote) - set(expected))]
    for rel in sorted(set(expected) & set(remote)):
        want, got = expected[rel], remote[rel]
        if got.lfs is not None:
            if (got.lfs.sha256, got.lfs.size) != (want.sha256, want.size):
                problems.append(f"{rel}: sha256 {got.lfs.sha256[:HASH_LEN]} / {got.lfs.size} bytes, expected "
                                f"{want.sha256[:HASH_LEN]} / {want.size} bytes")
        elif got.blob_id != want.git_oid or got.size != want.size:
            problems.append(f"{rel}: content differs ({got.size} bytes, expected {want.size})")
    return problems


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


# ---- push ----------------------------------------------------------------------------------------------------
class _Remote:
    """The calls push makes, each with transient retries and one-line errors."""

    def __init__(self, api: Any, repo_id: str, endpoint: str | None) -> None:
        self.api, self.repo_id, self.endpoint = api, repo_id, endpoint

    def call(self, fn: Any, revision: str | None = None) -> Any:
        return _with_retries(fn, self.repo_id, revision, self.endpoint)

    def snapshot(self, revision: str) -> tuple[str, list[Any]]:
        """(commit id, files with metadata) of a revision, read in one request so they belong together."""
        info = self.call(lambda: self.api.dataset_info(self.repo_id, revision=revision, files_metadata=True),
                         revision)
        return info.sha, list(info.siblings or [])

    def tag_target(self, tag: str) -> str | None:
        refs = self.call(lambda: self.api.list_repo_refs(self.repo_id, repo_type="dataset"))
        return next((t.target_commit for t in refs.tags if t.name == tag), None)

    def check(self, commit: str, expected: dict[str, LocalFile]) -> list[str]:
        return _remote_problems(self.snapshot(commit)[1], expected)


def push(
    store: DatasetStore,
    ref: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    repair: bool = False,
) -> PushResult:
    """Upload one version in one checked commit and tag it with the version's tag (guarantees: module docstring).

    Idempotent: if the tag already points at a commit holding exactly these files, nothing is committed. If
    the branch head already holds them (a previous push committed but failed before tagging), only the tag is
    created.
    """
    if repo_id.count("/") != 1 or "@" in repo_id or not all(repo_id.split("/")):  # a bare NAME would go to the
        raise CurateError(f"expected ORG/NAME for the repo to push to, got {repo_id!r}")  # token's own namespace
    version = store.get(ref)
    problems = store.verify(version)
    if problems:
        raise CurateError(f"{version.ref} is damaged, nothing pushed: {_summary(problems)}")
    expected = _local_index(version)
    branch = revision or "main"
    remote = _Remote(_api(endpoint, token), repo_id, endpoint)
    api = remote.api
    url = str(remote.call(lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)))

    tagged = remote.tag_target(version.tag)
    if tagged is not None:
        wrong = remote.check(tagged, expected)
        if not wrong:
            return PushResult(repo_id, version.tag, None, False, url)
        if not repair:
            raise CurateError(
                f"{repo_id} tag {version.tag} (commit {tagged[:12]}) does not hold {version.ref}: {_summary(wrong)}; "
                "run again with --repair to move the tag to a checked commit of this version"
            )
        log.warning("%s tag %s does not hold %s (%s): repairing", repo_id, version.tag, version.ref, _summary(wrong))

    if branch != "main":
        remote.call(lambda: api.create_branch(repo_id, repo_type="dataset", branch=branch, exist_ok=True), branch)
    commit, created = _commit_version(remote, version, expected, branch)
    repaired = _place_tag(remote, version, commit, expected, moved_from=tagged)
    return PushResult(repo_id, version.tag, commit, created, url, repaired)


def _commit_version(remote: _Remote, version: Version, expected: dict[str, LocalFile], branch: str) -> tuple[str, bool]:
    """Make `branch` hold exactly the version's files with optimistic concurrency; return (checked commit, created)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    adds: dict[str, Any] = {}  # reused across attempts: hashing a large file once is enough
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        head, siblings = remote.snapshot(branch)
        if not _remote_problems(siblings, expected):
            return head, False  # the branch already holds exactly this version
        current = {s.rfilename: s for s in siblings}
        changed = [rel for rel in expected if rel not in current or _remote_problems([current[rel]],
                                                                                       {rel: expected[rel]})]
        doomed = [rel for rel in current if rel not in expected and rel not in KEPT_REMOTE_FILES]
        for rel in changed:
            if rel not in adds:
                adds[rel] = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(version.path / rel))
        ops = [adds[rel] for rel in changed] + [CommitOperationDelete(path_in_repo=rel) for rel in doomed]
        info = remote.call(lambda ops=ops, head=head: _create_commit(remote, version, ops, branch, head), branch)
        if info is None:
            log.info("%s: %s moved during the push (attempt %d); re-reading it", remote.repo_id, branch, attempt)
            time.sleep(random.uniform(0.05, 0.2) * attempt)
            continue
        wrong = remote.check(info.oid, expected)
        if not wrong:
            return info.oid, True
        # only possible when the client dropped every operation as a no-op against a head that moved meanwhile
        log.info("%s: commit %s does not hold %s yet (%s); retrying", remote.repo_id, info.oid[:12], version.ref,
                 _summary(wrong))
    raise CurateError(
        f"{remote.repo_id}@{branch} kept changing during the push ({CONFLICT_ATTEMPTS} attempts): nothing tagged; "
        "run the push again"
    )


def _create_commit(remote: _Remote, version: Version, ops: list[Any], branch: str, parent: str) -> Any:
    """One commit on top of `parent`; None when the Hub says the branch moved (HTTP 412)."""
    from huggingface_hub.errors import HfHubHTTPError

    m = version.manifest
    try:
        return remote.api.create_commit(
            repo_id=remote.repo_id,
            repo_type="dataset",
            operations=ops,
            revision=branch,
            parent_commit=parent,
            commit_message=f"{version.name} {version.tag} ({version.hash[:HASH_LEN]})",
            commit_description=f"content hash {version.hash}\nbuilt by {m['builder']['name']} "
            f"{m['builder']['version']}",
        )
    except HfHubHTTPError as e:
        if _status(e) == 412:
            return None
        raise


def _place_tag(
    remote: _Remote, version: Version, commit: str, expected: dict[str, LocalFile], moved_from: str | None
) -> bool:
    """Tag the checked commit; a tag that appeared meanwhile is accepted only if it passes the same check."""
    api, repo_id, tag = remote.api, remote.repo_id, version.tag
    message = f"{version.name} {tag} content hash {version.hash}"
    if moved_from is not None:
        remote.call(lambda: api.delete_tag(repo_id, repo_type="dataset", tag=tag), tag)

    def create() -> bool:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.create_tag(repo_id, repo_type="dataset", tag=tag, revision=commit, tag_message=message)
        except HfHubHTTPError as e:
            if _status(e) == 409:
                return False
            raise
        return True

    if remote.call(create, commit):
        return moved_from is not None
    other = remote.tag_target(tag)  # someone tagged it first (a concurrent push of the same version)
    wrong = remote.check(other, expected) if other else ["tag vanished"]
    if wrong:
        raise CurateError(f"{repo_id} tag {tag} was created concurrently on commit {str(other)[:12]} that does "
                          f"not hold {version.ref}: {_summary(wrong)}; run again with --repair")
    return False


# ---- pull ----------------------------------------------------------------------------------------------------
def parse_repo_ref(spec: str) -> tuple[str, str]:
    repo_id, _, rev = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CurateError(f"expected ORG/NAME[@REVISION], got {spec!r}")
    return repo_id, rev or "main"


def pull(
    store: DatasetStore,
    repo_spec: str,
    *,
    name: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PullResult:
    """Download a revision into the store as a version after verifying its content hash.

    The name (`name`, else the manifest's) is checked before anything is written; the download lands in a temp
    folder inside the store (same filesystem, so the final step is a rename) that is removed whatever happens.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, revision = parse_repo_ref(repo_spec)
    if name is not None:
        check_name(name, "--name")
    api = _api(endpoint, token)

    def call(fn: Any) -> Any:
        return _with_retries(fn, repo_id, revision, endpoint)

    info = call(lambda: api.dataset_info(repo_id, revision=revision, files_metadata=True))
    commit = info.sha
    cache = endpoint_cache_dir(endpoint)
    manifest_file = call(lambda: hf_hub_download(repo_id, MANIFEST, repo_type="dataset", revision=commit,
                                                 endpoint=endpoint, token=token, cache_dir=cache))
    manifest = _read_manifest(Path(manifest_file), f"{repo_id}@{revision}")
    target = check_name(name if name is not None else manifest.get("name"), f"dataset name in {repo_id}@{revision}")
    present = {s.rfilename for s in info.siblings or []}
    listed = _listed_files(manifest, f"{repo_id}@{revision}", present)
    missing = [f for f in listed if f not in present]
    if missing:
        raise CurateError(f"{repo_id}@{revision} lacks {missing[0]}, which its {MANIFEST} lists; nothing written")

    root_existed = store.root.exists()
    try:
        with store.staging_dir() as staging:  # locked while in use; removed on exit, stale ones by the store
            call(lambda: snapshot_download(
                repo_id, repo_type="dataset", revision=commit, local_dir=staging, endpoint=endpoint, token=token,
                cache_dir=cache, allow_patterns=[glob.escape(f) for f in [*listed, MANIFEST]],
            ))
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            manifest_path = staging / MANIFEST
            if json.loads(manifest_path.read_text()) != manifest:
                raise CurateError(f"{repo_id}@{revision}: {MANIFEST} changed during the pull; nothing written")
            manifest["origin"] = {"hub": repo_id, "revision": revision, "commit": commit,
                                  "endpoint": redact_url(endpoint or _default_endpoint())}
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
            result = store.import_version(target, staging, manifest["content_hash"])
    except BaseException:
        if not root_existed:  # a store this pull created holds nothing but the empty staging folder: remove it
            _remove_empty(store.root / "staging")
            _remove_empty(store.root)
        raise
    return PullResult(result.version, result.created, commit)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or gone): leave it


def _read_manifest(path: Path, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CurateError(f"{where}: {MANIFEST} is not valid JSON ({e}); nothing written") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("content_hash"), str):
        raise CurateError(f"{where}: {MANIFEST} has no content_hash: not a curate dataset version")
    return manifest


def _listed_files(manifest: dict[str, Any], where: str, present: set[str]) -> list[str]:
    """The files a pulled manifest lists (`curate.store.listed_files`), each a plain relative path.

    A manifest from before `extra_files` takes the commit's other non-parquet files as extras (as push does).
    """
    try:
        files = listed_files(manifest)
    except (KeyError, AttributeError, TypeError):
        raise CurateError(f"{where}: {MANIFEST} has no valid file lists: not a curate dataset version") from None
    if "extra_files" not in manifest:
        files |= {f for f in present - KEPT_REMOTE_FILES if not f.endswith(".parquet")}
    for rel in files:
        if not isinstance(rel, str) or rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
            raise CurateError(f"{where}: {MANIFEST} lists an unsafe path {str(rel)!r}; nothing written")
    return sorted(files)
