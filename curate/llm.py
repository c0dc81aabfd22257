"""Chat-completion client for any OpenAI-compatible endpoint, built for resumable dataset collection.

What it adds on top of the ``openai`` SDK:

* bounded concurrency (one ``asyncio.Semaphore``) with a synchronous wrapper for scripts;
* a persistent on-disk response cache, so a rerun or a resumed run never pays for a call twice;
* one retry policy (exponential backoff with jitter; honours ``Retry-After`` up to ``max_retry_wait``) for
  408/409/429, 5xx, timeouts, dropped connections and malformed bodies (not JSON, not UTF-8, no choices).
  The SDK's own retries are switched off (``max_retries=0``) so that attempts, delays and the usage
  counters all come from this one policy. 401/403/404 stop the whole call at the first such reply;
* replies are checked before they are cached: only a complete answer (``finish_reason: stop``, text, no
  refusal) is cached; a cut, filtered, empty, null or refused one is asked once more (a cut one only with
  ``retry_truncated``, then with twice the ``max_tokens``) and else returned with its ``problem``, uncached,
  so a rerun asks again;
* a hard per-request deadline (``request_timeout``, body included) beside the stall ``timeout``, and a cap
  on the reply size (``max_response_bytes``) enforced while the body streams in;
* the Batch API (JSONL upload, ``batches.create``, polling, results mapped back by ``custom_id``) feeding
  the same cache, including re-attaching to batches a previous run submitted;
* usage accounting (tokens, calls vs cache hits, retries) and an estimated dollar cost, "unknown" (None)
  when a reply reported no valid usage.

Every failure is an `LLMError` (a `CurateError`): one line naming the redacted URL and the status, and how
many of the call's replies are already cached.

The response cache lives in `curate.llm_cache` and the price table in `curate.pricing`; both are
re-exported here. The endpoint URL is recorded (cache keys, logs) only through `curate.urls.redact_url`.

The API key is read from the environment (``OPENAI_API_KEY`` or the variable named by
``LLMConfig.api_key_env``) and is never logged, stored in the cache, or kept on the config object.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import openai

from curate.errors import CurateError
from curate.llm_cache import CACHE_FILE, Messages, ResponseCache, cache_key
from curate.pricing import BATCH_PRICE_FACTOR, PRICES_PER_1M, estimate_cost, price_for
from curate.urls import redact_url, split_credentials

# Re-exported: callers (and older code) import these names from `curate.llm`.
__all__ = [
    "BATCH_PRICE_FACTOR", "PRICES_PER_1M", "Completion", "LLMClient", "LLMConfig", "LLMConfigError", "LLMError",
    "Messages", "ResponseCache", "Usage", "cache_key", "price_for", "resolve_base_url", "rich_progress",
]
ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")
logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, wrong URL or model: every request would fail
GOOD_FINISH = "stop"
TERMINAL_BATCH_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_BATCH_REQUESTS = 50_000  # OpenAI's per-batch request limit
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class LLMError(CurateError, RuntimeError):
    """Requests that still failed after all retries; everything that succeeded is already cached."""


class LLMConfigError(CurateError, ValueError):
    """The client cannot be set up (e.g. no API key for a remote endpoint)."""


class _Failure(LLMError):
    """One request's failure, as one line: ``<url>: <status and what went wrong>[ after N retries]``."""

    def __init__(self, url: str, what: str, *, retryable: bool, reason: str, fatal: bool = False,
                 wait: float | None = None) -> None:
        super().__init__(f"{url}: {what}")
        self.url, self.what, self.retryable, self.reason = url, what, retryable, reason
        self.fatal, self.wait = fatal, wait
        self.retries = 0

    def line(self) -> str:
        return f"{self.url}: {self.what}" + (f" after {self.retries} retries" if self.retries else "")

    def __str__(self) -> str:
        return self.line()


class _TooLarge(Exception):
    """Raised while a reply body streams in, once it passes ``max_response_bytes``."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"HTTP {status}: reply of more than {limit} bytes (--max-response-bytes); stopped reading")


@dataclass
class LLMConfig:
    """Endpoint, sampling and reliability settings. ``base_url=None`` means ``$OPENAI_BASE_URL`` or OpenAI."""

    model: str = "gpt-3.5-turbo"
    base_url: str | None = field(default=None, repr=False)  # may hold credentials (user:pw@, ?api_key=)
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.8
    max_tokens: int | None = 512
    top_p: float | None = None
    seed: int | None = None  # sample i is sent with seed + i, so each sample is reproducible and distinct
    concurrency: int = 16
    max_retries: int = 6
    timeout: float = 60.0  # stall: the longest wait for the connection or the next bytes (httpx timeouts)
    request_timeout: float = 300.0  # hard deadline for one attempt, body included
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_wait: float = 60.0  # the longest Retry-After honoured
    max_response_bytes: int = 1_000_000
    retry_truncated: bool = False  # ask a reply cut by max_tokens once more with twice the max_tokens
    accept_truncated: bool = False  # a reply cut by max_tokens is complete (a judge's label capped on purpose)
    cache_dir: Path | str | None = Path(".curate/llm_cache")
    batch_poll_interval: float = 30.0
    batch_completion_window: str = "24h"

    def sampling_params(self) -> dict[str, Any]:
        """Request parameters that change the output, hence part of the cache key."""
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return params


def reply_problem(text: str | None, finish_reason: str | None, refusal: str | None = None) -> str | None:
    """Why a reply is not a usable answer (``refusal``, ``null``, its finish reason, ``empty``), or None."""
    if refusal:
        return "refusal"
    if text is None:
        return "null"
    if finish_reason != GOOD_FINISH:
        return finish_reason or "no finish reason"
    if not text.strip():
        return "empty"
    return None


@dataclass(frozen=True)
class Completion:
    """One sampled reply. ``source`` is ``online``, ``batch`` or ``cache`` (no call made this time).

    ``problem`` is None for a complete answer; otherwise (``length``, ``content_filter``, ``null``, ``empty``,
    ``refusal``) the reply was not cached and ``text`` is what the server sent ("" for null).
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    key: str
    prompt_index: int
    sample: int
    source: str
    refusal: str | None = None
    problem: str | None = None

    @property
    def cached(self) -> bool:
        return self.source == "cache"

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class _Reply:
    """A checked chat.completion body: the first choice and the usage (None where not validly reported)."""

    text: str | None
    finish_reason: str | None
    refusal: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _parse_reply(data: Any) -> _Reply | str:
    """The reply in a decoded chat.completion body, or what is wrong with it.

    Checked by hand: the SDK builds its reply objects without validation, and ``ChatCompletion.model_validate``
    would reject a reply for bad ``usage`` alone, which only makes the cost unknown.
    """
    if not isinstance(data, dict):
        return "body is not a JSON object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices in the reply" if not choices else "choices is not a list"
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return "no message in the first choice"
    text, finish, refusal = message.get("content"), choice.get("finish_reason"), message.get("refusal")
    if not isinstance(text, str | None) or not isinstance(finish, str | None) or not isinstance(refusal, str | None):
        return "content, finish_reason or refusal is not text"
    for field_text in (text, refusal):
        try:
            (field_text or "").encode("utf-8")
        except UnicodeEncodeError:
            return "text that is not valid Unicode (a lone surrogate)"
    usage = data.get("usage")
    pt = _count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    ct = _count(usage.get("completion_tokens")) if isinstance(usage, dict) else None
    if pt is None or ct is None:
        pt = ct = None
    return _Reply(text, finish, refusal, pt, ct)


@dataclass
class Usage:
    """What a client has spent so far. Tokens count only calls made (cache hits are free)."""

    requests: int = 0  # HTTP attempts at chat.completions, retries included
    completed: int = 0  # new completions obtained online
    cache_hits: int = 0
    deduplicated: int = 0  # identical (prompt, sample) asked twice in one call: answered once
    retries: int = 0
    failures: int = 0
    unusable: int = 0  # replies that were cut, filtered, empty, null or refused even after a retry
    unknown_usage: int = 0  # replies (paid for) that reported no valid token counts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_submitted: int = 0
    batch_completed: int = 0
    batch_failed: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)

    def cost(self, model: str) -> float | None:
        """Estimated dollars for the calls made (Batch API at half price); None for unknown models or when
        some reply reported no valid usage (never a guessed 0)."""
        if self.unknown_usage:
            return None
        return estimate_cost(model, self.prompt_tokens, self.completion_tokens, self.batch_prompt_tokens,
                             self.batch_completion_tokens)

    def summary(self, model: str) -> dict[str, Any]:
        out = asdict(self)
        out["retry_reasons"] = dict(self.retry_reasons)
        out["model"] = model
        out["estimated_cost_usd"] = self.cost(model)
        return out


def _retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked for by ``retry-after-ms`` / ``retry-after`` (number or HTTP date), if any."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is not None:
            return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def resolve_base_url(base_url: str | None = None) -> str:
    """The endpoint a client with this ``base_url`` talks to: it, else ``$OPENAI_BASE_URL``, else OpenAI's."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


class _RedactURLs(logging.Filter):
    """Rewrites URL arguments of httpx's request log lines through `redact_url` (query-string keys)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(str(a)) if "://" in str(a) else a for a in record.args)
        return True


def _install_log_redaction() -> None:
    # httpx, or the fork of it some openai releases ship (its logger is named after its package)
    sdk_http = openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
    names = {"httpx", "openai", sdk_http}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactURLs) for f in logger.filters):
            logger.addFilter(_RedactURLs())


def _is_local(base_url: str | None) -> bool:
    host = urlparse(base_url or "").hostname or ""
    return host in {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class _Skipped(Exception):
    """A request not sent because an earlier reply (401/403/404) stopped the call."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _server_message(response: Any) -> str:
    """The server's own words on a failed request, on one short line (an HTML page is named, not quoted)."""
    ctype = response.headers.get("content-type", "")
    try:
        body = response.json()
    except Exception:
        return "an HTML page" if "html" in ctype else (response.text or "empty body")[:120].replace("\n", " ")
    err = body.get("error", body) if isinstance(body, dict) else body
    message = err.get("message") if isinstance(err, dict) else err
    return " ".join(str(message).split())[:200]


@dataclass
class _Job:
    key: str
    messages: list[dict[str, str]]
    sample: int


class _BarUpdate:
    """The progress callback of `rich_progress`; ``note(text)`` shows why it is waiting beside the bar."""

    def __init__(self, bar: Any, task: Any, description: str) -> None:
        self._bar, self._task, self._description = bar, task, description

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total, description=self._description)

    def note(self, text: str) -> None:
        self._bar.update(self._task, description=f"{self._description} ({text})")


def rich_progress(description: str = "LLM calls") -> contextlib.AbstractContextManager[ProgressCallback]:
    """``with rich_progress("answers") as cb: client.complete_many(..., progress=cb)`` draws a bar."""

    @contextlib.contextmanager
    def _bar() -> Iterator[ProgressCallback]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            yield _BarUpdate(bar, bar.add_task(description, total=None), description)

    return _bar()


def _sdk_httpx() -> Any:
    """The httpx the SDK runs on (httpx, or the fork some openai releases ship)."""
    return importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


def _limited_transport(limit: int) -> Any:
    """An httpx transport that stops reading a chat-completion body once it passes ``limit`` bytes.

    httpx has no response-size limit, so the stream is wrapped here: a declared Content-Length over the
    limit is refused before the body is read, and a chunked body is counted as it arrives.
    """
    httpx = _sdk_httpx()

    class LimitedStream(httpx.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any, status: int) -> None:
            self._inner, self._status, self._seen = inner, status, 0

        async def __aiter__(self) -> Any:
            async for chunk in self._inner:
                self._seen += len(chunk)
                if self._seen > limit:
                    raise _TooLarge(self._status, limit)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class LimitedTransport(httpx.AsyncHTTPTransport):  # type: ignore[misc,name-defined]
        async def handle_async_request(self, request: Any) -> Any:
            response = await super().handle_async_request(request)
            if not request.url.path.endswith("/chat/completions"):
                return response  # batch files are large by design
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                await response.aclose()
                raise _TooLarge(response.status_code, limit)
            return httpx.Response(response.status_code, headers=response.headers,
                                  stream=LimitedStream(response.stream, response.status_code),
                                  extensions=response.extensions)

    from openai._constants import DEFAULT_CONNECTION_LIMITS

    return LimitedTransport(limits=DEFAULT_CONNECTION_LIMITS)


class LLMClient:
    """``LLMClient(config).complete_many(prompts)``: cached, retried, concurrent chat completions."""

    def __init__(self, config: LLMConfig | None = None, **overrides: Any):
        cfg = config or LLMConfig()
        unknown = sorted(set(overrides) - {f.name for f in fields(LLMConfig)})
        if unknown:
            raise TypeError(f"unknown LLMConfig field(s) {unknown}")
        cfg = replace(cfg, **overrides)  # a copy: the caller's config object is never mutated
        self.config = cfg
        self.base_url = resolve_base_url(cfg.base_url)  # may hold credentials: never written anywhere
        self.endpoint = redact_url(self.base_url)  # what is recorded (cache keys, manifests, logs)
        self._check_api_key()
        _install_log_redaction()
        cache_path = Path(cfg.cache_dir) / CACHE_FILE if cfg.cache_dir is not None else None
        self.cache = ResponseCache(cache_path)
        self.usage = Usage()
        self._pause_until = 0.0  # monotonic time before which no request is sent (after a Retry-After)
        self._note: Callable[[str], None] | None = None  # shows waits on the caller's progress line

    # ---------------------------------------------------------------------------- setup
    def _check_api_key(self) -> None:
        if not os.environ.get(self.config.api_key_env) and not _is_local(self.base_url):
            raise LLMConfigError(
                f"no API key: set ${self.config.api_key_env} in the environment "
                f"(keys are never read from files or arguments)"
            )

    def _sdk(self) -> openai.AsyncOpenAI:
        # A placeholder key is fine for local OpenAI-compatible servers, which ignore it.
        key = os.environ.get(self.config.api_key_env) or "local-no-key"
        # Userinfo and query go to the SDK as basic auth and default query parameters (what httpx would do
        # with them anyway), so the SDK's and httpx's URLs, logs and error messages never hold them.
        bare, auth, query = split_credentials(self.base_url)
        http_client = openai.DefaultAsyncHttpxClient(  # auth: (user, password) as basic auth
            auth=auth, transport=_limited_transport(self.config.max_response_bytes))
        return openai.AsyncOpenAI(
            api_key=key, base_url=bare, timeout=self.config.timeout, max_retries=0, default_query=query or None,
            http_client=http_client,
        )

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_usage(self) -> None:
        self.usage = Usage()

    def estimated_cost(self) -> float | None:
        return self.usage.cost(self.config.model)

    # ---------------------------------------------------------------------------- planning
    def _plan(self, prompts: Sequence[Messages], n_samples: int) -> tuple[list[_Job], dict[str, _Job]]:
        """All (prompt, sample) jobs in order, and the distinct ones by cache key."""
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        params = self.config.sampling_params()
        if self.config.seed is not None:
            params["seed"] = self.config.seed  # a different base seed asks for different samples
        jobs: list[_Job] = []
        distinct: dict[str, _Job] = {}
        for messages in prompts:
            msgs = [dict(m) for m in messages]
            for sample in range(n_samples):
                job = _Job(cache_key(self.config.model, msgs, params, sample, self.endpoint), msgs, sample)
                jobs.append(job)
                if job.key in distinct:
                    self.usage.deduplicated += 1
                distinct.setdefault(job.key, job)
        return jobs, distinct

    def _request_body(self, job: _Job) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "messages": job.messages}
        body.update(self.config.sampling_params())
        if self.config.seed is not None:
            body["seed"] = self.config.seed + job.sample
        return body

    def _assemble(self, jobs: list[_Job], n_samples: int, sources: Mapping[str, str],
                  unusable: Mapping[str, Completion] | None = None) -> list[Completion]:
        found = self.cache.get_many([j.key for j in jobs])
        out = []
        for i, job in enumerate(jobs):
            if unusable and job.key in unusable:
                out.append(replace(unusable[job.key], prompt_index=i // n_samples, sample=job.sample))
                continue
            text, finish, pt, ct = found[job.key]
            out.append(Completion(text, finish, pt, ct, job.key, i // n_samples, job.sample,
                                  sources.get(job.key, "cache")))
        return out

    def _good_cached(self, keys: Sequence[str]) -> set[str]:
        """Keys with a complete answer in the cache (older runs may have cached cut or empty ones)."""
        return {k for k, (text, finish, _, _) in self.cache.get_many(keys).items()
                if self._problem(text, finish, None) is None}

    def _problem(self, text: str | None, finish: str | None, refusal: str | None) -> str | None:
        problem = reply_problem(text, finish, refusal)
        return None if problem == "length" and self.config.accept_truncated else problem

    # ---------------------------------------------------------------------------- retries
    def _url(self, path: str) -> str:
        return f"{(self.endpoint or '').rstrip('/')}{path}"

    def _classify(self, exc: BaseException, path: str) -> _Failure:
        """Any failure of one attempt as a `_Failure`: what to say, and whether to retry, wait or stop."""
        url = self._url(path)
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, TimeoutError):
            return _Failure(url, f"no complete reply within {self.config.request_timeout:g} s (--request-timeout)",
                            retryable=True, reason="deadline")
        if isinstance(exc, _TooLarge):
            return _Failure(url, str(exc), retryable=False, reason="too large")
        if isinstance(exc, openai.APITimeoutError):
            return _Failure(url, f"no bytes for {self.config.timeout:g} s (--timeout)", retryable=True,
                            reason="timeout")
        if isinstance(exc, openai.APIConnectionError):
            chain = _chain(exc)
            too_large = next((e for e in chain if isinstance(e, _TooLarge)), None)
            if too_large is not None:
                return _Failure(url, str(too_large), retryable=False, reason="too large")
            refused = any(isinstance(e, ConnectionRefusedError) for e in chain)
            cause = chain[1] if len(chain) > 1 else exc
            what = "connection refused" if refused else f"connection failed ({type(cause).__name__}: {cause})"
            return _Failure(url, what, retryable=True, reason="connection")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            what = f"HTTP {status} ({type(exc).__name__}: {_server_message(exc.response)})"
            retryable = status in RETRYABLE_STATUS or status >= 500
            return _Failure(url, what, retryable=retryable, reason=str(status), fatal=status in FATAL_STATUS,
                            wait=_retry_after_seconds(exc.response.headers) if retryable else None)
        return _Failure(url, f"{type(exc).__name__}: {exc}", retryable=False, reason=type(exc).__name__)

    def _retry_delay(self, failure: _Failure, attempt: int) -> float:
        cfg = self.config
        if failure.wait is not None:
            # Honour the server's wait up to --max-retry-wait, with a little jitter (under the cap) so waiting
            # requests do not all return in lockstep.
            return min(cfg.max_retry_wait, failure.wait * (1 + random.uniform(0, 0.2)))
        cap = min(cfg.backoff_max, cfg.backoff_base * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)

    async def _with_retries(self, call: Callable[[], Awaitable[T]], *, path: str = "",
                            count_requests: bool = False, deadline: float | None = None,
                            stop: asyncio.Event | None = None) -> T:
        attempt = 0
        while True:
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            if stop is not None and stop.is_set():
                raise _Skipped
            if count_requests:
                self.usage.requests += 1
            try:
                if deadline is None:
                    return await call()
                # httpx's timeouts bound each connect/read/write, not the whole request: a server dripping a
                # byte a second never trips them. The hard deadline is an asyncio timeout around the call.
                return await asyncio.wait_for(call(), deadline)
            except Exception as exc:
                failure = self._classify(exc, path)
                if not failure.retryable or attempt >= self.config.max_retries:
                    failure.retries = attempt
                    raise failure from None
                delay = self._retry_delay(failure, attempt)
                if failure.reason in ("429", "503") and failure.wait is not None:
                    # A rate limit applies to the whole client: hold every request, not just this one.
                    if time.monotonic() + delay > self._pause_until + 0.5:
                        what = "rate limited" if failure.reason == "429" else "unavailable (503)"
                        self._announce(f"waiting {delay:.0f} s: {what} by {urlparse(self.base_url).hostname}")
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
                attempt += 1
                self.usage.retries += 1
                self.usage.retry_reasons[failure.reason] += 1
                await asyncio.sleep(delay)

    def _announce(self, text: str) -> None:
        logger.info("%s", text)
        if self._note is not None:
            self._note(text)

    # ---------------------------------------------------------------------------- online
    async def _ask(self, sdk: openai.AsyncOpenAI, body: dict[str, Any], stop: asyncio.Event) -> _Reply:
        """One chat completion, retried; a malformed body counts as a failed attempt like a 5xx."""
        url = self._url("/chat/completions")

        async def attempt() -> _Reply:
            raw = await sdk.chat.completions.with_raw_response.create(**body)
            http = raw.http_response
            try:
                data = json.loads(http.content)  # bytes: json checks the UTF-8 itself
            except UnicodeDecodeError:
                problem: str | _Reply = "body is not UTF-8"
            except ValueError:
                ctype = http.headers.get("content-type", "")
                problem = f"body is not JSON ({ctype or 'no content type'})"
            else:
                problem = _parse_reply(data)
            if isinstance(problem, str):
                raise _Failure(url, f"HTTP {http.status_code}: {problem}", retryable=True, reason="malformed")
            return problem

        return await self._with_retries(attempt, path="/chat/completions", count_requests=True,
                                        deadline=self.config.request_timeout, stop=stop)

    def _account(self, reply: _Reply) -> None:
        if reply.prompt_tokens is None or reply.completion_tokens is None:
            self.usage.unknown_usage += 1
            return
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens

    async def _fetch_online(
        self, todo: Sequence[_Job], sources: dict[str, str], tick: Callable[[], None] | None = None,
        unusable: dict[str, Completion] | None = None, all_keys: Sequence[str] = (),
    ) -> None:
        """Fetch ``todo`` concurrently; each complete reply is cached as soon as it arrives.

        Unusable replies (cut, filtered, empty, null, refused) go to ``unusable``, uncached. The first 401/403/404
        stops every request not yet sent.
        """
        if not todo:
            return
        unusable = {} if unusable is None else unusable
        sem = asyncio.Semaphore(self.config.concurrency)
        stop = asyncio.Event()
        sdk = self._sdk()

        async def one(job: _Job) -> None:
            body = self._request_body(job)
            async with sem:
                if stop.is_set():
                    raise _Skipped
                try:
                    reply = await self._ask(sdk, body, stop)
                    self._account(reply)
                    problem = self._problem(reply.text, reply.finish_reason, reply.refusal)
                    retry_body = None
                    if problem == "length":
                        if self.config.retry_truncated and body.get("max_tokens"):
                            retry_body = {**body, "max_tokens": 2 * int(body["max_tokens"])}
                    elif problem is not None:
                        retry_body = body  # filtered, empty or refused: a new sample may be complete
                    if retry_body is not None:
                        self.usage.retries += 1
                        self.usage.retry_reasons[problem or ""] += 1
                        body, reply = retry_body, await self._ask(sdk, retry_body, stop)
                        self._account(reply)
                except _Failure as failure:
                    if failure.fatal:
                        stop.set()
                    raise
            pt, ct = reply.prompt_tokens or 0, reply.completion_tokens or 0
            problem = self._problem(reply.text, reply.finish_reason, reply.refusal)
            if problem is None:
                self.cache.put(job.key, self.config.model, body, reply.text or "", reply.finish_reason, pt, ct,
                               "online")
                self.usage.completed += 1
            else:
                self.usage.unusable += 1
                unusable[job.key] = Completion(reply.text or "", reply.finish_reason, pt, ct, job.key, 0, job.sample,
                                               "online", reply.refusal, problem)
            sources[job.key] = "online"
            if tick:
                tick()

        try:
            results = await asyncio.gather(*(one(j) for j in todo), return_exceptions=True)
        finally:
            await sdk.close()
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, _Skipped)]
        if errors:
            self.usage.failures += len(errors)
            failures = [e if isinstance(e, _Failure) else self._classify(e, "/chat/completions") for e in errors]
            first = next((f for f in failures if f.fatal), failures[0])
            keys = list(all_keys) or [j.key for j in todo]
            cached = len(self._good_cached(keys))
            more = f" ({len(errors)} requests failed)" if len(errors) > 1 else ""
            stopped = "; stopped at the first such reply" if first.fatal else ""
            raise LLMError(
                f"{first.line()}{more}{stopped}; {cached} of {len(keys)} replies cached, so rerunning resumes "
                f"where this stopped"
            ) from None

    def _start(
        self, prompts: Sequence[Messages], n_samples: int, progress: ProgressCallback | None
    ) -> tuple[list[_Job], dict[str, _Job], list[str], Callable[[], None]]:
        """Plan jobs, count cache hits, and return (jobs, distinct, missing keys, progress tick)."""
        jobs, distinct = self._plan(prompts, n_samples)
        cached = self._good_cached(list(distinct))
        self.usage.cache_hits += sum(1 for j in jobs if j.key in cached)
        missing = [key for key in distinct if key not in cached]
        total = len(distinct)
        state = {"done": total - len(missing)}
        self._note = getattr(progress, "note", None)
        if progress:
            progress(state["done"], total)

        def tick() -> None:
            state["done"] += 1
            if progress:
                progress(state["done"], total)

        return jobs, distinct, missing, tick

    async def acomplete_many(
        self, prompts: Sequence[Messages], n_samples: int = 1, *, progress: ProgressCallback | None = None
    ) -> list[Completion]:
        """Async ``complete_many``: one result per (prompt, sample), prompt-major order."""
        jobs, distinct, missing, tick = self._start(prompts, n_samples, progress)
        sources: dict[str, str] = {}
        unusable: dict[str, Completion] = {}
        await self._fetch_online([distinct[k] for k in missing], sources, tick, unusable, list(distinct))
        return self._assemble(jobs, n_samples, sources, unusable)

    def complete_many(
        self, prompts: Sequence[Messages], n_samples: int = 1, *, progress: ProgressCallback | None = None
    ) -> list[Completion]:
        """One ``Completion`` per (prompt, sample) in prompt-major order; cached replies cost nothing."""
        return _run_sync(self.acomplete_many(prompts, n_samples, progress=progress))

    def complete(self, messages: Messages) -> Completion:
        return self.complete_many([messages])[0]

    # ---------------------------------------------------------------------------- Batch API
    async def acomplete_many_batch(
        self,
        prompts: Sequence[Messages],
        n_samples: int = 1,
        *,
        poll_interval: float | None = None,
        fallback_online: bool = True,
        progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        """Async ``complete_many_batch``."""
        jobs, distinct, missing_keys, tick = self._start(prompts, n_samples, progress)
        missing = set(missing_keys)
        sources: dict[str, str] = {}
        unusable: dict[str, Completion] = {}
        if missing:
            sdk = self._sdk()
            try:
                # Re-attach to batches an earlier (interrupted) run submitted for these requests.
                waiting = {bid: keys for bid, keys in self.cache.open_batches().items() if keys & missing}
                in_flight = set().union(*waiting.values()) if waiting else set()
                fresh = [distinct[k] for k in missing_keys if k not in in_flight]
                for start in range(0, len(fresh), MAX_BATCH_REQUESTS):
                    chunk = fresh[start : start + MAX_BATCH_REQUESTS]
                    batch_id = await self._submit_batch(sdk, chunk)
                    waiting[batch_id] = {j.key for j in chunk}
                await self._await_batches(sdk, waiting, poll_interval, sources, missing, tick)
            finally:
                await sdk.close()
            still = [distinct[k] for k in missing_keys if k not in sources]
            if still and not fallback_online:
                raise LLMError(f"{self._url('/batches')}: {len(still)} batch requests did not complete "
                               f"(fallback_online=False)")
            await self._fetch_online(still, sources, tick, unusable, list(distinct))
        return self._assemble(jobs, n_samples, sources, unusable)

    async def _submit_batch(self, sdk: openai.AsyncOpenAI, jobs: Sequence[_Job]) -> str:
        lines = [
            json.dumps({"custom_id": job.key, "method": "POST", "url": "/v1/chat/completions",
                        "body": self._request_body(job)}, ensure_ascii=False)
            for job in jobs
        ]
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        file_obj = await self._with_retries(
            lambda: sdk.files.create(file=("requests.jsonl", payload, "application/jsonl"), purpose="batch"),
            path="/files",
        )
        batch = await self._with_retries(
            lambda: sdk.batches.create(
                input_file_id=file_obj.id,
                endpoint="/v1/chat/completions",
                completion_window=self.config.batch_completion_window,  # type: ignore[arg-type]
            ),
            path="/batches",
        )
        self.cache.add_batch(batch.id, file_obj.id, [job.key for job in jobs])
        self.usage.batch_submitted += len(jobs)
        return batch.id

    async def _await_batches(
        self,
        sdk: openai.AsyncOpenAI,
        waiting: dict[str, set[str]],
        poll_interval: float | None,
        sources: dict[str, str],
        missing: set[str],
        tick: Callable[[], None],
    ) -> None:
        interval = self.config.batch_poll_interval if poll_interval is None else poll_interval
        pending = dict(waiting)
        while pending:
            for batch_id in list(pending):
                batch = await self._with_retries(lambda b=batch_id: sdk.batches.retrieve(b), path="/batches")
                if batch.status not in TERMINAL_BATCH_STATES:
                    continue
                if batch.output_file_id:
                    await self._ingest_batch_output(sdk, batch.output_file_id, sources, missing, tick)
                if batch.error_file_id:
                    err = await self._with_retries(lambda f=batch.error_file_id: sdk.files.content(f), path="/files")
                    self.usage.batch_failed += sum(1 for line in err.text.splitlines() if line.strip())
                self.cache.set_batch_status(batch_id, f"ingested:{batch.status}")
                del pending[batch_id]
            if pending:
                await asyncio.sleep(interval)

    async def _ingest_batch_output(
        self,
        sdk: openai.AsyncOpenAI,
        file_id: str,
        sources: dict[str, str],
        missing: set[str],
        tick: Callable[[], None],
    ) -> None:
        content = await self._with_retries(lambda: sdk.files.content(file_id), path="/files")
        for line in content.text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            response = record.get("response") or {}
            if response.get("status_code") != 200:
                self.usage.batch_failed += 1
                continue
            reply = _parse_reply(response.get("body"))
            if isinstance(reply, str) or self._problem(reply.text, reply.finish_reason, reply.refusal):
                self.usage.batch_failed += 1  # malformed or unusable: asked again online (never cached)
                continue
            pt, ct = reply.prompt_tokens, reply.completion_tokens
            key = record["custom_id"]
            request = {"model": self.config.model, "custom_id": key}
            self.cache.put(key, self.config.model, request, reply.text or "", reply.finish_reason, pt or 0, ct or 0,
                           "batch")
            self.usage.batch_completed += 1
            if pt is None or ct is None:
                self.usage.unknown_usage += 1
            else:
                self.usage.batch_prompt_tokens += pt
                self.usage.batch_completion_tokens += ct
            if key in missing and key not in sources:
                tick()
            sources[key] = "batch"

    def complete_many_batch(
        self,
        prompts: Sequence[Messages],
        n_samples: int = 1,
        *,
        poll_interval: float | None = None,
        fallback_online: bool = True,
        progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        """Like ``complete_many`` but through the Batch API (half price, up to 24 h).

        Requests are uploaded as JSONL with ``custom_id`` = cache key, so results map back exactly and land
        in the same cache. Batches are recorded before polling: if this process dies, the next call
        re-attaches to them instead of paying again. Lines the batch could not answer are retried online
        unless ``fallback_online=False``.
        """
        return _run_sync(
            self.acomplete_many_batch(
                prompts, n_samples, poll_interval=poll_interval, fallback_online=fallback_online,
                progress=progress,
            )
        )


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when an event loop is already running (e.g. Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
