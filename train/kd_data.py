"""Teacher-logit cache rows -> KD training features and the collator that pads them.

The student consumes the cache's own ``input_ids`` (the teacher's tokenization), so positions line up by
construction: cache row t describes the distribution predicting ``input_ids[prompt_len + t]``, i.e. the
student's logits at position ``prompt_len + t - 1``. Only [batch, T, k] teacher tensors are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from train.data import IGNORE, cached_completion, pad_right


def kd_features(ex: Any, max_length: int) -> dict[str, Any] | None:
    """One `CachedExample` -> features, cut to ``max_length`` tokens (None if no completion token is left)."""
    cut = cached_completion(ex.input_ids, ex.prompt_len, max_length)
    if cut is None:
        return None
    ids, labels, t = cut
    p = int(ex.prompt_len)
    feats: dict[str, Any] = {
        "input_ids": ids,
        "labels": labels,
        "kd_ids": np.asarray(ex.topk_ids[:t], dtype=np.int64),
        "kd_logprobs": np.asarray(ex.topk_logprobs[:t], dtype=np.float32),
        "kd_residual": np.asarray(ex.residual[:t], dtype=np.float32),
        "answer_pos": p - 1,
    }
    if getattr(ex, "sample_weights", None) is not None:
        feats["kd_weights"] = np.asarray(ex.sample_weights[:t], dtype=np.float32)
    if getattr(ex, "tail_ids", None) is not None:  # the tail term also needs the full entropy (its teacher part)
        feats["kd_tail_ids"] = np.asarray(ex.tail_ids[:t], dtype=np.int64)
        feats["kd_entropy"] = np.asarray(ex.entropy[:t], dtype=np.float32)
    if ex.label_logprobs is not None:
        feats["label_logprobs"] = np.asarray(ex.label_logprobs, dtype=np.float32)
        if getattr(ex, "label_token_ids", None) is not None:  # per-subset words: the row's own label tokens
            feats["label_token_ids"] = np.asarray(ex.label_token_ids, dtype=np.int64)
    return feats


@dataclass
class KDCollator:
    """Pads ids / labels like `CompletionCollator` and the cache rows to [B, T_max, k] (a row's cached
    positions are its supervised ones: ``labels != IGNORE``). Padding entries of variable-length rows arrive
    as log-prob -inf; the losses skip them. With ``per_row_labels`` (a cache whose subsets have their own label
    words) ``label_token_ids`` [B, C] holds each row's label tokens (0 where a row has none: masked out)."""

    pad_id: int
    num_labels: int = 0
    per_row_labels: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        lengths = [len(f["input_ids"]) for f in features]
        out = {
            "input_ids": pad_right([f["input_ids"] for f in features], self.pad_id),
            "attention_mask": pad_right([[1] * m for m in lengths], 0),
            "labels": pad_right([f["labels"] for f in features], IGNORE),
            "kd_ids": pad_right([f["kd_ids"] for f in features], 0),
            "kd_logprobs": pad_right([f["kd_logprobs"] for f in features], 0.0, torch.float32),
            "kd_residual": pad_right([f["kd_residual"] for f in features], 0.0, torch.float32),
            "answer_pos": torch.tensor([f["answer_pos"] for f in features], dtype=torch.long),
            "label_logprobs": torch.zeros((n, max(self.num_labels, 1)), dtype=torch.float32),
            "label_mask": torch.zeros(n, dtype=torch.bool),
        }
        if self.per_row_labels:
            out["label_token_ids"] = torch.zeros((n, max(self.num_labels, 1)), dtype=torch.long)
        if "kd_weights" in features[0]:  # a sampled cache: importance weights of the kept ids
            out["kd_weights"] = pad_right([f["kd_weights"] for f in features], 0.0, torch.float32)
        if "kd_tail_ids" in features[0]:  # a --tail-samples cache: draws outside the kept ids
            out["kd_tail_ids"] = pad_right([f["kd_tail_ids"] for f in features], -1)
            out["kd_entropy"] = pad_right([f["kd_entropy"] for f in features], 0.0, torch.float32)
        for i, f in enumerate(features):
            if "label_logprobs" in f and self.num_labels:
                if self.per_row_labels:
                    if "label_token_ids" not in f:
                        continue  # no words of its own: not a label-KD row
                    out["label_token_ids"][i] = torch.from_numpy(f["label_token_ids"])
                out["label_logprobs"][i] = torch.from_numpy(f["label_logprobs"])
                out["label_mask"][i] = True
        return out
