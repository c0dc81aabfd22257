"""The Hub look-alike, exercised with the real ``huggingface_hub`` client and ``datasets`` (no mocks).

If these pass, code that publishes to the Hub can be tested end to end against ``hub_server``: what the client
uploads is stored byte for byte, revisions resolve like on the Hub, errors map to the client's exception types,
and connection drops behave like real network failures.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import CommitOperationAdd, RepoFile, RepoFolder, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server.fixture import HubServer
from tests.hub_server.fixture import hub_server as hub_server  # noqa: F401  (pytest fixture)

COMMIT_ID = re.compile(r"[0-9a-f]{40}")
README = """\
---
license: apache-2.0
configs:
- config_name: lr
  data_files:
  - split: train
    path: lr/train-*.parquet
  - split: test
    path: lr/test-*.parquet
- config_name: hr
  data_files:
  - split: train
    path: hr/train-*.parquet
---
# Demo dataset

Two configs, sharded parquet.
"""


def _rows(start: int, stop: int, tag: str) -> list[dict[str, object]]:
    return [{"id": i, "text": f"{tag} sentence {i}", "label": i % 2} for i in range(start, stop)]


SHARDS: dict[str, list[dict[str, object]]] = {
    "lr/train-00000-of-00002.parquet": _rows(0, 5, "lr"),
    "lr/train-00001-of-00002.parquet": _rows(5, 9, "lr"),
    "lr/test-00000-of-00001.parquet": _rows(100, 103, "lr"),
    "hr/train-00000-of-00001.parquet": _rows(200, 204, "hr"),
}


def _make_folder(root: Path) -> Path:
    """A dataset folder the way a publisher writes it: README with ``configs:`` + parquet shards + a text file."""
    (root / "notes").mkdir(parents=True)
    (root / "README.md").write_text(README)
    (root / "notes" / "about.txt").write_text("hand-written notes\n")
    for rel, rows in SHARDS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / rel)
    return root


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative posix path -> bytes), ignoring client-side cache folders."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _publish(hub: HubServer, folder: Path, name: str = "ethics-demo") -> tuple[str, str]:
    """create_repo (private dataset) -> upload_folder -> tag v1; returns (repo_id, v1 commit id)."""
    api = hub.api()
    repo_id = f"{hub.user}/{name}"
    api.create_repo(repo_id, repo_type="dataset", private=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, commit_message="v1 data")
    api.create_tag(repo_id, repo_type="dataset", tag="v1", revision=info.oid)
    return repo_id, info.oid


def test_publish_tag_and_read_back(hub_server: HubServer, tmp_path: Path) -> None:
    """The full publishing round trip with the real client; every read-side API sees exactly what was pushed."""
    api = hub_server.api()
    folder = _make_folder(tmp_path / "src")
    repo_id = f"{hub_server.user}/ethics-demo"

    url = api.create_repo(repo_id, repo_type="dataset", private=True)
    assert (url.repo_id, url.repo_type) == (repo_id, "dataset")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id, repo_type="dataset")
    assert conflict.value.response.status_code == 409
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    assert api.dataset_info(repo_id).private is True

    pushed = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, commit_message="v1 data")
    assert COMMIT_ID.fullmatch(pushed.oid)
    api.create_tag(repo_id, repo_type="dataset", tag="v1")
    with pytest.raises(HfHubHTTPError) as dup_tag:
        api.create_tag(repo_id, repo_type="dataset", tag="v1")
    assert dup_tag.value.response.status_code == 409
    api.create_tag(repo_id, repo_type="dataset", tag="v1", exist_ok=True)

    # move main past v1, so that reading "v1" has to mean the tagged snapshot and not the branch head
    api.create_commit(
        repo_id,
        repo_type="dataset",
        operations=[CommitOperationAdd("notes/about.txt", b"rewritten after v1\n")],
        commit_message="after v1",
    )
    api.delete_file("hr/train-00000-of-00001.parquet", repo_id, repo_type="dataset")

    refs = api.list_repo_refs(repo_id, repo_type="dataset")
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", pushed.oid)]
    (main,) = refs.branches
    assert main.name == "main" and main.target_commit != pushed.oid
    assert api.dataset_info(repo_id, revision="v1").sha == pushed.oid
    assert api.dataset_info(repo_id).sha == main.target_commit

    # snapshot at v1: byte-identical to the folder, plus the .gitattributes the Hub writes on repo creation
    snap = Path(api.snapshot_download(repo_id, repo_type="dataset", revision="v1", cache_dir=tmp_path / "c1"))
    got = _files(snap)
    assert ".gitattributes" in got and "*.parquet filter=lfs" in got.pop(".gitattributes").decode()
    assert got == _files(folder)
    head = _files(Path(api.snapshot_download(repo_id, repo_type="dataset", cache_dir=tmp_path / "c2")))
    assert head["notes/about.txt"] == b"rewritten after v1\n"
    assert "hr/train-00000-of-00001.parquet" not in head

    # tree listing: parquet went through LFS (sha256 = content hash), text files are git blobs
    tree = list(api.list_repo_tree(repo_id, repo_type="dataset", revision="v1", recursive=True))
    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    assert {f.path for f in tree if isinstance(f, RepoFolder)} == {"lr", "hr", "notes"}
    assert set(files) == set(_files(folder)) | {".gitattributes"}
    for rel, data in _files(folder).items():
        entry = files[rel]
        assert entry.size == len(data)
        if rel.endswith(".parquet"):
            assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
        else:
            assert entry.lfs is None and entry.blob_id == _git_blob_id(data)
    top = {f.path for f in api.list_repo_tree(repo_id, repo_type="dataset", revision="v1")}
    assert top == {".gitattributes", "README.md", "hr", "lr", "notes"}
    assert {f.path for f in api.list_repo_tree(repo_id, "lr", repo_type="dataset")} == {
        "lr/train-00000-of-00002.parquet",
        "lr/train-00001-of-00002.parquet",
        "lr/test-00000-of-00001.parquet",
    }

    infos = api.get_paths_info(repo_id, ["README.md", "lr", "missing.txt"], repo_type="dataset", revision="v1")
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "README.md"), ("RepoFolder", "lr")]

    # existence helpers and history
    assert api.file_exists(repo_id, "hr/train-00000-of-00001.parquet", repo_type="dataset", revision="v1")
    assert not api.file_exists(repo_id, "hr/train-00000-of-00001.parquet", repo_type="dataset")
    assert api.revision_exists(repo_id, "v1", repo_type="dataset")
    assert api.revision_exists(repo_id, pushed.oid, repo_type="dataset")
    assert not api.revision_exists(repo_id, "v2", repo_type="dataset")
    assert api.repo_exists(repo_id, repo_type="dataset")
    assert not api.repo_exists(f"{hub_server.user}/nope", repo_type="dataset")
    titles = [c.title for c in api.list_repo_commits(repo_id, repo_type="dataset")]
    assert titles[:3] == ["Delete hr/train-00000-of-00001.parquet with huggingface_hub", "after v1", "v1 data"]
    assert titles[3:] == ["initial commit"]

    # plain hf_hub_download: the cache keys LFS blobs by sha256, as with the real Hub
    shard = "lr/train-00000-of-00002.parquet"
    local = hf_hub_download(
        repo_id,
        shard,
        repo_type="dataset",
        revision="v1",
        endpoint=hub_server.endpoint,
        token=hub_server.token,
        cache_dir=tmp_path / "c3",
    )
    assert Path(local).read_bytes() == (folder / shard).read_bytes()
    assert Path(local).resolve().name == hashlib.sha256((folder / shard).read_bytes()).hexdigest()

    # storage is content-addressed: each distinct content is stored once, under its sha256
    for data in _files(folder).values():
        sha = hashlib.sha256(data).hexdigest()
        assert (hub_server.root / "blobs" / sha[:2] / sha).read_bytes() == data


def test_errors_map_to_the_clients_exceptions(hub_server: HubServer, tmp_path: Path) -> None:
    """404/401/409/412 carry the Hub's X-Error-Code headers, so the client raises its usual exceptions."""
    api = hub_server.api()
    anonymous = hub_server.api(token=False)
    repo_id, _ = _publish(hub_server, _make_folder(tmp_path / "src"))
    missing = f"{hub_server.user}/does-not-exist"

    with pytest.raises(RepositoryNotFoundError) as err:
        api.dataset_info(missing)
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as err:
        anonymous.dataset_info(repo_id)  # private: same answer as "missing", but 401 when unauthenticated
    assert err.value.response.status_code == 401
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(repo_id, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_tree(repo_id, repo_type="dataset", revision="no-such-branch").__next__()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            repo_id,
            "nope.txt",
            repo_type="dataset",
            endpoint=hub_server.endpoint,
            token=hub_server.token,
            cache_dir=tmp_path / "c",
        )
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "README.md", repo_type="dataset", endpoint=hub_server.endpoint, token=False)

    with pytest.raises(HfHubHTTPError) as err:
        hub_server.api(token="hf_not_a_valid_token").dataset_info(repo_id)
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo(f"{hub_server.user}/anon", repo_type="dataset")
    assert err.value.response.status_code == 401

    ops = [CommitOperationAdd("x.txt", b"x")]
    with pytest.raises(HfHubHTTPError) as err:  # tags are read-only
        api.create_commit(repo_id, ops, commit_message="m", repo_type="dataset", revision="v1")
    assert err.value.response.status_code == 400
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(repo_id, ops, commit_message="m", repo_type="dataset", revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as err:  # optimistic concurrency: the head moved
        api.create_commit(repo_id, ops, commit_message="m", repo_type="dataset", parent_commit="0" * 40)
    assert err.value.response.status_code == 412

    api.create_branch(repo_id, repo_type="dataset", branch="dev", revision="v1")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo_id, repo_type="dataset", branch="dev")
    assert err.value.response.status_code == 409
    dev = api.create_commit(repo_id, ops, commit_message="on dev", repo_type="dataset", revision="dev")
    assert api.dataset_info(repo_id, revision="dev").sha == dev.oid != api.dataset_info(repo_id).sha


def test_dropped_lfs_upload_is_retried_by_the_client(hub_server: HubServer, tmp_path: Path) -> None:
    """A connection dropped mid-PUT is retried by huggingface_hub's own backoff: the call still succeeds."""
    api = hub_server.api()
    repo_id = f"{hub_server.user}/blobs"
    api.create_repo(repo_id, repo_type="dataset")
    folder = tmp_path / "src"
    folder.mkdir()
    payload = os.urandom(4 << 20)  # large enough that the client is still sending when the socket dies
    (folder / "weights.bin").write_bytes(payload)

    fault = hub_server.fail_next_upload()
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)
    assert fault.fired == 1
    puts = hub_server.requests_to("PUT", r"^/__lfs/")
    assert [p.fault for p in puts] == ["drop", None]
    assert 0 < puts[0].body_bytes < len(payload)
    (entry,) = api.get_paths_info(repo_id, "weights.bin", repo_type="dataset")
    assert isinstance(entry, RepoFile) and entry.lfs is not None
    assert entry.lfs.sha256 == hashlib.sha256(payload).hexdigest()


def test_dropped_commit_raises_and_a_retry_completes(hub_server: HubServer, tmp_path: Path) -> None:
    """The commit POST is not retried by the client: the call raises, nothing is half-applied, re-running works."""
    api = hub_server.api()
    folder = _make_folder(tmp_path / "src")
    repo_id = f"{hub_server.user}/retry"
    api.create_repo(repo_id, repo_type="dataset")
    head = api.dataset_info(repo_id).sha

    hub_server.fail_next_commit()
    with pytest.raises(httpx2.TransportError):
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)
    assert api.dataset_info(repo_id).sha == head  # no partial commit
    uploaded = len(hub_server.requests_to("PUT", r"^/__lfs/"))
    assert uploaded == len(SHARDS)  # the LFS objects made it before the commit died

    done = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)
    assert len(hub_server.requests_to("PUT", r"^/__lfs/")) == uploaded  # already on the server: not re-sent
    snap = Path(api.snapshot_download(repo_id, repo_type="dataset", revision=done.oid, cache_dir=tmp_path / "c"))
    got = _files(snap)
    got.pop(".gitattributes")
    assert got == _files(folder)


def test_truncated_download_is_resumed_with_a_range_request(hub_server: HubServer, tmp_path: Path) -> None:
    """The server cuts a download midway; hf_hub_download resumes with ``Range`` and gets identical bytes.

    The client only counts bytes it has flushed, in DOWNLOAD_CHUNK_SIZE (10 MiB) chunks: a cut before the first
    full chunk restarts from zero, so the file is one chunk + 1 MiB and the cut falls after the first chunk.
    """
    api = hub_server.api()
    repo_id = f"{hub_server.user}/dl"
    api.create_repo(repo_id, repo_type="dataset")
    chunk = hf_constants.DOWNLOAD_CHUNK_SIZE
    payload = os.urandom(chunk + (1 << 20))
    api.upload_file(path_or_fileobj=payload, path_in_repo="big.bin", repo_id=repo_id, repo_type="dataset")

    hub_server.fail_next_download(after_bytes=chunk + (1 << 19))
    local = hf_hub_download(
        repo_id, "big.bin", repo_type="dataset", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c"
    )
    assert Path(local).read_bytes() == payload
    gets = hub_server.requests_to("GET", r"/resolve/.*/big\.bin$")
    assert [(g.fault, g.status, g.headers.get("range")) for g in gets] == [
        ("truncate", 200, None),
        (None, 206, f"bytes={chunk}-"),
    ]


def test_hf_file_system_reads_a_tagged_revision(hub_server: HubServer, tmp_path: Path) -> None:
    """What `curate query --hub` relies on: `HfFileSystem` listing (tree / paths-info), revisions in the path
    (a tag, and a commit id), and ranged reads (resolve with ``Range``) of exactly the bytes that were pushed."""
    from huggingface_hub import HfFileSystem

    folder = _make_folder(tmp_path / "src")
    repo_id, oid = _publish(hub_server, folder)
    hub_server.api().create_commit(repo_id, [CommitOperationAdd("lr/extra.parquet", b"x" * 10)],
                                   commit_message="after v1", repo_type="dataset")
    fs = HfFileSystem(endpoint=hub_server.endpoint, token=hub_server.token, skip_instance_cache=True)
    for rev in ("v1", oid):
        base = f"datasets/{repo_id}@{rev}"
        assert sorted(fs.glob(f"{base}/lr/*.parquet")) == [
            f"{base}/lr/test-00000-of-00001.parquet", f"{base}/lr/train-00000-of-00002.parquet",
            f"{base}/lr/train-00001-of-00002.parquet"]
        shard = "lr/train-00001-of-00002.parquet"
        data = (folder / shard).read_bytes()
        assert fs.info(f"{base}/{shard}")["size"] == len(data)
        assert fs.modified(f"{base}/{shard}").year >= 2024  # lastCommit of an expanded listing (fsspec users)
        with fs.open(f"{base}/{shard}", "rb", block_size=64) as handle:
            handle.seek(len(data) - 8)
            assert handle.read() == data[-8:]  # the parquet footer, through a Range request
        assert pq.read_table(fs.open(f"{base}/{shard}", "rb")).num_rows == len(SHARDS[shard])
    assert fs.exists(f"datasets/{repo_id}/lr/extra.parquet")
    assert not fs.exists(f"datasets/{repo_id}@v1/lr/extra.parquet")
    assert [g.headers.get("range") for g in hub_server.requests_to("GET", r"/resolve/") if g.status == 206]
