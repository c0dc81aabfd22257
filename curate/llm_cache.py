"""The LLM client's persistent response cache: completed replies and submitted batches in one SQLite file.

Split out of `curate.llm` so the cache (what is stored, under which key) can be read and tested on its own.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, str]]
CACHE_FILE = "responses.sqlite"


def cache_key(model: str, messages: Messages, params: Mapping[str, Any], sample: int,
              endpoint: str | None = None) -> str:
    """sha256 over everything that determines a reply: endpoint, model, messages, sampling params, sample index.

    ``endpoint`` is the base URL with credentials stripped (`curate.urls.redact_url`): the same model name
    behind two servers (a local vLLM "gpt-3.5-turbo", a replay server, OpenAI) are different models.
    """
    payload = {
        "endpoint": endpoint,
        "model": model,
        "messages": [dict(m) for m in messages],
        "params": {k: v for k, v in sorted(params.items()) if v is not None},
        "sample": sample,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Completed replies and submitted batches in one SQLite file.

    sqlite3 rather than a cache library: it is in the standard library, it is one file that is easy to
    copy or delete, and each reply is committed in its own transaction (WAL journal), so a run killed at
    any point keeps every reply received before it and a resume never repeats a paid call.
    ``path=None`` keeps the cache in memory (nothing persists).
    """

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        with self._lock, self._db:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, model TEXT, request TEXT,"
                " text TEXT, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,"
                " source TEXT, created REAL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, input_file_id TEXT,"
                " keys TEXT, status TEXT, created REAL)"
            )

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None, int, int]]:
        found: dict[str, tuple[str, str | None, int, int]] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, text, finish_reason, prompt_tokens, completion_tokens FROM completions"
                    f" WHERE key IN ({marks})",
                    chunk,
                ).fetchall()
                for key, text, finish, pt, ct in rows:
                    found[key] = (text, finish, pt, ct)
        return found

    def put(self, key: str, model: str, request: Mapping[str, Any], text: str, finish_reason: str | None,
            prompt_tokens: int, completion_tokens: int, source: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, json.dumps(request, ensure_ascii=False), text, finish_reason, prompt_tokens,
                 completion_tokens, source, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM completions").fetchone()[0])

    def add_batch(self, batch_id: str, input_file_id: str, keys: Sequence[str]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?)",
                (batch_id, input_file_id, json.dumps(list(keys)), "submitted", time.time()),
            )

    def set_batch_status(self, batch_id: str, status: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))

    def open_batches(self) -> dict[str, set[str]]:
        """Batches submitted but not yet ingested: batch id -> the cache keys it will answer."""
        with self._lock:
            rows = self._db.execute("SELECT batch_id, keys FROM batches WHERE status = 'submitted'").fetchall()
        return {batch_id: set(json.loads(keys)) for batch_id, keys in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
