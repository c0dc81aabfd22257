"""Downloads against a real HTTP server on 127.0.0.1: transient failures are retried, the rest is one line."""

from __future__ import annotations

import io
import socket
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.sources import download


class Server:
    """Serves `files` by path; `/flaky/...` answers 503 twice, `/cut/...` drops the body once, then both serve."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.hits[self.path] += 1
                kind, _, rest = self.path.lstrip("/").partition("/")
                body = server.files.get(rest)
                if body is None:
                    self.send_error(404)
                elif kind == "flaky" and server.hits[self.path] <= 2:
                    self.send_error(503)
                elif kind == "cut" and server.hits[self.path] == 1:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])  # then the connection closes mid-body
                    self.close_connection = True
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _ethics_tar(ethics_source: Path) -> bytes:
    """A small ETHICS tarball laid out as upstream's (`ethics/<subset>/<file>`), from the first real rows."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for rel in ("justice/justice_test.csv", "virtue/virtue_test.csv"):
            data = b"".join((ethics_source / rel).read_bytes().splitlines(keepends=True)[:25])
            info = tarfile.TarInfo(f"ethics/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def server(dfar_source: Path, ethics_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CURATE_DOWNLOAD_BACKOFF_S", "0.05")
    s = Server({"DFAR_trainset.csv": (dfar_source / "DFAR_trainset.csv").read_bytes(),
                "ethics.tar": _ethics_tar(ethics_source)})
    yield s
    s.close()


def test_retries_503_then_serves(server: Server, dfar_source: Path) -> None:
    path = download(f"{server.url}/flaky/DFAR_trainset.csv")
    assert path.read_bytes() == (dfar_source / "DFAR_trainset.csv").read_bytes()
    assert server.hits["/flaky/DFAR_trainset.csv"] == 3
    assert not list(path.parent.glob("*.part"))
    download(f"{server.url}/flaky/DFAR_trainset.csv")  # cached: no new request
    assert server.hits["/flaky/DFAR_trainset.csv"] == 3


def test_retries_a_body_cut_off_midway(server: Server, dfar_source: Path) -> None:
    path = download(f"{server.url}/cut/DFAR_trainset.csv")
    assert path.read_bytes() == (dfar_source / "DFAR_trainset.csv").read_bytes()
    assert server.hits["/cut/DFAR_trainset.csv"] == 2


def test_gives_up_after_the_retries(server: Server) -> None:
    with pytest.raises(CurateError, match=r"could not download .*/flaky/DFAR_trainset.csv: HTTP 503 \(after 2"):
        download(f"{server.url}/flaky/DFAR_trainset.csv", retries=1)


def test_cli_build_from_a_flaky_url(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/flaky/ethics.tar"
    res = CliRunner().invoke(app, ["build", "ethics", "--source", url, "--store", str(tmp_path / "s"),
                                   "--subsets", "justice,virtue"])
    assert res.exit_code == 0, res.output
    assert "built ethics@v1" in res.output
    assert server.hits["/flaky/ethics.tar"] == 3


@pytest.mark.parametrize("case", ["404", "unreachable"])
def test_cli_errors_name_the_url(case: str, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_DOWNLOAD_RETRIES", "1")
    if case == "404":
        url = f"{server.url}/plain/nope.tar"
    else:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/ethics.tar"
    res = CliRunner().invoke(app, ["build", "ethics", "--source", url, "--store", str(tmp_path / "s")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()  # retry warnings, then the error
    assert all(x.startswith("WARNING") for x in lines[:-1]), res.output
    assert lines[-1].startswith("error: ") and f"could not download {url}" in lines[-1], res.output
    assert "Traceback" not in res.output
    if case == "404":
        assert "HTTP 404" in res.output and server.hits["/plain/nope.tar"] == 1  # not retried
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.parquet"))


def test_unresolvable_host_is_one_line_at_once(tmp_path: Path) -> None:
    """A host that cannot resolve (offline, or a typo: `.invalid` never resolves, RFC 6761) is not retried: one
    line naming the host and the way out, without the retry warnings and back-off of a transient failure."""
    url = "https://no-such-host.invalid/ethics.tar"
    res = CliRunner().invoke(app, ["build", "ethics", "--source", url, "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0] == (f"error: could not download {url}: cannot resolve no-such-host.invalid (offline? give a "
                        "local folder with --source)")
