"""The whole preference-distillation chain once with the real SmolLM2-135M on a few real DFAR pairs: pairs with
SmolLM2's own rejected answers -> DPO teacher (TRL) -> teacher cache of both sides -> SmolLM2 scored at its ids ->
advantage table -> DCKD and ADPA+ students (4 of 30 layers). Mechanics are covered by the tiny-model tests;
this one checks the real model, tokenizer and data go through every step, with the numbers meaning something."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from curate.configs import load_config
from curate.store import DatasetStore

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(max_steps=1, batch_size=2, max_length=96, logging_steps=1, save_steps=100, evaluate=False)


def test_smollm2_dpo_caches_advantage_dckd_adpa_plus(tmp_path: Path, dfar_source: Path, tok: Any) -> None:
    from builders.advantage import build_advantage, load_advantage
    from builders.dfar import DfarConfig, build_dfar
    from builders.preferences import PreferencesConfig, build_preferences
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from train.adpa import run_adpa
    from train.config import ADPAConfig, DCKDConfig, DPOTeacherConfig
    from train.dckd import run_dckd
    from train.dpo import run_dpo

    store = DatasetStore(tmp_path / "store")
    dfar = build_dfar(store, dfar_source, DfarConfig(limit=4)).version
    prefs = build_preferences(store, PreferencesConfig(from_dataset=dfar.ref, rejected="model:smollm2", limit=2,
                                                       split="train", max_new_tokens=12, device="cpu")).version
    pairs = prefs.read("pairs")
    assert pairs.num_rows == 2 and all(c != r for c, r in zip(pairs["chosen"].to_pylist(),
                                                               pairs["rejected"].to_pylist(), strict=True))
    common = {**RUN, "store": str(store.root)}
    teacher = run_dpo(load_config(DPOTeacherConfig, None, {**common, "model": "smollm2", "dataset": prefs.ref,
                                                           "run_dir": str(tmp_path / "dpo")}), tokenizer=tok)
    cache = dict(dataset="preferences", config="sides", k=8, max_length=96, batch_size=4, dtype="float32")
    cache_teacher_logits(store, LogitCacheConfig(model=str(teacher.run.path), name="t", **cache), progress=False)
    cache_teacher_logits(store, LogitCacheConfig(model="smollm2", name="r", at_ids="t", **cache), progress=False)
    adv = build_advantage(store, "t", "r", name="adv").version
    rows = [e for e in load_advantage(adv) if e.side == "rejected"]
    values = np.concatenate([e.advantage.ravel() for e in rows])
    # one DPO step moved the teacher off its reference, by a little: advantages are small but not all zero
    assert 0 < np.abs(values).mean() < 2.0

    student = {**common, "model": "smollm2", "student_layers": 4}
    dckd = run_dckd(load_config(DCKDConfig, None, {**student, "cache": "t", "save_merged": True,
                                                   "run_dir": str(tmp_path / "dckd")}), tokenizer=tok)
    first = dckd.metrics["log_history"][0]
    assert first["kl_chosen"] > 0.1 and first["kl_rejected"] > 0.1  # a 4-layer student is far from its teacher
    plus = run_adpa(load_config(ADPAConfig, None, {**student, "advantage": "adv", "init": str(dckd.run.path),
                                                   "student_layers": None, "run_dir": str(tmp_path / "plus")}),
                    tokenizer=tok)
    first = plus.metrics["log_history"][0]
    assert np.isfinite(first["loss"]) and first["adv"] != 0.0
    assert first["loss"] == pytest.approx(first["nll"] - 1.6 * first["adv"], rel=1e-4)
