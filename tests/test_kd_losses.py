"""Sparse KD losses: exact against dense references, the documented top-k + residual rule, temperature
scaling, and gradients that reach only LoRA parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curate.errors import CurateError
from train.losses import LOSSES, get_loss
from train.losses.base import RESIDUAL_FLOOR

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V = 11


def _dense_reference(name: str, t_logits: torch.Tensor, s_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · D(softmax(t/T) ‖ softmax(s/T)) over the full vocabulary, float64, written from the definitions."""
    p = torch.softmax(t_logits.double() / temp, -1)
    q = torch.softmax(s_logits.double() / temp, -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        d = kl(p, q)
    elif name == "reverse_kl":
        d = kl(q, p)
    else:
        m = 0.5 * (p + q)
        d = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return temp**2 * d


def _sparse_reference(name: str, t_logits: np.ndarray, s_logits: np.ndarray, k: int, temp: float) -> np.ndarray:
    """The documented rule in float64 numpy: coarse-grain both onto top-k(teacher) + one bucket, floor the
    buckets, temper the coarse distributions (p^(1/T) renormalised), T² · D."""
    out = []
    for t, s in zip(t_logits.astype(np.float64), s_logits.astype(np.float64), strict=True):
        p = np.exp(t - np.logaddexp.reduce(t))
        q = np.exp(s - np.logaddexp.reduce(s))
        top = np.argsort(-p)[:k]
        pc = np.append(p[top], max(1 - p[top].sum(), RESIDUAL_FLOOR))
        qc = np.append(q[top], max(1 - q[top].sum(), RESIDUAL_FLOOR))
        pt = pc ** (1 / temp) / (pc ** (1 / temp)).sum()
        qt = qc ** (1 / temp) / (qc ** (1 / temp)).sum()

        def kl(a: np.ndarray, b: np.ndarray) -> float:
            return float((a * (np.log(a) - np.log(b))).sum())

        if name == "forward_kl":
            d = kl(pt, qt)
        elif name == "reverse_kl":
            d = kl(qt, pt)
        else:
            m = 0.5 * (pt + qt)
            d = 0.5 * kl(pt, m) + 0.5 * kl(qt, m)
        out.append(temp**2 * d)
    return np.array(out)


def _cache_rows(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the teacher-logit cache stores per position: top-k ids / log-probs and the residual mass."""
    lp = torch.log_softmax(t_logits, -1)
    top_lp, top_ids = lp.topk(k, -1)
    residual = (1 - top_lp.exp().sum(-1)).clamp_min(0)
    return top_ids, top_lp, residual


def _gather(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's full-vocabulary log-probs at the cached ids (what the KD trainer passes the loss)."""
    return torch.log_softmax(logits, -1).gather(-1, ids)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, V, generator=g) * 2, torch.randn(6, V, generator=g) * 2


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_full_k_equals_dense(name: str, temp: float, logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    t, s = logits
    ids, lps, res = _cache_rows(t, V)
    got = get_loss(name).token_loss(_gather(s, ids), lps, res, temp, complete=True)
    torch.testing.assert_close(got.double(), _dense_reference(name, t, s, temp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_top_k_follows_documented_rule(name: str, k: int, temp: float,
                                       logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    t, s = logits
    ids, lps, res = _cache_rows(t, k)
    got = get_loss(name).token_loss(_gather(s, ids), lps, res, temp)
    np.testing.assert_allclose(got.numpy(), _sparse_reference(name, t.numpy(), s.numpy(), k, temp),
                               rtol=1e-4, atol=1e-6)


def test_sparse_forward_kl_is_a_lower_bound_and_zero_at_the_teacher(
        logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    t, s = logits
    ids, lps, res = _cache_rows(t, 4)
    loss = get_loss("forward_kl")
    sparse = loss.token_loss(_gather(s, ids), lps, res, 1.0)
    assert torch.all(sparse <= _dense_reference("forward_kl", t, s, 1.0).float() + 1e-6)
    at_teacher = loss.token_loss(_gather(t, ids), lps, res, 1.0)
    assert float(at_teacher.abs().max()) < 1e-5


def test_temperature_scales_by_t_squared(logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    t, s = logits
    ids, lps, res = _cache_rows(t, V)
    loss = get_loss("forward_kl")
    for temp in (0.5, 3.0):
        tl = torch.log_softmax(t / temp, -1)
        sl = torch.log_softmax(s / temp, -1)
        plain_kl = loss.divergence(tl, sl)
        got = loss.token_loss(_gather(s, ids), lps, res, temp, complete=True)
        torch.testing.assert_close(got, temp**2 * plain_kl, rtol=1e-5, atol=1e-6)


def test_residual_floor_keeps_zero_residual_finite() -> None:
    """fp16 cache residuals underflow to 0; the bucket floor keeps loss and gradient finite."""
    s = torch.randn(3, V, requires_grad=True)
    t = torch.randn(3, V) * 8
    ids, lps, _ = _cache_rows(t, 5)
    zero = torch.zeros(3)
    for name in LOSSES:
        out = get_loss(name).token_loss(_gather(s, ids), lps, zero, 2.0).sum()
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


def test_label_loss_is_kl_over_renormalised_label_words() -> None:
    g = torch.Generator().manual_seed(1)
    student_full = torch.log_softmax(torch.randn(4, V, generator=g), -1)
    teacher_full = torch.log_softmax(torch.randn(4, V, generator=g), -1)
    words = [2, 7]
    temp = 2.0
    got = get_loss("forward_kl").label_loss(student_full[:, words], teacher_full[:, words], temp)
    p = torch.softmax(teacher_full[:, words] / temp, -1)
    q = torch.softmax(student_full[:, words] / temp, -1)
    want = temp**2 * (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(got, want)


def test_jsd_is_bounded_and_symmetric(logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    t, s = logits
    jsd = get_loss("jsd")
    a = jsd.divergence(torch.log_softmax(t * 5, -1), torch.log_softmax(s * 5, -1))
    b = jsd.divergence(torch.log_softmax(s * 5, -1), torch.log_softmax(t * 5, -1))
    torch.testing.assert_close(a, b)
    assert float(a.max()) <= math.log(2) + 1e-6


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(CurateError, match="forward_kl"):
        get_loss("adpa")


def test_gradients_reach_only_lora_parameters() -> None:
    from tests.tiny import tiny_llama
    from train.kd import ce_and_distillation
    from train.kd_data import KDCollator, kd_features
    from train.modeling import add_lora
    from train.token_rows import logprobs_at, supervised_positions

    vocab, k = 40, 5
    model = add_lora(tiny_llama(vocab, hidden=16, layers=2, heads=2), r=4, alpha=8, dropout=0.0,
                     target_modules="all-linear", quantized=False)
    g = torch.Generator().manual_seed(0)

    class Row:  # the fields of a CachedExample the feature builder reads
        def __init__(self, n: int, p: int) -> None:
            self.input_ids = torch.randint(0, vocab, (n,), generator=g).numpy()
            self.prompt_len = p
            lp, ids = torch.log_softmax(torch.randn(n - p, vocab, generator=g), -1).topk(k, -1)
            self.topk_ids, self.topk_logprobs = ids.numpy(), lp.numpy()
            self.residual = (1 - lp.exp().sum(-1)).numpy()
            self.label_logprobs = None

    batch = KDCollator(pad_id=0)([kd_features(Row(12, 5), 64), kd_features(Row(9, 3), 64)])
    rows, pos, targets = supervised_positions(batch["labels"])
    logprobs = logprobs_at(model, batch["input_ids"], batch["attention_mask"], rows, pos)
    ce, kd = ce_and_distillation(logprobs, rows, pos, targets, batch, kd_loss=get_loss("forward_kl"),
                                 temperature=2.0)  # exactly what KDTrainer.compute_loss computes
    (0.5 * ce + 0.5 * kd).backward()
    named = dict(model.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and all(named[n].requires_grad for n in lora)
    assert all(named[n].grad is not None for n in lora)  # lora_A's is zero at step 0: lora_B starts at zero
    assert any(float(named[n].grad.abs().sum()) > 0 for n in lora if "lora_B" in n)
    leaked = sorted(n for n, p in named.items() if n not in lora and p.grad is not None)
    assert not leaked, leaked


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_padded_variable_length_rows_follow_the_rule_with_finite_gradients(
        name: str, temp: float, logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rows of a top-p cache keep different numbers of entries, padded with id 0 and log-prob -inf: each row's
    loss is the documented rule at its own k, and no gradient turns NaN through the padding."""
    t_logits, s_logits = logits
    kept = [1, 3, 5, 2, 7, 4]
    width = max(kept)
    ids, lps, res = _cache_rows(t_logits, width)
    pad = torch.arange(width)[None, :] >= torch.tensor(kept)[:, None]
    residual = torch.stack([1 - lps[i, :n].exp().sum() for i, n in enumerate(kept)]).clamp_min(0)
    ids, lps = ids.masked_fill(pad, 0), lps.masked_fill(pad, -torch.inf)
    s = s_logits.clone().requires_grad_(True)
    got = get_loss(name).token_loss(_gather(s, ids), lps, residual, temp)
    want = [_sparse_reference(name, t_logits[i:i + 1].numpy(), s_logits[i:i + 1].numpy(), n, temp)[0]
            for i, n in enumerate(kept)]
    assert np.allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_forward_kl_estimator_is_unbiased(tau: float) -> None:
    """Rows drawn by the cacher's own sampler (`reduce_logits(samples=N)`, from the teacher or a tempered
    proposal with importance weights): over many independent draws the mean estimate equals the dense forward
    KL, within 4 standard errors measured from the same draws."""
    from curate.teacher_scoring import reduce_logits

    g = torch.Generator().manual_seed(3)
    vocab, n_samples, draws = 50, 12, 4000
    t_logits = torch.randn(3, vocab, generator=g) * 2.5
    s_logits = torch.randn(3, vocab, generator=g) * 2.5
    dense = _dense_reference("forward_kl", t_logits, s_logits, 1.0).numpy()
    loss = get_loss("forward_kl")
    estimates = []
    for seed in range(draws):
        r = reduce_logits(t_logits.clone(), vocab, samples=n_samples, seed=seed, proposal_temperature=tau)
        weights = r.sample_counts.float() / n_samples
        if tau != 1.0:
            weights = weights * r.sample_log_weights.exp()
        assert torch.equal(r.sample_counts.sum(-1), torch.full((3,), n_samples))
        est = loss.sampled_token_loss(_gather(s_logits, r.topk_ids), r.topk_logprobs, weights, 1.0)
        estimates.append(est.numpy())
    est = np.array(estimates, dtype=np.float64)  # [draws, 3]
    mean, stderr = est.mean(0), est.std(0, ddof=1) / math.sqrt(draws)
    assert np.all(stderr > 0) and np.all(4 * stderr < 0.05 * dense)  # a tolerance that can fail
    assert np.all(np.abs(mean - dense) <= 4 * stderr + 1e-6), (mean, dense, stderr)


def test_sampled_caches_refuse_biased_losses_and_temperatures() -> None:
    s, t, w = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3) / 3
    with pytest.raises(CurateError, match="only forward_kl"):
        get_loss("reverse_kl").sampled_token_loss(s, t, w, 1.0)
    with pytest.raises(CurateError, match="temperature-1 KL"):
        get_loss("forward_kl").sampled_token_loss(s, t, w, 2.0)


# ---- tail draws (--tail-samples) -----------------------------------------------------------------------
TAIL_V = 600  # three sampler blocks of 256, the last one short (88)


def _tail_rows(seed: int, m: int, t_logits: torch.Tensor) -> object:
    from curate.teacher_scoring import reduce_logits

    # entry-cost selection: the top-40 entries past each row's kept count belong to the tail too
    return reduce_logits(t_logits.clone(), 40, entry_cost=0.004, tail_samples=m, seed=seed)


def _tail_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, TAIL_V, generator=g) * 2.5
    t[2] = -1e4
    t[2, 7] = 10.0  # a row whose tail has (numerically) no mass: no draws
    return t


def test_tail_draws_follow_the_teacher_outside_the_kept_ids() -> None:
    """Draws never hit a kept id, carry the teacher's exact log-probs, and their frequencies fit p restricted to
    the tail (chi-square over bins with >= 5 expected draws, p > 1e-4; the row without tail mass has none)."""
    from scipy.stats import chi2

    t_logits = _tail_logits()
    p = torch.softmax(t_logits.double(), -1)
    m, repeats = 16, 400
    counts = np.zeros((2, TAIL_V))
    for seed in range(repeats):
        r = _tail_rows(seed, m, t_logits)
        assert not torch.isfinite(r.tail_logprobs[2]).any()
        for i in range(2):
            kept = set(r.topk_ids[i, : int(r.kept[i])].tolist())
            ids = r.tail_ids[i]
            assert not kept & set(ids.tolist())
            assert torch.all(ids[1:] >= ids[:-1])
            assert torch.allclose(r.tail_logprobs[i].double(), p[i, ids].log(), atol=1e-4)
            np.add.at(counts[i], ids.numpy(), 1)
    for i in range(2):
        tail = p[i].numpy().copy()
        tail[r.topk_ids[i, : int(r.kept[i])].numpy()] = 0
        expected = tail / tail.sum() * m * repeats
        big = expected >= 5
        obs = np.append(counts[i][big], counts[i][~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        stat = float(((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum())
        assert big.sum() > 20 and chi2.sf(stat, len(obs) - 1) > 1e-4, (i, stat, len(obs))


def test_coarse_plus_tail_term_is_an_unbiased_forward_kl_and_gradient() -> None:
    """Over many draws, forward KL on (kept ids + bucket) plus the tail term averages to the dense KL, and its
    gradient to the dense gradient q - p (within 4 standard errors measured from the same draws); the coarse
    term alone falls short of the dense KL by far more than that, so a missing tail term fails."""
    t_logits = _tail_logits()[:2]
    # a student near the teacher (as in distillation): its tail mass is small too, so a tail term that forgot to
    # renormalise the student within the tail (a bias of r · log q_T) is far outside the tolerance
    s_logits = t_logits + torch.randn(2, TAIL_V, generator=torch.Generator().manual_seed(6))
    dense = _dense_reference("forward_kl", t_logits, s_logits, 1.0).numpy()
    dense_grad = (torch.softmax(s_logits.double(), -1) - torch.softmax(t_logits.double(), -1)).numpy()
    loss = get_loss("forward_kl")
    assert loss.uses_tail(1.0) and not loss.uses_tail(2.0) and not get_loss("jsd").uses_tail(1.0)
    p = torch.softmax(t_logits.double(), -1)
    entropy = -(p * p.log()).sum(-1).float()  # what the cache stores per token
    values, grads, coarse = [], [], []
    for seed in range(1500):
        r = _tail_rows(seed, 4, t_logits)
        ids, top_lp, res, tail_ids, tail_lp = (x.clone() for x in (r.topk_ids, r.topk_logprobs, r.residual.float(),
                                                                   r.tail_ids, r.tail_logprobs))  # out of inference
        s = s_logits.clone().requires_grad_(True)
        lp = torch.log_softmax(s, -1)
        head = loss.token_loss(lp.gather(-1, ids), top_lp, res, 1.0)
        total = head + loss.tail_token_loss(lp.gather(-1, ids), top_lp, lp.gather(-1, tail_ids),
                                            torch.isfinite(tail_lp), res, entropy)
        total.sum().backward()
        values.append(total.detach().numpy())
        coarse.append(head.detach().numpy())
        grads.append(s.grad.numpy().copy())
    v, g = np.array(values, np.float64), np.array(grads, np.float64)
    se = v.std(0, ddof=1) / math.sqrt(len(v))
    assert np.all(np.abs(v.mean(0) - dense) <= 4 * se + 1e-5), (v.mean(0), dense, se)
    assert np.all(dense - np.array(coarse).mean(0) > 10 * se), "the tail term must matter in this test"
    g_se = g.std(0, ddof=1) / math.sqrt(len(g))
    err = np.linalg.norm(g.mean(0) - dense_grad, axis=-1)
    assert np.all(err <= 4 * np.sqrt((g_se**2).sum(-1))), (err, np.sqrt((g_se**2).sum(-1)))



def test_tail_term_on_quantised_rows_is_unbiased_for_the_cached_teacher() -> None:
    """With u8-delta-coarse codes the decoded kept mass S is not 1 - r, so the coarse term's teacher p̂ (kept
    log-probs and log r renormalised together) holds r̂ = r / (S + r) in its bucket. The tail term is a mean over
    draws, so its expectation is exactly sum_x p|T(x) · (the term with the single draw x): fed every tail id,
    coarse + expected tail term must equal the documented value, and its gradient q - p̂ (p̂'s bucket shared out
    as the teacher's own tail), to float64 precision. A tail weighted by the raw r leaves (r - r̂)(q|T - p|T)."""
    from curate.logit_codec import SCHEMES, decode_logprobs, encode_logprobs

    scheme = SCHEMES["u8-delta-coarse"]
    g = torch.Generator().manual_seed(11)
    t_logits = torch.randn(2, TAIL_V, generator=g) * 1.5
    t_logits[:, 0] += 7.5  # a dominant token, whose 1/4-nat code moves the kept mass by 0.04 and 0.11
    s_logits = torch.randn(2, TAIL_V, generator=g, dtype=torch.float64) * 1.5
    p, q = torch.softmax(t_logits.double(), -1), torch.softmax(s_logits, -1)
    entropy = -(p * p.log()).sum(-1)
    loss = get_loss("forward_kl")
    r = _tail_rows(0, 4, t_logits)
    lp_codes = r.topk_logprobs.numpy()
    back = decode_logprobs(encode_logprobs(np.where(np.isfinite(lp_codes), lp_codes, 0.0), scheme), scheme)
    top_lp = torch.from_numpy(np.where(np.isfinite(lp_codes), back, -np.inf)).double()
    ids, res = r.topk_ids.clone(), r.residual.double()
    for i in range(2):
        n = int(r.kept[i])
        tail = torch.ones(TAIL_V, dtype=torch.bool)
        tail[ids[i, :n]] = False
        tail_ids = tail.nonzero().squeeze(-1)
        p_cond = p[i, tail_ids] / p[i, tail_ids].sum()
        s = s_logits[i].clone().requires_grad_(True)
        lp = torch.log_softmax(s, -1)
        row = (lp[ids[i]][None], top_lp[i][None], res[i : i + 1])
        coarse = loss.token_loss(*row, 1.0)[0]
        each = loss.tail_token_loss(row[0].expand(len(tail_ids), -1), row[1].expand(len(tail_ids), -1),
                                    lp[tail_ids][:, None], torch.ones(len(tail_ids), 1, dtype=torch.bool),
                                    res[i].expand(len(tail_ids)), entropy[i].expand(len(tail_ids)))
        total = coarse + (p_cond * each).sum()
        total.backward()

        # the target, from the definitions
        dec, rr = top_lp[i, :n].exp(), float(res[i])
        s_mass = float(dec.sum())
        assert abs(s_mass - (1 - rr)) > 0.03, "the codes must move the kept mass for this test to mean anything"
        r_hat = rr / (s_mass + rr)
        p_hat = torch.zeros(TAIL_V, dtype=torch.float64)
        p_hat[ids[i, :n]] = dec / (s_mass + rr)
        p_hat[tail_ids] = r_hat * p_cond
        q_tail = float(q[i, tail_ids].sum())
        coarse_t = torch.cat([dec / (s_mass + rr), torch.tensor([r_hat], dtype=torch.float64)])
        coarse_s = torch.cat([q[i, ids[i, :n]], torch.tensor([q_tail], dtype=torch.float64)])
        p_kept = dec / s_mass * (1 - rr)  # the kept p the entropy identity uses
        teacher_part = (-float(entropy[i]) - float((p_kept * p_kept.log()).sum())) / rr - math.log(rr)
        student_part = float((p_cond * (q[i, tail_ids] / q_tail).log()).sum())
        want = float((coarse_t * (coarse_t / coarse_s).log()).sum()) + r_hat * (teacher_part - student_part)
        assert abs(total.item() - want) < 1e-9, (total.item(), want)
        err = float((s.grad - (q[i] - p_hat)).norm())
        q_cond = q[i, tail_ids] / q_tail
        raw_r_bias = float(((rr - r_hat) * (q_cond - p_cond)).norm())
        assert err < 1e-9 and raw_r_bias > 1e-4, (err, raw_r_bias)


def test_tail_draws_leave_the_kept_rows_bit_identical() -> None:
    """Adding --tail-samples changes nothing else a row stores: kept count, ids, log-probs, residual and entropy
    are the same bits as without draws (the residual decides the kept count under --entry-cost)."""
    from curate.teacher_scoring import reduce_logits

    t = torch.randn(64, 49_152, generator=torch.Generator().manual_seed(8)) * 3
    plain = reduce_logits(t.clone(), 64, entry_cost=0.004)
    drawn = reduce_logits(t.clone(), 64, entry_cost=0.004, tail_samples=4, seed=1)
    assert plain.tail_ids is None and drawn.tail_ids is not None
    for name in ("kept", "topk_ids", "topk_logprobs", "residual", "entropy"):
        assert torch.equal(getattr(plain, name), getattr(drawn, name)), name
