"""Dual-Constrained KD (DCKD) of a DPO teacher into a small student, offline, from a teacher cache of the
preference pairs' sides (`curate cache-logits --dataset preferences --config sides --teacher <dpo run>`):

    loss = NLL(chosen) + alpha · KL(p_T ‖ q_S on chosen tokens) + beta · KL(p_T ‖ q_S on rejected tokens)

each a token mean over its side (train/losses/dckd.py). The cache's tokenizer fingerprint and parent are
checked before any step, as for KD.
"""

from __future__ import annotations

from typing import Any

from curate.errors import CurateError
from curate.store import DatasetStore, Version
from train.config import DCKDConfig
from train.kd import cache_template, check_tokenizer, get_cache, resolve_parent
from train.losses import get_preference_loss
from train.preference_distill import PairSide, PreferenceDistillTrainer, pair_up
from train.preference_run import prepare_pairs, run_preference_distill
from train.runner import Prepared, RunResult


def cache_sides(cache: Version, split: str) -> list[PairSide]:
    """The cache's rows of one split as pair sides (refused, one line, when the cache has no side column)."""
    from curate.logit_codec import load_cache

    out = []
    for e in load_cache(cache, split):
        if e.side is None:
            raise CurateError(f"{cache.ref} has no side column: DCKD needs a cache of the `sides` config of a "
                              "preferences version (curate cache-logits --dataset preferences --config sides)")
        out.append(PairSide(e.id, e.side, e.input_ids, e.prompt_len, top_ids=e.topk_ids,
                            teacher_logprobs=e.topk_logprobs, residual=e.residual))
    return out


def prepare_dckd(cfg: DCKDConfig, tokenizer: Any | None = None, *, cache: Version | None = None) -> Prepared:
    from curate.logit_codec import cache_params

    store = DatasetStore(cfg.store)
    cache = cache if cache is not None else get_cache(store, cfg.cache, "just cache-advantage")
    params = cache_params(cache)
    template = cache_template(cfg, cache, params, method="DCKD")
    resolve_parent(store, cache)  # the parent must be in the store (one line otherwise)

    def check(tok: Any) -> str:
        return check_tokenizer(tok, params, cache, cfg.model)

    pairs = pair_up(cache_sides(cache, cfg.train_split), f"{cache.ref} split {cfg.train_split!r}")
    prepared = prepare_pairs(cfg, store, cache, pairs, template=template, check_tokenizer=check,
                             tokenizer=tokenizer, facts={"teacher": params.get("teacher"), "cache_k": params.get("k")})
    if params.get("tail_samples"):  # said, as KD says it for losses without a tail estimator
        prepared.notes.append(f"{cache.ref} has tail draws; DCKD's KL terms use the kept ids + one bucket, "
                              "so the draws are not used")
    return prepared


def run_dckd(cfg: DCKDConfig, *, tokenizer: Any | None = None, console: Any = None) -> RunResult:
    """One DCKD run end to end: checks (cache, parent, tokenizer, sides) first, then train, save, evaluate."""
    cache = get_cache(DatasetStore(cfg.store), cfg.cache, "just cache-advantage")
    loss = get_preference_loss("dckd", alpha=cfg.alpha, beta=cfg.beta)
    return run_preference_distill(cfg, f"{cache.name}-{cache.tag}",
                                  lambda: prepare_dckd(cfg, tokenizer, cache=cache), loss,
                                  PreferenceDistillTrainer, console=console)
