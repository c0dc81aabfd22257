"""Advantage-Guided Distillation for Preference Alignment (ADPA), offline, from an advantage table
(`curate build advantage`: A = log p_T - log p_ref at the DPO teacher's top-k ids of each rejected token):

    loss = NLL(chosen) - gamma · mean over rejected tokens of sum_k q_S(v_k) · A(v_k)

(train/losses/adpa.py; ``--advantage-clamp reference`` reproduces the public code's clamp). ``--init <run>``
starts from another run, the DCKD student for ADPA+ (what the public recipe's ADPA run in fact is).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from curate.errors import CurateError
from curate.store import DatasetStore, Version
from train.config import ADPAConfig
from train.kd import cache_template, check_tokenizer
from train.losses import get_preference_loss
from train.preference_distill import PairSide, PreferenceDistillTrainer, pair_up
from train.preference_run import prepare_pairs, run_preference_distill
from train.runner import Prepared, RunResult


def get_advantage(store: DatasetStore, spec: str) -> Version:
    try:
        return store.get(spec)
    except CurateError as e:
        raise CurateError(f"{e}; build one first: curate build advantage (just cache-advantage)") from None


def advantage_sides(version: Version, split: str) -> list[PairSide]:
    from builders.advantage import load_advantage

    return [PairSide(e.id, str(e.side), e.input_ids, e.prompt_len, top_ids=e.topk_ids, advantage=e.advantage,
                     valid=e.valid) for e in load_advantage(version, split)]


def student_config(cfg: ADPAConfig) -> ADPAConfig:
    """The config the student is loaded from: ``--init`` (ADPA+) replaces ``--model``."""
    return replace(cfg, model=cfg.init) if cfg.init else cfg


def prepare_adpa(cfg: ADPAConfig, tokenizer: Any | None = None, *, adv: Version | None = None) -> Prepared:
    from builders.advantage import advantage_params

    store = DatasetStore(cfg.store)
    adv = adv if adv is not None else get_advantage(store, cfg.advantage)
    params = advantage_params(adv)
    template = cache_template(cfg, adv, params, method="ADPA", source="table")
    student = student_config(cfg)

    def check(tok: Any) -> str:
        return check_tokenizer(tok, params, adv, student.model)

    pairs = pair_up(advantage_sides(adv, cfg.train_split), f"{adv.ref} split {cfg.train_split!r}")
    if not any(r.top_ids is not None and r.top_ids.size for _, r in pairs):
        raise CurateError(f"{adv.ref} has no advantage rows on rejected responses in split {cfg.train_split!r}")
    return prepare_pairs(student, store, adv, pairs, template=template, check_tokenizer=check, tokenizer=tokenizer,
                         facts={"teacher": params.get("teacher_model"), "reference": params.get("reference_model"),
                                "init": cfg.init, "advantage_clamp": cfg.advantage_clamp})


def run_adpa(cfg: ADPAConfig, *, tokenizer: Any | None = None, console: Any = None) -> RunResult:
    """One ADPA (or, with --init, ADPA+) run end to end."""
    adv = get_advantage(DatasetStore(cfg.store), cfg.advantage)
    loss = get_preference_loss("adpa", gamma=cfg.gamma, clamp=cfg.advantage_clamp)
    return run_preference_distill(cfg, f"{adv.name}-{adv.tag}", lambda: prepare_adpa(cfg, tokenizer, adv=adv), loss,
                                  PreferenceDistillTrainer, console=console)
