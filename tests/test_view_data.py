"""The small real store the view / annotate tests share (no tests here): DFAR rows, a teacher-logit cache of a
tiny Llama on the real SmolLM2 tokenizer, and a sage-responses version built through the offline replay server
(real recorded gpt-3.5 answers and RoTs). Built once per test process; tests that write get a copy."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from curate.store import DatasetStore
from tests.conftest import shared

DFAR_ROWS = 6  # per split
SAGE_QUESTIONS = 3  # x 5 paraphrases
CACHE_K = 8


@functools.lru_cache(maxsize=1)
def built_store() -> Path:
    from builders.dfar import DfarConfig, build_dfar
    from builders.sage_responses import SageResponsesConfig, build_sage_responses
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.models import ModelRef, load_causal_lm, load_tokenizer
    from tests.openai_server.fixture import shared_server
    from tests.tiny import save_tiny, single_thread, smollm2_tokenizer

    root = Path(tempfile.mkdtemp(prefix="view-store-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    store = DatasetStore(root / "store")
    build_dfar(store, shared("dfar"), DfarConfig(limit=DFAR_ROWS))
    folder = save_tiny(root / "teacher", smollm2_tokenizer(), hidden=32)
    with single_thread():
        model = load_causal_lm(ModelRef.parse(str(folder)), dtype="float32", device="cpu").eval()
        cache_teacher_logits(store, LogitCacheConfig(model=str(folder), dtype="float32", k=CACHE_K, limit=2,
                                                     splits=["test"]),
                             model=model, tokenizer=load_tokenizer(ModelRef.parse(str(folder))), progress=False)
    server = shared_server()
    server.reset()
    build_sage_responses(store, SageResponsesConfig(
        questions=str(shared("sage", "quality100") / "q100.csv"), base_url=server.base_url,
        limit_questions=SAGE_QUESTIONS, concurrency=8), figures=False)
    return root / "store"


def store_copy(dest: Path) -> DatasetStore:
    """A private, writable copy of the shared store."""
    shutil.copytree(built_store(), dest / "store")
    return DatasetStore(dest / "store")
