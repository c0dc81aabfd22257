"""`curate sage-loop`: rounds of select → LoRA SFT → SaGE eval on a tiny model, and resuming a killed loop at
its first unfinished round (aligned answers from the offline replay server)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from train.sage_loop import SageLoopConfig, run_sage_loop

from .openai_server.fixture import OpenAIServer, openai_server  # noqa: F401
from .tiny import save_tiny, single_thread, smollm2_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELDOUT = """question_id,question,paraphrased
1,Is it ok to lie?,Is it ok to lie?
1,Is it ok to lie?,Is lying acceptable?
2,Should I help strangers?,Should I help strangers?
2,Should I help strangers?,Is helping strangers good?
"""


def test_loop_runs_rounds_and_resumes_at_first_unfinished(openai_server: OpenAIServer,  # noqa: F811
                                                          tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "tiny", smollm2_tokenizer())
    heldout = tmp_path / "heldout.csv"
    heldout.write_text(HELDOUT)
    cfg = SageLoopConfig(model=str(model), base_url=openai_server.base_url, aligned_limit=4, heldout=str(heldout),
                         rounds=2, max_steps=1, batch_size=2, max_new_tokens=6, initial_threshold=0.8,
                         round_decay=0.5, min_threshold=0.3, loop_dir=str(tmp_path / "loop"),
                         store=str(tmp_path / "s"))
    with single_thread():
        first = run_sage_loop(cfg)
    loop = tmp_path / "loop"
    assert [r["round"] for r in first.rounds] == [0, 1, 2]
    assert first.rounds[1]["threshold"] == pytest.approx(0.8) and first.rounds[2]["threshold"] == pytest.approx(0.4)
    assert first.rounds[2]["rows_selected"] >= first.rounds[1]["rows_selected"] > 0  # lower threshold, more data
    assert "aligned answers: built sage-responses@v1" in first.actions
    assert (loop / "rounds.png").stat().st_size > 1000 and "| 2 | 0.400 |" in (loop / "rounds.md").read_text()
    assert first.best["mean_sage"] == max(r["mean_sage"] for r in first.rounds)

    # killed after round 2's training, before its eval was recorded: round 2 is the first unfinished round
    state = json.loads((loop / "state.json").read_text())
    state["rounds"] = [r for r in state["rounds"] if r["round"] < 2]
    (loop / "state.json").write_text(json.dumps(state))
    with single_thread():
        second = run_sage_loop(cfg)
    assert second.actions[0] == "round 0 (base): finished earlier, skipped"
    assert "round 1: finished earlier, skipped" in second.actions
    assert "round 2 sft: reused" in second.actions
    assert second.rounds[2]["eval_hash"] == first.rounds[2]["eval_hash"]  # cached answers: the same version

    # killed during round 2's training (no adapter yet): that round trains again from the base model
    state["rounds"] = [r for r in state["rounds"] if r["round"] < 2]
    (loop / "state.json").write_text(json.dumps(state))
    shutil.rmtree(loop / "round-2" / "run" / "adapter")
    with single_thread():
        third = run_sage_loop(cfg)
    assert "round 2 sft: trained" in third.actions and len(third.rounds) == 3

    # another endpoint (a replay server's port changes per start) is not another loop: everything is reused
    with single_thread():
        fourth = run_sage_loop(SageLoopConfig(**{**cfg.__dict__, "base_url": "http://127.0.0.1:9/v1"}))
    assert all("skipped" in a for a in fourth.actions) and len(fourth.rounds) == 3

    # another loop's settings in the same folder are refused in one line
    with pytest.raises(CurateError, match="other settings"):
        run_sage_loop(SageLoopConfig(**{**cfg.__dict__, "max_steps": 3}))


def test_cli_help_shows_defaults() -> None:
    r = CliRunner().invoke(app, ["sage-loop", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0 and "--rounds" in r.output and "moral100-low" in r.output
