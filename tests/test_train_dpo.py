"""`curate train dpo` on tiny random models and pairs of real DFAR rows: the run records its reference and beta,
saves a teacher that the logit cache loads, its preference eval agrees with a reload of the saved weights, the
DPO loss starts at ln 2 and goes down, Ctrl-C names the command that resumes, and bad options are one line."""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from curate.errors import CurateError
from curate.store import DatasetStore
from tests.test_preference_eval import write_pairs
from tests.tiny import save_tiny
from train.config import DPOTeacherConfig, SFTConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUICK = dict(batch_size=2, max_length=48, logging_steps=1, save_steps=50, lora_r=4, lora_alpha=8, lora_dropout=0.0,
             eval_limit=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok) -> dict[str, Any]:
    """Pairs of real DFAR rows, a tiny student, and two 1-step SFT runs of it on dfar `lr`: one with merged
    weights (in a default-named folder, whose name ends with its identity), one adapter-only."""
    from tests.conftest import shared
    from train.sft import run_sft

    root = tmp_path_factory.mktemp("dpo")
    store = DatasetStore(root / "store")
    write_pairs(store, shared("dfar"))
    student = save_tiny(root / "student", tok, hidden=32, seed=0)
    sft = dict(model=str(student), store=str(store.root), max_steps=1, batch_size=2, limit=4, max_length=64,
               evaluate=False, lora_r=4)
    merged = run_sft(load_config(SFTConfig, None, {**sft, "save_merged": True, "runs_dir": str(root / "runs")}),
                     tokenizer=tok).run.path
    adapter = run_sft(load_config(SFTConfig, None, {**sft, "run_dir": str(root / "sft-adapter")}),
                      tokenizer=tok).run.path
    return {"root": root, "store": store, "sft_merged": merged, "sft_adapter": adapter}


def _cfg(world: dict[str, Any], run_dir: Path, **kw: Any) -> DPOTeacherConfig:
    values = {**QUICK, "model": str(world["sft_merged"]), "store": str(world["store"].root), "run_dir": str(run_dir),
              **kw}
    return load_config(DPOTeacherConfig, None, values)


def _logged(metrics: dict[str, Any], key: str) -> list[float]:
    return [r[key] for r in metrics["log_history"] if key in r and "train_loss" not in r]


def test_dpo_run_records_reference_and_beta_and_is_a_teacher(world: dict[str, Any], tmp_path: Path, tok) -> None:
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.models import ModelRef
    from train.dpo import run_dpo
    from train.preference_eval import PreferenceEvalConfig, run_preference_eval

    result = run_dpo(_cfg(world, tmp_path / "dpo", max_steps=3, learning_rate=1e-2), tokenizer=tok)
    run, sft = result.run.path, world["sft_merged"]
    info = json.loads((run / "run.json").read_text())
    ref = info["reference"]
    assert ref["path"] == str(sft) and ref["weights"] == "merged" and ref["method"] == "sft"
    assert sft.name.endswith("-" + ref["identity"])  # the SFT run's default folder name carries its identity
    assert ref["run_json_sha256"] == hashlib.sha256((sft / "run.json").read_bytes()).hexdigest()
    assert info["beta"] == 0.1 and info["method"] == "dpo" and info["trainer"] == "trl.DPOTrainer"
    assert yaml.safe_load((run / "config.yaml").read_text())["beta"] == 0.1
    assert info["config"]["model"] == str(sft) and info["template"] == "plain"
    card = (run / "README.md").read_text()
    assert "DPO (TRL `DPOTrainer`" in card and ref["identity"] in card and "curate train dpo --config" in card
    assert (run / "plots" / "rewards.png").is_file()
    # the run is a teacher: `--teacher <run>` resolves to its merged weights and the logit cache runs on it
    assert ModelRef.parse(str(run)).location == str((run / "merged").resolve())
    cache = cache_teacher_logits(world["store"], LogitCacheConfig(dataset="dfar", config="lr", model=str(run), k=4,
                                                                 limit=2, max_length=64, name="dpo-teacher-logits"),
                                 progress=False)
    assert cache.version.manifest["params"]["teacher_location"] == str((run / "merged").resolve())
    assert cache.version.splits("default")
    # the post-training eval (adapter on / off in memory) agrees with a reload of the saved merged weights against
    # the recorded reference and beta
    pe = result.metrics["preference_eval"]
    again, _ = run_preference_eval(PreferenceEvalConfig(model=str(run), store=str(world["store"].root), limit=4,
                                                        max_length=48, device="cpu", out_dir=str(tmp_path / "e1")),
                                   progress=False)
    assert again["reference"] == str(sft) and again["beta"] == 0.1
    assert again["margin"] == pytest.approx(pe["margin"], abs=2e-4) and again["n"] == pe["n"] == 4
    assert again["accuracy_sum"] == pe["accuracy_sum"] and again["accuracy_mean"] == pe["accuracy_mean"]
    assert abs(pe["margin"]) > 1e-3  # three steps at lr 1e-2 moved the policy: the check above is not 0 == 0
    # the reference scored against itself has margin 0; the teacher's own margin is reported beside it
    ref_eval, _ = run_preference_eval(PreferenceEvalConfig(model=str(sft), teacher=str(run), limit=4, max_length=48,
                                                           store=str(world["store"].root), device="cpu",
                                                           out_dir=str(tmp_path / "e2")), progress=False)
    assert ref_eval["margin"] == pytest.approx(0.0, abs=1e-6)
    assert ref_eval["teacher"]["margin"] == pytest.approx(pe["margin"], abs=2e-4)


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_dpo_loss_starts_at_ln2_and_goes_down_on_four_pairs(world: dict[str, Any], tmp_path: Path, tok,
                                                            weights: str) -> None:
    """Step 1 scores the policy against an identical reference (LoRA B = 0, or the explicit copy), so the loss is
    exactly -log sigmoid(0) = ln 2; six steps on the same four pairs then separate chosen from rejected."""
    from train.dpo import run_dpo

    lora = weights == "lora"
    cfg = _cfg(world, tmp_path / "dpo", model=str(world["sft_merged" if lora else "sft_adapter"]), limit=4,
               batch_size=4, max_steps=6, learning_rate=1e-2 if lora else 1e-3, use_lora=lora, evaluate=False,
               lr_scheduler="constant", seed=0)
    result = run_dpo(cfg, tokenizer=tok)
    losses, margins = _logged(result.metrics, "loss"), _logged(result.metrics, "rewards/margins")
    assert len(losses) == 6
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and margins[0] == pytest.approx(0.0, abs=1e-4)
    assert losses[-1] < losses[0] - 0.04 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert margins[-1] > 0.08, margins
    info = json.loads((result.run.path / "run.json").read_text())
    assert info["reference"]["weights"] == ("merged" if lora else "adapter")
    assert (result.run.path / "merged" / "config.json").is_file()
    assert (result.run.path / "adapter").is_dir() == lora


class _StopAtStep:
    """A console whose print raises Ctrl-C when the trainer reports step ``n`` (as a user's Ctrl-C would)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def print(self, text: Any = "", **_: Any) -> None:
        if str(text).startswith(f"step {self.n}/"):
            raise KeyboardInterrupt


def test_ctrl_c_names_the_dpo_command_that_resumes(world: dict[str, Any], tmp_path: Path, tok) -> None:
    from curate.cli import app
    from train.dpo import run_dpo

    run = tmp_path / "dpo"
    with pytest.raises(CurateError) as stopped:
        run_dpo(_cfg(world, run, max_steps=3, save_steps=1, evaluate=False, save_merged=False), tokenizer=tok,
                console=_StopAtStep(2))
    msg = str(stopped.value)
    assert "\n" not in msg and "checkpoint-1" in msg, msg
    resume = shlex.split(msg.split("Resume with: ", 1)[1])
    assert resume[:3] == ["curate", "train", "dpo"] and resume[-1] == "--resume"
    res = CliRunner().invoke(app, resume[1:])
    assert res.exit_code == 0, res.output
    segments = json.loads((run / "run.json").read_text())["segments"]
    assert [s["start_step"] for s in segments] == [0, 1]
    assert json.loads((run / "metrics.json").read_text())["train"]["global_step"] == 3
    recorded = (run / "metrics.json").read_bytes()
    again = CliRunner().invoke(app, resume[1:])  # nothing left to resume: said, and the results stay
    assert again.exit_code == 0 and "already finished at step 3/3" in again.output, again.output
    assert (run / "metrics.json").read_bytes() == recorded and len(json.loads((run / "run.json").read_text())[
        "segments"]) == 2


def test_bad_dpo_options_are_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    from curate.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "dpo", "--help"], terminal_width=200).output
    assert "--beta" in help_text and "0.1" in help_text and "5e-05" in help_text and "--save-merged" in help_text
    base = ["train", "dpo", "--store", str(world["store"].root), "--run-dir", str(tmp_path / "r")]
    for extra, expected in (
        (["--model", str(world["sft_merged"]), "--student-layers", "1"], "prune in its SFT run"),
        (["--model", str(world["sft_adapter"]), "--no-save-merged"], "keep --save-merged"),
        (["--model", str(world["sft_merged"]), "--dataset", "dfar", "--dataset-config", "lr"], "lacks column(s)"),
    ):
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code != 0 and expected in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
