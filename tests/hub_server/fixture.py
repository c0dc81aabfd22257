"""The ``hub_server`` pytest fixture: the Hub look-alike on 127.0.0.1, one fresh server (and folder) per test.

Use it from a test module with ``from tests.hub_server.fixture import hub_server  # noqa: F401`` or, for the whole
suite, ``pytest_plugins = ["tests.hub_server.fixture"]`` in the root ``conftest.py``.

Client configuration, and why:

* ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import time. In-process code therefore passes the endpoint
  explicitly (``hub.api()`` is an ``HfApi(endpoint=..., token=...)``; ``hf_hub_download(..., endpoint=hub.endpoint)``).
  Code that only honours the environment (``datasets.load_dataset``, a CLI) runs in a subprocess with
  ``hub.env()`` / ``hub.run_python()``, exactly as a user would run it.
* With ``hf_xet`` installed, ``upload_folder`` / ``create_commit`` upload through Xet unconditionally (the server
  cannot opt out), and this server speaks plain LFS only. So ``HF_HUB_DISABLE_XET=1`` is set for subprocesses and,
  for the duration of each test, ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` is set to True in-process (the
  variable has already been read at import time, so the environment alone would be too late).
* ``HF_HUB_OFFLINE`` is removed (and ``constants.HF_HUB_OFFLINE`` forced to False during the test): offline mode
  blocks every request, including requests to this local server. Telemetry is disabled too (in-process and in
  subprocesses): with it on, the client fetches ``{constants.ENDPOINT}/api/agent-harnesses``, which in-process is
  the real huggingface.co.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import uvicorn

from .app import Fault, FaultAction, HubApp, HubConfig, RequestRecord, create_app

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# Variables that would make a client ignore (or mis-route) this server.
_SCRUBBED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_DATASETS_CACHE",
    "HUGGINGFACE_CO_STAGING",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
UPLOAD_PATH = r"^/__lfs/"  # LFS object PUTs (the pre-signed "S3" URLs handed out by the batch API)
COMMIT_PATH = r"^/api/[a-z]+s/[^/]+/[^/]+/commit/"
RESOLVE_PATH = r"/resolve/"


@dataclass
class HubServer:
    """Handle on a running server: where it is, how to authenticate, where it stores things, how to break it."""

    endpoint: str
    token: str
    root: Path
    user: str
    app: HubApp = field(repr=False)

    # clients --------------------------------------------------------------------------------------------------
    def api(self, token: str | bool | None = None) -> HfApi:
        """An ``HfApi`` bound to this server; ``token=False`` gives an anonymous client."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token if token is None else token)

    def env(self, hf_home: str | Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should use this server (fresh, empty HF_HOME unless given)."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        home = Path(hf_home) if hf_home is not None else self.root.parent / f"hf-home-{uuid.uuid4().hex[:8]}"
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_TOKEN=self.token,
            HF_HOME=str(home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        env.update(extra)
        return env

    def run_python(
        self,
        code: str,
        *,
        hf_home: str | Path | None = None,
        extra_env: dict[str, str] | None = None,
        timeout: float = 120.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code`` against this server; on failure (``check``) the assertion shows its output."""
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env(hf_home, **(extra_env or {})),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"subprocess failed (rc={result.returncode})\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
        return result

    # fault injection ------------------------------------------------------------------------------------------
    def fail_next(
        self,
        method: str | None,
        path_regex: str,
        times: int = 1,
        *,
        action: FaultAction = "drop",
        status: int = 503,
        after_bytes: int | None = None,
    ) -> Fault:
        """Arm a fault for the next ``times`` matching requests (see ``app.Fault`` for the actions)."""
        return self.app.faults.add(Fault(method, path_regex, times, action, status, after_bytes))

    def fail_next_upload(self, times: int = 1, *, after_bytes: int | None = None) -> Fault:
        """Drop the TCP connection in the middle of the next ``times`` LFS object uploads."""
        return self.fail_next("PUT", UPLOAD_PATH, times, after_bytes=after_bytes)

    def fail_next_commit(self, times: int = 1, *, after_bytes: int | None = None) -> Fault:
        """Drop the connection while the next commit request is being received (the commit is never applied)."""
        return self.fail_next("POST", COMMIT_PATH, times, after_bytes=after_bytes)

    def fail_next_download(self, times: int = 1, *, after_bytes: int | None = None) -> Fault:
        """Cut the next file download(s) after ``after_bytes`` of the body (default: half)."""
        return self.fail_next("GET", RESOLVE_PATH, times, action="truncate", after_bytes=after_bytes)

    def clear_faults(self) -> None:
        self.app.faults.clear()

    # observation ----------------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, in order (method, raw path, status, injected fault)."""
        return list(self.app.log)

    def requests_to(self, method: str, path_regex: str) -> list[RequestRecord]:
        import re

        return [r for r in self.app.log if r.method == method and re.search(path_regex, r.path)]


@contextmanager
def run_hub_server(
    root: Path,
    *,
    user: str = "hub-tester",
    lfs_threshold: int = 10 * 1024 * 1024,
) -> Iterator[HubServer]:
    """Start uvicorn on 127.0.0.1 (a free port) in a daemon thread; stop it on exit. Usable outside pytest."""
    token = f"hf_test_{uuid.uuid4().hex}"
    config = HubConfig({token: user}, lfs_threshold)
    asgi, hub = create_app(root, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            asgi,
            http="h11",  # fault injection reaches the TCP transport through uvicorn's h11 request cycle
            lifespan="off",
            proxy_headers=False,
            access_log=False,
            log_level="warning",
            timeout_keep_alive=30,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hub-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("hub server failed to start")
        time.sleep(0.01)
    try:
        yield HubServer(f"http://127.0.0.1:{port}", token, root, user, hub)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh Hub look-alike per test, with the in-process ``huggingface_hub`` set up to use plain LFS."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # with telemetry on, building the user agent fetches an "agent harness" registry from constants.ENDPOINT,
    # i.e. the real huggingface.co: keep that from happening now that offline mode is lifted
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with run_hub_server(tmp_path / "hub") as server:
        yield server
