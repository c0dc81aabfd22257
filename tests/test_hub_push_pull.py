"""Push and pull versions through the real huggingface_hub client against the Hub-compatible test server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.hub import TRANSIENT_ATTEMPTS, pull, push
from curate.store import DatasetStore, Version

from .hub_server.fixture import HubServer, hub_server  # noqa: F401

COMMIT = r"/commit/"


@pytest.fixture
def dfar_small(tmp_path: Path, dfar_source: Path) -> tuple[DatasetStore, Version]:
    st = DatasetStore(tmp_path / "local")
    return st, build_dfar(st, dfar_source, DfarConfig(limit=200)).version


def _files(v: Version) -> dict[str, bytes]:
    return {p.relative_to(v.path).as_posix(): p.read_bytes() for p in sorted(v.path.rglob("*.parquet"))}


def test_round_trip(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, v = dfar_small
    r = push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    assert r.created_commit and r.tag == "v1"
    refs = hub_server.api().list_repo_refs("org/dfar", repo_type="dataset")
    assert [t.name for t in refs.tags] == ["v1"] and refs.tags[0].target_commit == r.commit
    commit = hub_server.api().list_repo_commits("org/dfar", repo_type="dataset")[0]
    assert v.hash[:16] in commit.title

    fresh = DatasetStore(tmp_path / "fresh")
    got = pull(fresh, "org/dfar@v1", endpoint=hub_server.endpoint, token=hub_server.token)
    assert got.created and got.version.hash == v.hash and got.version.tag == "v1"
    assert _files(got.version) == _files(v)
    origin = got.version.manifest["origin"]
    assert origin == {"hub": "org/dfar", "revision": "v1", "commit": r.commit, "endpoint": hub_server.endpoint}
    assert (got.version.path / "README.md").read_text() == (v.path / "README.md").read_text()
    assert not (got.version.path / ".gitattributes").exists() and not (got.version.path / ".cache").exists()
    # pulling the same content again adds nothing
    assert pull(fresh, "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token).created is False


def test_load_dataset_from_server(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    """What a user does: `datasets.load_dataset(repo, "lr", revision="v1")` with HF_ENDPOINT set."""
    st, v = dfar_small
    push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    out = hub_server.run_python(
        "import json, datasets\n"
        "ds = datasets.load_dataset('org/dfar', 'lr', revision='v1')\n"
        "print(json.dumps({s: ds[s].num_rows for s in ds} | {'first': ds['train'][0]['completion']}))\n",
        timeout=180,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["train"] == 200 and got["test"] == 200
    assert got["first"] == v.read("lr", "train")["completion"][0].as_py()


def test_push_is_idempotent(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    st, _ = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    push(st, "dfar", "org/dfar", **kw)
    commits_before = len(hub_server.requests_to("POST", COMMIT))
    again = push(st, "dfar", "org/dfar", **kw)
    assert again.commit is None and not again.created_commit
    assert len(hub_server.requests_to("POST", COMMIT)) == commits_before
    res = CliRunner().invoke(app, ["push", "dfar", "org/dfar", "--store", str(st.root), "--endpoint",
                                   hub_server.endpoint], env={"HF_TOKEN": hub_server.token})
    assert res.exit_code == 0, res.output
    assert "already there" in res.output


def test_second_version_replaces_files(hub_server: HubServer, dfar_small, dfar_source: Path, tmp_path) -> None:  # noqa: F811
    st, v1 = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    push(st, "dfar", "org/dfar", **kw)
    v2 = build_dfar(st, dfar_source, DfarConfig(limit=50)).version
    r2 = push(st, "dfar@v2", "org/dfar", **kw)
    assert r2.tag == "v2"
    fresh = DatasetStore(tmp_path / "fresh")
    assert pull(fresh, "org/dfar@v1", **kw).version.hash == v1.hash
    assert pull(fresh, "org/dfar@v2", **kw).version.hash == v2.hash
    assert [v.tag for v in fresh.versions("dfar")] == ["v1", "v2"]


def test_interrupted_push_then_retry(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, v = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    before = _files(v)
    # every attempt of this push loses its connection midway: the LFS objects are uploaded, then the server
    # drops the commit request (uploads dropped mid-object are retried inside huggingface_hub itself, with
    # ~23 s of sleeps, which test_hub_server covers)
    fault = hub_server.fail_next_commit(times=TRANSIENT_ATTEMPTS)
    with pytest.raises(CurateError, match="org/dfar"):
        push(st, "dfar", "org/dfar", **kw)
    assert fault.fired == TRANSIENT_ATTEMPTS
    uploads = len(hub_server.requests_to("PUT", r"^/__lfs/"))
    assert uploads == 6
    assert _files(st.get("dfar")) == before  # the local version is intact
    refs = hub_server.api().list_repo_refs("org/dfar", repo_type="dataset")
    assert refs.tags == []
    r = push(st, "dfar", "org/dfar", **kw)
    assert r.tag == "v1" and r.commit
    assert len(hub_server.requests_to("PUT", r"^/__lfs/")) == uploads  # the retry re-sent no object
    assert pull(DatasetStore(tmp_path / "fresh"), "org/dfar@v1", **kw).version.hash == v.hash


def test_single_dropped_connection_is_retried(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    st, _ = dfar_small
    hub_server.fail_next_commit(times=1)
    r = push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    assert r.created_commit and r.tag == "v1"


def test_tampered_file_is_refused(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, v = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    push(st, "dfar", "org/dfar", **kw)
    # someone commits a different parquet file over ours, leaving the manifest as it was
    forged = tmp_path / "forged.parquet"
    pq.write_table(pa.table({"id": ["x"], "prompt": ["p"], "completion": ["c"]}), forged)
    hub_server.api().upload_file(path_or_fileobj=str(forged), path_in_repo="lr/train-00000-of-00001.parquet",
                                 repo_id="org/dfar", repo_type="dataset")
    fresh = DatasetStore(tmp_path / "fresh")
    with pytest.raises(CurateError, match="content hash mismatch"):
        pull(fresh, "org/dfar", **kw)
    assert fresh.names() == [] and not any((fresh.root / "datasets").glob("*/versions/*"))
    assert pull(fresh, "org/dfar@v1", **kw).version.hash == v.hash  # the tag still holds the real data


def test_missing_repo_and_revision(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, _ = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    fresh = DatasetStore(tmp_path / "fresh")
    with pytest.raises(CurateError, match="org/nope not found"):
        pull(fresh, "org/nope", **kw)
    push(st, "dfar", "org/dfar", **kw)
    with pytest.raises(CurateError, match="has no revision 'v9'"):
        pull(fresh, "org/dfar@v9", **kw)
    res = CliRunner().invoke(app, ["pull", "org/nope", "--store", str(fresh.root), "--endpoint", hub_server.endpoint])
    assert res.exit_code == 1 and "not found" in res.output and "Traceback" not in res.output


def test_private_repo_needs_token(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, _ = dfar_small
    push(st, "dfar", "org/secret", private=True, endpoint=hub_server.endpoint, token=hub_server.token)
    assert hub_server.api().dataset_info("org/secret").private is True
    with pytest.raises(CurateError, match="private and no valid token"):
        pull(DatasetStore(tmp_path / "anon"), "org/secret", endpoint=hub_server.endpoint, token=False)  # type: ignore[arg-type]
    with pytest.raises(CurateError, match="not authorised|not found"):
        push(st, "dfar", "org/other", endpoint=hub_server.endpoint, token="hf_wrong")


def test_token_never_written(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, _ = dfar_small
    push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    fresh = DatasetStore(tmp_path / "fresh")
    pull(fresh, "org/dfar@v1", endpoint=hub_server.endpoint, token=hub_server.token)
    for root in (st.root, fresh.root):
        for p in root.rglob("*"):
            if p.is_file():
                assert hub_server.token.encode() not in p.read_bytes(), p


@pytest.mark.hub
@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("CURATE_TEST_HUB_REPO")),
    reason="real-Hub smoke test: set HF_TOKEN and CURATE_TEST_HUB_REPO=org/name (a repo you may write to)",
)
def test_real_hub_smoke(dfar_small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    st, v = dfar_small
    repo = os.environ["CURATE_TEST_HUB_REPO"]
    push(st, "dfar", repo, private=True, endpoint="https://huggingface.co")
    got = pull(DatasetStore(tmp_path / "fresh"), f"{repo}@{v.tag}", endpoint="https://huggingface.co")
    assert got.version.hash == v.hash


def test_hub_query_views_from_pushed_manifest(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    """`curate query --hub` reads the pushed manifest from the server and builds `hf://` views from it
    (DuckDB's hf:// itself always goes to huggingface.co, so the SQL is checked, not executed)."""
    from curate.sql_views import hub_views

    st, _ = dfar_small
    push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    specs = {s.name: s.sql() for s in hub_views("org/dfar@v1", endpoint=hub_server.endpoint)}
    assert set(specs) == {"dfar", "dfar__l", "dfar__lr"}
    assert "'hf://datasets/org/dfar@v1/lr/train-*.parquet'" in specs["dfar__lr"]
    with pytest.raises(CurateError, match="could not read manifest.json"):
        hub_views("org/dfar@v7", endpoint=hub_server.endpoint)


# ---- pull safety -----------------------------------------------------------------------------------------------
def _publish_crafted(hub_server: HubServer, v: Version, repo_id: str, tmp_path: Path, **manifest: object) -> None:  # noqa: F811
    """Publish a copy of a version whose manifest.json has some fields replaced (a repo someone crafted)."""
    folder = tmp_path / f"crafted-{repo_id.replace('/', '-')}"
    import shutil

    shutil.copytree(v.path, folder)
    (folder / "manifest.json").write_text(json.dumps(v.manifest | manifest, indent=2))
    api = hub_server.api()
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder))


def _everything(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_pull_refuses_unsafe_dataset_names(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, v = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    absolute = tmp_path / "abs-escape"
    _publish_crafted(hub_server, v, "org/relative", tmp_path, name="../../escape")
    _publish_crafted(hub_server, v, "org/absolute", tmp_path, name=str(absolute))
    push(st, "dfar", "org/dfar", **kw)
    area = tmp_path / "area"  # the store is area/one/store: `../../escape` would land in area/one/escape
    fresh = DatasetStore(area / "one" / "store")
    area.mkdir()
    for spec in ("org/relative", "org/absolute"):
        with pytest.raises(CurateError, match="is not allowed"):
            pull(fresh, spec, **kw)
    with pytest.raises(CurateError, match="--name '../x' is not allowed"):
        pull(fresh, "org/dfar", name="../x", **kw)
    assert _everything(area) == [] and not absolute.exists() and not (tmp_path / "escape").exists()
    for args in (["org/relative"], ["org/absolute"], ["org/dfar", "--name", "/tmp/x"], ["org/dfar", "--name", "a/b"]):
        res = CliRunner().invoke(app, ["pull", *args, "--store", str(fresh.root), "--endpoint", hub_server.endpoint],
                                 env={"HF_TOKEN": hub_server.token})
        assert res.exit_code == 1, res.output
        assert "not allowed" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert _everything(area) == [] and not absolute.exists()
    assert pull(fresh, "org/dfar", name="ok-name", **kw).version.name == "ok-name"  # a good name still works


def test_failed_pull_leaves_nothing_behind(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    st, v = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    push(st, "dfar", "org/dfar", **kw)
    # a store that exists already (holding a version) and one the pull would create
    existing = DatasetStore(tmp_path / "existing")
    pull(existing, "org/dfar@v1", name="other", **kw)
    before = _everything(existing.root)
    new = DatasetStore(tmp_path / "new")

    # network error while the data files download (after the manifest was read)
    hub_server.fail_next("GET", r"/resolve/.*\.parquet$", times=1000, action="status", status=403)
    for target in (existing, new):
        with pytest.raises(CurateError, match="org/dfar"):
            pull(target, "org/dfar@v1", **kw)
    hub_server.clear_faults()
    # hash mismatch: a forged shard committed over the real one
    forged = tmp_path / "forged.parquet"
    pq.write_table(pa.table({"id": ["x"], "prompt": ["p"], "completion": ["c"]}), forged)
    hub_server.api().upload_file(path_or_fileobj=str(forged), path_in_repo="lr/train-00000-of-00001.parquet",
                                 repo_id="org/dfar", repo_type="dataset")
    for target in (existing, new):
        with pytest.raises(CurateError, match="content hash mismatch"):
            pull(target, "org/dfar", **kw)
    assert _everything(existing.root) == before
    assert not new.root.exists()


# ---- push verification, atomic commits, tag checks ---------------------------------------------------------------
def test_push_refuses_a_damaged_version(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    st, v = dfar_small
    shard = v.path / "lr" / "train-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CurateError, match="damaged, nothing pushed"):
        push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    res = CliRunner().invoke(app, ["push", "dfar", "org/dfar", "--store", str(st.root), "--endpoint",
                                   hub_server.endpoint], env={"HF_TOKEN": hub_server.token})
    assert res.exit_code == 1 and "damaged" in res.output and "Traceback" not in res.output
    assert hub_server.requests_to("POST", r"/api/repos/create") == []
    assert hub_server.requests_to("POST", COMMIT) == []


def _multi_versions(st: DatasetStore, n: int) -> list[Version]:
    """n versions of one dataset sharing config `a` and differing in `b`, with 1..n shards (different file names),
    so a push that computed its deletions against a stale head would leave another version's shards behind."""
    shared = pa.table({"x": list(range(20))})
    out = []
    for i in range(n):
        with st.new_version("multi", builder="test", builder_version="1", params={"i": i}, sources=[]) as w:
            w.write_table("a", "train", shared)
            w.write_table("b", "train", pa.table({"x": list(range(i, i + 10 * (i + 1)))}), rows_per_shard=10)
        out.append(w.result.version)  # type: ignore[attr-defined]
    return out


def _remote_files(hub: HubServer, repo_id: str, rev: str) -> dict[str, str]:
    info = hub.api().dataset_info(repo_id, revision=rev, files_metadata=True)
    return {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in info.siblings if s.rfilename != ".gitattributes"}


def test_concurrent_pushes_of_different_versions(hub_server: HubServer, tmp_path: Path) -> None:  # noqa: F811
    """N pushes of different versions of one dataset to one repo at once: every tag holds exactly its version."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from curate.hub import version_files

    st = DatasetStore(tmp_path / "local")
    versions = _multi_versions(st, 4)
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    for rnd in range(3):
        repo = f"org/multi-{rnd}"
        with ThreadPoolExecutor(len(versions)) as pool:
            results = list(pool.map(lambda v, repo=repo: push(st, v.ref, repo, **kw), versions))
        assert sorted(r.tag for r in results) == [v.tag for v in versions]
        fresh = DatasetStore(tmp_path / f"fresh-{rnd}")
        for v in versions:
            expected = {rel: hashlib.sha256((v.path / rel).read_bytes()).hexdigest() for rel in version_files(v)}
            got = _remote_files(hub_server, repo, v.tag)
            assert set(got) == set(expected), (repo, v.tag)
            for rel in expected:
                if rel.endswith(".parquet"):
                    assert got[rel] == expected[rel], (repo, v.tag, rel)
            assert pull(fresh, f"{repo}@{v.tag}", **kw).version.hash == v.hash
    conflicts = [r for r in hub_server.requests_to("POST", COMMIT) if r.status == 412]
    assert conflicts, "the pushes never overlapped: the test did not exercise concurrency"


def test_conflicting_commit_is_retried_on_the_new_head(hub_server: HubServer, dfar_small) -> None:  # noqa: F811
    """A commit landing between the push's read of main and its commit: HTTP 412, the push re-reads and retries."""
    st, v = dfar_small
    api = hub_server.api()
    api.create_repo("org/dfar", repo_type="dataset")
    original = hub_server.app.repo_info
    fired = []

    async def repo_info_then_commit(request, p):  # type: ignore[no-untyped-def]
        response = await original(request, p)
        if not fired and p.get("rev") == "main" and request.query_params.get("blobs"):
            fired.append(1)
            import asyncio

            await asyncio.to_thread(api.upload_file, path_or_fileobj=b"interloper\n", path_in_repo="stray.txt",
                                    repo_id="org/dfar", repo_type="dataset")
        return response

    # land a commit right after the push's first read of main (the read with file metadata)
    hub_server.app.routes = [(m, pat, repo_info_then_commit if h == original else h)
                             for m, pat, h in hub_server.app.routes]
    r = push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    assert fired and [x.status for x in hub_server.requests_to("POST", COMMIT)].count(412) == 1
    assert "stray.txt" not in _remote_files(hub_server, "org/dfar", r.tag)


def test_mismatching_tag_is_reported_and_repaired(hub_server: HubServer, dfar_small, tmp_path: Path) -> None:  # noqa: F811
    """The tag's manifest.json says the right hash but a shard was swapped: push checks files, not the manifest."""
    st, v = dfar_small
    kw = {"endpoint": hub_server.endpoint, "token": hub_server.token}
    api = hub_server.api()
    push(st, "dfar", "org/dfar", **kw)
    forged = tmp_path / "forged.parquet"
    pq.write_table(pa.table({"id": ["x"], "prompt": ["p"], "completion": ["c"]}), forged)
    bad = api.upload_file(path_or_fileobj=str(forged), path_in_repo="lr/train-00000-of-00001.parquet",
                          repo_id="org/dfar", repo_type="dataset")
    api.delete_tag("org/dfar", repo_type="dataset", tag="v1")
    api.create_tag("org/dfar", repo_type="dataset", tag="v1", revision=bad.oid)

    with pytest.raises(CurateError, match=r"tag v1 .* does not hold dfar@v1: lr/train-00000-of-00001.parquet.*repair"):
        push(st, "dfar", "org/dfar", **kw)
    res = CliRunner().invoke(app, ["push", "dfar", "org/dfar", "--store", str(st.root), "--endpoint",
                                   hub_server.endpoint], env={"HF_TOKEN": hub_server.token})
    assert res.exit_code == 1 and "--repair" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["push", "dfar", "org/dfar", "--repair", "--store", str(st.root), "--endpoint",
                                   hub_server.endpoint], env={"HF_TOKEN": hub_server.token})
    assert res.exit_code == 0, res.output
    assert "repaired" in res.output
    tag = next(t for t in api.list_repo_refs("org/dfar", repo_type="dataset").tags if t.name == "v1")
    assert tag.target_commit != bad.oid
    assert pull(DatasetStore(tmp_path / "fresh"), "org/dfar@v1", **kw).version.hash == v.hash
    assert push(st, "dfar", "org/dfar", **kw).commit is None  # now already there


# ---- caches per endpoint -------------------------------------------------------------------------------------
def test_caches_are_per_endpoint(hub_server: HubServer, dfar_small, dfar_source: Path, tmp_path: Path,  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers host `org/dfar` with different content under the same tag: neither answers for the other, and
    nothing lands in the shared hub cache under the bare repo id."""
    import huggingface_hub.constants as hf_constants

    from curate.hub import endpoint_cache_dir

    from .hub_server.fixture import run_hub_server

    home = tmp_path / "hf-home"
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    st, v = dfar_small
    other_store = DatasetStore(tmp_path / "other")
    other = build_dfar(other_store, dfar_source, DfarConfig(limit=30)).version
    with run_hub_server(tmp_path / "hub2") as second:
        assert second.endpoint != hub_server.endpoint
        push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
        push(other_store, "dfar", "org/dfar", endpoint=second.endpoint, token=second.token)
        a = pull(DatasetStore(tmp_path / "a"), "org/dfar@v1", endpoint=hub_server.endpoint, token=hub_server.token)
        b = pull(DatasetStore(tmp_path / "b"), "org/dfar@v1", endpoint=second.endpoint, token=second.token)
        assert (a.version.hash, b.version.hash) == (v.hash, other.hash)
        dirs = {endpoint_cache_dir(hub_server.endpoint), endpoint_cache_dir(second.endpoint)}
    assert len(dirs) == 2 and all(d.parent == home / "curate-endpoints" for d in dirs)
    assert all(any(d.rglob("manifest.json")) for d in dirs)
    assert not (home / "hub").exists() or not any((home / "hub").glob("datasets--org--dfar"))


# ---- every Hub error is one line -------------------------------------------------------------------------------
def _one_line_error(args: list[str], env: dict[str, str] | None = None) -> str:
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in res.output and len(errors) == 1 and res.output.strip().endswith(errors[0]), res.output
    return errors[0]


def test_hub_errors_are_one_line(hub_server: HubServer, dfar_small, tmp_path: Path,  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import huggingface_hub.constants as hf_constants

    st, _ = dfar_small
    push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    store = ["--store", str(tmp_path / "fresh")]
    ep = ["--endpoint", hub_server.endpoint]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert "cannot reach" in _one_line_error(["pull", "org/dfar", *store, "--endpoint", dead])
    assert "cannot reach" in _one_line_error(["push", "dfar", "org/dfar", "--store", str(st.root), "--endpoint", dead])
    assert "HTTP 401" in _one_line_error(["pull", "org/dfar", *store, *ep], env={"HF_TOKEN": "hf_wrong"})
    assert "HTTP 401" in _one_line_error(["push", "dfar", "org/x", "--store", str(st.root), *ep],
                                         env={"HF_TOKEN": "hf_wrong"})
    assert "not found" in _one_line_error(["pull", "org/nope", *store, *ep], env={"HF_TOKEN": hub_server.token})
    assert "no revision 'v9'" in _one_line_error(["pull", "org/dfar@v9", *store, *ep],
                                                 env={"HF_TOKEN": hub_server.token})
    assert "no revision" in _one_line_error(["pull", "org/dfar@bad%2Frev", *store, *ep],
                                            env={"HF_TOKEN": hub_server.token})
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert "offline" in _one_line_error(["pull", "org/dfar", *store, *ep], env={"HF_TOKEN": hub_server.token})
    assert not (tmp_path / "fresh").exists()
