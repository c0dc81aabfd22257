"""--resume of a run that already reached its last step: nothing is retrained, re-evaluated or rewritten (a 0-step
"resume" used to replace the real results with a 0.0 loss), while a raised --max-steps still trains further."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.tiny import tiny_kd_store
from train.config import KDConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUICK: dict[str, Any] = dict(max_steps=2, batch_size=2, limit=4, learning_rate=1e-2, logging_steps=1,
                             max_length=48, eval_limit=2, gen_max_new_tokens=2, lora_r=4, lora_alpha=8,
                             lora_dropout=0.0, evaluate=False)
# What a finished run's resume must leave byte for byte: results, card, run.json (segments) and the replay files.
RECORDS = ("metrics.json", "README.md", "run.json", "config.yaml", "datasets.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, Path]:
    """A tiny DFAR version, a tiny student and a k=8 teacher-logit cache: what `curate train kd` needs."""
    return tiny_kd_store(tmp_path_factory.mktemp("resume-finished"), tok, n_train=16, k=8, max_length=48)


def _cfg(world: dict[str, Path], run_dir: Path, **kw: Any) -> KDConfig:
    values = {**QUICK, "model": str(world["student"]), "store": str(world["store"]), "run_dir": str(run_dir), **kw}
    return load_config(KDConfig, None, values)


def _records(run: Path) -> dict[str, bytes]:
    """Every file whose bytes a no-op resume must keep (the evaluation's outputs and checkpoints included)."""
    names = [*RECORDS, *(str(p.relative_to(run)) for p in sorted((run / "eval").rglob("*")) if p.is_file())]
    out = {name: (run / name).read_bytes() for name in names}
    out["checkpoints"] = " ".join(sorted(p.name for p in (run / "checkpoints").iterdir())).encode()
    return out


def test_cli_resume_of_a_finished_kd_run_changes_nothing(world: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The new-user trial: the identical command with --resume says "already finished" and exits 0, and
    metrics.json, the card, run.json and the evaluation stay the first run's."""
    from curate.cli import app

    run = tmp_path / "run"
    args = ["train", "kd", "--model", str(world["student"]), "--store", str(world["store"]), "--max-steps", "2",
            "--batch-size", "2", "--limit", "4", "--max-length", "48", "--lora-r", "4", "--run-dir", str(run),
            "--set", "eval_limit=2", "--set", "gen_max_new_tokens=2", "--set", "logging_steps=1"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    before = _records(run)
    assert json.loads(before["metrics.json"])["train"]["train_loss"] > 0
    assert (run / "eval").is_dir() and before["checkpoints"] == b"checkpoint-2"
    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("a finished run needs no model to say so")

    monkeypatch.setattr("train.modeling.load_causal_lm", no_weights)
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "already finished at step 2/2: nothing to resume" in again.output and "run finished" not in again.output
    assert "--overwrite" in again.output
    assert "mean train loss 0.0000" not in again.output and "evaluating" not in again.output
    assert _records(run) == before
    assert len(json.loads((run / "run.json").read_text())["segments"]) == 1


def test_resume_with_more_steps_trains_further(world: dict[str, Path], tmp_path: Path, tok: Any) -> None:
    """A raised --max-steps (with --allow-changes) is more to train: the run continues from its last step."""
    from train.kd import run_kd

    run = tmp_path / "run"
    done = run_kd(_cfg(world, run), tokenizer=tok)
    same = run_kd(_cfg(world, run, resume=True), tokenizer=tok)
    assert same.already_finished and same.metrics == done.metrics
    more = run_kd(_cfg(world, run, resume=True, max_steps=4, allow_changes=True), tokenizer=tok)
    assert not more.already_finished
    assert more.metrics["train"]["global_step"] == 4 and more.metrics["train"]["train_loss"] > 0
    assert json.loads((run / "metrics.json").read_text())["train"]["global_step"] == 4
    segments = json.loads((run / "run.json").read_text())["segments"]
    assert [s["start_step"] for s in segments] == [0, 2]
    assert segments[1]["changes"] == {"max_steps": [2, 4]}
    again = run_kd(_cfg(world, run, resume=True, max_steps=4, allow_changes=True), tokenizer=tok)
    assert again.already_finished and again.run.finished_at == (4, 4)


def test_epoch_sized_run_and_unfinished_outputs(world: dict[str, Path], tmp_path: Path, tok: Any) -> None:
    """Sized by --epochs, the final step is the checkpoint's own max_steps; a run killed after its last
    checkpoint but before its results were written is not finished (resuming completes its outputs)."""
    from train.kd import run_kd
    from train.run_folder import RunFolder

    run = tmp_path / "run"
    done = run_kd(_cfg(world, run, max_steps=-1, epochs=1), tokenizer=tok)
    step = done.metrics["train"]["global_step"]
    before = _records(run)
    same = run_kd(_cfg(world, run, max_steps=-1, epochs=1, resume=True), tokenizer=tok)
    assert same.already_finished and same.run.finished_at == (step, step)
    assert _records(run) == before
    for lost in ("metrics.json", "README.md", "adapter"):
        part = tmp_path / f"without-{lost}"
        shutil.copytree(run, part)
        target = part / lost
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        cfg = _cfg(world, part, max_steps=-1, epochs=1, resume=True)
        assert RunFolder.prepare(cfg, "x", is_main=True).finished_at is None, lost
