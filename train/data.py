"""Prompt/completion rows -> token ids with the prompt masked out of the loss, packing, and the collator.

Tokenisation follows the teacher-logit cache's rule (``template`` ``plain``: ``tok(prompt) +
tok(completion, add_special_tokens=False)``; ``chat``: the chat template around the prompt), so an SFT model,
a cached teacher and a KD student all see the same ids for the same row, and the answer position is always
``prompt_len - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from curate.errors import CurateError
from curate.models import prompt_token_ids

if TYPE_CHECKING:
    import pyarrow as pa

IGNORE = -100  # label value the loss skips (prompt and padding)


def cached_completion(input_ids: Any, prompt_len: int, max_length: int,
                      ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(ids, labels, completion tokens) of a cached row cut to ``max_length``: labels copy the completion ids
    and are IGNORE on the prompt; None when no completion token is left (KD and preference features)."""
    ids = np.asarray(input_ids, dtype=np.int64)[:max_length]
    p = int(prompt_len)
    t = len(ids) - p
    if t <= 0:
        return None
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[p:] = ids[p:]
    return ids, labels, t


def read_split(version: Any, config: str, split: str, required: tuple[str, ...], purpose: str) -> Any:
    """One split of a config as a pyarrow table; a missing split or required column is one line naming both."""
    if split not in version.splits(config):
        raise CurateError(f"{version.ref} config {config!r} has no split {split!r} "
                          f"(it has {', '.join(version.splits(config)) or 'none'})")
    table = version.read(config, split)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise CurateError(f"{version.ref} config {config!r} lacks column(s) {', '.join(missing)} "
                          f"({purpose} needs {', '.join(required)})")
    return table


def check_subsets(wanted: list[str], known: list[str], where: str) -> None:
    """A subset name the data does not have: one line listing the known ones."""
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise CurateError(f"unknown subset(s) {', '.join(unknown)} in {where}; known: {', '.join(known)}")


def select_subsets(table: pa.Table, subsets: list[str] | None, where: str) -> pa.Table:
    """The rows of the given subsets (all when None), in their stored order; the table needs a `subset`
    column when subsets are named."""
    import pyarrow.compute as pc

    if "subset" not in table.column_names:
        if subsets:
            raise CurateError(f"{where} has no subset column: --subsets does not apply")
        return table
    known = sorted(set(table["subset"].to_pylist()), key=str)
    if not subsets:
        return table
    check_subsets(subsets, known, where)
    return table.filter(pc.is_in(table["subset"], value_set=pa_array(subsets)))


def head_per_subset(table: pa.Table, n: int) -> pa.Table:
    """The first `n` rows of each subset, in stored order (a quick cache or eval of every paradigm, where the
    first `n` rows of the table would all be one paradigm's)."""
    import numpy as np

    subsets = np.array(table["subset"].to_pylist(), dtype=object)
    keep = [i for s in dict.fromkeys(subsets.tolist()) for i in np.flatnonzero(subsets == s)[:n].tolist()]
    return table.take(sorted(keep))


def pa_array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def mix_rows(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n): rows stored subset after subset are interleaved before --limit
    takes the first N, and the same seed gives the same order for SFT, KD and a rerun."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n).tolist()


@dataclass
class TokenizedRows:
    """Examples ready for the collator plus what was dropped or cut, for the run's notes."""

    examples: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)


def tokenize_rows(tok: Any, prompts: list[str], completions: list[str], *, template: str, max_length: int,
                  append_eos: bool) -> TokenizedRows:
    """input_ids = prompt + completion (+ EOS); labels = IGNORE over the prompt, the ids over the completion.

    Completions longer than ``max_length`` allows lose tokens from the end; a prompt that alone fills
    ``max_length`` leaves nothing to learn and the row is dropped (both counted in the notes).
    """
    out = TokenizedRows([])
    eos = [tok.eos_token_id] if append_eos and tok.eos_token_id is not None else []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = prompt_token_ids(tok, prompt, template)
        c = list(tok(completion, add_special_tokens=False).input_ids) + eos
        if len(p) >= max_length:
            out.dropped += 1
            continue
        if len(p) + len(c) > max_length:
            c = c[: max_length - len(p)]
            out.truncated += 1
        out.examples.append({"input_ids": p + c, "labels": [IGNORE] * len(p) + c})
    if out.truncated:
        out.notes.append(f"{out.truncated} completions cut to max_length {max_length}")
    if out.dropped:
        out.notes.append(f"{out.dropped} rows dropped: the prompt alone fills max_length {max_length}")
    if not out.examples:
        raise CurateError(f"no trainable rows: every prompt is at least max_length ({max_length}) tokens")
    return out


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples (in order) into blocks of at most ``max_length`` tokens, never splitting one.

    Padding-free packing as in `transformers.DataCollatorWithFlattening`: each block carries ``position_ids``
    that restart at 0 for every example, and the model (sdpa / eager / flash attention, with no 2D attention
    mask and no cache) then attends only within each example, so packed examples do not see each other and
    their losses equal the unpacked ones. The first token of each example is never a target (it would be
    predicted from the previous example). Fewer pad tokens, faster epochs.
    """
    blocks: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > max_length:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] = cur["input_ids"] + ex["input_ids"]
        cur["labels"] = cur["labels"] + [IGNORE] + ex["labels"][1:]
        cur["position_ids"] = cur["position_ids"] + list(range(len(ex["input_ids"])))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


class ListDataset(Dataset):
    """A list of feature dicts as a torch Dataset (Trainer needs `__len__` / `__getitem__`)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def pad_right(rows: list[Any], value: float, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """[B, max_len, ...] from rows of different lengths (lists or arrays), padded at the end with ``value``."""
    return pad_sequence([torch.as_tensor(r, dtype=dtype) for r in rows], batch_first=True, padding_value=value)


@dataclass
class CompletionCollator:
    """Right-pads input_ids (pad id), labels (IGNORE) and builds the attention mask; packed blocks (with
    ``position_ids``) are flattened into one row without padding or attention mask, so that the model
    separates the examples by their restarting positions (`DataCollatorWithFlattening` semantics)."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" in features[0]:
            return {key: torch.as_tensor([x for f in features for x in f[key]], dtype=torch.long).unsqueeze(0)
                    for key in ("input_ids", "labels", "position_ids")}
        ids = pad_right([f["input_ids"] for f in features], self.pad_id)
        mask = pad_right([[1] * len(f["input_ids"]) for f in features], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_right([f["labels"] for f in features], IGNORE)}
