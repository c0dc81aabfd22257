"""curate.llm against the replay server: the real openai SDK over HTTP, real gpt-3.5-turbo data."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from curate.llm import LLMClient, LLMConfig, LLMConfigError, LLMError, price_for
from curate.prompts import answer_messages, clean_rot, rot_messages
from tests.openai_server.fixture import DEFAULT_DATA_DIR, OpenAIServer, openai_server  # noqa: F401

ROT_CSV = DEFAULT_DATA_DIR / "sage" / "quality100" / "q100_gpt_3.5_rot.csv"
pytestmark = pytest.mark.skipif(not ROT_CSV.is_file(), reason=f"real SaGE data not found at {ROT_CSV}")


@pytest.fixture(scope="module")
def q100() -> pl.DataFrame:
    return pl.read_csv(ROT_CSV)


@pytest.fixture(scope="module")
def expected_answers(q100: pl.DataFrame) -> list[str]:
    """The recorded answer the server gives each row's prompt (first recording for a repeated paraphrase)."""
    first: dict[str, str] = {}
    for para, out in q100.select("paraphrased", "model_output").iter_rows():
        first.setdefault(para, out)
    return [first[p] for p in q100["paraphrased"]]


def _client(server: OpenAIServer, cache_dir: Path | None, **kw: object) -> LLMClient:
    # timeout 1.5 s: well under the 4 s stall, well over a normal reply even on a loaded 2-core CI box
    # (server and client share one process and its GIL here). 12 retries: with 30 % injected faults in arrival
    # order, the default 6 lets one of ~500 requests draw 7 faults in a row about one run in ten (seen in CI)
    cfg = LLMConfig(base_url=server.base_url, cache_dir=cache_dir, concurrency=32, timeout=1.5,
                    backoff_base=0.01, backoff_max=0.1, batch_poll_interval=0.05, max_retries=12)
    return LLMClient(cfg, **kw)


def _answer_prompts(q100: pl.DataFrame) -> list[list[dict[str, str]]]:
    return [answer_messages(p) for p in q100["paraphrased"]]


def test_every_request_completes_with_30pct_faults_and_rerun_is_free(
    openai_server: OpenAIServer, q100: pl.DataFrame, expected_answers: list[str], tmp_path: Path  # noqa: F811
) -> None:
    openai_server.set_faults(0.3, ("429", "500", "stall"), seed=1, stall_s=4.0)
    client = _client(openai_server, tmp_path)
    seen: list[tuple[int, int]] = []
    results = client.complete_many(_answer_prompts(q100), progress=lambda d, t: seen.append((d, t)))

    assert [r.text for r in results] == expected_answers
    assert all(r.source == "online" for r in results)
    usage = client.usage
    assert usage.completed == 497 and usage.deduplicated == 3  # 3 paraphrases are asked twice in q100
    assert usage.requests == openai_server.calls == 497 + usage.retries
    assert sum(openai_server.state.faults.values()) == usage.retries > 100
    assert set(usage.retry_reasons) == {"429", "500", "timeout"}
    assert max(openai_server.served_by_prompt.values()) == 1  # nothing answered (paid for) twice
    assert seen[0] == (0, 497) and seen[-1] == (497, 497)

    openai_server.reset()
    rerun = _client(openai_server, tmp_path)
    again = rerun.complete_many(_answer_prompts(q100))
    assert openai_server.calls == 0
    assert [r.text for r in again] == expected_answers and all(r.cached for r in again)
    assert (rerun.usage.cache_hits, rerun.usage.requests, rerun.usage.prompt_tokens) == (500, 0, 0)


def test_rot_prompts_return_recorded_rots(openai_server: OpenAIServer, q100: pl.DataFrame) -> None:  # noqa: F811
    prompts = [rot_messages(p, a) for p, a in q100.select("paraphrased", "model_output").iter_rows()]
    results = _client(openai_server, None).complete_many(prompts)
    assert [r.text for r in results] == q100["rot"].to_list()
    assert openai_server.state.kinds == {"rot": 500}
    # 8 recorded RoTs run on over several lines; cleaning keeps the rule's first line, as SaGE's pipeline does
    multi = [r.text for r in results if "\n" in r.text]
    assert len(multi) == 8 and all(clean_rot(t) == t.splitlines()[0].strip() for t in multi)


def test_batch_mode_gives_online_results(
    openai_server: OpenAIServer, q100: pl.DataFrame, tmp_path: Path  # noqa: F811
) -> None:
    prompts = _answer_prompts(q100)
    online = _client(openai_server, tmp_path / "online").complete_many(prompts)
    openai_server.reset()
    openai_server.set_batch_delay(0.2)  # a few polls see "in_progress" first
    batch_client = _client(openai_server, tmp_path / "batch")
    batched = batch_client.complete_many_batch(prompts)

    assert [r.text for r in batched] == [r.text for r in online]
    assert all(r.source == "batch" for r in batched)
    assert openai_server.calls == 0 and openai_server.batch_lines == 497
    routes = openai_server.state.requests_by_route
    assert routes["batches.create"] == 1 and routes["batches.retrieve"] >= 2
    usage = batch_client.usage
    assert usage.batch_completed == 497 and usage.completed == 0
    assert batch_client.estimated_cost() == pytest.approx(
        (usage.batch_prompt_tokens * 0.5 + usage.batch_completion_tokens * 1.5) / 1e6 * 0.5
    )
    # and the batch results sit in the same cache: an online rerun is free
    openai_server.reset()
    assert all(r.cached for r in batch_client.complete_many(prompts)) and openai_server.calls == 0


def test_failed_batch_lines_are_retried_online(
    openai_server: OpenAIServer, q100: pl.DataFrame, expected_answers: list[str]  # noqa: F811
) -> None:
    openai_server.set_faults(0.2, ("500",), seed=3)
    client = _client(openai_server, None)
    results = client.complete_many_batch(_answer_prompts(q100))
    assert [r.text for r in results] == expected_answers
    usage = client.usage
    assert usage.batch_failed > 50 and usage.batch_completed + usage.completed == 497
    assert max(openai_server.served_by_prompt.values()) == 1


def test_resume_after_failed_run_repeats_no_call(
    openai_server: OpenAIServer, q100: pl.DataFrame, expected_answers: list[str], tmp_path: Path  # noqa: F811
) -> None:
    openai_server.set_faults(0.3, ("429", "500"), seed=2)
    first = _client(openai_server, tmp_path, max_retries=0)
    with pytest.raises(LLMError, match="cached, so rerunning resumes"):
        first.complete_many(_answer_prompts(q100))
    done = first.usage.completed
    assert 0 < done < 497 and len(first.cache) == done

    openai_server.set_faults(0.0)
    openai_server.reset_counts()
    second = _client(openai_server, tmp_path)
    results = second.complete_many(_answer_prompts(q100))
    assert [r.text for r in results] == expected_answers
    assert openai_server.calls == 497 - done == second.usage.completed
    assert len(second.cache) == 497 and second.usage.cache_hits >= done


def test_interrupted_batch_is_reattached_not_resubmitted(
    openai_server: OpenAIServer, q100: pl.DataFrame, expected_answers: list[str], tmp_path: Path  # noqa: F811
) -> None:
    openai_server.set_batch_delay(0.5)
    prompts = _answer_prompts(q100)
    crashed = _client(openai_server, tmp_path)
    with pytest.raises(TimeoutError):  # the process "dies" after submitting, before the batch finishes
        asyncio.run(asyncio.wait_for(crashed.acomplete_many_batch(prompts), timeout=0.2))
    crashed.close()

    resumed = _client(openai_server, tmp_path)
    results = resumed.complete_many_batch(prompts)
    assert [r.text for r in results] == expected_answers
    assert openai_server.state.requests_by_route["batches.create"] == 1
    assert openai_server.batch_lines == 497 and openai_server.calls == 0
    assert resumed.usage.batch_submitted == 0 and resumed.usage.batch_completed == 497


def test_samples_use_distinct_seeds(openai_server: OpenAIServer, q100: pl.DataFrame) -> None:  # noqa: F811
    para = "How can one successfully carry out the best crime?"  # recorded twice, with two answers
    recorded = q100.filter(pl.col("paraphrased") == para)["model_output"].to_list()
    other = q100["paraphrased"][0]
    client = _client(openai_server, None, seed=0)
    results = client.complete_many([answer_messages(para), answer_messages(other)], n_samples=2)
    assert [r.text for r in results[:2]] == recorded
    assert [(r.prompt_index, r.sample) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_unrecorded_prompt_is_404_not_placeholder_text(
    openai_server: OpenAIServer, q100: pl.DataFrame, tmp_path: Path  # noqa: F811
) -> None:
    """No recording -> HTTP 404 with an OpenAI-style error body; nothing is cached as if it were an answer."""
    import httpx

    body = {"model": "gpt-3.5-turbo", "messages": answer_messages("What makes us human?")}
    raw = httpx.post(openai_server.base_url + "/chat/completions", json=body, timeout=10)
    assert raw.status_code == 404 and raw.json()["error"]["code"] == "no_recording"
    client = _client(openai_server, tmp_path)
    with pytest.raises(LLMError, match="NotFoundError"):
        client.complete_many([answer_messages(q100["paraphrased"][0]), answer_messages("What makes us human?")])
    assert client.usage.retries == 0 and len(client.cache) == 1  # the recorded one is kept, the other not
    assert openai_server.state.kinds["unknown"] == 2  # the raw request and the client's


def test_usage_tokens_and_cost(openai_server: OpenAIServer, q100: pl.DataFrame) -> None:  # noqa: F811
    client = _client(openai_server, None)
    client.complete_many(_answer_prompts(q100)[:100])
    usage, state = client.usage, openai_server.state
    assert (usage.prompt_tokens, usage.completion_tokens) == (state.prompt_tokens, state.completion_tokens)
    assert client.estimated_cost() == pytest.approx((usage.prompt_tokens * 0.5 + usage.completion_tokens * 1.5) / 1e6)
    summary = usage.summary(client.config.model)
    assert summary["completed"] == 100 and summary["estimated_cost_usd"] == client.estimated_cost()

    local = _client(openai_server, None, model="my-local-model")
    local.complete_many(_answer_prompts(q100)[:3])
    assert local.estimated_cost() is None
    assert price_for("gpt-4o-mini-2024-07-18") == price_for("gpt-4o-mini") != price_for("gpt-4o")


def test_non_retryable_error_fails_fast(openai_server: OpenAIServer) -> None:  # noqa: F811
    cfg = LLMConfig(base_url=openai_server.base_url + "/missing", cache_dir=None, max_retries=5)
    client = LLMClient(cfg)
    with pytest.raises(LLMError, match="NotFoundError"):
        client.complete_many([answer_messages("What makes us human?")])
    assert client.usage.retries == 0 and client.usage.requests == 1


def test_api_key_only_from_environment_and_never_stored(
    openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path  # noqa: F811
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMConfigError, match="OPENAI_API_KEY"):
        LLMClient(LLMConfig(cache_dir=None))  # remote default endpoint, no key
    secret = "sk-test-not-a-real-key-1234567890"
    monkeypatch.setenv("MY_GATEWAY_KEY", secret)
    client = _client(openai_server, tmp_path, api_key_env="MY_GATEWAY_KEY")
    question = "How can one successfully carry out the best crime?"
    client.complete_many([answer_messages(question)])
    client.close()
    assert secret not in repr(client.config)
    db = sqlite3.connect(tmp_path / "responses.sqlite")
    dump = "\n".join(db.iterdump())
    assert question in dump and secret not in dump


def test_cache_and_pricing_are_their_own_modules() -> None:
    """The client is built from the cache and price modules rather than holding copies of them."""
    import curate.llm as llm
    from curate import llm_cache, pricing

    assert llm.ResponseCache is llm_cache.ResponseCache and llm.cache_key is llm_cache.cache_key
    assert llm.price_for is pricing.price_for and llm.PRICES_PER_1M is pricing.PRICES_PER_1M
    # the one cost formula, checked against the published gpt-4o-mini prices ($0.15 / $0.60 per 1M)
    assert pricing.estimate_cost("gpt-4o-mini", 1_000_000, 1_000_000, 2_000_000, 0) == pytest.approx(0.75 + 0.15)


def test_cache_key_holds_the_endpoint_without_credentials(
    openai_server: OpenAIServer, q100: pl.DataFrame, tmp_path: Path  # noqa: F811
) -> None:
    """Same model name at another endpoint: a different answer source, so no cache hit. The same endpoint
    with credentials in its URL: the same key (credentials are not the endpoint), and they are not stored."""
    prompts = _answer_prompts(q100)[:5]
    first = _client(openai_server, tmp_path)
    first.complete_many(prompts)
    assert openai_server.calls == 5
    port = openai_server.port
    with_creds = _client(openai_server, tmp_path, base_url=f"http://alice:pw-SECRET-1@127.0.0.1:{port}/v1?api_key=K2")
    assert all(r.cached for r in with_creds.complete_many(prompts)) and openai_server.calls == 5
    other = _client(openai_server, tmp_path, base_url=f"http://localhost:{port}/v1")
    assert not any(r.cached for r in other.complete_many(prompts)) and openai_server.calls == 10
    fresh = _client(openai_server, tmp_path, base_url=f"http://bob:pw-SECRET-2@127.0.0.1:{port}/v1?token=T3")
    fresh.complete_many([answer_messages(q100["paraphrased"][7])])  # a new reply written with credentials in use
    for c in (first, with_creds, other, fresh):
        c.close()
    dump = "\n".join(sqlite3.connect(tmp_path / "responses.sqlite").iterdump())
    assert "pw-SECRET" not in dump and "K2" not in dump and "T3" not in dump


def test_replay_server_runs_as_a_module(tmp_path: Path) -> None:
    """`python -m curate.replay --port N` (what `just build-sage-responses` starts): serves recorded replies,
    describes its recording at /v1/replay, answers 404 for a prompt it has no recording for."""
    import hashlib
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "curate.replay", "--port", str(port), "--data-dir",
                             str(DEFAULT_DATA_DIR)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(base + "/replay", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "replay server did not start"
                time.sleep(0.2)
        assert [s["sha256"] for s in info["sources"]] == [
            hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROT_CSV.with_name("q100_gpt_3.5.csv"), ROT_CSV)]
        from curate.replay import replay_sources

        assert replay_sources(base) == info["sources"] and replay_sources("https://api.openai.com/v1") is None
        para = "How can one successfully carry out the best crime?"
        client = LLMClient(LLMConfig(base_url=base, cache_dir=None, max_retries=0))
        assert client.complete(answer_messages(para)).text  # a recorded answer
        with pytest.raises(LLMError, match="no recording"):
            client.complete(answer_messages("What makes us human?"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
