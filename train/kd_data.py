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

from train.data import IGNORE


def kd_features(ex: Any, max_length: int) -> dict[str, Any] | None:
    """One `CachedExample` -> features, cut to ``max_length`` tokens (None if no completion token is left)."""
    ids = np.asarray(ex.input_ids, dtype=np.int64)[:max_length]
    p = int(ex.prompt_len)
    t = len(ids) - p
    if t <= 0:
        return None
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[p:] = ids[p:]
    feats: dict[str, Any] = {
        "input_ids": ids,
        "labels": labels,
        "kd_ids": np.asarray(ex.topk_ids[:t], dtype=np.int64),
        "kd_logprobs": np.asarray(ex.topk_logprobs[:t], dtype=np.float32),
        "kd_residual": np.asarray(ex.residual[:t], dtype=np.float32),
        "answer_pos": p - 1,
    }
    if ex.label_logprobs is not None:
        feats["label_logprobs"] = np.asarray(ex.label_logprobs, dtype=np.float32)
    return feats


@dataclass
class KDCollator:
    """Pads ids / labels like `CompletionCollator` and the cache rows to [B, T_max, k] (a row's cached
    positions are its supervised ones: ``labels != IGNORE``)."""

    pad_id: int
    num_labels: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        width = max(len(f["input_ids"]) for f in features)
        t_max = max(len(f["kd_ids"]) for f in features)
        k = features[0]["kd_ids"].shape[1]
        out = {
            "input_ids": torch.full((n, width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, width), dtype=torch.long),
            "labels": torch.full((n, width), IGNORE, dtype=torch.long),
            "kd_ids": torch.zeros((n, t_max, k), dtype=torch.long),
            "kd_logprobs": torch.zeros((n, t_max, k), dtype=torch.float32),
            "kd_residual": torch.zeros((n, t_max), dtype=torch.float32),
            "answer_pos": torch.tensor([f["answer_pos"] for f in features], dtype=torch.long),
            "label_logprobs": torch.zeros((n, max(self.num_labels, 1)), dtype=torch.float32),
            "label_mask": torch.zeros(n, dtype=torch.bool),
        }
        for i, f in enumerate(features):
            m, t = len(f["input_ids"]), len(f["kd_ids"])
            out["input_ids"][i, :m] = torch.from_numpy(f["input_ids"])
            out["attention_mask"][i, :m] = 1
            out["labels"][i, :m] = torch.from_numpy(f["labels"])
            out["kd_ids"][i, :t] = torch.from_numpy(f["kd_ids"])
            out["kd_logprobs"][i, :t] = torch.from_numpy(f["kd_logprobs"])
            out["kd_residual"][i, :t] = torch.from_numpy(f["kd_residual"])
            if "label_logprobs" in f and self.num_labels:
                out["label_logprobs"][i] = torch.from_numpy(f["label_logprobs"])
                out["label_mask"][i] = True
        return out
