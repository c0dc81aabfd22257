"""`--on-policy` for DCKD / ADPA: the rejected side of every pair becomes a fresh response of the student,
scored at once by the DPO teacher (top-k ids, log-probs, exact residual) and, for ADPA, by its reference at
exactly those ids (the advantage A = log p_T - log p_ref), the same quantities the offline caches hold.

Cost: one generation of ``sample_max_new_tokens`` and one (DCKD) or two (ADPA) teacher forwards per step, on
top of the student's step; on CPU a step is several times slower. It pays when the student's own mistakes
differ from the offline rejected responses, i.e. once the student has moved away from the model that wrote
them (long runs, or a student initialised elsewhere); for short runs from the same init the offline table
carries the same signal at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curate.errors import CurateError
from curate.teacher_scoring import completion_logits
from train.config import PreferenceDistillConfig
from train.losses.preference import PreferenceLoss
from train.preference_distill import PairCollator, PairSide


def row_side(inputs: dict[str, torch.Tensor], i: int) -> PairSide:
    """Batch row ``i`` back as a `PairSide` (its own length and teacher rows), to be collated again."""
    n = int(inputs["attention_mask"][i].sum())
    p = int(inputs["answer_pos"][i]) + 1
    t = n - p
    side = PairSide("", "chosen", inputs["input_ids"][i, :n].cpu().numpy(), p)
    if "top_ids" in inputs and bool(inputs["has_teacher"][i]):
        side.top_ids = inputs["top_ids"][i, :t].cpu().numpy()
        side.valid = inputs["valid"][i, :t].cpu().numpy()
        for key in ("teacher_logprobs", "advantage"):
            if key in inputs:
                setattr(side, key, inputs[key][i, :t].cpu().numpy())
        if "residual" in inputs:
            side.residual = inputs["residual"][i, :t].cpu().numpy()
    return side


@dataclass
class OnPolicyRejected:
    """Called by the trainer before each training step's loss: returns the batch with new rejected rows."""

    teacher: Any
    reference: Any | None  # only ADPA needs it
    pad_id: int
    eos_id: int | None
    k: int
    max_new_tokens: int
    temperature: float

    @classmethod
    def from_config(cls, cfg: PreferenceDistillConfig, tok: Any, loss: PreferenceLoss) -> OnPolicyRejected:
        from curate.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
        from train.modeling import model_ref

        if not cfg.teacher_model:
            raise CurateError("--on-policy scores the student's samples: give --teacher-model")
        specs = {"teacher": cfg.teacher_model}
        if loss.name == "adpa":
            if not cfg.reference_model:
                raise CurateError("--on-policy ADPA needs the teacher's reference for the advantage: give "
                                  "--reference-model (the SFT run the DPO teacher started from)")
            specs["reference"] = cfg.reference_model
        models: dict[str, Any] = {}
        for role, spec in specs.items():
            ref = model_ref(spec)
            if tokenizer_fingerprint(load_tokenizer(ref)) != tokenizer_fingerprint(tok):
                raise CurateError(f"--{role}-model {spec} has another tokenizer than the student: its scores would "
                                  "not be of the student's tokens")
            models[role] = load_causal_lm(ref, dtype=cfg.dtype, device="cpu").eval()
        return cls(models["teacher"], models.get("reference"), tok.pad_token_id, tok.eos_token_id, cfg.top_k,
                   cfg.sample_max_new_tokens, cfg.sample_temperature)

    def __call__(self, model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = inputs["input_ids"].device
        for m in (self.teacher, self.reference):
            if m is not None and next(m.parameters()).device != device:
                m.to(device)  # once: the teachers score on the student's device
        b = inputs["side"].numel() // 2
        prompts = [inputs["input_ids"][b + i, : int(inputs["answer_pos"][b + i]) + 1].tolist() for i in range(b)]
        samples = self.sample(model, prompts)
        rejected = self.score(prompts, samples)
        feats = []
        for i in range(b):
            chosen = row_side(inputs, i)
            feats.append({"chosen": chosen.features(len(chosen.input_ids)),
                          "rejected": rejected[i].features(len(rejected[i].input_ids))})
        return {key: v.to(device) for key, v in PairCollator(self.pad_id)(feats).items()}

    @torch.no_grad()
    def sample(self, model: Any, prompts: list[list[int]]) -> list[list[int]]:
        """One response per prompt from the student (left-padded batch), cut before EOS (at least one token)."""
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        was_training = model.training
        model.eval()
        try:
            kwargs: dict[str, Any] = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens,
                                      "pad_token_id": self.pad_id, "eos_token_id": self.eos_id}
            if self.temperature > 0:
                kwargs.update(temperature=self.temperature, top_k=0, top_p=1.0)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].tolist()
        finally:
            model.train(was_training)
        cut = []
        for row in out:
            end = row.index(self.eos_id) if self.eos_id is not None and self.eos_id in row else len(row)
            cut.append(row[:end] or row[:1])  # no EOS appended (the house rule); an empty answer keeps its EOS
        return cut

    def score(self, prompts: list[list[int]], samples: list[list[int]]) -> list[PairSide]:
        """Teacher top-k (+ residual) at every sampled token, and the reference's log-probs at those ids."""
        seqs = [p + s for p, s in zip(prompts, samples, strict=True)]
        lens = [len(p) for p in prompts]
        dev = next(self.teacher.parameters()).device
        t_lp = torch.log_softmax(completion_logits(self.teacher, seqs, lens, self.pad_id).float(), dim=-1)
        k = min(self.k, t_lp.shape[-1])
        top_lp, top_ids = t_lp.topk(k, dim=-1)
        residual = (-torch.expm1(torch.logsumexp(top_lp, dim=-1))).clamp(min=0.0)
        adv = None
        if self.reference is not None:
            r_lp = torch.log_softmax(completion_logits(self.reference, seqs, lens, self.pad_id).float(), dim=-1)
            adv = top_lp - r_lp.to(dev).gather(-1, top_ids)
        out, start = [], 0
        for p, s in zip(prompts, samples, strict=True):
            rows = slice(start, start + len(s))
            start += len(s)
            side = PairSide("", "rejected", np.asarray(p + s, dtype=np.int64), len(p),
                            top_ids=top_ids[rows].cpu().numpy(), valid=np.ones((len(s), k), dtype=bool))
            if adv is None:
                side.teacher_logprobs = top_lp[rows].cpu().numpy()
                side.residual = residual[rows].cpu().numpy()
            else:
                side.advantage = adv[rows].cpu().numpy()
            out.append(side)
        return out
