"""The distillation-loss interface and the sparse (top-k + residual) view of teacher and student.

Every loss is a divergence between two distributions over the same outcomes; what differs between KD
recipes is only that divergence, so a new one (ADPA, DCKD, ...) is a new file implementing `divergence`.

Sparse rule (token-level KD from a top-k cache, never a dense [batch, seq, vocab] teacher tensor):

* Both distributions are coarse-grained onto k + 1 outcomes at temperature 1: the teacher's top-k ids S,
  plus one bucket R for everything else. Teacher: p_i (cached log-probs) and its residual r = 1 - sum p_S.
  Student: s_i = softmax(z)_i gathered at S, and s_R = 1 - sum s_S (its mass outside the teacher's top-k).
  Both buckets are floored at ``RESIDUAL_FLOOR`` (fp16 residuals underflow, float32 sums round).
* Temperature is applied to the coarse distributions: q^T_j = p_j^(1/T) / Z over j in S ∪ {R}, same for s.
  Within S this is exactly softmax(logits / T) restricted to S; the bucket is treated as one outcome.
* KD = T² · D(q^T ‖ s^T), D = the loss's divergence (forward KL, reverse KL, JSD).

With k = V there is no bucket (it is dropped) and the result is exactly the dense T² · D(softmax(t/T) ‖
softmax(z/T)). With k < V, for forward KL the sparse value never exceeds the dense one at T = 1 (merging
outcomes cannot increase a KL), and it is zero when the student matches the teacher.

Label KD (``--kd-target labels``) uses the label-verbalizer log-probs at the answer position, renormalised
over the labels (a C-way classifier, no bucket), tempered the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from curate.errors import CurateError
from curate.logit_codec import RESIDUAL_FLOOR  # smallest bucket mass, the same number the cache reader uses

__all__ = ["RESIDUAL_FLOOR", "DistillationLoss", "kl", "label_log_distributions", "sampled_forward_kl",
           "sparse_log_distributions", "tail_forward_kl"]

PAD_LOGPROB = -1e4  # stands for -inf on padded entries (fits float16 / bfloat16; exp() is exactly 0)


def sparse_log_distributions(student_topk: Tensor, topk_logprobs: Tensor, residual: Tensor, temperature: float,
                             *, complete: bool = False) -> tuple[Tensor, Tensor]:
    """Tempered (teacher, student) log-distributions over the k (+1 bucket) outcomes.

    student_topk: [N, k] the student's (temperature-1, full-vocabulary) log-probs gathered at the teacher's
    top-k ids; topk_logprobs: [N, k] the teacher's raw log-probs; residual: [N] teacher mass outside the
    top-k; complete: k is the whole vocabulary (no bucket). Returns two [N, k + 1] (or [N, k]) tensors.
    Taking the gathered log-probs (not [N, V]) lets the caller gather top-k and gold ids in one pass.
    """
    s_top = student_topk
    t_top = topk_logprobs.to(s_top.dtype)
    pad = ~torch.isfinite(t_top)  # padding of variable-length rows (top-p / sampled caches): probability 0
    if bool(pad.any()):
        # A finite stand-in far below any real log-prob: exp underflows to 0 (so sums and the KL skip it) while
        # gradients stay finite, which -inf would not give through logsumexp and the JSD mixture.
        t_top = t_top.masked_fill(pad, PAD_LOGPROB)
        s_top = s_top.masked_fill(pad, PAD_LOGPROB)
    if not complete:
        # log(1 - sum s_S) from the gathered log-probs: -expm1(logsumexp) is accurate for small and large mass.
        s_mass = torch.logsumexp(s_top, dim=-1)
        s_rest = torch.log(torch.clamp(-torch.expm1(s_mass), min=RESIDUAL_FLOOR))
        t_rest = torch.log(torch.clamp(residual.to(s_top.dtype), min=RESIDUAL_FLOOR))
        s_top = torch.cat([s_top, s_rest.unsqueeze(-1)], dim=-1)
        t_top = torch.cat([t_top, t_rest.unsqueeze(-1)], dim=-1)
    return (torch.log_softmax(t_top / temperature, dim=-1), torch.log_softmax(s_top / temperature, dim=-1))


def label_log_distributions(student_label_logprobs: Tensor, teacher_label_logprobs: Tensor,
                            temperature: float) -> tuple[Tensor, Tensor]:
    """Tempered (teacher, student) distributions over the C label words, renormalised over the labels."""
    t = teacher_label_logprobs.to(student_label_logprobs.dtype)
    return (torch.log_softmax(t / temperature, dim=-1),
            torch.log_softmax(student_label_logprobs / temperature, dim=-1))


class DistillationLoss(ABC):
    """A divergence D(teacher ‖ student) between log-distributions; the T² scaling and sparsity live here."""

    name: ClassVar[str]

    @abstractmethod
    def divergence(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        """[..., K] log-distributions over the same K outcomes -> [...] divergence (nats)."""

    def token_loss(self, student_topk: Tensor, topk_logprobs: Tensor, residual: Tensor, temperature: float,
                   *, complete: bool = False) -> Tensor:
        """Per-position T² · D on the sparse view: student log-probs at the top-k ids + cache rows -> [N]."""
        t, s = sparse_log_distributions(student_topk, topk_logprobs, residual, temperature, complete=complete)
        return temperature**2 * self.divergence(t, s)

    def sampled_token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, weights: Tensor,
                           temperature: float) -> Tensor:
        """Per-position estimate of D from a sampled cache ([N, n] each, weights = counts / draws). Only forward
        KL has an unbiased estimator from draws of the teacher; other losses refuse sampled caches."""
        self.check_sampled(temperature)
        raise NotImplementedError

    def uses_tail(self, temperature: float) -> bool:
        """Whether `tail_token_loss` adds the tail draws of a ``--tail-samples`` cache at this temperature; where
        it does not, the loss is the coarse one over kept ids + one bucket (draws of the teacher estimate only a
        temperature-1 forward KL)."""
        return False

    def tail_token_loss(self, student_topk: Tensor, topk_logprobs: Tensor, student_tail: Tensor, drawn: Tensor,
                        residual: Tensor, entropy: Tensor) -> Tensor:
        """Per-position tail term (added to `token_loss`) from the draws of a ``--tail-samples`` cache."""
        raise NotImplementedError(f"{self.name} has no tail estimator")

    def check_sampled(self, temperature: float) -> None:
        """Raise unless this loss can train from a sampled cache at this temperature."""
        raise CurateError(f"--loss {self.name} cannot train from a sampled cache (--select sample): only "
                          "forward_kl has an unbiased estimator; use --loss forward_kl or a top-k cache")

    def label_loss(self, student_label_logprobs: Tensor, teacher_label_logprobs: Tensor,
                   temperature: float) -> Tensor:
        """Per-example T² · D over the label verbalizers: [N, C] and [N, C] -> [N]."""
        t, s = label_log_distributions(student_label_logprobs, teacher_label_logprobs, temperature)
        return temperature**2 * self.divergence(t, s)


def kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim; outcomes with p = 0 contribute 0 (the difference is masked before the
    product, so an infinite log-prob there cannot turn the gradient into NaN)."""
    p = p_logp.exp()
    return (p * torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p))).sum(-1)


def tail_forward_kl(student_topk: Tensor, topk_logprobs: Tensor, student_tail: Tensor, drawn: Tensor,
                    residual: Tensor, entropy: Tensor) -> Tensor:
    """The tail part of KL(p̂ ‖ q) by the chain rule, T = every id outside the kept ones, q|T = q / q_T
    (q_T = 1 - the student's kept mass), p|T = p / r the teacher within its tail (r = the cached residual):

        r̂ · KL(p|T ‖ q|T) = r̂ · ((sum_T p log p) / r  -  log r  -  E_{j ~ p|T}[log q_j - log q_T])

    p̂ is the teacher the coarse term sees (`sparse_log_distributions`: the decoded kept log-probs and log r
    renormalised together, so its bucket holds r̂ = r / (S + r), S the decoded kept mass), with its bucket
    shared out as p|T. Weighting by that same r̂ (not r) makes coarse + tail term an unbiased estimate of
    KL(p̂ ‖ q) whose gradient is q - p̂: with u8 codes S differs from 1 - r (a 1/4-nat step moves a top-1 of
    0.9 to 1.0), and weighting by r would leave a bias (r - r̂)(q|T - p|T). The teacher's part comes from the cached
    full entropy H (sum_T p log p = -H - sum_kept p log p, the kept p renormalised to 1 - r): exact for fp16
    caches, off by the quantisation of the kept log-probs otherwise (a constant: no gradient). The student's
    part is the mean over the m draws, so the gradient needs only the drawn ids.
    [N, k], [N, k] (-inf padding), [N, m], [N, m] bool, [N], [N] -> [N]; a token without draws adds 0."""
    dtype = student_tail.dtype
    pad = ~torch.isfinite(topk_logprobs)
    s_top = student_topk.masked_fill(pad, PAD_LOGPROB)
    log_q_tail = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(s_top, dim=-1)), min=RESIDUAL_FLOOR))
    r = residual.to(dtype).clamp(min=0)
    t_top = topk_logprobs.to(dtype).masked_fill(pad, PAD_LOGPROB)
    log_p = t_top - torch.logsumexp(t_top, dim=-1, keepdim=True) + torch.log1p(-r.clamp(max=1 - 1e-6))[:, None]
    kept_plogp = torch.where(pad, torch.zeros_like(log_p), log_p.exp() * log_p).sum(-1)
    teacher = -entropy.to(dtype) - kept_plogp - torch.where(r > 0, r * torch.log(r.clamp(min=RESIDUAL_FLOOR)), 0.0)
    student = torch.where(drawn, student_tail - log_q_tail[:, None], torch.zeros_like(student_tail))
    any_drawn = drawn.any(-1)
    term = teacher - r * student.sum(-1) / drawn.sum(-1).clamp(min=1)  # r · KL(p|T ‖ q|T)
    r_floor = r.clamp(min=RESIDUAL_FLOOR)  # the coarse term's bucket mass, floored as it floors it
    kept_mass = torch.where(pad, torch.zeros_like(t_top), t_top.exp()).sum(-1)
    r_hat_over_r = torch.where(r > 0, r_floor / (kept_mass + r_floor) / r.clamp(min=torch.finfo(dtype).tiny), 0.0)
    return torch.where(any_drawn, term * r_hat_over_r, torch.zeros_like(term))


def sampled_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, weights: Tensor) -> Tensor:
    """Unbiased estimate of KL(p ‖ q) from N draws x_i ~ p: (1/N) sum_i (log p(x_i) - log q(x_i)), written over
    the distinct ids as sum_j w_j (log p_j - log q_j) with w_j = count_j / N. ``student_logprobs`` are the
    student's full-vocabulary (temperature 1) log-probs at the ids; padding has weight 0. [N, n] -> [N]."""
    diff = teacher_logprobs.to(student_logprobs.dtype) - student_logprobs
    return (weights.to(student_logprobs.dtype) * torch.where(weights > 0, diff, torch.zeros_like(diff))).sum(-1)
