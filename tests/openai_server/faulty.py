"""A misbehaving OpenAI-compatible server on 127.0.0.1, one fault mode at a time, for the endpoint tests.

Raw asyncio rather than FastAPI/uvicorn: several faults (a body dripped one byte a second, an endless chunked
body, a Content-Length the body never reaches, bytes that are not UTF-8) are below what a web framework lets
a handler send. It answers ``POST .../chat/completions`` only; ``GET .../replay`` is 404 (not a replay server).

Healthy replies are ``"Answer: <last user message>"`` with ``finish_reason: stop`` and real-looking usage. A
fault applies to requests whose body contains ``match`` (every request when None), at most ``times`` times.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

CUT_ANSWER = "It is usually best to act with care and resp"
REFUSAL = "I'm sorry, but I can't help with that."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    body: dict[str, Any]
    fault: str | None


@dataclass
class FaultyServer:
    mode: str | None = None
    match: str | None = None
    times: int | None = None
    seen: list[Seen] = field(default_factory=list)
    _faults_sent: int = 0

    def start(self) -> FaultyServer:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fault(self, mode: str | None, match: str | None = None, times: int | None = None) -> None:
        self.mode, self.match, self.times, self._faults_sent = mode, match, times, 0

    def reset(self) -> None:
        self.fault(None)
        self.seen = []

    @property
    def calls(self) -> int:
        return sum(1 for s in self.seen if s.path.endswith("/chat/completions"))

    # ---------------------------------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            path = path.split("?")[0]
            if method != "POST" or not path.endswith("/chat/completions"):
                await self._send(writer, 404, b'{"error": {"message": "not found"}}')
                return
            body = json.loads(raw)
            fault = self._pick(raw)
            self.seen.append(Seen(path, body, fault))
            await self._reply(writer, body, fault)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _pick(self, raw: bytes) -> str | None:
        if self.mode is None or (self.match is not None and self.match.encode() not in raw):
            return None
        if self.times is not None and self._faults_sent >= self.times:
            return None
        self._faults_sent += 1
        return self.mode

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: bytes, ctype: str = "application/json",
                    extra: dict[str, str] | None = None) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items()) + "Connection: close\r\n\r\n"
        writer.write(head.encode() + payload)
        await writer.drain()

    @staticmethod
    def completion(body: dict[str, Any], content: Any = None, finish: str = "stop", usage: Any = "auto",
                   **message: Any) -> dict[str, Any]:
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        text = f"Answer: {user[-300:]}" if content is None else content
        out: dict[str, Any] = {
            "id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, **message},
                         "finish_reason": finish}],
        }
        if usage == "auto":
            usage = {"prompt_tokens": len(user.split()), "completion_tokens": len(str(text).split()),
                     "total_tokens": len(user.split()) + len(str(text).split())}
        if usage is not None:
            out["usage"] = usage
        return out

    async def _reply(self, writer: asyncio.StreamWriter, body: dict[str, Any], fault: str | None) -> None:
        ok = self.completion(body)
        js = "application/json"
        if fault is None or (fault == "length" and (body.get("max_tokens") or 0) > 512):
            await self._send(writer, 200, json.dumps(ok).encode())
        elif fault == "length":
            await self._send(writer, 200, json.dumps(self.completion(body, CUT_ANSWER, "length")).encode())
        elif fault == "content_filter":
            await self._send(writer, 200, json.dumps(self.completion(body, REFUSAL, "content_filter")).encode())
        elif fault == "null":
            payload = self.completion(body)
            payload["choices"][0]["message"]["content"] = None
            await self._send(writer, 200, json.dumps(payload).encode())
        elif fault == "refusal":
            payload = self.completion(body, refusal=REFUSAL)
            payload["choices"][0]["message"]["content"] = None
            await self._send(writer, 200, json.dumps(payload).encode())
        elif fault in ("no_usage", "negative_usage", "null_usage"):
            usage = {"no_usage": None, "null_usage": {"prompt_tokens": None, "completion_tokens": None},
                     "negative_usage": {"prompt_tokens": -10_000_000, "completion_tokens": -10_000_000}}[fault]
            payload = self.completion(body, usage=usage)
            await self._send(writer, 200, json.dumps(payload).encode())
        elif fault == "drip":  # a whole valid reply, one byte a second
            payload = json.dumps(ok).encode()
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {js}\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
            for b in payload:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(1)
        elif fault == "endless":  # a chunked body that never ends, a few bytes a tenth of a second
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {js}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            writer.write(b"1\r\n{\r\n")
            while True:
                writer.write(b"4\r\n    \r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        elif fault == "retry_after":
            await self._send(writer, 429, b'{"error": {"message": "Rate limit reached"}}',
                             extra={"Retry-After": "3600"})
        elif fault == "invalid_json":
            await self._send(writer, 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
        elif fault == "html200":
            await self._send(writer, 200, b"<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
        elif fault == "no_choices":
            payload = self.completion(body)
            del payload["choices"]
            await self._send(writer, 200, json.dumps(payload).encode())
        elif fault == "empty_choices":
            payload = self.completion(body)
            payload["choices"] = []
            await self._send(writer, 200, json.dumps(payload).encode())
        elif fault == "html500":
            await self._send(writer, 500, b"<html><body>500 Internal Server Error</body></html>", "text/html")
        elif fault == "401":
            await self._send(writer, 401, b'{"error": {"message": "Incorrect API key provided", '
                                          b'"type": "invalid_request_error", "code": "invalid_api_key"}}')
        elif fault == "404":
            await self._send(writer, 404, b'{"error": {"message": "The model does not exist", '
                                          b'"type": "invalid_request_error", "code": "model_not_found"}}')
        elif fault == "non_utf8":
            payload = json.dumps(self.completion(body, "caf\x00E9")).encode().replace(b"\\u0000", b"\xff\xfe")
            await self._send(writer, 200, payload)
        elif fault == "surrogate":
            payload = json.dumps(self.completion(body, "half a pair: \ud800"), ensure_ascii=True).encode()
            await self._send(writer, 200, payload)
        elif fault == "huge":  # 20 MB of answer
            await self._send(writer, 200, json.dumps(self.completion(body, "word " * 4_000_000)).encode())
        elif fault == "huge_chunked":  # 20 MB of answer with no Content-Length: only counting can stop it
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {js}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            payload = json.dumps(self.completion(body, "word " * 4_000_000)).encode()
            for start in range(0, len(payload), 65536):
                chunk = payload[start : start + 65536]
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif fault == "nul":  # a NUL character inside the answer: valid JSON and valid text
            text = "Answer: keep\x00this " + body["messages"][-1]["content"][-80:]
            await self._send(writer, 200, json.dumps(self.completion(body, text)).encode())
        elif fault == "reset":  # the connection drops before any reply
            writer.transport.abort()
        else:
            raise ValueError(f"unknown fault {fault!r}")
