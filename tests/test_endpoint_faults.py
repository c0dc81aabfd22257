"""`curate build sage-responses` against a misbehaving OpenAI-compatible server (tests/openai_server/faulty.py).

Each case goes through the public CLI: truncated, filtered, null and refused answers never become training
data and are asked again on a rerun; slow, endless, rate-limited, malformed, oversized and failing replies end
in one line naming the (redacted) URL and the status, with the count of answers already cached; usage the
server did not report honestly is "unknown", never $0 or negative.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from curate.cli import app
from curate.llm import LLMClient, LLMConfig
from curate.prompts import answer_messages
from curate.store import DatasetStore

from .openai_server.faulty import CUT_ANSWER, REFUSAL, FaultyServer, free_port

MARK = "Is lying acceptable to shield a friend from trouble (MARK)?"
PARAPHRASES = {
    "q1": ["Is it right to lie to protect a friend?", "Should one lie to protect a friend?", MARK],
    "q2": ["Is it wrong to steal bread to feed a child?", "May one steal food for a hungry child?",
           "Is taking bread for a starving child theft worth condemning?"],
}
QUESTION = {"q1": "Is it right to lie to protect a friend?", "q2": "Is it wrong to steal bread to feed a child?"}


@pytest.fixture(scope="module")
def server() -> Iterator[FaultyServer]:
    s = FaultyServer().start()
    yield s
    s.stop()


@pytest.fixture
def srv(server: FaultyServer) -> Iterator[FaultyServer]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    path = tmp_path / "q.csv"
    rows = ["question_id,question,paraphrased"]
    rows += [f'{q},"{QUESTION[q]}","{p}"' for q, ps in PARAPHRASES.items() for p in ps]
    path.write_text("\n".join(rows) + "\n")
    return path


def build(base_url: str, questions: Path, store: Path, *extra: str) -> tuple[Result, float]:
    args = ["build", "sage-responses", "--questions", str(questions), "--base-url", base_url, "--model",
            "gpt-4o-mini", "--store", str(store), "--initial-threshold", "0", "--min-threshold", "0",
            "--timeout", "5", "--max-retries", "1", *extra]
    start = time.monotonic()
    res = CliRunner().invoke(app, args)
    return res, time.monotonic() - start


def error_lines(res: Result) -> list[str]:
    assert "Traceback" not in res.output
    return [ln for ln in res.output.splitlines() if ln.startswith("error:")]


def answer_requests(srv: FaultyServer, paraphrase: str) -> list[dict]:
    return [s.body for s in srv.seen if s.body["messages"] == answer_messages(paraphrase)]


def cached_texts(store: Path) -> list[str]:
    (db,) = (store / "llm_cache").rglob("responses.sqlite")
    with sqlite3.connect(db) as con:
        return [t for (t,) in con.execute("SELECT text FROM completions")]


# ---- 1. truncated / filtered / empty / refused answers ------------------------------------------------------
BAD = {"length": ("length", CUT_ANSWER), "content_filter": ("content_filter", REFUSAL), "null": ("stop", ""),
       "refusal": ("stop", "")}


@pytest.mark.parametrize("mode", list(BAD))
def test_cut_or_refused_answer_is_never_selected_and_is_asked_again(
    mode: str, srv: FaultyServer, questions: Path, tmp_path: Path
) -> None:
    store = tmp_path / "s"
    srv.fault(mode, match="MARK")
    res, _ = build(srv.base_url, questions, store)
    assert res.exit_code == 0, res.output
    finish, text = BAD[mode]
    version = DatasetStore(store).get("sage-responses")
    resp = version.read_polars("responses")
    assert {"finish_reason", "refusal"} <= set(resp.columns)
    bad = resp.filter(resp["paraphrased"] == MARK)
    assert bad["finish_reason"].to_list() == [finish] and bad["model_output"].to_list() == [text]
    assert bad["refusal"].to_list() == [REFUSAL if mode == "refusal" else None]
    assert bad["selected"].to_list() == [False] and resp.filter(resp["paraphrased"] != MARK)["selected"].all()
    assert (resp.filter(resp["paraphrased"] != MARK)["finish_reason"] == "stop").all()
    selected = version.read_polars("selected")
    assert selected.height == 5 and not any(MARK in p for p in selected["prompt"])
    assert text == "" or text not in selected["completion"].to_list()
    # listed in the report and the card; retried once, except a cut answer (same max_tokens: cut again)
    assert "q1#2" in res.output and mode in res.output
    assert "q1#2" in version.card_path.read_text()
    assert len(answer_requests(srv, MARK)) == (1 if mode == "length" else 2)
    assert text == "" or text not in cached_texts(store)

    srv.reset()  # a healthy server: only the bad answer (and then its RoT) is asked again
    again, _ = build(srv.base_url, questions, store)
    assert again.exit_code == 0, again.output
    assert srv.calls == 2 and len(answer_requests(srv, MARK)) == 1
    assert DatasetStore(store).get("sage-responses").read_polars("selected").height == 6


def test_retry_truncated_asks_once_more_with_more_tokens(srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault("length", match="MARK")
    res, _ = build(srv.base_url, questions, tmp_path / "s", "--retry-truncated")
    assert res.exit_code == 0, res.output
    assert [r["max_tokens"] for r in answer_requests(srv, MARK)] == [512, 1024]
    resp = DatasetStore(tmp_path / "s").get("sage-responses").read_polars("responses")
    assert (resp["finish_reason"] == "stop").all() and CUT_ANSWER not in resp["model_output"].to_list()


# ---- 2. deadlines and Retry-After -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["drip", "endless"])
def test_request_deadline_bounds_slow_bodies(mode: str, srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault(mode)
    res, took = build(srv.base_url, questions, tmp_path / "s", "--request-timeout", "2")
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert f"{srv.base_url}/chat/completions" in line and "no complete reply within 2 s" in line
    assert "0 of 6 replies cached" in line
    assert took < 30  # 2 attempts of 2 s each, a backoff, and start-up; not 398 s


def test_retry_after_is_capped_and_shown(srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault("retry_after", times=1)
    res, took = build(srv.base_url, questions, tmp_path / "s", "--max-retry-wait", "1")
    assert res.exit_code == 0, res.output
    assert "waiting 1 s: rate limited by 127.0.0.1" in res.output
    assert took < 60
    help_text = CliRunner().invoke(app, ["build", "sage-responses", "--help"], env={"COLUMNS": "200"}).output
    for flag, default in (("--request-timeout", "300"), ("--max-retry-wait", "60"),
                          ("--max-response-bytes", "1000000"), ("--retry-truncated", "no-retry-truncated")):
        assert flag in help_text and default in help_text


# ---- 3. one-line errors ----------------------------------------------------------------------------------------
STATUS = {"invalid_json": "HTTP 200", "html200": "HTTP 200", "no_choices": "HTTP 200", "empty_choices": "HTTP 200",
          "html500": "HTTP 500", "non_utf8": "HTTP 200", "surrogate": "HTTP 200"}


@pytest.mark.parametrize("mode", list(STATUS))
def test_malformed_replies_are_retried_then_one_line(
    mode: str, srv: FaultyServer, questions: Path, tmp_path: Path
) -> None:
    srv.fault(mode, match="MARK")
    url = f"http://alice:PLANTED-pw@127.0.0.1:{srv.port}/v1?api_key=PLANTED-key"
    res, _ = build(url, questions, tmp_path / "s")
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert f"{srv.base_url}/chat/completions" in line and STATUS[mode] in line, line
    assert "5 of 6 replies cached" in line and "PLANTED" not in res.output
    assert len(answer_requests(srv, MARK)) == 2  # retried like a server error (--max-retries 1)
    assert not any("half a pair" in t or "caf" in t for t in cached_texts(tmp_path / "s"))


@pytest.mark.parametrize("mode", ["invalid_json", "non_utf8"])
def test_transient_malformed_replies_recover(mode: str, srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault(mode, times=2)
    res, _ = build(srv.base_url, questions, tmp_path / "s", "--max-retries", "3")
    assert res.exit_code == 0, res.output
    assert DatasetStore(tmp_path / "s").get("sage-responses").read_polars("selected").height == 6


@pytest.mark.parametrize("mode", ["401", "404"])
def test_auth_and_not_found_stop_at_the_first_reply(
    mode: str, srv: FaultyServer, questions: Path, tmp_path: Path
) -> None:
    srv.fault(mode)
    res, _ = build(srv.base_url, questions, tmp_path / "s", "--concurrency", "1", "--max-retries", "6")
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert f"{srv.base_url}/chat/completions" in line and f"HTTP {mode}" in line and "0 of 6 replies cached" in line
    assert "retries" not in line  # never retried, so no "after up to 6 retries"
    assert srv.calls == 1


def test_connection_refused_names_the_url(questions: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    res, _ = build(url, questions, tmp_path / "s")
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert f"{url}/chat/completions" in line and "connection refused" in line and "0 of 6 replies cached" in line


@pytest.mark.parametrize("mode", ["huge", "huge_chunked"])
def test_oversized_reply_is_cut_off_while_streaming(
    mode: str, srv: FaultyServer, questions: Path, tmp_path: Path
) -> None:
    srv.fault(mode, match="MARK")
    res, _ = build(srv.base_url, questions, tmp_path / "s")
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert "more than 1000000 bytes" in line and "--max-response-bytes" in line and "5 of 6 replies cached" in line
    assert max(len(t) for t in cached_texts(tmp_path / "s")) < 10_000


# ---- 4. usage -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no_usage", "negative_usage", "null_usage"])
def test_unreported_usage_is_unknown(mode: str, srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault(mode)
    res, _ = build(srv.base_url, questions, tmp_path / "s")
    assert res.exit_code == 0, res.output
    version = DatasetStore(tmp_path / "s").get("sage-responses")
    card = json.loads((version.path / "manifest.json").read_text())["card"]
    assert "estimated cost: unknown" in card["build_notes"] and "cost unknown" in res.output
    assert "$0.0000" not in card["build_notes"] and "$-" not in res.output + version.card_path.read_text()
    assert all(u["estimated_cost_usd"] is None and u["prompt_tokens"] >= 0 for u in card["usage"].values())

    srv.reset()  # a rerun: this run's calls, not the stored run's
    again, _ = build(srv.base_url, questions, tmp_path / "s")
    assert again.exit_code == 0, again.output
    assert "answers: 0 calls (all cached)" in again.output and "version already built" in again.output
    assert srv.calls == 0


# ---- already right before this issue, kept so --------------------------------------------------------------
def test_nul_characters_round_trip_and_resets_recover(srv: FaultyServer, questions: Path, tmp_path: Path) -> None:
    srv.fault("nul")
    res, _ = build(srv.base_url, questions, tmp_path / "s")
    assert res.exit_code == 0, res.output
    resp = DatasetStore(tmp_path / "s").get("sage-responses").read_polars("responses")
    assert all(a.startswith("keep\x00this ") for a in resp["model_output"])
    srv.reset()
    again, _ = build(srv.base_url, questions, tmp_path / "s")
    assert again.exit_code == 0 and srv.calls == 0  # the NUL answers came back from the cache as they were

    srv.fault("reset", times=3)
    res, _ = build(srv.base_url, questions, tmp_path / "s2", "--max-retries", "3")
    assert res.exit_code == 0, res.output
    assert srv.calls == 12 + 3  # 6 answers + 6 RoTs, and the 3 dropped connections asked again


def test_a_label_capped_on_purpose_is_kept_when_accepted(srv: FaultyServer, tmp_path: Path) -> None:
    """A judge caps its one-word label with max_tokens: with accept_truncated the cut reply is complete and
    cached; without it, it is returned as unusable and not cached."""
    srv.fault("length")
    prompts = [answer_messages(p) for p in PARAPHRASES["q1"]]
    cfg = LLMConfig(model="judge", base_url=srv.base_url, cache_dir=tmp_path, max_tokens=8, max_retries=0)
    strict = LLMClient(cfg).complete_many(prompts)
    assert [c.problem for c in strict] == ["length"] * 3 and srv.calls == 3
    judged = LLMClient(cfg, accept_truncated=True).complete_many(prompts)
    assert all(c.ok and c.text == CUT_ANSWER for c in judged) and srv.calls == 6
    assert all(c.cached for c in LLMClient(cfg, accept_truncated=True).complete_many(prompts)) and srv.calls == 6
