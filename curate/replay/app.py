"""An OpenAI-compatible HTTP server that replays real gpt-3.5-turbo data, for offline runs, tests and benchmarks.

It answers ``POST /v1/chat/completions`` from a lookup table built from the SaGE q100 files: a prompt that
contains one of the 500 recorded paraphrases gets gpt-3.5-turbo's recorded answer to it, and a prompt
that contains a recorded answer (a Rule-of-Thumb prompt) gets the recorded RoT. Texts are found inside
the prompt, so any template that embeds the question (or question and answer) works; the templates in
``curate.prompts`` take a fast exact path. A prompt with no recording gets HTTP 404 with an OpenAI-style
error body (code ``no_recording``), never made-up text. ``GET /v1/replay`` lists the recording files and
their sha256, so a build can tell it is replaying and record what from.

It also implements the slice of the Files and Batch APIs that ``curate.llm`` uses, counts every request,
can inject faults (429 with Retry-After, 500, a stalled reply that outlives the client timeout) at a
seeded rate, and can add a fixed latency for throughput measurements.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from curate.replay.recording import Lookup

FAULT_KINDS = ("429", "500", "stall")


def approx_tokens(text: str) -> int:
    """OpenAI's rule of thumb of ~4 characters per token (no tokenizer download needed offline)."""
    return max(1, math.ceil(len(text) / 4))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Chat prompt tokens: content plus the ~4 framing tokens per message and 3 for the reply primer."""
    return sum(approx_tokens(str(m.get("content") or "")) + 4 for m in messages) + 3


class NoRecording(LookupError):
    """The prompt has no recorded reply: answered with HTTP 404, never with made-up text."""


@dataclass
class ServerState:
    """Everything the server counts and every knob a test turns. Mutated from the test thread."""

    lookup: Lookup
    sources: list[dict[str, Any]] = field(default_factory=list)  # the recording files and their sha256
    latency_s: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 0.05
    stall_s: float = 3.0
    batch_delay_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    calls: int = 0  # chat.completions HTTP requests received, faulted ones included
    calls_by_prompt: Counter[str] = field(default_factory=Counter)
    served_by_prompt: Counter[str] = field(default_factory=Counter)  # successful replies per prompt
    faults: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # answer / rot / unknown
    requests_by_route: Counter[str] = field(default_factory=Counter)
    batch_lines: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset_counts(self) -> None:
        with self.lock:
            self.calls = 0
            self.batch_lines = 0
            self.prompt_tokens = self.completion_tokens = 0
            for counter in (self.calls_by_prompt, self.served_by_prompt, self.faults, self.kinds,
                            self.requests_by_route):
                counter.clear()

    def draw_fault(self) -> str | None:
        with self.lock:
            if self.fault_rate <= 0 or self.rng.random() >= self.fault_rate:
                return None
            return self.rng.choice(self.fault_kinds)

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat.completion object for a request body, and the usage bookkeeping that goes with it.

        Raises `NoRecording` when any requested choice has no recorded reply."""
        messages = body.get("messages") or []
        user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        n = int(body.get("n") or 1)
        seed = body.get("seed")
        choices = []
        kind = "unknown"
        for i in range(n):
            reply = self.lookup.reply(user, None if seed is None else int(seed) + i)
            kind = reply.kind
            if reply.text is None:
                with self.lock:
                    self.kinds["unknown"] += 1
                raise NoRecording(user)
            choices.append({"index": i, "message": {"role": "assistant", "content": reply.text},
                            "finish_reason": "stop", "logprobs": None})
        pt = prompt_tokens(messages)
        ct = sum(approx_tokens(c["message"]["content"]) for c in choices)
        with self.lock:
            self.kinds[kind] += 1
            self.served_by_prompt[user] += 1
            self.prompt_tokens += pt
            self.completion_tokens += ct
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "gpt-3.5-turbo"),
            "choices": choices,
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            "system_fingerprint": "fp_replay",
        }


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _no_recording(prompt: str) -> dict[str, Any]:
    shown = prompt if len(prompt) <= 120 else prompt[:117] + "..."
    return {"error": {"message": f"replay server: no recording for this prompt: {shown!r}",
                      "type": "invalid_request_error", "param": "messages", "code": "no_recording"}}


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Form fields and files of a multipart/form-data body (python-multipart is not a dependency)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[str(name)] = (filename, payload)
        else:
            fields[str(name)] = payload.decode()
    return fields, files


def _file_object(file_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": len(meta["data"]), "created_at": meta["created_at"],
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed"}


def _run_batch_lines(state: ServerState, lines: Iterable[str]) -> tuple[list[str], list[str], Counter[str]]:
    """Answer each JSONL request line; injected faults become per-line errors, as the real API reports."""
    out, errors, counts = [], [], Counter()
    for line in lines:
        if not line.strip():
            continue
        req = json.loads(line)
        state.batch_lines += 1
        fault = state.draw_fault()
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": req["custom_id"]}
        if fault is None:
            try:
                body = state.completion(req["body"])
            except NoRecording as e:
                record["response"] = {"status_code": 404, "request_id": uuid.uuid4().hex,
                                      "body": _no_recording(str(e))}
                record["error"] = None
                errors.append(json.dumps(record))
                counts["failed"] += 1
                continue
            record["response"] = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}
            record["error"] = None
            out.append(json.dumps(record))
            counts["completed"] += 1
        else:
            status = 429 if fault == "429" else 500
            record["response"] = {"status_code": status, "request_id": uuid.uuid4().hex,
                                  "body": {"error": {"message": f"injected {fault}", "type": "server_error"}}}
            record["error"] = None
            errors.append(json.dumps(record))
            counts["failed"] += 1
    return out, errors, counts


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="replay OpenAI server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        messages = body.get("messages") or []
        user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        with state.lock:
            state.calls += 1
            state.calls_by_prompt[user] += 1
            state.requests_by_route["chat.completions"] += 1
        if state.latency_s > 0:
            await asyncio.sleep(state.latency_s)
        fault = state.draw_fault()
        if fault is not None:
            with state.lock:
                state.faults[fault] += 1
        if fault == "429":
            wait = state.retry_after_s
            headers = {"retry-after-ms": str(int(wait * 1000)), "retry-after": str(max(1, math.ceil(wait)))}
            return _error(429, "Rate limit reached (injected).", "rate_limit_exceeded", headers)
        if fault == "500":
            return _error(500, "The server had an error (injected).", "server_error")
        if fault == "stall" and await _stall(request, state.stall_s):
            return Response(status_code=499)  # the client gave up (timed out); nobody reads this
        try:
            return JSONResponse(state.completion(body))
        except NoRecording:
            return JSONResponse(_no_recording(user), status_code=404)

    @app.get("/v1/replay")
    async def replay_info() -> Response:
        """What this server replays: lets a build record `replayed_from` and keep a separate cache."""
        return JSONResponse({"object": "replay", "sources": state.sources})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "gpt-3.5-turbo", "object": "model", "created": 0,
                                                         "owned_by": "replay"}]})

    @app.post("/v1/files")
    async def create_file(request: Request) -> Response:
        state.requests_by_route["files.create"] += 1
        fields, files = _parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in files:
            return _error(400, "multipart field 'file' is required", "invalid_request_error")
        filename, data = files["file"]
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        state.files[file_id] = {"data": data, "filename": filename, "purpose": fields.get("purpose", "batch"),
                                "created_at": int(time.time())}
        return JSONResponse(_file_object(file_id, state.files[file_id]))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        if file_id not in state.files:
            return _error(404, f"no file {file_id}", "invalid_request_error")
        return JSONResponse(_file_object(file_id, state.files[file_id]))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        state.requests_by_route["files.content"] += 1
        if file_id not in state.files:
            return _error(404, f"no file {file_id}", "invalid_request_error")
        return Response(state.files[file_id]["data"], media_type="application/octet-stream")

    def _store(data: str, filename: str) -> str | None:
        if not data:
            return None
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        state.files[file_id] = {"data": data.encode(), "filename": filename, "purpose": "batch_output",
                                "created_at": int(time.time())}
        return file_id

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        state.requests_by_route["batches.create"] += 1
        body = await request.json()
        input_id = body.get("input_file_id")
        if input_id not in state.files:
            return _error(404, f"no file {input_id}", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions":
            return _error(400, "only /v1/chat/completions batches are supported", "invalid_request_error")
        lines = state.files[input_id]["data"].decode().splitlines()
        out, errors, counts = _run_batch_lines(state, lines)
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        state.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": input_id,
            "completion_window": body.get("completion_window", "24h"), "status": "validating",
            "created_at": now, "metadata": body.get("metadata"), "errors": None,
            "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": len(out) + len(errors), "completed": 0, "failed": 0},
            "_ready_at": time.monotonic() + state.batch_delay_s,
            "_results": ("\n".join(out) + "\n" if out else "", "\n".join(errors) + "\n" if errors else "", counts),
        }
        return JSONResponse(_public(state.batches[batch_id]))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        state.requests_by_route["batches.retrieve"] += 1
        batch = state.batches.get(batch_id)
        if batch is None:
            return _error(404, f"no batch {batch_id}", "invalid_request_error")
        if batch["status"] != "completed":
            if time.monotonic() >= batch["_ready_at"]:
                output, errors, counts = batch["_results"]
                batch.update(status="completed", completed_at=int(time.time()),
                             output_file_id=_store(output, f"{batch_id}_output.jsonl"),
                             error_file_id=_store(errors, f"{batch_id}_errors.jsonl"))
                batch["request_counts"].update(completed=counts["completed"], failed=counts["failed"])
            else:
                batch["status"] = "in_progress"
        return JSONResponse(_public(batch))

    return app


async def _stall(request: Request, seconds: float) -> bool:
    """Hold the reply for ``seconds``; True as soon as the client disconnects (or the server stops)."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:  # server shutting down mid-stall: end quietly
        return True
    return False


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}
