"""The SaGE-responses builder end to end: the real openai SDK against the OpenAI-compatible replay server
(real gpt-3.5-turbo answers and RoTs from q100), faults, resume, batch mode, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from builders.sage_responses import SageResponsesConfig, build_sage_responses, load_questions
from curate.cli import app
from curate.errors import InputError
from curate.llm import ResponseCache
from curate.store import DatasetStore

from .conftest import REPO, shared
from .openai_server.fixture import OpenAIServer, openai_server  # noqa: F401

N_QUESTIONS = 12
# 12 retries: 30 % injected faults must not exhaust one request's retries by chance (7 in a row: 0.3^7 each)
FAST = {"timeout": 0.5, "backoff_base": 0.01, "backoff_max": 0.1, "batch_poll_interval": 0.05, "max_retries": 12}


@pytest.fixture(scope="module")
def q100() -> Path:
    return shared("sage", "quality100")


def _params(q100: Path, server: OpenAIServer, **kw: object) -> SageResponsesConfig:
    return SageResponsesConfig(questions=str(q100 / "q100.csv"), base_url=server.base_url,
                               limit_questions=N_QUESTIONS, concurrency=16, **kw)  # type: ignore[arg-type]


def test_build_with_faults_matches_reference_and_rerun_is_free(
    openai_server: OpenAIServer, q100: Path, tmp_path: Path  # noqa: F811
) -> None:
    from curate.sage import sage_scores

    store = DatasetStore(tmp_path / "s")
    openai_server.set_faults(0.3, ("429", "500", "stall"), seed=7, stall_s=2.0)
    r = build_sage_responses(store, _params(q100, openai_server), execution=FAST)
    n = N_QUESTIONS * 5
    resp = r.version.read_polars("responses")
    assert resp.height == n and resp.select("question_id", "paraphrase_idx").n_unique() == n
    assert (resp["model_output"] != "").all() and (resp["rot"] != "").all()
    assert openai_server.stats()["faults"], "faults were injected"

    # answers and RoTs are the recorded gpt-3.5 ones, so scores equal the scorer on the reference file
    ref = pl.read_csv(q100 / "q100_gpt_3.5_rot.csv", infer_schema=False).filter(
        pl.col("question_id").is_in(resp["question_id"].unique().to_list())
    )
    joined = resp.join(ref.select("question_id", "paraphrased", pl.col("rot").alias("ref_rot")),
                       on=["question_id", "paraphrased"])
    assert joined.height == n and (joined["rot"] == joined["ref_rot"]).all()
    expected = sage_scores(ref).select("question_id", pl.col("sage").alias("expected"))
    got = resp.group_by("question_id").agg(pl.col("sage").first()).join(expected, on="question_id")
    assert (got["sage"] - got["expected"]).abs().max() < 1e-9

    # selection: exactly the questions whose score beat the threshold in force; thresholds decay
    per_q = resp.group_by("question_id", maintain_order=True).agg(pl.col("sage", "threshold", "selected").first())
    assert (per_q["selected"] == (per_q["sage"] > per_q["threshold"])).all()
    th = per_q["threshold"].to_list()
    assert th[0] == 0.9 and all(b == pytest.approx(max(0.6, a * 0.99)) for a, b in zip(th, th[1:], strict=False))
    sel = r.version.read_polars("selected")
    assert sel.height == 5 * int(per_q["selected"].sum())
    assert sel["prompt"][0].startswith("Answer the following question") if sel.height else True
    assert (r.version.path / "figures" / "sage_selection.png").stat().st_size > 10_000
    assert "figures/sage_selection.png" in r.version.card_path.read_text()
    assert r.version.read_polars("feedback").height == 0

    openai_server.set_faults(0.0)
    openai_server.reset_counts()
    again = build_sage_responses(store, _params(q100, openai_server), execution=FAST)
    assert openai_server.calls == 0
    assert not again.created and again.version.hash == r.version.hash


def test_batch_mode_equals_online(openai_server: OpenAIServer, q100: Path, tmp_path: Path) -> None:  # noqa: F811
    online = build_sage_responses(DatasetStore(tmp_path / "a"), _params(q100, openai_server), execution=FAST,
                                  figures=False)
    batch = build_sage_responses(DatasetStore(tmp_path / "b"), _params(q100, openai_server, batch=True),
                                 execution=FAST, figures=False)
    assert openai_server.batch_lines > 0
    assert batch.version.hash == online.version.hash


def test_feedback_set_with_target_model(openai_server: OpenAIServer, q100: Path, tmp_path: Path) -> None:  # noqa: F811
    """The replay server answers every model alike, so target and aligned scores tie: nothing is strictly
    more consistent, the feedback set is empty, and the target columns are filled."""
    r = build_sage_responses(DatasetStore(tmp_path / "s"), _params(q100, openai_server, target_model="smol"),
                             execution=FAST, figures=False)
    resp = r.version.read_polars("responses")
    assert (resp["target_output"] == resp["model_output"]).all()
    assert (resp["target_sage"] == resp["sage"]).all()
    assert r.version.read_polars("feedback").height == 0


def test_killed_midway_resumes_without_repeats(openai_server: OpenAIServer, q100: Path, tmp_path: Path) -> None:  # noqa: F811
    store_dir = tmp_path / "s"
    openai_server.set_latency(0.05)
    code = (
        "from builders.sage_responses import SageResponsesConfig, build_sage_responses\n"
        "from curate.store import DatasetStore\n"
        f"p = SageResponsesConfig(questions={str(q100 / 'q100.csv')!r}, base_url={openai_server.base_url!r}, "
        f"limit_questions={N_QUESTIONS}, concurrency=2)\n"
        f"build_sage_responses(DatasetStore({str(store_dir)!r}), p)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "test"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while openai_server.calls < 30 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert openai_server.calls >= 30
    assert not (store_dir / "llm_cache" / "responses.sqlite").exists(), "replays never touch the real cache"
    (replay_cache,) = (store_dir / "llm_cache").glob("replay-*/responses.sqlite")
    cache = ResponseCache(replay_cache)
    done_before = len(cache)
    cache.close()
    assert 0 < done_before < 2 * 5 * N_QUESTIONS
    assert not any((store_dir / "datasets").glob("*/versions/*")), "no version from the killed run"

    openai_server.set_latency(0.0)
    openai_server.reset_counts()
    r = build_sage_responses(DatasetStore(store_dir), _params(q100, openai_server), execution=FAST, figures=False)
    assert openai_server.calls == 2 * 5 * N_QUESTIONS - done_before  # finished items were not asked again
    resp = r.version.read_polars("responses")
    assert resp.height == 5 * N_QUESTIONS and resp.select("question_id", "paraphrase_idx").n_unique() == resp.height


def test_one_paraphrase_and_plain_question_rules(openai_server: OpenAIServer, q100: Path, tmp_path: Path) -> None:  # noqa: F811
    rows = pl.read_csv(q100 / "q100.csv", infer_schema=False)
    first = rows["question_id"][0]
    one = rows.filter(pl.col("question_id") == first).head(1)
    path = tmp_path / "one.csv"
    one.select("question_id", "question", "paraphrased").write_csv(path)
    r = build_sage_responses(DatasetStore(tmp_path / "s"),
                             SageResponsesConfig(questions=str(path), base_url=openai_server.base_url),
                             execution=FAST, figures=False)
    resp = r.version.read_polars("responses")
    assert resp.height == 1 and resp["sage"][0] == 1.0  # a single answer cannot disagree with itself
    plain = tmp_path / "plain.csv"
    one.select("question_id", "question").write_csv(plain)
    with pytest.raises(InputError, match="plain.csv: no 'paraphrased' column: give --paraphrases N"):
        build_sage_responses(DatasetStore(tmp_path / "s2"),
                             SageResponsesConfig(questions=str(plain), base_url=openai_server.base_url))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replayed_build_is_labelled_cached_apart_and_rerun_reports_no_calls(
    openai_server: OpenAIServer, q100: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """No --base-url: the endpoint comes from $OPENAI_BASE_URL and is recorded as such (not None); the
    replay server is recognised, its replies go to their own cache, and `replayed_from` names the recording
    files with their sha256 (computed here independently). A rerun says it made no calls."""
    store_dir = tmp_path / "s"
    real_cache = ResponseCache(store_dir / "llm_cache" / "responses.sqlite")  # a store with real paid replies
    real_cache.close()
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    args = ["build", "sage-responses", "--questions", str(q100 / "q100.csv"), "--limit-questions", "3",
            "--store", str(store_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "SaGE: embedding" in res.output  # the long silent step says what it does
    assert "answers: 15 calls" in res.output and "(replayed)" in res.output
    version = DatasetStore(store_dir).get("sage-responses")
    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest["params"]["base_url"] == openai_server.base_url
    expected = [{"name": f, "sha256": _sha256(q100 / f)} for f in ("q100_gpt_3.5.csv", "q100_gpt_3.5_rot.csv")]
    got = [{"name": Path(s["location"]).name, "sha256": s["sha256"]} for s in manifest["params"]["replayed_from"]]
    assert got == expected and manifest["card"]["replayed_from"] == manifest["params"]["replayed_from"]
    assert {s["sha256"] for s in manifest["sources"]} >= {e["sha256"] for e in expected}
    card = version.card_path.read_text()
    assert "replayed offline" in card and all(e["sha256"][:16] in card for e in expected)
    real = ResponseCache(store_dir / "llm_cache" / "responses.sqlite")
    assert len(real) == 0, "replayed replies never land in the real cache"
    real.close()
    assert len(list((store_dir / "llm_cache").glob("replay-*/responses.sqlite"))) == 1

    openai_server.reset_counts()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert openai_server.calls == 0
    assert "answers: 0 calls (all cached), 15 replies" in again.output and "rots: 0 calls (all cached)" in again.output
    assert "15 calls" not in again.output  # not the stored usage of the first run


MALFORMED = {
    "missing column": (b"question_id,paraphrased\n1,Is it ok?\n", r"q.csv, row 1: missing column\(s\) question"),
    "empty question": (b"question_id,question,paraphrased\n1,,Is it ok?\n", r"q.csv, row 2: empty question"),
    "conflicting question": (b"question_id,question,paraphrased\n1,A?,A1\n1,B?,B1\n",
                             r"q.csv, row 3: question_id 1 has two different questions"),
    "truncated": (b'question_id,question,paraphrased\n1,A?,"A1', r"q.csv, row 2 .*truncated"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_question_file(case: str, tmp_path: Path) -> None:
    content, pattern = MALFORMED[case]
    path = tmp_path / "q.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=pattern):
        load_questions(path)
    res = CliRunner().invoke(app, ["build", "sage-responses", "--questions", str(path), "--store",
                                   str(tmp_path / "s"), "--base-url", "http://127.0.0.1:9/v1"])
    assert res.exit_code == 1 and "q.csv" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s" / "datasets").exists()


def test_score_cli_formats(q100: Path, tmp_path: Path) -> None:
    """`curate sage score FILE --format csv`: one row per question_id, then the mean (the full-file
    reproduction of the published mean lives in test_sage.py)."""
    from curate.sage import sage_scores

    ref = pl.read_csv(q100 / "q100_gpt_3.5_rot.csv", infer_schema=False)
    subset = ref.filter(pl.col("question_id").is_in(ref["question_id"].unique(maintain_order=True).head(8).to_list()))
    path = tmp_path / "subset.csv"
    subset.write_csv(path)
    expected = sage_scores(subset)
    res = CliRunner().invoke(app, ["sage", "score", str(path), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "SaGE: embedding" in res.stderr and "SaGE: embedding" not in res.stdout  # status on stderr only
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "question_id,sage" and len(lines) == 1 + 8 + 1
    got = {q: float(v) for q, v in (ln.split(",") for ln in lines[1:-1])}
    assert got == pytest.approx(dict(zip(expected["question_id"], expected["sage"], strict=True)), abs=1e-9)
    assert lines[-1] == f"mean,{expected['sage'].mean()}"
    js = CliRunner().invoke(app, ["sage", "score", str(path), "--format", "json"])
    assert js.exit_code == 0 and len(json.loads(js.stdout)["scores"]) == 8
    bad = CliRunner().invoke(app, ["sage", "score", str(q100 / "q100.csv")])
    assert bad.exit_code == 1 and "model_output" in bad.output and "q100.csv" in bad.output
