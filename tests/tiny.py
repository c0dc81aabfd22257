"""Tiny random Llama-shaped models on a real tokenizer, and a small DFAR source folder: test and benchmark
fixtures (real ids, real code paths, seconds instead of minutes), kept out of the shipped packages."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread for the block: tiny models gain nothing from more, and on a busy 2-core runner two
    OpenMP threads contending for the cores were measured 3-10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer (read from the GGUF once per process: ~6 s)."""
    from curate.models import ModelRef, load_tokenizer

    return load_tokenizer(ModelRef.parse("smollm2"))


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               pad_token_id: int | None = None, initializer_range: float = 0.02) -> Any:
    """A randomly initialised LlamaForCausalLM (float32) with the given vocabulary (``initializer_range`` 1
    spreads its logits, so top-k boundaries are not float-noise ties)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=pad_token_id,
                      initializer_range=initializer_range)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def save_tiny(folder: Path, tok: Any, **kwargs: Any) -> Path:
    """Write a tiny model + tokenizer to a folder that `ModelRef.parse(folder)` loads."""
    model = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


_ETHICAL = ["helped my neighbour carry her groceries", "returned the wallet I found to its owner",
            "told my friend the truth about the broken vase", "donated blood at the hospital",
            "paid for the coffee I spilled", "visited my grandmother when she was sick",
            "shared my lunch with a hungry classmate", "stopped at the red light at night",
            "admitted my mistake to my boss", "recycled the bottles after the party",
            "held the door for a man with crutches", "gave back the extra change to the cashier"]
_UNETHICAL = ["stole money from my sister's purse", "lied to the police about the accident",
              "copied my classmate's exam answers", "kicked the dog because I was angry",
              "sold fake medicine to old people", "read my roommate's diary without asking",
              "cheated on my taxes this year", "spread a false rumour about my coworker",
              "left my baby alone in the hot car", "took credit for my friend's work",
              "broke the neighbour's window and ran away", "kept the wallet I found on the bus"]
_FRAMES = ["I {act}.", "Yesterday I {act}.", "Last week I {act}.", "This morning I {act}."]


def write_tiny_dfar(folder: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """A small source folder in DFAR's CSV format (Statement, Label, Reason) for the real builder."""
    import csv

    rows = []
    for f, frame in enumerate(_FRAMES):
        for i in range(len(_ETHICAL)):
            for label, acts in ((0, _ETHICAL), (1, _UNETHICAL)):
                act = acts[(i + f) % len(acts)]
                why = ("it is kind and honest and harms nobody" if label == 0
                       else "it hurts other people and breaks their trust")
                rows.append((frame.format(act=act), label, f"It is {'not ' if label == 0 else ''}wrong because {why}."))
    if n_train + n_test > len(rows):
        raise ValueError(f"at most {len(rows)} rows")
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("DFAR_trainset.csv", rows[:n_train]), ("DFAR_testset.csv", rows[n_train:n_train + n_test])):
        with open(folder / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Statement", "Label", "Reason"])
            w.writerows(part)
    return folder


def tiny_kd_store(root: Path, tok: Any, *, n_train: int, k: int, max_length: int,
                  sharpen: float = 1.0) -> dict[str, Path]:
    """What `curate train kd` needs, tiny: a DFAR version (``n_train`` + 8 rows), a student folder and a k-entry
    lr cache of it from another tiny model, whose final norm is scaled by ``sharpen`` (a random model is
    near-uniform over 49k tokens)."""
    import torch

    from builders.dfar import build_dfar
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.store import DatasetStore

    store = DatasetStore(root / "store")
    build_dfar(store, write_tiny_dfar(root / "src", n_train, 8))
    student = save_tiny(root / "student", tok, hidden=32, seed=0)
    teacher = tiny_llama(len(tok), hidden=32, seed=1, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(sharpen)
    params = LogitCacheConfig(dataset="dfar", config="lr", model=str(student), k=k, max_length=max_length,
                              batch_size=8, chunk_size=16)
    cache_teacher_logits(store, params, model=teacher, tokenizer=tok, progress=False)
    return {"root": root, "store": store.root, "student": student}
