"""`curate train rl-sage`: the SaGE-consistency reward against hand-computed groups, and a few GRPO steps on a
tiny model (mechanics: run folder, adapter, reward log)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.configs import ConfigError
from train.config import RLSageConfig
from train.rl_sage import SageReward, group_consistency

from .tiny import save_tiny, single_thread, smollm2_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_group_consistency_by_hand() -> None:
    # question a: answers at 0°, 60°, 90°; question b: 0° and 180°; the last answer of b is empty.
    emb = np.array([_unit(0), _unit(60), _unit(90), _unit(0), _unit(180), _unit(45)])
    qids = ["a", "a", "a", "b", "b", "b"]
    got = group_consistency(qids, emb, empty=[False, False, False, False, False, True])
    c60, c90, c30 = 0.5, 0.0, math.cos(math.radians(30))
    assert got == pytest.approx([(c60 + c90) / 2, (c60 + c30) / 2, (c90 + c30) / 2, -1.0, -1.0, 0.0])


def test_group_consistency_mixes_rots_and_handles_lonely_answers() -> None:
    ans = np.array([_unit(0), _unit(90), _unit(30)])
    rot = np.array([_unit(0), _unit(0), _unit(0)])  # same rule everywhere: cos 1
    got = group_consistency(["q", "q", "r"], ans, rot)
    assert got == pytest.approx([0.8 * 0.0 + 0.2 * 1.0, 0.2, 0.0])  # r has no peer: 0


@pytest.mark.slow
def test_reward_on_texts_matches_independent_minilm_cosines() -> None:
    from sentence_transformers import SentenceTransformer

    from curate.sage import _packaged_minilm

    answers = ["Lying is wrong because it breaks trust.", "You should not lie; honesty builds trust.",
               "Lying is sometimes fine.", "Help strangers when you can.", "Helping others is good."]
    qids = [1, 1, 1, 2, 2]
    reward = SageReward("sentence-transformers/all-MiniLM-L6-v2")
    got = reward(prompts=[""] * 5, completions=answers, question_id=qids)
    st = SentenceTransformer(str(_packaged_minilm()))
    e = st.encode(answers)
    cos = (e @ e.T) / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
    expected = [(cos[0, 1] + cos[0, 2]) / 2, (cos[1, 0] + cos[1, 2]) / 2, (cos[2, 0] + cos[2, 1]) / 2,
                cos[3, 4], cos[4, 3]]
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[1] > got[2]  # the answer that agrees with its group earns more than the dissenting one
    assert reward.history == [pytest.approx(float(np.mean(expected)), abs=1e-5)]


def test_batch_must_hold_whole_groups() -> None:
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        RLSageConfig(batch_size=6, num_generations=4).validate()


def test_help_lists_rl_sage_defaults() -> None:
    r = CliRunner().invoke(app, ["train", "rl-sage", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0 and "--num-generations" in r.output and "quality100" in r.output


def test_a_few_grpo_steps_on_a_tiny_model(tmp_path: Path) -> None:
    from builders.sage_eval import load_local_model
    from train.rl_sage import run_rl_sage

    model = save_tiny(tmp_path / "tiny", smollm2_tokenizer())
    q = tmp_path / "q.csv"
    q.write_text("question_id,question,paraphrased\n1,Is it ok to lie?,Is it ok to lie?\n"
                 "1,Is it ok to lie?,Is lying acceptable?\n2,Should I help?,Should I help?\n"
                 "2,Should I help?,Is helping good?\n")
    cfg = RLSageConfig(model=str(model), questions=str(q), max_steps=2, batch_size=4, num_generations=2,
                       max_completion_length=6, runs_dir=str(tmp_path / "runs"), store=str(tmp_path / "s"),
                       format_weight=0.1)
    with single_thread():
        result = run_rl_sage(cfg)
    run = result.run.path
    assert (run / "adapter").is_dir() and (run / "plots" / "reward.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2 and len(metrics["reward_per_step"]) == 2
    info = json.loads((run / "run.json").read_text())
    assert info["trainer"] == "trl.GRPOTrainer" and info["config"]["method"] == "rl-sage"
    record = json.loads((run / "datasets.json").read_text())[0]  # a valid dataset name: `curate eval` reads it
    assert record["name"] == "sage-questions" and record["rows_used"] == {"train": 4}
    with single_thread():
        loaded, _ = load_local_model(str(run), device="cpu")  # the run is a model `curate sage eval` can score
    assert loaded is not None
