"""Batched inference helpers for evaluation: label-verbalizer scoring, greedy generation, token NLL.

Only the positions a reading needs are projected to the vocabulary (``logits_to_keep``): the lm head is a
large share of a small model's forward pass, and the prompt positions are never scored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from curate.models import prompt_token_ids
from train.token_rows import accepts_logits_to_keep

Tick = Callable[[int], None] | None  # called with the number of sequences each batch finished (progress bars)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def pad(tok: Any, seqs: list[list[int]], side: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) padded on ``side`` by the tokenizer's own `pad` (`curate.models.load_tokenizer`
    gives every tokenizer a pad token)."""
    batch = tok.pad({"input_ids": seqs}, padding_side=side, return_tensors="pt", return_attention_mask=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.inference_mode()
def sequence_logprobs(model: Any, tok: Any, prefixes: list[list[int]], continuations: list[list[int]],
                      batch_size: int = 16, on_batch: Tick = None) -> list[list[float]]:
    """Per-token log-probs of each continuation given its prefix (one forward over prefix + continuation)."""
    out: list[list[float]] = []
    dev = _device(model)
    keep_ok = accepts_logits_to_keep(model)
    for a in range(0, len(prefixes), batch_size):
        pre, cont = prefixes[a: a + batch_size], continuations[a: a + batch_size]
        ids, mask = pad(tok, [p + c for p, c in zip(pre, cont, strict=True)], "right", dev)
        width = ids.shape[1]
        offset = min(len(p) for p in pre) - 1 if keep_ok else 0
        kwargs = {"logits_to_keep": width - offset} if keep_ok else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        for i, (p, c) in enumerate(zip(pre, cont, strict=True)):
            if not c:
                out.append([])
                continue
            rows = logits[i, len(p) - 1 - offset: len(p) + len(c) - 1 - offset].float()
            lp = torch.log_softmax(rows, dim=-1)
            out.append(lp.gather(-1, torch.tensor(c, device=dev).unsqueeze(-1)).squeeze(-1).tolist())
        if on_batch:
            on_batch(len(pre))
    return out


@torch.inference_mode()
def next_token_logprobs(model: Any, tok: Any, prompt_ids: list[list[int]], token_ids: list[int],
                        batch_size: int = 16, on_batch: Tick = None) -> list[list[float]]:
    """[N][C] log-probs of the given tokens right after each prompt: left padding puts every prompt's last
    token in the last column (positions from the mask), so one position per row reaches the lm head."""
    dev = _device(model)
    out: list[list[float]] = []
    cols = torch.tensor(token_ids, device=dev)
    keep_ok = accepts_logits_to_keep(model)
    for a in range(0, len(prompt_ids), batch_size):
        ids, mask = pad(tok, prompt_ids[a: a + batch_size], "left", dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": 1} if keep_ok else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       **kwargs).logits
        out += torch.log_softmax(logits[:, -1].float(), dim=-1)[:, cols].tolist()
        if on_batch:
            on_batch(len(ids))
    return out


def verbalizer_ids(tok: Any, words: list[str], prefix: str = " ") -> list[list[int]]:
    return [list(tok(prefix + w, add_special_tokens=False).input_ids) for w in words]


def score_label_words(model: Any, tok: Any, prompt_ids: list[list[int]], words: list[str], *,
                      prefix: str = " ", batch_size: int = 16, on_batch: Tick = None) -> list[list[float]]:
    """[N][C] total log-prob of ``prefix + word`` after each prompt: the verbalizer reading of the label."""
    word_ids = verbalizer_ids(tok, words, prefix)
    if all(len(w) == 1 for w in word_ids):
        return next_token_logprobs(model, tok, prompt_ids, [w[0] for w in word_ids], batch_size, on_batch)
    scores = [[0.0] * len(words) for _ in prompt_ids]
    for c, wid in enumerate(word_ids):
        lps = sequence_logprobs(model, tok, prompt_ids, [wid] * len(prompt_ids), batch_size,
                                on_batch if c == len(word_ids) - 1 else None)
        for i, lp in enumerate(lps):
            scores[i][c] = float(sum(lp))
    return scores


@torch.inference_mode()
def generate(model: Any, tok: Any, prompt_ids: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
             first_token_ids: list[int] | None = None, on_batch: Tick = None,
             ) -> tuple[list[str], list[list[float]] | None]:
    """Greedy continuations (left-padded batches), decoded without special tokens; with ``first_token_ids``
    also the [N][C] log-probs of those tokens as the first generated token (the prefill's distribution, so
    single-token verbalizers cost no extra forward pass)."""
    pad_id = _pad_id(tok)
    dev = _device(model)
    texts: list[str] = []
    firsts: list[list[float]] = []
    cols = torch.tensor(first_token_ids or [], dtype=torch.long, device=dev)
    for a in range(0, len(prompt_ids), batch_size):
        ids, mask = pad(tok, prompt_ids[a: a + batch_size], "left", dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=tok.eos_token_id, return_dict_in_generate=True,
                             output_logits=first_token_ids is not None)
        texts += tok.batch_decode(gen.sequences[:, ids.shape[1]:], skip_special_tokens=True)
        if first_token_ids is not None:
            firsts += torch.log_softmax(gen.logits[0].float(), dim=-1)[:, cols].tolist()
        if on_batch:
            on_batch(len(ids))
    return texts, (firsts if first_token_ids is not None else None)


def label_pattern(words: dict[int, str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of any label word; longer words first (``unethical`` before
    ``ethical``, though word boundaries already keep one from matching inside the other)."""
    alts = sorted(words.values(), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b", re.IGNORECASE)


def parse_generation(text: str, words: dict[int, str]) -> tuple[int | None, str]:
    """(first label named in the text or None, the reason: what follows it minus 'Reason:' framing)."""
    m = label_pattern(words).search(text)
    if m is None:
        return None, text.strip()
    by_word = {w.lower(): lab for lab, w in words.items()}
    rest = text[m.end():]
    rest = re.sub(r"^[\s.:;,!-]*(reason\s*:)?\s*", "", rest, flags=re.IGNORECASE)
    return by_word[m.group(1).lower()], rest.strip()


def tokenize_prompts(tok: Any, prompts: list[str], template: str, max_length: int) -> list[list[int]]:
    """Prompt ids as in training; over-long prompts keep their end (where the question is asked)."""
    return [prompt_token_ids(tok, p, template)[-max_length:] for p in prompts]
