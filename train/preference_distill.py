"""What DCKD and ADPA share: preference pairs as training features, the pair collator and the trainer.

The two methods differ only in their loss (`train/losses/dckd.py`, `train/losses/adpa.py`) and in where the
teacher rows come from (a DPO-teacher cache for DCKD, an advantage table for ADPA); both arrive here as one
`PairSide` per side of a pair. A batch of B pairs is one forward over 2B sequences (chosen rows first, then
rejected, as TRL's DPO concatenates them); the loss receives each side's response tokens pooled over the batch.

Token means: every term is a mean over its side's response tokens of the micro-batch. With gradient
accumulation each micro-batch's loss counts 1 / steps (exact pooled means only when grad_accum = 1: the sides'
token counts differ, so no single token count rescales all terms). No EOS is appended: every mean is over the
cached completion tokens only, the ones the teacher rows describe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from curate.errors import CurateError
from curate.store import DatasetStore, Version
from train.data import IGNORE, cached_completion, pad_right
from train.losses.preference import TERMS, PreferenceLoss, SideTokens
from train.token_rows import logprobs_at, supervised_positions

SIDES = ("chosen", "rejected")


@dataclass
class PairSide:
    """One side of one pair as training consumes it: token ids and, per completion token, the teacher rows."""

    id: str
    side: str
    input_ids: np.ndarray  # int64 [L], prompt + completion (the cache's tokenization)
    prompt_len: int
    top_ids: np.ndarray | None = None  # int64 [T, k] teacher kept ids (row t predicts input_ids[prompt_len + t])
    teacher_logprobs: np.ndarray | None = None  # float32 [T, k]; -inf on padding
    residual: np.ndarray | None = None  # float32 [T]
    advantage: np.ndarray | None = None  # float32 [T, k]
    valid: np.ndarray | None = None  # bool [T, k], False on padding entries

    def features(self, max_length: int) -> dict[str, Any] | None:
        """Cut to ``max_length`` tokens (None when no completion token is left)."""
        cut = cached_completion(self.input_ids, self.prompt_len, max_length)
        if cut is None:
            return None
        ids, labels, t = cut
        out: dict[str, Any] = {"input_ids": ids, "labels": labels, "answer_pos": int(self.prompt_len) - 1}
        if self.top_ids is not None and self.top_ids.size:
            out["top_ids"] = np.asarray(self.top_ids[:t], dtype=np.int64)
            valid = self.valid[:t] if self.valid is not None else None
            if self.teacher_logprobs is not None:
                lp = np.asarray(self.teacher_logprobs[:t], dtype=np.float32)
                out["teacher_logprobs"] = lp
                valid = np.isfinite(lp) if valid is None else valid & np.isfinite(lp)
            if self.residual is not None:
                out["residual"] = np.asarray(self.residual[:t], dtype=np.float32)
            if self.advantage is not None:
                out["advantage"] = np.asarray(self.advantage[:t], dtype=np.float32)
            out["valid"] = valid if valid is not None else np.ones(out["top_ids"].shape, dtype=bool)
        return out


def pair_up(rows: Iterable[PairSide], where: str) -> list[tuple[PairSide, PairSide]]:
    """(chosen, rejected) per id in first-seen order; one line naming the id when a side is missing or repeated."""
    by_id: dict[str, dict[str, PairSide]] = {}
    for r in rows:
        if r.side not in SIDES:
            raise CurateError(f"{where}: row {r.id!r} has side {r.side!r}, not chosen/rejected: cache the `sides` "
                              "config of a preferences version (curate build preferences)")
        sides = by_id.setdefault(r.id, {})
        if r.side in sides:
            raise CurateError(f"{where}: pair {r.id!r} has two {r.side} rows")
        sides[r.side] = r
    out = []
    for pid, sides in by_id.items():
        missing = [s for s in SIDES if s not in sides]
        if missing:
            raise CurateError(f"{where}: pair {pid!r} has no {missing[0]} row")
        out.append((sides["chosen"], sides["rejected"]))
    return out


def pair_features(pairs: list[tuple[PairSide, PairSide]], max_length: int,
                  notes: list[str]) -> list[dict[str, Any]]:
    """Features of the pairs whose two sides both keep a completion token within ``max_length``."""
    feats = []
    for chosen, rejected in pairs:
        c, r = chosen.features(max_length), rejected.features(max_length)
        if c is not None and r is not None:
            feats.append({"id": chosen.id, "chosen": c, "rejected": r})
    if len(feats) < len(pairs):
        notes.append(f"{len(pairs) - len(feats)} pairs dropped: a side has no completion token within max_length")
    return feats


def _padded3(rows: list[np.ndarray | None], t: int, k: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), t, k), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if r is not None and r.size:
            out[i, : r.shape[0], : r.shape[1]] = torch.from_numpy(np.asarray(r))
    return out


@dataclass
class PairCollator:
    """B pairs -> one batch of 2B rows (chosen first): ids, labels and mask padded right, teacher rows padded
    to [2B, T, k] with ``valid`` False on padding (and on every entry of a side that carries no teacher rows)."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        b = len(features)
        out = {
            "input_ids": pad_right([r["input_ids"] for r in rows], self.pad_id),
            "attention_mask": pad_right([[1] * len(r["input_ids"]) for r in rows], 0),
            "labels": pad_right([r["labels"] for r in rows], IGNORE),
            "answer_pos": torch.tensor([r["answer_pos"] for r in rows], dtype=torch.long),
            "side": torch.tensor([0] * b + [1] * b, dtype=torch.long),
        }
        t = max(len(r["input_ids"]) - r["answer_pos"] - 1 for r in rows)
        k = max((r["top_ids"].shape[1] for r in rows if "top_ids" in r), default=0)
        if k:
            out["top_ids"] = _padded3([r.get("top_ids") for r in rows], t, k, 0, torch.long)
            out["valid"] = _padded3([r.get("valid") for r in rows], t, k, False, torch.bool)
            out["has_teacher"] = torch.tensor(["top_ids" in r for r in rows], dtype=torch.bool)
            for key in ("teacher_logprobs", "advantage"):
                if any(key in r for r in rows):
                    out[key] = _padded3([r.get(key) for r in rows], t, k, 0.0, torch.float32)
            if any("residual" in r for r in rows):
                out["residual"] = pad_right([r.get("residual", np.zeros(0, np.float32)) for r in rows], 0.0,
                                            torch.float32)
                if out["residual"].shape[1] < t:
                    out["residual"] = torch.nn.functional.pad(out["residual"], (0, t - out["residual"].shape[1]))
        return out


def side_tokens(inputs: dict[str, torch.Tensor], logprobs: torch.Tensor, rows: torch.Tensor, t: torch.Tensor,
                targets: torch.Tensor, which: int) -> SideTokens:
    """One side's response tokens pooled over the batch, with the teacher rows at each token when it has them."""
    m = inputs["side"][rows] == which
    r, tt = rows[m], t[m]
    side = SideTokens(logprobs=logprobs[m], targets=targets[m])
    if "top_ids" in inputs and bool(inputs["has_teacher"][r].all()) and r.numel():
        side.top_ids = inputs["top_ids"][r, tt]
        side.pad = ~inputs["valid"][r, tt]
        if "teacher_logprobs" in inputs:
            side.teacher_logprobs = inputs["teacher_logprobs"][r, tt].masked_fill(side.pad, -torch.inf)
        if "residual" in inputs:
            side.residual = inputs["residual"][r, tt]
        if "advantage" in inputs:
            side.advantage = inputs["advantage"][r, tt].masked_fill(side.pad, 0.0)
    return side


class PreferenceDistillTrainer(Trainer):
    """`transformers.Trainer` whose loss is a `PreferenceLoss` over the chosen and rejected sides of each pair."""

    loss_is_scaled_for_ga = None  # each micro-batch counts 1 / steps (see the module docstring)

    def __init__(self, *args: Any, pref_loss: PreferenceLoss, on_policy: Any | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pref_loss = pref_loss
        self.on_policy = on_policy  # `train.on_policy.OnPolicyRejected`: fresh rejected sides from the student
        self._parts: dict[str, float] = {}
        self._n = 0

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.on_policy is not None and model.training:
            inputs = self.on_policy(model, inputs)
        rows, pos, targets = supervised_positions(inputs["labels"])
        logprobs = logprobs_at(model, inputs["input_ids"], inputs["attention_mask"], rows, pos)
        t = pos - inputs["answer_pos"][rows]  # teacher row index: logits at prompt_len - 1 + t
        terms = self.pref_loss(side_tokens(inputs, logprobs, rows, t, targets, 0),
                               side_tokens(inputs, logprobs, rows, t, targets, 1))
        scale = 1.0 if num_items_in_batch is None else 1.0 / self.current_gradient_accumulation_steps
        loss = terms["loss"] * scale
        if model.training:
            for name in TERMS:
                if name in terms:
                    self._parts[name] = self._parts.get(name, 0.0) + float(terms[name].detach())
            self._n += 1
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Each term (averaged since the last log) next to the combined training loss."""
        if "loss" in logs and self._n:
            logs.update({k: v / self._n for k, v in self._parts.items()})
            self._parts, self._n = {}, 0
        super().log(logs, *args, **kwargs)


def preference_parent(store: DatasetStore, version: Version) -> tuple[Version, str]:
    """The preferences version a cache or advantage table descends from (via lineage) and the config its rows
    were computed from (`sides`)."""
    seen: list[str] = []
    todo = [version]
    while todo:
        v = todo.pop(0)
        seen.append(v.ref)
        if v.manifest.get("builder", {}).get("name") == "preferences":
            return v, "sides"
        for p in v.manifest.get("parents") or []:
            found = store.find_by_hash(p["name"], p["content_hash"])
            if found is None:
                raise CurateError(f"{v.ref} was computed from {p['name']}@{p.get('tag', '?')} (content hash "
                                  f"{p['content_hash'][:16]}), which is not in store {store.root}")
            todo.append(found)
    raise CurateError(f"{version.ref} does not descend from a preferences version (lineage: {' <- '.join(seen)})")
