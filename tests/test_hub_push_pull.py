"""Push and pull versions through the real huggingface_hub client against the Hub-compatible test server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from builders.dfar import DfarParams, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.hub import TRANSIENT_ATTEMPTS, pull, push
from curate.store import DatasetStore, Version

from .hub_server.fixture import HubServer, hub_server  # noqa: F401

COMMIT = r"/commit/"


@pytest.fixture
def dfar_small(tmp_path: Path, dfar_source: Path) -> tuple[DatasetStore, Version]:
    st = DatasetStore(tmp_path / "local")
    return st, build_dfar(st, dfar_source, DfarParams(limit=200)).version


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
    v2 = build_dfar(st, dfar_source, DfarParams(limit=50)).version
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
