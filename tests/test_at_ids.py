"""`curate cache-logits --at-ids` and the `side` column: a second model scored exactly at another cache's kept ids.

Two tiny random Llamas sharing the SmolLM2 tokenizer act as DPO teacher and reference; the parent is a small
preferences-like `sides` table (two rows per id) written through the store. Expected values come from a dense,
unbatched forward pass of the reference model in the test.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from builders.teacher_logits import BuildResult, LogitCacheConfig, ShardReport, cache_teacher_logits
from curate.errors import CurateError
from curate.logit_codec import load_cache
from curate.models import ModelRef, load_causal_lm, load_tokenizer
from curate.store import DatasetStore
from tests.tiny import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("I returned the wallet I found.", " ethical. It is honest.", " unethical. It is theft."),
    ("I stole money from my sister.", " unethical. It hurts her.", " ethical. Money is money."),
    ("I donated blood at the hospital.", " ethical. It saves lives.", " unethical. It wastes time."),
    ("I lied to the police.", " unethical. It obstructs justice.", " ethical. Police ask too much."),
    ("I helped my neighbour.", " ethical.", " unethical. Helping is naive and makes people lazy."),
]


def write_sides(store: DatasetStore, pairs: list[tuple[str, str, str]] = PAIRS, name: str = "preferences",
                test_from: int = 4) -> Any:
    """A preferences-like version with a `sides` config: id, side, prompt, completion, split (2 rows per id)."""
    rows: dict[str, list[Any]] = {"id": [], "side": [], "prompt": [], "completion": [], "split": []}
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            for col, v in zip(rows, (f"p{i}", side, prompt, text, "train" if i < test_from else "test"), strict=True):
                rows[col].append(v)
    table = pa.table(rows)
    with store.new_version(name, builder="test-sides", builder_version="0", params={}, sources=[]) as w:
        for split in ("train", "test"):
            w.write_table("sides", split, table.filter(pa.compute.equal(table["split"], split)))
    return w.result.version


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, tuple[Path, Any, Any]]:
    """teacher / reference: two tiny random Llamas (different seeds) with one tokenizer; `other_tok`: a model
    whose tokenizer differs (one added token), for the mismatch refusals."""
    out = {}
    for name, seed in (("teacher", 1), ("reference", 2)):
        folder = save_tiny(tmp_path_factory.mktemp(name), tok, seed=seed, hidden=32)
        out[name] = (folder, load_causal_lm(ModelRef.parse(str(folder)), dtype="float32", device="cpu").eval(),
                     load_tokenizer(ModelRef.parse(str(folder))))
    return out


@pytest.fixture(scope="module")
def sides_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sides-store")
    write_sides(DatasetStore(root))
    return root


def fresh(tmp_path: Path, root: Path) -> DatasetStore:
    shutil.copytree(root, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def run(store: DatasetStore, model: tuple[Path, Any, Any], **kw: Any) -> BuildResult | ShardReport:
    folder, m, tk = model
    run_kw = {k: kw.pop(k) for k in ("merge", "merge_only", "max_units") if k in kw}
    params = LogitCacheConfig(model=str(folder), dataset="preferences", config="sides", dtype="float32",
                              chunk_size=2, batch_size=2, **kw)
    return cache_teacher_logits(store, params, model=m, tokenizer=tk, progress=False, **run_kw)


def dense(model: Any, input_ids: np.ndarray, prompt_len: int) -> torch.Tensor:
    """Unbatched, unpadded float64 log-softmax at the completion positions: the ground truth."""
    with torch.inference_mode():
        logits = model(torch.tensor(input_ids[None])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)[prompt_len - 1: -1]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, sides_store: Path, models) -> tuple[DatasetStore, Any, Any]:
    """A teacher cache (k = 8, default u8-delta) and a reference cache made --at-ids it (fp16)."""
    store = fresh(tmp_path_factory.mktemp("caches"), sides_store)
    teacher = run(store, models["teacher"], k=8, name="teacher-cache")
    reference = run(store, models["reference"], at_ids="teacher-cache", quantization="fp16", name="ref-cache")
    assert isinstance(teacher, BuildResult) and isinstance(reference, BuildResult)
    return store, teacher.version, reference.version


def test_side_column_is_kept_and_keys_rows(caches) -> None:
    _, teacher, _ = caches
    rows = load_cache(teacher)
    assert [(r.id, r.side) for r in rows if r.split == "train"] == [
        (f"p{i}", s) for i in range(4) for s in ("chosen", "rejected")]
    assert teacher.read("default").schema.field("side").type == pa.string()
    assert teacher.manifest["params"]["sides"] is True


def test_at_ids_scores_exactly_the_other_caches_ids(caches, models) -> None:
    _, teacher, reference = caches
    ref_model = models["reference"][1]
    p = reference.manifest["params"]
    assert p["select"] == "at-ids" and p["at_ids"] == {"name": teacher.name, "tag": teacher.tag,
                                                       "content_hash": teacher.hash}
    assert p["k"] == 8 and p["quantization"] == "fp16"
    assert p["tokenizer_fingerprint"] == teacher.manifest["params"]["tokenizer_fingerprint"]
    parents = reference.manifest["parents"]
    assert [(q["name"], q["content_hash"]) for q in parents] == [
        ("preferences", teacher.manifest["parents"][0]["content_hash"]), (teacher.name, teacher.hash)]
    t_rows, r_rows = load_cache(teacher), load_cache(reference)
    assert len(t_rows) == len(r_rows) == 2 * len(PAIRS)
    for t, r in zip(t_rows, r_rows, strict=True):
        assert (t.id, t.side, t.split) == (r.id, r.side, r.split)
        assert np.array_equal(t.input_ids, r.input_ids) and t.prompt_len == r.prompt_len
        assert np.array_equal(t.topk_ids, r.topk_ids)  # identical ids, in the teacher's order
        full = dense(ref_model, r.input_ids, r.prompt_len)
        want = full.gather(-1, torch.from_numpy(r.topk_ids)).numpy()
        assert np.allclose(r.topk_logprobs, want, atol=1e-2, rtol=1e-3)  # fp16 of |lp| < 16: error < 8e-3
        assert np.allclose(r.residual, 1 - np.exp(want).sum(-1), rtol=2e-3, atol=1e-6)
        assert np.allclose(r.entropy, -(full.exp() * full).sum(-1).numpy(), rtol=2e-3, atol=1e-3)
        # not the reference's own top-k: its order is the teacher's
        own = torch.topk(full, 8).indices.numpy()
        assert not np.array_equal(own, r.topk_ids)


def test_at_ids_delta_scheme_stored_plain_within_its_step(tmp_path: Path, caches, models) -> None:
    store, teacher, _ = caches
    out = run(store, models["reference"], at_ids=f"{teacher.name}@{teacher.tag}", name="ref-u8")  # default u8-delta
    assert isinstance(out, BuildResult)
    p = out.version.manifest["params"]
    assert p["quantization"] == "u8" and any("stored as u8" in n for n in out.notes)
    for t, r in zip(load_cache(teacher), load_cache(out.version), strict=True):
        want = dense(models["reference"][1], r.input_ids, r.prompt_len).gather(-1, torch.from_numpy(t.topk_ids))
        want = want.numpy()
        inside = want > -255 / 16
        assert np.all(np.abs(r.topk_logprobs - want)[inside] <= 1 / 32 + 1e-5)


def test_at_ids_resume_has_no_lost_or_duplicate_rows(tmp_path: Path, caches, models) -> None:
    store, teacher, reference = caches
    kw = dict(at_ids="teacher-cache", quantization="fp16", name="ref-resumed")
    first = run(store, models["reference"], max_units=2, **kw)  # the run "dies" after 2 of 5 units
    assert isinstance(first, ShardReport) and (first.computed, first.total_units) == (2, 5)
    assert "ref-resumed" not in store.names()
    resumed = run(store, models["reference"], merge=False, **kw)
    assert isinstance(resumed, ShardReport) and (resumed.computed, resumed.skipped) == (3, 2)
    final = run(store, models["reference"], merge_only=True, **kw)
    assert isinstance(final, BuildResult) and final.version.hash == reference.hash
    keys = [(r.split, r.id, r.side) for r in load_cache(final.version)]
    assert len(keys) == len(set(keys)) == 2 * len(PAIRS)


def test_at_ids_refusals(tmp_path: Path, caches, models, tok: Any) -> None:
    store, teacher, _ = caches
    # another parent (different content) -> refused, naming both
    write_sides(store, PAIRS[:4], name="other-prefs")
    with pytest.raises(CurateError, match="not this run's parent"):
        cache_teacher_logits(store, LogitCacheConfig(model=str(models["reference"][0]), dataset="other-prefs",
                                                     config="sides", at_ids="teacher-cache"),
                             model=models["reference"][1], tokenizer=models["reference"][2], progress=False)
    # another tokenizer -> refused
    other_tok = load_tokenizer(ModelRef.parse(str(models["reference"][0])))
    other_tok.add_tokens(["<extra-token>"])
    with pytest.raises(CurateError, match="another tokenizer"):
        run(store, (models["reference"][0], models["reference"][1], other_tok), at_ids="teacher-cache")
    # same tokenizer, other tokenization of one row (max_length cut) -> refused naming the row
    with pytest.raises(CurateError, match=r"row id p\d side (chosen|rejected) \(\w+\): input_ids differ"):
        from builders import teacher_logits as tl

        tk = models["reference"][2]
        plan = tl.plan_cache(store, LogitCacheConfig(model=str(models["reference"][0]), dataset="preferences",
                                                     config="sides", at_ids="teacher-cache"), tk)
        plan.examples[3].input_ids = plan.examples[3].input_ids[:-1]
        tl._at_ids_rows(plan.at_ids, plan.examples, plan.fingerprint, "reference")
    with pytest.raises(CurateError, match="--top-p"):
        run(store, models["reference"], at_ids="teacher-cache", top_p=0.9)


def test_cli_at_ids(tmp_path: Path, caches, models) -> None:
    from typer.testing import CliRunner

    from curate.cli import app

    store, teacher, reference = caches
    runner = CliRunner()
    assert "--at-ids" in runner.invoke(app, ["cache-logits", "--help"]).output
    res = runner.invoke(app, ["cache-logits", "--teacher", str(models["reference"][0]), "--dataset", "preferences",
                              "--config", "sides", "--at-ids", "teacher-cache", "--quantization", "fp16",
                              "--dtype", "float32", "--name", "ref-cli", "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    assert store.get("ref-cli").hash == reference.hash  # the same bytes as the Python run
    res = runner.invoke(app, ["cache-logits", "--teacher", str(models["reference"][0]), "--dataset", "preferences",
                              "--config", "sides", "--at-ids", "no-such-cache", "--store", str(store.root)])
    assert res.exit_code != 0 and "no-such-cache" in res.output and "Traceback" not in res.output
