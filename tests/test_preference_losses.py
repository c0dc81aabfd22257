"""DCKD and ADPA against dense full-vocabulary formulas written in the test: the tail bucket at k < V, both
advantage clamps, pooled token means over sequences of different lengths, padding, and gradients."""

from __future__ import annotations

import pytest
import torch

from curate.errors import CurateError
from train.losses import PREFERENCE_LOSSES, SideTokens, get_preference_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V = 23
EPS = 1e-8


def _rand(seed: int, *shape: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _side(student: torch.Tensor, teacher: torch.Tensor, k: int, targets: torch.Tensor,
          advantage: torch.Tensor | None = None) -> SideTokens:
    """What a trainer hands the loss: student log-probs [N, V] and the cache's top-k rows of ``teacher`` logits
    (plus, for ADPA, the dense [N, V] advantage read at those ids)."""
    lp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = lp.topk(k, -1)
    return SideTokens(logprobs=torch.log_softmax(student, -1), targets=targets, top_ids=top_ids,
                      teacher_logprobs=top_lp, residual=(1 - top_lp.exp().sum(-1)).clamp_min(0),
                      advantage=None if advantage is None else advantage.gather(-1, top_ids))


def _dense_nll(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(student.double(), -1)[torch.arange(len(targets)), targets]


def _dense_kl(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token KL(p_T ‖ q_S) of the coarse-grained distributions: the teacher's k most likely ids kept, every
    other id merged into one outcome (for both p and q); with k = V that is the plain dense KL."""
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    out = []
    for pi, qi in zip(p, q, strict=True):
        kept = torch.argsort(pi, descending=True)[:k]
        rest = torch.ones(V, dtype=torch.bool)
        rest[kept] = False
        pc, qc = pi[kept], qi[kept]
        if k < V:
            pc, qc = torch.cat([pc, pi[rest].sum()[None]]), torch.cat([qc, qi[rest].sum()[None]])
        out.append((pc * (pc.log() - qc.log())).sum())
    return torch.stack(out)


def _dense_adv(student: torch.Tensor, advantage: torch.Tensor, clamp: str) -> torch.Tensor:
    """Per-token sum over the whole vocabulary of q_S(v) · A(v) (k = V), optionally with the public clamp."""
    q, a = torch.softmax(student.double(), -1), advantage.double()
    if clamp == "reference":
        q, a = q.clamp(EPS, 1 - EPS), a.clamp(EPS, 1 - EPS)
    return (q * a).sum(-1)


def _advantage(seed: int, n: int) -> torch.Tensor:
    """log p_T - log p_ref of two random models: values of both signs, some in (0, 1), some above 1."""
    a = torch.log_softmax(_rand(seed, n, V), -1) - torch.log_softmax(_rand(seed + 1, n, V), -1)
    assert n < 4 or ((a < 0).any() and (a > 1).any() and ((a > 0) & (a < 1)).any())
    return a


def _pair(n_c: int, n_r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return {"s_c": _rand(seed, n_c, V), "t_c": _rand(seed + 1, n_c, V), "s_r": _rand(seed + 2, n_r, V),
            "t_r": _rand(seed + 3, n_r, V), "y_c": torch.randint(0, V, (n_c,), generator=g),
            "y_r": torch.randint(0, V, (n_r,), generator=g), "a_r": _advantage(seed + 4, n_r)}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [V, 7, 1])
@pytest.mark.parametrize("weights", [{}, {"alpha": 0.3, "beta": 0.7}])
def test_dckd_equals_dense_formula(k: int, weights: dict[str, float]) -> None:
    """k = V: the plain dense KL; k < V: the KL of the distributions coarse-grained by hand onto top-k + rest."""
    d = _pair(5, 6)
    got = get_preference_loss("dckd", **weights)(_side(d["s_c"], d["t_c"], k, d["y_c"]),
                                                 _side(d["s_r"], d["t_r"], k, d["y_r"]))
    alpha, beta = weights.get("alpha", 0.1), weights.get("beta", 0.1)
    nll = _dense_nll(d["s_c"], d["y_c"]).mean()
    kl_c, kl_r = _dense_kl(d["s_c"], d["t_c"], k).mean(), _dense_kl(d["s_r"], d["t_r"], k).mean()
    _close(got["nll"], nll)
    _close(got["kl_chosen"], kl_c)
    _close(got["kl_rejected"], kl_r)
    _close(got["loss"], nll + alpha * kl_c + beta * kl_r)
    if k < V:  # the bucket matters: the sparse KL is not the dense one
        assert float((_dense_kl(d["s_r"], d["t_r"], V).mean() - kl_r).abs()) > 1e-3


@pytest.mark.parametrize("clamp", ["none", "reference"])
def test_adpa_equals_dense_formula_at_full_k(clamp: str) -> None:
    d = _pair(5, 6)
    gamma = 1.6
    got = get_preference_loss("adpa", clamp=clamp)(_side(d["s_c"], d["t_c"], V, d["y_c"]),
                                                   _side(d["s_r"], d["t_r"], V, d["y_r"], d["a_r"]))
    adv = _dense_adv(d["s_r"], d["a_r"], clamp).mean()
    _close(got["adv"], adv)
    _close(got["nll"], _dense_nll(d["s_c"], d["y_c"]).mean())
    _close(got["loss"], _dense_nll(d["s_c"], d["y_c"]).mean() - gamma * adv)


def test_the_two_clamps_differ() -> None:
    """Negative advantages count in the published formula and ~0 in the reference code's."""
    d = _pair(5, 6)
    r = _side(d["s_r"], d["t_r"], V, d["y_r"], d["a_r"])
    c = _side(d["s_c"], d["t_c"], V, d["y_c"])
    none, ref = (float(get_preference_loss("adpa", clamp=m)(c, r)["adv"]) for m in ("none", "reference"))
    assert abs(none - ref) > 1e-2


def test_terms_are_pooled_token_means_over_sequences_of_different_lengths() -> None:
    """A batch of two rejected sequences with 3 and 7 response tokens (chosen 4 and 6): every term is the mean
    over all 10 tokens of its side, which differs from the mean of the two per-sequence means."""
    d = _pair(10, 10, seed=7)
    chosen = _side(d["s_c"], d["t_c"], 5, d["y_c"])
    dckd = get_preference_loss("dckd")(chosen, _side(d["s_r"], d["t_r"], 5, d["y_r"]))
    adpa = get_preference_loss("adpa")(chosen, _side(d["s_r"], d["t_r"], V, d["y_r"], d["a_r"]))
    cases = [(dckd["nll"], _dense_nll(d["s_c"], d["y_c"]), 4), (dckd["kl_rejected"],
             _dense_kl(d["s_r"], d["t_r"], 5), 3), (adpa["adv"], _dense_adv(d["s_r"], d["a_r"], "none"), 3)]
    for got, per_token, first in cases:
        pooled = per_token.mean()
        per_sequence = (per_token[:first].mean() + per_token[first:].mean()) / 2
        assert float((pooled - per_sequence).abs()) > 1e-3  # the test can tell the two apart
        _close(got, pooled)


@pytest.mark.parametrize("explicit_mask", [True, False])
def test_padding_entries_contribute_nothing(explicit_mask: bool) -> None:
    """Rows keeping 1..7 of width 7 (a top-p cache): padding has a junk id, log-prob -inf and a junk advantage.
    Each token's KL is the bucket rule at its own k and its advantage sum runs over its own kept ids only."""
    d = _pair(3, 6, seed=3)
    kept = torch.tensor([1, 3, 7, 2, 5, 4])
    width = 7
    side = _side(d["s_r"], d["t_r"], width, d["y_r"], d["a_r"])
    pad = torch.arange(width)[None, :] >= kept[:, None]
    side.residual = torch.stack([1 - side.teacher_logprobs[i, :n].exp().sum() for i, n in enumerate(kept)])
    side.top_ids = side.top_ids.masked_fill(pad, 5)
    side.teacher_logprobs = side.teacher_logprobs.masked_fill(pad, -torch.inf)
    side.advantage = side.advantage.masked_fill(pad, torch.nan if explicit_mask else 0.0)
    side.pad = pad if explicit_mask else None
    chosen = _side(d["s_c"], d["t_c"], V, d["y_c"])
    s = d["s_r"].clone().requires_grad_(True)
    side.logprobs = torch.log_softmax(s, -1)
    kl = get_preference_loss("dckd")(chosen, side)["kl_rejected"]
    adv = get_preference_loss("adpa")(chosen, side)["adv"]
    want_kl = torch.stack([_dense_kl(d["s_r"][i:i + 1], d["t_r"][i:i + 1], int(n))[0] for i, n in enumerate(kept)])
    p_r = torch.softmax(d["t_r"].double(), -1)
    q_r = torch.softmax(d["s_r"].double(), -1)
    want_adv = torch.stack([(q_r[i] * d["a_r"][i].double())[torch.argsort(p_r[i], descending=True)[:n]].sum()
                            for i, n in enumerate(kept)])
    _close(kl, want_kl.mean())
    _close(adv, want_adv.mean())
    (kl + adv).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("clamp", ["none", "reference"])
def test_adpa_gradient_matches_the_dense_formula(clamp: str) -> None:
    d = _pair(4, 9, seed=11)
    s_c, s_r = d["s_c"].clone().requires_grad_(True), d["s_r"].clone().requires_grad_(True)
    chosen = _side(s_c, d["t_c"], V, d["y_c"])
    loss = get_preference_loss("adpa", clamp=clamp)(chosen, _side(s_r, d["t_r"], V, d["y_r"], d["a_r"]))["loss"]
    g_c, g_r = torch.autograd.grad(loss, [s_c, s_r])
    ds_c, ds_r = d["s_c"].double().requires_grad_(True), d["s_r"].double().requires_grad_(True)
    dense = _dense_nll(ds_c, d["y_c"]).mean() - 1.6 * _dense_adv(ds_r, d["a_r"], clamp).mean()
    w_c, w_r = torch.autograd.grad(dense, [ds_c, ds_r])
    assert float(g_r.abs().max()) > 1e-4 and torch.isfinite(g_r).all() and torch.isfinite(g_c).all()
    _close(g_c, w_c)
    _close(g_r, w_r)


@pytest.mark.parametrize("k", [V, 5])
def test_dckd_gradient_is_finite_and_matches_dense_at_full_k(k: int) -> None:
    d = _pair(4, 9, seed=13)
    s_c, s_r = d["s_c"].clone().requires_grad_(True), d["s_r"].clone().requires_grad_(True)
    get_preference_loss("dckd")(_side(s_c, d["t_c"], k, d["y_c"]), _side(s_r, d["t_r"], k, d["y_r"]))["loss"].backward()
    assert all(torch.isfinite(g).all() and float(g.abs().max()) > 1e-4 for g in (s_c.grad, s_r.grad))
    if k == V:
        ds_c, ds_r = d["s_c"].double().requires_grad_(True), d["s_r"].double().requires_grad_(True)
        dense = (_dense_nll(ds_c, d["y_c"]).mean() + 0.1 * _dense_kl(ds_c, d["t_c"], V).mean()
                 + 0.1 * _dense_kl(ds_r, d["t_r"], V).mean())
        w_c, w_r = torch.autograd.grad(dense, [ds_c, ds_r])
        _close(s_c.grad, w_c)
        _close(s_r.grad, w_r)


def test_empty_rejected_side_gives_zero_terms_with_a_graph() -> None:
    d = _pair(3, 0)
    rejected = _side(d["s_r"], d["t_r"], V, d["y_r"], d["a_r"])
    for name in PREFERENCE_LOSSES:
        s_c = d["s_c"].clone().requires_grad_(True)
        out = get_preference_loss(name)(_side(s_c, d["t_c"], V, d["y_c"]), rejected)
        assert float(out.get("adv", out.get("kl_rejected"))) == 0.0
        out["loss"].backward()
        assert torch.isfinite(s_c.grad).all()


def test_registry_refuses_unknown_names_weights_and_clamps() -> None:
    assert set(PREFERENCE_LOSSES) == {"dckd", "adpa"}
    with pytest.raises(CurateError, match="dckd, adpa"):
        get_preference_loss("dpo")
    with pytest.raises(CurateError, match="gamma"):
        get_preference_loss("dckd", gamma=1.0)
    with pytest.raises(CurateError, match="none, reference"):
        get_preference_loss("adpa", clamp="soft")
    d = _pair(2, 2)
    with pytest.raises(CurateError, match="advantage"):
        get_preference_loss("adpa")(_side(d["s_c"], d["t_c"], V, d["y_c"]), _side(d["s_r"], d["t_r"], V, d["y_r"]))
