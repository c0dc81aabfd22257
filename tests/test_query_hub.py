"""`curate query --hub` end to end against the Hub look-alike: HfFileSystem registered with DuckDB, so any
Hub-compatible endpoint works and nothing (no httpfs extension) is downloaded."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import curate
from builders.dfar import DfarConfig, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.hub import push
from curate.store import DatasetStore, Version

from .hub_server.fixture import HubServer, hub_server  # noqa: F401

SQL = "SELECT split, label, count(*) AS n FROM dfar GROUP BY ALL ORDER BY ALL"


@pytest.fixture
def pushed(hub_server: HubServer, tmp_path: Path, dfar_source: Path) -> Version:  # noqa: F811
    st = DatasetStore(tmp_path / "local")
    v = build_dfar(st, dfar_source, DfarConfig(limit=200)).version
    push(st, "dfar", "org/dfar", endpoint=hub_server.endpoint, token=hub_server.token)
    return v


def _expected(v: Version, config: str = "default") -> list[str]:
    """The counts straight from the local parquet with pyarrow (the pushed bytes are the same files)."""
    t = v.read(config)
    counts = Counter(zip(t.column("split").to_pylist(), t.column("label").to_pylist(), strict=True))
    return ["split,label,n"] + [f"{s},{lab},{n}" for (s, lab), n in sorted(counts.items())]


def _invoke(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(app, args, env=env)


def test_query_hub_with_endpoint_option(hub_server: HubServer, pushed: Version) -> None:  # noqa: F811
    res = _invoke(["query", "--hub", "org/dfar@v1", "--endpoint", hub_server.endpoint, SQL, "--format", "csv"],
                  {"HF_TOKEN": hub_server.token})
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == _expected(pushed)
    # the parquet came from this server (through HfFileSystem), not from huggingface.co
    assert hub_server.requests_to("GET", r"^/datasets/org/dfar/resolve/v1/default/.*\.parquet$")


def test_query_hub_honours_hf_endpoint(hub_server: HubServer, pushed: Version) -> None:  # noqa: F811
    """`HF_ENDPOINT` set now counts, though huggingface_hub read it once at import."""
    res = _invoke(["query", "--hub", "org/dfar", SQL.replace("FROM dfar", "FROM dfar__lr"), "--format", "csv"],
                  {"HF_TOKEN": hub_server.token, "HF_ENDPOINT": hub_server.endpoint})
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == _expected(pushed, "lr")


def test_python_api_over_the_hub(hub_server: HubServer, pushed: Version) -> None:  # noqa: F811
    df = curate.query('SELECT count(*) AS n FROM dfar__l WHERE split = \'test\'', hub="org/dfar@v1",
                      endpoint=hub_server.endpoint, token=hub_server.token)
    assert df.item() == pushed.num_rows("l") - len(pushed.read("l", "train"))


def test_unknown_revision_is_one_line(hub_server: HubServer, pushed: Version) -> None:  # noqa: F811
    res = _invoke(["query", "--hub", "org/dfar@v9", "--endpoint", hub_server.endpoint, SQL],
                  {"HF_TOKEN": hub_server.token})
    _one_line(res, "org/dfar@v9")
    with pytest.raises(CurateError, match="could not read manifest.json"):
        curate.query(SQL, hub="org/nothing", endpoint=hub_server.endpoint, token=hub_server.token)


def test_offline_is_one_line(hub_server: HubServer) -> None:  # noqa: F811
    """A refused connection (nothing listening) ends as one line naming the endpoint, not a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connections to it are refused
    endpoint = f"http://127.0.0.1:{port}"
    res = _invoke(["query", "--hub", "org/dfar@v1", "--endpoint", endpoint, SQL], {})
    _one_line(res, endpoint)


def test_parquet_failing_mid_query_is_one_line(hub_server: HubServer, pushed: Version) -> None:  # noqa: F811
    """The manifest is read, then every parquet download fails: still one line, exit 1."""
    hub_server.fail_next("GET", r"\.parquet", times=1000, action="status", status=404)
    res = _invoke(["query", "--hub", "org/dfar@v1", "--endpoint", hub_server.endpoint, SQL],
                  {"HF_TOKEN": hub_server.token})
    _one_line(res, "404")
    assert "-00000-of-00001.parquet" in res.output and "Traceback" not in res.output


def test_endpoint_needs_hub(tmp_path: Path) -> None:
    res = _invoke(["query", "SELECT 1", "--endpoint", "http://127.0.0.1:1", "--store", str(tmp_path)], {})
    _one_line(res, "--endpoint only applies with --hub")


def _one_line(res: Result, names: str) -> None:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and names in lines[0], res.output
