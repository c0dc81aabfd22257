"""Run the replay server in a background thread of this process (tests, benchmarks, notebooks).

``with OpenAIServer() as server: LLMClient(LLMConfig(base_url=server.base_url))...`` — a free port on
127.0.0.1, knobs for faults and latency, and the server's counters.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from curate.replay.app import FAULT_KINDS, ServerState, create_app
from curate.replay.recording import Q100, Lookup, data_available, default_data_dir, recording_sources


class OpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 (free port), run by uvicorn in a daemon thread."""

    def __init__(self, data_dir: Path | None = None):
        data_dir = data_dir or default_data_dir()
        if not data_available(data_dir):
            raise FileNotFoundError(f"SaGE q100 files not found under {data_dir / Q100}")
        self.data_dir = data_dir
        self.state = ServerState(lookup=Lookup.from_dir(data_dir), sources=recording_sources(data_dir))
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OpenAIServer:
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
        # and without it every reply waits ~40 ms for a delayed ACK (Nagle) between headers and body.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves this very socket
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1, backlog=1024)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="openai-replay-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("replay OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ knobs and counters
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        """chat.completions requests received (faulted and stalled ones included)."""
        return self.state.calls

    @property
    def calls_by_prompt(self) -> Counter[str]:
        """Requests received per user-message text."""
        return self.state.calls_by_prompt

    @property
    def served_by_prompt(self) -> Counter[str]:
        """Successful replies per user-message text (online and batch): >1 means paid twice."""
        return self.state.served_by_prompt

    @property
    def batch_lines(self) -> int:
        return self.state.batch_lines

    def set_faults(self, rate: float, kinds: Sequence[str] = FAULT_KINDS, *, seed: int = 0,
                   retry_after_s: float = 0.05, stall_s: float = 3.0) -> None:
        """Fail ``rate`` of requests with a kind drawn from ``kinds`` (seeded, so runs repeat)."""
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
        with self.state.lock:
            self.state.fault_rate = rate
            self.state.fault_kinds = tuple(kinds)
            self.state.rng = random.Random(seed)
            self.state.retry_after_s = retry_after_s
            self.state.stall_s = stall_s

    def set_latency(self, seconds: float) -> None:
        self.state.latency_s = seconds

    def set_batch_delay(self, seconds: float) -> None:
        """Batches report ``in_progress`` until this long after creation."""
        self.state.batch_delay_s = seconds

    def reset_counts(self) -> None:
        self.state.reset_counts()

    def reset(self) -> None:
        """Counts cleared, faults off, no latency or batch delay."""
        self.set_faults(0.0)
        self.set_latency(0.0)
        self.set_batch_delay(0.0)
        self.reset_counts()

    def stats(self) -> dict[str, Any]:
        s = self.state
        return {
            "calls": s.calls, "faults": dict(s.faults), "kinds": dict(s.kinds),
            "routes": dict(s.requests_by_route), "batch_lines": s.batch_lines,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        }
