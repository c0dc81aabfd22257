"""Push store versions to Hugging Face Hub dataset repos and pull them back, lineage intact.

A version folder is already a Hub dataset repo (card with `configs`, parquet per config/split, manifest),
so a push is one `upload_folder` commit plus a git tag named after the version; a pull is a
`snapshot_download` of a revision, a content-hash check, and an atomic import into the store.

The token comes from `HF_TOKEN` or the standard `hf auth login` store, read by huggingface_hub itself; we
never handle, print or persist it. The endpoint comes from `HF_ENDPOINT` the same way (or `endpoint=`).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.store import HASH_LEN, MANIFEST, DatasetStore, Version

# Remote files a new version replaces in the same commit (a later version may have other shard names).
REPLACED_PATTERNS = ["*.parquet", "*.png"]
TRANSIENT_ATTEMPTS = 3


@dataclass
class PushResult:
    repo_id: str
    tag: str
    commit: str | None  # None: nothing was committed (already there)
    created_commit: bool
    url: str


@dataclass
class PullResult:
    version: Version
    created: bool
    commit: str


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _explain(e: Exception, repo_id: str, revision: str | None = None) -> CurateError:
    """Map huggingface_hub errors to one clear line (never including the token)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, RevisionNotFoundError):
        return CurateError(f"dataset repo {repo_id} has no revision {revision!r}")
    if isinstance(e, RepositoryNotFoundError):
        return CurateError(
            f"dataset repo {repo_id} not found, or it is private and no valid token was given "
            "(set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(e, EntryNotFoundError):
        return CurateError(f"dataset repo {repo_id}@{revision or 'main'} has no {MANIFEST}: not a curate version")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return CurateError(
                f"not authorised for {repo_id} (HTTP {status}): set HF_TOKEN to a token with write access "
                "or run `hf auth login`"
            )
        return CurateError(f"Hub request for {repo_id} failed: {str(e).splitlines()[0]}")
    return CurateError(f"Hub request for {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0]}")


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
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, _transport_errors()):
        return True
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return e.response.status_code >= 500 or e.response.status_code == 429
    return False


def _with_retries(fn: Any, repo_id: str, revision: str | None = None, attempts: int = TRANSIENT_ATTEMPTS) -> Any:
    """Retry transient failures (dropped connection, 5xx, 429) with backoff; others fail at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CurateError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as one clear line
            if attempt < attempts and _is_transient(e):
                time.sleep(min(2 ** attempt * 0.25, 4))
                continue
            raise _explain(e, repo_id, revision) from None
    raise AssertionError("unreachable")


def _remote_manifest(api: Any, repo_id: str, revision: str) -> dict[str, Any] | None:
    """The manifest at a revision, or None when the repo / revision / file is absent."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, MANIFEST, repo_type="dataset", revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
        return None
    return json.loads(Path(path).read_text())


def push(
    store: DatasetStore,
    ref: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload one version (parquet, manifest, card) in one commit and tag it with the version's tag.

    Idempotent: if the tag already points at this content, nothing is committed. If the branch head
    already holds it (a previous push committed but failed before tagging), only the tag is created.
    """
    version = store.get(ref)
    api = _api(endpoint, token)
    branch = revision or "main"
    repo_url = _with_retries(
        lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True), repo_id
    )
    url = str(repo_url)

    tagged = _with_retries(lambda: _remote_manifest(api, repo_id, version.tag), repo_id, version.tag)
    if tagged is not None:
        if tagged.get("content_hash") == version.hash:
            return PushResult(repo_id, version.tag, None, False, url)
        raise CurateError(
            f"{repo_id} already has a tag {version.tag} with other content "
            f"({str(tagged.get('content_hash'))[:HASH_LEN]} ≠ {version.hash[:HASH_LEN]}); "
            "pull it or push to another repo"
        )

    if branch != "main":
        _with_retries(lambda: api.create_branch(repo_id, repo_type="dataset", branch=branch, exist_ok=True),
                      repo_id, branch)
    head = _with_retries(lambda: _remote_manifest(api, repo_id, branch), repo_id, branch)
    created_commit = False
    if head is not None and head.get("content_hash") == version.hash:
        commit = _with_retries(
            lambda: api.dataset_info(repo_id, revision=branch).sha, repo_id, branch
        )
    else:
        info = _with_retries(
            lambda: api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(version.path),
                revision=branch,
                commit_message=f"{version.name} {version.tag} ({version.hash[:HASH_LEN]})",
                commit_description=f"content hash {version.hash}\nbuilt by "
                f"{version.manifest['builder']['name']} {version.manifest['builder']['version']}",
                delete_patterns=REPLACED_PATTERNS,
            ),
            repo_id,
            branch,
        )
        commit = info.oid
        created_commit = True
    _with_retries(
        lambda: api.create_tag(repo_id, repo_type="dataset", tag=version.tag, revision=commit,
                               tag_message=f"{version.name} {version.tag} content hash {version.hash}"),
        repo_id,
        commit,
    )
    return PushResult(repo_id, version.tag, commit, created_commit, url)


def parse_repo_ref(spec: str) -> tuple[str, str]:
    repo_id, _, rev = spec.partition("@")
    if repo_id.count("/") != 1:
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

    The download lands in a temp folder inside the store (same filesystem, so the final step is a
    rename); a hash mismatch or any failure leaves the store untouched.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_repo_ref(repo_spec)
    api = _api(endpoint, token)
    commit = _with_retries(lambda: api.dataset_info(repo_id, revision=revision).sha, repo_id, revision)
    staging = store.root / "staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        _with_retries(
            lambda: snapshot_download(
                repo_id, repo_type="dataset", revision=commit, local_dir=staging, endpoint=endpoint,
                token=token,
            ),
            repo_id,
            revision,
        )
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        (staging / ".gitattributes").unlink(missing_ok=True)
        manifest_path = staging / MANIFEST
        if not manifest_path.is_file():
            raise CurateError(f"{repo_id}@{revision} has no {MANIFEST}: not a curate dataset version")
        manifest = json.loads(manifest_path.read_text())
        manifest["origin"] = {"hub": repo_id, "revision": revision, "commit": commit,
                              "endpoint": endpoint or _default_endpoint()}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        result = store.import_version(name or manifest["name"], staging, manifest["content_hash"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PullResult(result.version, result.created, commit)


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
