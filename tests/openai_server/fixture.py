"""The ``openai_server`` pytest fixture: one `curate.replay.server.OpenAIServer` per test session.

Use in a test module with ``from tests.openai_server.fixture import openai_server  # noqa: F401``. Every
test gets it with counts reset, faults off and no latency.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator

import pytest

from curate.replay.recording import Q100, data_available, default_data_dir
from curate.replay.server import OpenAIServer

DEFAULT_DATA_DIR = default_data_dir()
_SHARED: OpenAIServer | None = None

__all__ = ["DEFAULT_DATA_DIR", "OpenAIServer", "data_available", "openai_server", "shared_server"]


def shared_server() -> OpenAIServer:
    """One server per test session, started on first use and stopped when the interpreter exits."""
    global _SHARED
    if _SHARED is None:
        _SHARED = OpenAIServer(DEFAULT_DATA_DIR).start()
        atexit.register(_SHARED.stop)
    return _SHARED


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """The session's replay server, reset (counts, faults, latency) for this test."""
    if not data_available(DEFAULT_DATA_DIR):
        pytest.skip(f"real SaGE data not found at {DEFAULT_DATA_DIR / Q100} (expected ../shared/data)")
    server = shared_server()
    server.reset()
    yield server
    server.reset()
