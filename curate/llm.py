"""Chat-completion client for any OpenAI-compatible endpoint, built for resumable dataset collection.

What it adds on top of the ``openai`` SDK:

* bounded concurrency (one ``asyncio.Semaphore``) with a synchronous wrapper for scripts;
* a persistent on-disk response cache, so a rerun or a resumed run never pays for a call twice;
* one retry policy (exponential backoff with jitter; honours ``Retry-After`` on 429/503) for 408/409/429,
  5xx, timeouts and dropped connections. The SDK's own retries are switched off (``max_retries=0``) so
  that attempts, delays and the usage counters all come from this one policy;
* the Batch API (JSONL upload, ``batches.create``, polling, results mapped back by ``custom_id``) feeding
  the same cache, including re-attaching to batches a previous run submitted;
* usage accounting (tokens, calls vs cache hits, retries) and an estimated dollar cost.

The response cache lives in `curate.llm_cache` and the price table in `curate.pricing`; both are
re-exported here. The endpoint URL is recorded (cache keys, logs) only through `curate.urls.redact_url`.

The API key is read from the environment (``OPENAI_API_KEY`` or the variable named by
``LLMConfig.api_key_env``) and is never logged, stored in the cache, or kept on the config object.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
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

RETRYABLE_STATUS = frozenset({408, 409, 429})
TERMINAL_BATCH_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_BATCH_REQUESTS = 50_000  # OpenAI's per-batch request limit
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class LLMError(RuntimeError):
    """Requests that still failed after all retries; everything that succeeded is already cached."""


class LLMConfigError(ValueError):
    """The client cannot be set up (e.g. no API key for a remote endpoint)."""


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
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0
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


@dataclass(frozen=True)
class Completion:
    """One sampled reply. ``source`` is ``online``, ``batch`` or ``cache`` (no call made this time)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    key: str
    prompt_index: int
    sample: int
    source: str

    @property
    def cached(self) -> bool:
        return self.source == "cache"


@dataclass
class Usage:
    """What a client has spent so far. Tokens count only calls made (cache hits are free)."""

    requests: int = 0  # HTTP attempts at chat.completions, retries included
    completed: int = 0  # new completions obtained online
    cache_hits: int = 0
    deduplicated: int = 0  # identical (prompt, sample) asked twice in one call: answered once
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_submitted: int = 0
    batch_completed: int = 0
    batch_failed: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)

    def cost(self, model: str) -> float | None:
        """Estimated dollars for the calls made (Batch API at half price); None for unknown models."""
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


@dataclass
class _Job:
    key: str
    messages: list[dict[str, str]]
    sample: int


def rich_progress(description: str = "LLM calls") -> contextlib.AbstractContextManager[ProgressCallback]:
    """``with rich_progress("answers") as cb: client.complete_many(..., progress=cb)`` draws a bar."""

    @contextlib.contextmanager
    def _bar() -> Iterator[ProgressCallback]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    return _bar()


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
        http_client = openai.DefaultAsyncHttpxClient(auth=auth) if auth else None  # (user, password): basic
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

    def _assemble(self, jobs: list[_Job], n_samples: int, sources: Mapping[str, str]) -> list[Completion]:
        found = self.cache.get_many([j.key for j in jobs])
        out = []
        for i, job in enumerate(jobs):
            text, finish, pt, ct = found[job.key]
            out.append(Completion(text, finish, pt, ct, job.key, i // n_samples, job.sample,
                                  sources.get(job.key, "cache")))
        return out

    # ---------------------------------------------------------------------------- retries
    def _retry_delay(self, exc: BaseException, attempt: int) -> tuple[float, str] | None:
        """(seconds to wait, reason) for a retryable failure, else None."""
        retry_after = None
        if isinstance(exc, openai.APITimeoutError):
            reason = "timeout"
        elif isinstance(exc, openai.APIConnectionError):
            reason = "connection"
        elif isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status not in RETRYABLE_STATUS and status < 500:
                return None
            reason = str(status)
            retry_after = _retry_after_seconds(exc.response.headers)
        else:
            return None
        cfg = self.config
        if retry_after is not None:
            # Honour the server's wait, plus a little jitter so waiting requests do not return in lockstep.
            wait = min(retry_after, cfg.retry_after_max)
            return wait * (1 + random.uniform(0, 0.2)), reason
        cap = min(cfg.backoff_max, cfg.backoff_base * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2), reason

    async def _with_retries(self, call: Callable[[], Awaitable[T]], *, count_requests: bool = False) -> T:
        attempt = 0
        while True:
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            if count_requests:
                self.usage.requests += 1
            try:
                return await call()
            except Exception as exc:
                decision = self._retry_delay(exc, attempt)
                if decision is None or attempt >= self.config.max_retries:
                    raise
                delay, reason = decision
                if isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503):
                    # A rate limit applies to the whole client: hold every request, not just this one.
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
                attempt += 1
                self.usage.retries += 1
                self.usage.retry_reasons[reason] += 1
                await asyncio.sleep(delay)

    # ---------------------------------------------------------------------------- online
    async def _fetch_online(
        self, todo: Sequence[_Job], sources: dict[str, str], tick: Callable[[], None] | None = None
    ) -> None:
        """Fetch ``todo`` concurrently; each reply is cached as soon as it arrives."""
        if not todo:
            return
        sem = asyncio.Semaphore(self.config.concurrency)
        sdk = self._sdk()

        async def one(job: _Job) -> None:
            body = self._request_body(job)
            async with sem:
                resp = await self._with_retries(lambda: sdk.chat.completions.create(**body), count_requests=True)
            choice = resp.choices[0]
            pt = resp.usage.prompt_tokens if resp.usage else 0
            ct = resp.usage.completion_tokens if resp.usage else 0
            self.cache.put(job.key, self.config.model, body, choice.message.content or "",
                           choice.finish_reason, pt, ct, "online")
            self.usage.completed += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            sources[job.key] = "online"
            if tick:
                tick()

        try:
            results = await asyncio.gather(*(one(j) for j in todo), return_exceptions=True)
        finally:
            await sdk.close()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.usage.failures += len(errors)
            kinds = Counter(type(e).__name__ for e in errors)
            raise LLMError(
                f"{len(errors)} of {len(todo)} requests failed after up to {self.config.max_retries} retries "
                f"({dict(kinds)}; first: {errors[0]}); the {len(todo) - len(errors)} that succeeded are "
                f"cached, so rerunning resumes where this stopped"
            ) from errors[0]

    def _start(
        self, prompts: Sequence[Messages], n_samples: int, progress: ProgressCallback | None
    ) -> tuple[list[_Job], dict[str, _Job], list[str], Callable[[], None]]:
        """Plan jobs, count cache hits, and return (jobs, distinct, missing keys, progress tick)."""
        jobs, distinct = self._plan(prompts, n_samples)
        cached = self.cache.get_many(list(distinct))
        self.usage.cache_hits += sum(1 for j in jobs if j.key in cached)
        missing = [key for key in distinct if key not in cached]
        total = len(distinct)
        state = {"done": total - len(missing)}
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
        await self._fetch_online([distinct[k] for k in missing], sources, tick)
        return self._assemble(jobs, n_samples, sources)

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
                raise LLMError(f"{len(still)} batch requests did not complete (fallback_online=False)")
            await self._fetch_online(still, sources, tick)
        return self._assemble(jobs, n_samples, sources)

    async def _submit_batch(self, sdk: openai.AsyncOpenAI, jobs: Sequence[_Job]) -> str:
        lines = [
            json.dumps({"custom_id": job.key, "method": "POST", "url": "/v1/chat/completions",
                        "body": self._request_body(job)}, ensure_ascii=False)
            for job in jobs
        ]
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        file_obj = await self._with_retries(
            lambda: sdk.files.create(file=("requests.jsonl", payload, "application/jsonl"), purpose="batch")
        )
        batch = await self._with_retries(
            lambda: sdk.batches.create(
                input_file_id=file_obj.id,
                endpoint="/v1/chat/completions",
                completion_window=self.config.batch_completion_window,  # type: ignore[arg-type]
            )
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
                batch = await self._with_retries(lambda b=batch_id: sdk.batches.retrieve(b))
                if batch.status not in TERMINAL_BATCH_STATES:
                    continue
                if batch.output_file_id:
                    await self._ingest_batch_output(sdk, batch.output_file_id, sources, missing, tick)
                if batch.error_file_id:
                    err = await self._with_retries(lambda f=batch.error_file_id: sdk.files.content(f))
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
        content = await self._with_retries(lambda: sdk.files.content(file_id))
        for line in content.text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            response = record.get("response") or {}
            if response.get("status_code") != 200:
                self.usage.batch_failed += 1
                continue
            body = response.get("body") or {}
            choice = (body.get("choices") or [{}])[0]
            usage = body.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            key = record["custom_id"]
            request = {"model": self.config.model, "custom_id": key}
            self.cache.put(key, self.config.model, request, (choice.get("message") or {}).get("content") or "",
                           choice.get("finish_reason"), pt, ct, "batch")
            self.usage.batch_completed += 1
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
