"""Logit cache v2: exact ids for any vocabulary (151,936 included), variable-length top-p rows, layout-1 caches
still read, one-line errors for bad selection flags, and sampled rows whose KD estimator is unbiased.

Expected values come from a direct full softmax of the same tiny random teacher (float64), never from the
cache code itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from builders.teacher_logits import BuildResult, LogitCacheConfig, cache_teacher_logits
from curate.cli import app
from curate.errors import CurateError
from curate.logit_codec import SCHEMES, decode_logprobs, encode_logprobs, load_cache
from curate.store import DatasetStore
from tests.conftest import shared
from tests.tiny import smollm2_tokenizer
from train.kd_data import kd_features

ROWS = 4  # per split of dfar lr: 8 examples, ~700 completion tokens
QWEN_VOCAB = 151_936


@pytest.fixture(scope="module")
def dfar_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2-store")
    build_dfar(DatasetStore(root), shared("dfar"), DfarConfig(limit=ROWS))
    return root


def _teacher(folder: Path, vocab: int | None) -> tuple[Path, Any, Any]:
    """A 2-layer random Llama (logits spread by initializer_range=1) on the SmolLM2 tokenizer, padded with
    added tokens to `vocab` entries when given (a Qwen-sized vocabulary with real text ids)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(smollm2_tokenizer())
    if vocab is not None:
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=1.0, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    return _teacher(tmp_path_factory.mktemp("teacher"), None)


@pytest.fixture(scope="module")
def qwen_sized_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    return _teacher(tmp_path_factory.mktemp("teacher-152k"), QWEN_VOCAB)


def _store(tmp_path: Path, dfar_store: Path) -> DatasetStore:
    import shutil

    shutil.copytree(dfar_store, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def _cache(store: DatasetStore, teacher: tuple[Path, Any, Any], **kw: Any) -> BuildResult:
    folder, model, tok = teacher
    params = LogitCacheConfig(model=str(folder), dtype="float32", chunk_size=4, batch_size=4, **kw)
    result = cache_teacher_logits(store, params, model=model, tokenizer=tok, progress=False)
    assert isinstance(result, BuildResult)
    return result


def _direct(model: Any, input_ids: np.ndarray, prompt_len: int) -> torch.Tensor:
    """Unbatched full log-softmax (float64) of the rows predicting the completion tokens: the ground truth."""
    with torch.inference_mode():
        logits = model(torch.tensor(input_ids[None])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)[prompt_len - 1: -1]


# ---- big vocabularies and old caches -------------------------------------------------------------------
def test_qwen_sized_vocabulary_round_trips_exactly(tmp_path: Path, dfar_store: Path, qwen_sized_teacher) -> None:
    """A 151,936-token teacher: ids (uint32 lists, dictionary-encoded by parquet) decode to exactly the top-k
    of a full softmax; the layout-1 cache of the same run reads back identically."""
    _, model, tok = qwen_sized_teacher
    store = _store(tmp_path, dfar_store)
    v2 = _cache(store, qwen_sized_teacher, k=16, quantization="fp16", splits=["test"]).version
    p = v2.manifest["params"]
    assert (p["vocab_size"], p["id_type"], p["layout"]) == (QWEN_VOCAB, "uint32", 2)
    examples = load_cache(v2)
    assert len(examples) == ROWS
    big = 0
    for ex in examples:
        full = _direct(model, ex.input_ids, ex.prompt_len)
        top = torch.topk(full, 16, dim=-1)
        assert np.array_equal(ex.topk_ids, top.indices.numpy())
        assert np.allclose(ex.topk_logprobs, top.values.numpy(), atol=2e-2, rtol=1e-3)
        big += int((ex.topk_ids >= 1 << 16).sum())
    assert big > 0, "the test must exercise ids above uint16"
    v1 = _cache(store, qwen_sized_teacher, k=16, quantization="fp16", splits=["test"], layout=1,
                name="v1-logits").version
    assert v1.manifest["params"]["id_type"] == "uint32" and v1.manifest["params"]["layout"] == 1
    for a, b in zip(load_cache(v1), examples, strict=True):
        assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.topk_logprobs, b.topk_logprobs)
        assert np.array_equal(a.residual, b.residual)


def test_layout_1_cache_loads_for_kd_like_layout_2(tmp_path: Path, dfar_store: Path, teacher) -> None:
    """Old caches (uint16 id lists, k per row) still feed KD: the same features as the packed layout."""
    store = _store(tmp_path, dfar_store)
    v1 = _cache(store, teacher, k=8, layout=1, name="old-logits").version
    v2 = _cache(store, teacher, k=8).version
    assert v1.read("default", "train").schema.field("topk_ids").type.value_type.value_type == "uint16"
    for a, b in zip(load_cache(v1), load_cache(v2), strict=True):
        fa, fb = kd_features(a, 1024), kd_features(b, 1024)
        assert fa.keys() == fb.keys()
        for key in fa:
            assert np.array_equal(fa[key], fb[key]), key


# ---- per-token adaptive (top-p) rows ---------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["fp16", "u8-delta"])
def test_top_p_rows_match_a_full_softmax(tmp_path: Path, dfar_store: Path, teacher, quantization: str) -> None:
    _, model, _ = teacher
    store = _store(tmp_path, dfar_store)
    top_p, k, k_min = 0.6, 24, 2
    v = _cache(store, teacher, k=k, top_p=top_p, k_min=k_min, quantization=quantization).version
    p = v.manifest["params"]
    assert (p["top_p"], p["k_min"], p["max_entries"]) == (top_p, k_min, k)
    scheme = SCHEMES[quantization]
    lengths = []
    for ex in load_cache(v):
        full = _direct(model, ex.input_ids, ex.prompt_len)
        top = torch.topk(full, k, dim=-1)
        probs = top.values.exp().numpy()
        cum = np.cumsum(probs, axis=1)
        want = np.clip((cum < top_p).sum(1) + 1, k_min, k)
        kept = np.isfinite(ex.topk_logprobs).sum(1)
        near = np.abs(cum[np.arange(len(cum)), np.minimum(want, k) - 1] - top_p) < 1e-5  # float32 boundary ties
        assert np.array_equal(kept[~near], want[~near])
        lengths += kept.tolist()
        for t, n in enumerate(kept):
            assert np.all(np.isfinite(ex.topk_logprobs[t, :n])) and np.all(ex.topk_ids[t, n:] == 0)
            assert np.array_equal(ex.topk_ids[t, :n], top.indices[t, :n].numpy())
            ref = decode_logprobs(encode_logprobs(top.values[t, :n].numpy()[None].astype(np.float32), scheme),
                                  scheme)[0]
            assert np.allclose(ex.topk_logprobs[t, :n], ref, atol=1e-3 if scheme.step is None else scheme.step)
            assert np.isclose(ex.residual[t], 1 - probs[t, :n].sum(), rtol=2e-3, atol=1e-6)
    assert len(set(lengths)) > 2, "rows must really vary in length"


def test_variable_rows_round_trip_exactly_through_the_table() -> None:
    """unit_table -> parquet -> decode_batch gives back exactly the kept prefix of each row (ids and codes)."""
    import io
    from dataclasses import dataclass

    import pyarrow.parquet as pq

    from builders.teacher_logits import _kept_mask, _ragged
    from curate.logit_codec import decode_batch

    @dataclass
    class Row:
        topk_ids: np.ndarray
        kept: np.ndarray

    rng = np.random.default_rng(1)
    vocab, k = QWEN_VOCAB, 12
    rows = []
    for t in (5, 1, 9):
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
        rows.append((Row(ids, rng.integers(1, k + 1, size=t)), -np.sort(rng.exponential(3, size=(t, k)), 1)))
    import pyarrow as pa

    from curate.logit_codec import cache_schema

    for name, scheme in SCHEMES.items():
        schema = cache_schema(vocab, scheme)
        masks = [_kept_mask(r) for r, _ in rows]
        codes = [encode_logprobs(lp.astype(np.float32), scheme) for _, lp in rows]
        table = pa.table({
            "id": ["a", "b", "c"], "split": ["train"] * 3, "label": pa.array([0, 1, None], pa.int8()),
            "input_ids": pa.array([[1] * (len(r.kept) + 1) for r, _ in rows], schema.field("input_ids").type),
            "prompt_len": pa.array([1, 1, 1], pa.int32()),
            "topk_ids": _ragged([r.topk_ids for r, _ in rows], masks, schema.field("topk_ids").type),
            "topk_logprobs": _ragged(codes, masks, schema.field("topk_logprobs").type),
            "residual": pa.array([[0.5] * len(r.kept) for r, _ in rows], pa.list_(pa.float16())),
            "entropy": pa.array([[1.0] * len(r.kept) for r, _ in rows], pa.list_(pa.float16())),
            "label_logprobs": pa.array([None, None, None], pa.list_(pa.float32())),
        }, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        back = decode_batch(pq.read_table(io.BytesIO(buf.getvalue())), scheme, k, ragged=True)
        for ex, (r, lp), m in zip(back, rows, masks, strict=True):
            full_back = decode_logprobs(encode_logprobs(lp.astype(np.float32), scheme), scheme)
            assert np.array_equal(np.isfinite(ex.topk_logprobs), m), name
            assert np.array_equal(ex.topk_ids[m], r.topk_ids[m]), name
            assert np.array_equal(ex.topk_logprobs[m], full_back[m]), name


# ---- flags --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5 (command line)"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0"),
    (["--top-p", "-0.2"], "top_p must be in (0, 1]"),
    (["--k", "8", "--k-min", "9"], "--k-min 9 is larger than --k 8"),
    (["--layout", "1", "--top-p", "0.9"], "--layout 1 stores exactly k entries"),
    (["--top-p", "0.9", "--entry-cost", "0.01"], "--top-p and --entry-cost are two ways"),
    (["--entry-cost", "0"], "entry_cost must be > 0"),
    (["--proposal-temperature", "2"], "--proposal-temperature is for --select sample"),
    (["--samples", "4"], "--samples is for --select sample"),
    (["--preset", "small", "--samples", "4"], "--samples is for --select sample"),
    (["--preset", "small", "--top-p", "0.9", "--entry-cost", "0.01"], "--top-p and --entry-cost are two ways"),
    (["--select", "sample", "--samples", "0"], "samples must be in [1, 4096]"),
    (["--preset", "tiny"], "--preset must be one of small, not 'tiny'"),
    (["--select", "sample", "--tail-samples", "4"], "--tail-samples adds draws to a top selection"),
    (["--tail-samples", "256"], "tail_samples must be in [0, 255]"),
])
def test_bad_selection_flags_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    out = CliRunner().invoke(app, ["cache-logits", "--store", str(tmp_path / "store"), *args])
    assert out.exit_code == 1, out.output
    assert message in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


def test_preset_is_the_lowest_layer(tmp_path: Path, dfar_store: Path, teacher) -> None:
    from builders.teacher_logits import PRESETS

    folder = teacher[0]
    store = _store(tmp_path, dfar_store)
    base = ["cache-logits", "--store", str(store.root), "--teacher", str(folder), "--dtype", "float32",
            "--split", "test", "--preset", "small"]
    out = CliRunner().invoke(app, [*base, "--k", "12"])
    assert out.exit_code == 0, out.output
    p = store.get("dfar-lr-logits").manifest["params"]
    assert p["preset"] == "small" and p["k"] == 12  # the explicit flag wins
    assert "(--preset small: entry cost 0.0052, k 1–12, u8-delta-coarse)" in out.output
    assert all(p[key] == value for key, value in PRESETS["small"].items() if key != "k")
    # an explicit way of choosing the entries replaces the preset's (its entry_cost), keeping the rest of it
    out = CliRunner().invoke(app, [*base, "--top-p", "0.9", "--name", "top-p-logits"])
    assert out.exit_code == 0, out.output
    p = store.get("top-p-logits").manifest["params"]
    assert (p["preset"], p["top_p"], p["entry_cost"], p["select"]) == ("small", 0.9, None, "top")
    assert (p["k"], p["quantization"]) == (PRESETS["small"]["k"], PRESETS["small"]["quantization"])
    assert "(--preset small: top-p 0.9, k 1–128, u8-delta-coarse)" in out.output  # what was used, said
    out = CliRunner().invoke(app, [*base, "--select", "sample", "--samples", "8", "--tail-samples", "0",
                                   "--name", "sampled-logits"])
    assert out.exit_code == 0 and "(--preset small: 8 draws, u8-delta-coarse)" in out.output, out.output


@pytest.mark.parametrize(("given", "chosen"), [
    ({"k": 12}, {"entry_cost": 0.0052, "top_p": None, "select": "top", "k": 12}),
    ({"top_p": 0.9}, {"entry_cost": None, "top_p": 0.9, "select": "top", "k": 128}),
    ({"select": "sample", "samples": 8}, {"entry_cost": None, "select": "sample", "samples": 8, "k": 128}),
    ({"entry_cost": 0.01}, {"entry_cost": 0.01, "top_p": None}),
    ({"layout": 1}, {"entry_cost": None, "layout": 1, "k": 128}),
])
def test_explicit_selection_replaces_the_presets(given: dict[str, Any], chosen: dict[str, Any]) -> None:
    """The CLI's layering (preset below the given options), without a model: what the config ends up as."""
    from builders.teacher_logits import preset_values
    from curate.configs import COMMAND_LINE, build_config

    cfg = build_config(LogitCacheConfig, [(preset_values("small", given), "--preset small"), (given, COMMAND_LINE)])
    assert {key: getattr(cfg, key) for key in chosen} == chosen
    assert (cfg.preset, cfg.quantization) == ("small", "u8-delta-coarse")


# ---- sampled rows ---------------------------------------------------------------------------------------
def test_sampled_cache_rows_and_kd_batch(tmp_path: Path, dfar_store: Path, teacher) -> None:
    """--select sample: distinct ids with counts summing to the draws, exact teacher log-probs at those ids,
    reproducible, and a KD batch whose loss is the weighted estimator."""
    from train.kd import ce_and_distillation
    from train.kd_data import KDCollator
    from train.losses import get_loss

    _, model, tok = teacher
    store = _store(tmp_path, dfar_store)
    v = _cache(store, teacher, select="sample", samples=8, quantization="fp16", splits=["test"]).version
    p = v.manifest["params"]
    assert (p["select"], p["samples"], p["max_entries"]) == ("sample", 8, 8)
    examples = load_cache(v)
    for ex in examples:
        full = _direct(model, ex.input_ids, ex.prompt_len)
        kept = np.isfinite(ex.topk_logprobs)
        assert np.allclose(ex.sample_weights.sum(1), 1.0) and np.all(ex.sample_weights[~kept] == 0)
        for t in range(len(ex.residual)):
            ids = ex.topk_ids[t, kept[t]]
            assert len(set(ids.tolist())) == len(ids)
            want = full[t, ids].numpy()
            assert np.allclose(ex.topk_logprobs[t, kept[t]], want, atol=2e-2, rtol=1e-3)
            assert np.all(np.diff(ex.topk_logprobs[t, kept[t]]) <= 0)
            assert np.isclose(ex.residual[t], 1 - np.exp(want).sum(), rtol=2e-3, atol=1e-5)
    tempered = load_cache(_cache(store, teacher, select="sample", samples=8, quantization="fp16", splits=["test"],
                                 proposal_temperature=2.0, name="tempered").version)
    for ex in tempered[:2]:
        full = _direct(model, ex.input_ids, ex.prompt_len)
        proposal = torch.log_softmax(full / 2.0, dim=-1)
        kept = np.isfinite(ex.topk_logprobs)
        ratio = (full - proposal).gather(-1, torch.from_numpy(ex.topk_ids)).exp().numpy()
        counts = np.where(kept, ex.sample_weights * 8 / ratio, 0)  # weights = counts / N * p / proposal
        assert np.allclose(counts, np.rint(counts), atol=1e-3) and np.allclose(counts.sum(1), 8, atol=1e-3)
    again = _cache(store, teacher, select="sample", samples=8, quantization="fp16", splits=["test"], name="again")
    assert [f.read_bytes() for f in again.version.files("default")] == [f.read_bytes() for f in v.files("default")]

    feats = [kd_features(ex, 1024) for ex in examples[:2]]
    batch = KDCollator(pad_id=tok.pad_token_id)(feats)
    with torch.no_grad():
        logprobs_all = torch.log_softmax(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    rows, pos = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    targets = batch["labels"][rows, pos + 1]
    _, kd = ce_and_distillation(logprobs_all[rows, pos], rows, pos, targets, batch, kd_loss=get_loss("forward_kl"),
                                temperature=1.0)
    t = pos - batch["answer_pos"][rows]
    w, lp = batch["kd_weights"][rows, t], batch["kd_logprobs"][rows, t]
    s = logprobs_all[rows, pos].gather(-1, batch["kd_ids"][rows, t])
    manual = (w * torch.where(w > 0, lp - s, torch.zeros_like(s))).sum(-1).mean()
    assert torch.isfinite(kd) and torch.allclose(kd, manual)

    from train.config import KDConfig
    from train.kd import prepare_kd

    folder = teacher[0]
    for kw, message in (({"loss": "reverse_kl"}, "only forward_kl"), ({"temperature": 2.0}, "temperature-1 KL")):
        cfg = KDConfig(model=str(folder), store=str(store.root), cache="again", limit=2, train_split="test",
                       eval_limit=0, max_length=64, **kw)
        with pytest.raises(CurateError, match=message):
            prepare_kd(cfg, tok)


def test_entry_cost_rows_are_the_budget_optimal_prefix(tmp_path: Path, dfar_store: Path, teacher) -> None:
    """--entry-cost c keeps per token the n in [k_min, k] minimising KL(teacher ‖ cache row) + c·n, with the KL
    computed here densely (full softmax against the rebuilt distribution, residual spread evenly)."""
    _, model, tok = teacher
    store = _store(tmp_path, dfar_store)
    k, k_min, cost = 12, 2, 0.15
    v = _cache(store, teacher, k=k, k_min=k_min, entry_cost=cost, quantization="fp16", splits=["test"]).version
    vocab = len(tok)
    lengths = []
    for ex in load_cache(v)[:2]:
        full = _direct(model, ex.input_ids, ex.prompt_len)
        p = full.exp()
        top = torch.topk(full, k, dim=-1)
        costs = []
        for n in range(1, k + 1):
            r = (1 - p.gather(-1, top.indices[:, :n]).sum(-1)).clamp(min=1e-12)
            q = (r / (vocab - n))[:, None].expand_as(p).clone()
            q.scatter_(-1, top.indices[:, :n], p.gather(-1, top.indices[:, :n]))
            costs.append((p * (full - q.log())).sum(-1) + cost * n)
        c = torch.stack(costs, -1)
        c[:, : k_min - 1] = torch.inf
        best = c.argmin(-1) + 1
        gap = c.sort(-1).values
        clear = (gap[:, 1] - gap[:, 0]) > 1e-6
        kept = torch.from_numpy(np.isfinite(ex.topk_logprobs).sum(1))
        assert torch.equal(kept[clear], best[clear])
        lengths += kept.tolist()
    assert len(set(lengths)) > 2 and min(lengths) >= k_min


def test_cache_written_before_v2_loads_for_kd(tmp_path: Path) -> None:
    """tests/data/logit_cache_v1.parquet was written by the code before v2 (commit adcf73a, a 1-layer random
    teacher on two synthetic `tests.tiny` DFAR rows; manifest params in logit_cache_v1.json, no layout key);
    today's reader gives exactly what that commit's reader gave."""
    import json

    import pyarrow.parquet as pq

    from curate.logit_codec import CACHE_CONFIG

    data = Path(__file__).parent / "data"
    fixture = json.loads((data / "logit_cache_v1.json").read_text())
    expected = json.loads((data / "logit_cache_v1_expected.json").read_text())
    store = DatasetStore(tmp_path / "store")
    with store.new_version("old-logits", builder="teacher-logits", builder_version="1.0.0",
                           params=fixture["params"], sources=[]) as w:
        w.write_table(CACHE_CONFIG, "test", pq.read_table(data / "logit_cache_v1.parquet"))
    examples = load_cache(store.get("old-logits"))
    assert [e.id for e in examples] == [e["id"] for e in expected]
    for ex, want in zip(examples, expected, strict=True):
        assert np.array_equal(ex.topk_ids, np.array(want["topk_ids"]))
        assert np.array_equal(ex.topk_logprobs, np.array(want["topk_logprobs"], dtype=np.float32))
        assert np.array_equal(ex.residual, np.array(want["residual"], dtype=np.float32))
        assert ex.sample_weights is None
        feats = kd_features(ex, 1024)
        assert feats["kd_ids"].shape == (len(want["topk_ids"]), fixture["params"]["k"])
        assert "kd_weights" not in feats


# ---- tail draws -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["teacher", "qwen_sized_teacher"])
def test_tail_draws_round_trip_and_feed_kd(tmp_path: Path, dfar_store: Path, which: str,
                                           request: pytest.FixtureRequest) -> None:
    """--tail-samples 4 on an fp16 --entry-cost cache (49,152 and 151,936 vocabularies): per token 4 ids outside the
    kept ones, decoded exactly as the scorer drew them; a rebuild is byte-identical. In a KD batch the tail
    term's student part (a difference between two students) and its teacher part (sum over the tail of
    p log p - r log r, from a direct float64 softmax) match; a loss without a tail estimator gets a note."""
    from builders.teacher_logits import plan_cache
    from curate.teacher_scoring import score_batch
    from train.config import KDConfig
    from train.kd import ce_and_distillation, prepare_kd
    from train.kd_data import KDCollator
    from train.losses import get_loss

    teacher = request.getfixturevalue(which)
    folder, model, tok = teacher
    store = _store(tmp_path, dfar_store)
    fields = {"k": 16, "entry_cost": 0.002, "tail_samples": 4, "splits": ["test"], "quantization": "fp16"}
    v = _cache(store, teacher, **fields).version
    p = v.manifest["params"]
    assert p["tail_samples"] == 4 and "tail_ids" in v.read("default", "test").schema.names
    examples = load_cache(v)
    plan = plan_cache(store, LogitCacheConfig(model=str(folder), dtype="float32", chunk_size=4, batch_size=4,
                                              **fields), tok)
    scored_by_id = {}  # the scorer on the cacher's own batches (draws are seeded by the batch's content)
    for unit in plan.units:
        batch_exs = [plan.examples[i] for i in unit]
        got = score_batch(model, [e.input_ids for e in batch_exs], [e.prompt_len for e in batch_exs], k=16,
                          pad_id=tok.pad_token_id, entry_cost=0.002, tail_samples=4)
        scored_by_id.update({e.id: g for e, g in zip(batch_exs, got, strict=True)})
    high = 0
    for ex in examples:
        scored = scored_by_id[ex.id]
        drawn = ex.tail_ids >= 0
        assert np.array_equal(drawn, np.isfinite(scored.tail_logprobs)) and drawn.all(axis=1).sum() > 0
        assert np.array_equal(ex.tail_ids[drawn], scored.tail_ids[drawn])
        for t in range(len(ex.residual)):
            kept = set(ex.topk_ids[t, np.isfinite(ex.topk_logprobs[t])].tolist())
            ids = ex.tail_ids[t, drawn[t]]
            assert len(ids) in (0, 4) and not kept & set(ids.tolist())
        high += int((ex.tail_ids[drawn] >= 1 << 16).sum())
    if which == "qwen_sized_teacher":
        assert p["id_type"] == "uint32" and high > 0, "the draws must exercise ids above uint16"
        return
    again = _cache(store, teacher, name="again", **fields)
    assert [f.read_bytes() for f in again.version.files("default")] == [f.read_bytes() for f in v.files("default")]

    feats = [kd_features(ex, 1024) for ex in examples[:2]]
    batch = KDCollator(pad_id=tok.pad_token_id)(feats)
    rows, pos = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    targets = batch["labels"][rows, pos + 1]
    t = pos - batch["answer_pos"][rows]
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    teacher_lp = torch.log_softmax(logits, -1)[rows, pos]

    def tail_term(seed: int) -> tuple[float, torch.Tensor]:
        """(KD with the tail - KD without it, for a student near the teacher) and the student part by hand."""
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        lq = torch.log_softmax(logits + noise, -1)[rows, pos]
        _, kd = ce_and_distillation(lq.float(), rows, pos, targets, batch, kd_loss=get_loss("forward_kl"),
                                    temperature=1.0)
        _, coarse = ce_and_distillation(lq.float(), rows, pos, targets,
                                        {k: x for k, x in batch.items() if not k.startswith("kd_tail")},
                                        kd_loss=get_loss("forward_kl"), temperature=1.0)
        kept = torch.isfinite(batch["kd_logprobs"][rows, t])
        log_q_tail = torch.log(1 - torch.where(kept, lq.gather(-1, batch["kd_ids"][rows, t]).exp(), 0.0).sum(-1))
        draws = batch["kd_tail_ids"][rows, t]
        ok = draws >= 0
        part = torch.where(ok, lq.gather(-1, draws.clamp(min=0)) - log_q_tail[:, None], 0.0)
        r = batch["kd_residual"][rows, t].double()
        return float(kd - coarse), r * part.sum(-1) / ok.sum(-1).clamp(min=1)

    got_a, part_a = tail_term(0)
    got_b, part_b = tail_term(1)
    assert abs((got_a - got_b) + float((part_a - part_b).mean())) < 1e-4, (got_a, got_b)
    assert abs(float((part_a - part_b).mean())) > 1e-3  # the students differ in the tail
    # the teacher part, sum_T p log p - r log r per token, from the dense teacher; the cache's comes from fp16 codes
    # of the kept log-probs and a float16 entropy: the bound below follows from their actual errors
    p_true = teacher_lp.exp()
    tail_mask = torch.ones_like(p_true, dtype=torch.bool)
    kept = torch.isfinite(batch["kd_logprobs"][rows, t])
    tail_mask.scatter_(1, torch.where(kept, batch["kd_ids"][rows, t], batch["kd_ids"][rows, t][:, :1]), False)
    r_true = torch.where(tail_mask, p_true, 0.0).sum(-1)
    has = (batch["kd_tail_ids"][rows, t] >= 0).any(-1)
    teacher_part = torch.where(tail_mask, p_true * teacher_lp, 0.0).sum(-1) - r_true * r_true.log()
    want = float(torch.where(has, teacher_part - part_a, 0.0).mean())
    true_kept = teacher_lp.gather(-1, batch["kd_ids"][rows, t])
    code_err = torch.where(kept, (batch["kd_logprobs"][rows, t].double() - true_kept).abs(), 0.0)
    kept_p = torch.where(kept, true_kept.exp(), 0.0)
    bound = float((2 * (kept_p * code_err.max(-1, keepdim=True).values * (1 + true_kept.abs())).sum(-1)
                   + 2**-10 * batch["kd_entropy"][rows, t] + 1e-3 * r_true).mean())
    assert abs(got_a - want) <= bound < 0.05, (got_a, want, bound)

    cfg = KDConfig(model=str(folder), store=str(store.root), cache="again", limit=2, train_split="test",
                   eval_limit=0, max_length=64, loss="jsd")
    assert any("cannot use them" in n for n in prepare_kd(cfg, tok).notes)
