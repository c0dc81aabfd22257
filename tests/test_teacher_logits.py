"""Teacher-logit cache: exactness against a full softmax, resume, sharding, bad input, CLI, and a real teacher.

Mechanics run a tiny randomly initialised Llama (built from a config, saved as a local folder) with the real
SmolLM2 tokenizer, so token ids, label verbalizers and templates are the production ones. The slow test runs
the real SmolLM2-135M-Instruct GGUF on 20 DFAR rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from builders.teacher_logits import BuildResult, LogitCacheConfig, ShardReport, cache_teacher_logits
from curate.cli import app
from curate.errors import CurateError
from curate.logit_codec import SCHEMES, decode_logprobs, encode_logprobs, load_cache, reconstruct_logprobs
from curate.models import SMOLLM2, ModelRef, load_causal_lm, load_tokenizer, tokenizer_fingerprint
from curate.sql_views import query
from curate.store import DatasetStore
from tests.conftest import shared

ROWS = 6  # per split: 12 examples of dfar lr, ~1,000 completion tokens


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    return load_tokenizer(ModelRef.parse(SMOLLM2))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> tuple[Path, Any, Any]:
    """A 2-layer Llama with the SmolLM2 vocabulary, saved as a teacher folder (weights + tokenizer).

    ``initializer_range=1`` spreads the logits so top-k boundaries are not float-noise ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-teacher")
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=1.0, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_causal_lm(ModelRef.parse(str(folder)), dtype="float32", device="cpu").eval()
    return folder, model, load_tokenizer(ModelRef.parse(str(folder)))


@pytest.fixture(scope="module")
def small_dfar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logit-store")
    build_dfar(DatasetStore(root), shared("dfar"), DfarConfig(limit=ROWS))
    return root


def _fresh_store(tmp_path: Path, small_dfar: Path) -> DatasetStore:
    """A private copy of the small DFAR store (caches write into it)."""
    import shutil

    shutil.copytree(small_dfar, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def _run(store: DatasetStore, teacher: tuple[Path, Any, Any], **kw: Any) -> BuildResult | ShardReport:
    folder, model, tok = teacher
    run_kw = {k: kw.pop(k) for k in ("shard", "num_shards", "merge", "merge_only", "max_units") if k in kw}
    params = LogitCacheConfig(model=str(folder), dtype="float32", chunk_size=4, batch_size=3, **kw)
    return cache_teacher_logits(store, params, model=model, tokenizer=tok, progress=False, **run_kw)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory: pytest.TempPathFactory, small_dfar: Path, tiny_teacher) -> BuildResult:
    """One unsharded, uninterrupted fp16 cache of dfar lr: the reference for exactness, resume and sharding."""
    store = _fresh_store(tmp_path_factory.mktemp("ref"), small_dfar)
    result = _run(store, tiny_teacher, quantization="fp16", k=16)
    assert isinstance(result, BuildResult)
    return result


def _direct(model: Any, input_ids: np.ndarray) -> torch.Tensor:
    """Unbatched, unpadded full log-softmax over the whole vocabulary (float64): the ground truth."""
    with torch.inference_mode():
        logits = model(torch.tensor(input_ids[None])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


# ---- codec --------------------------------------------------------------------------------------------
def test_codec_round_trip_and_delta_equivalence() -> None:
    rng = np.random.default_rng(0)
    lp = np.log(np.maximum(rng.dirichlet(np.full(1000, 0.05), size=50), 1e-30))
    lp = -np.sort(-lp, axis=1)[:, :64].astype(np.float32)
    for scheme in SCHEMES.values():
        back = decode_logprobs(encode_logprobs(lp, scheme), scheme)
        inside = lp > (scheme.floor if scheme.floor is not None else -np.inf)
        tol = scheme.max_error + (1e-3 * np.abs(lp) if scheme.step is None else 0)
        assert np.all(np.abs(back - lp)[inside] <= (tol[inside] if np.ndim(tol) else tol) + 1e-6), scheme.name
        assert np.all(np.diff(back, axis=1) <= 0), f"{scheme.name} must keep the descending order"
    u8, delta = SCHEMES["u8"], SCHEMES["u8-delta"]
    assert np.array_equal(decode_logprobs(encode_logprobs(lp, u8), u8),
                          decode_logprobs(encode_logprobs(lp, delta), delta))


# ---- exactness against a full softmax -------------------------------------------------------------------
def test_topk_residual_labels_match_full_softmax(reference_cache: BuildResult, tiny_teacher) -> None:
    _, model, tok = tiny_teacher
    v = reference_cache.version
    p = v.manifest["params"]
    assert p["k"] == 16 and p["quantization"] == "fp16" and p["template"] == "plain"
    assert p["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert p["label_words"] == {"0": "ethical", "1": "unethical"}
    assert p["label_token_ids"] == [tok(" ethical").input_ids[0], tok(" unethical").input_ids[0]]
    assert v.manifest["parents"][0]["name"] == "dfar" and v.manifest["parents"][0]["config"] == "lr"
    examples = load_cache(v)
    assert len(examples) == 2 * ROWS
    parent = {r["id"]: r for r in v_parent_rows(v)}
    for ex in examples:
        row = parent[ex.id]
        assert tok.decode(ex.input_ids[ex.prompt_len:]) == row["completion"]
        assert tok.decode(ex.input_ids[: ex.prompt_len]) == row["prompt"]
        full = _direct(model, ex.input_ids)[ex.prompt_len - 1: -1]  # row t predicts input_ids[prompt_len + t]
        top = torch.topk(full, 16, dim=-1)
        assert np.array_equal(ex.topk_ids, top.indices.numpy())
        assert np.allclose(ex.topk_logprobs, top.values.numpy(), atol=2e-2, rtol=1e-3)  # fp16
        residual = 1 - top.values.exp().sum(-1).numpy()
        assert np.allclose(ex.residual, residual, rtol=2e-3, atol=1e-6)
        # what a student sees: residual = 1 - sum(dequantised top-k probs), within the quantisation error
        assert np.allclose(ex.residual, 1 - np.exp(ex.topk_logprobs).sum(1), atol=1e-2)
        entropy = -(full.exp() * full).sum(-1).numpy()
        assert np.allclose(ex.entropy, entropy, rtol=2e-3, atol=1e-3)
        assert ex.label == row["label"]
        assert np.allclose(ex.label_logprobs, full[0, p["label_token_ids"]].numpy(), atol=1e-4)


def test_tiny_residual_keeps_its_relative_precision() -> None:
    """A peaked teacher (residual ~1e-9, below float32's resolution of 1 - sum(top-k) ~ 6e-8): the cached
    residual must be the mass outside the top-k to a relative 1e-4, which `1 - sum(top-k probs)` cannot do."""
    from curate.teacher_scoring import reduce_logits

    g = torch.Generator().manual_seed(0)
    vocab, k = 4096, 8
    logits = torch.randn(16, vocab, generator=g)
    logits[:, :k] += torch.linspace(27.0, 25.0, k)  # the top-k carry all but ~1e-9 of the mass
    x = logits.double()
    lse_all = torch.logsumexp(x, dim=-1)
    top = torch.topk(x, k, dim=-1).indices
    rest = x.scatter(-1, top, float("-inf"))  # every logit outside the top-k
    expected = torch.exp(torch.logsumexp(rest, dim=-1) - lse_all).numpy()
    assert 1e-10 < expected.min() and expected.max() < 1e-8
    reduced = reduce_logits(logits.clone(), k)
    np.testing.assert_allclose(reduced.residual.numpy(), expected, rtol=1e-4, atol=0)
    naive = 1 - reduced.topk_logprobs.exp().sum(-1).numpy()  # what this test exists to catch
    assert not np.allclose(naive, expected, rtol=1e-4, atol=0)


def test_kd_takes_the_caches_template_and_refuses_another(reference_cache: BuildResult) -> None:
    from curate.logit_codec import cache_params
    from train.config import KDConfig
    from train.kd import cache_template

    v = reference_cache.version
    assert cache_template(KDConfig(), v, cache_params(v)) == "plain"
    assert cache_template(KDConfig(template="plain"), v, cache_params(v)) == "plain"
    with pytest.raises(CurateError, match=r"template 'chat' differs from dfar-lr-logits@v1's 'plain'"):
        cache_template(KDConfig(template="chat"), v, cache_params(v))


def test_kd_prepared_state_carries_the_caches_version_labels_and_prefix(tmp_path: Path, small_dfar: Path,
                                                                       tiny_teacher) -> None:
    """KD reads the cache once: its version, label ids, template and label prefix (used by the evaluation
    after training, instead of the default " ")."""
    from train.config import KDConfig
    from train.kd import prepare_kd

    folder, _, tok = tiny_teacher
    store = _fresh_store(tmp_path, small_dfar)
    result = _run(store, tiny_teacher, quantization="fp16", k=4, label_prefix="")
    cfg = KDConfig(model=str(folder), store=str(store.root), limit=2, eval_limit=2, max_length=64)
    prep = prepare_kd(cfg, tok)
    assert prep.cache.hash == result.version.hash and prep.template == "plain" and prep.label_prefix == ""
    assert prep.label_token_ids == [tok("ethical").input_ids[0], tok("unethical").input_ids[0]]
    assert prep.label_token_ids == result.version.manifest["params"]["label_token_ids"]


def v_parent_rows(v: Any) -> list[dict]:
    store = DatasetStore(v.path.parents[3])
    parent = store.get(f"{v.manifest['parents'][0]['name']}@{v.manifest['parents'][0]['tag']}")
    return parent.read("lr").to_pylist()


def test_u8_schemes_stay_within_quantisation_error(tmp_path: Path, small_dfar: Path, tiny_teacher,
                                                    reference_cache: BuildResult) -> None:
    store = _fresh_store(tmp_path, small_dfar)
    ref = {e.id: e for e in load_cache(reference_cache.version)}
    for name in ("u8-delta", "u8-delta-coarse"):
        scheme = SCHEMES[name]
        result = _run(store, tiny_teacher, quantization=name, k=16, splits=["test"])
        assert result.version.name == "dfar-lr-logits" and result.version.splits("default") == ["test"]
        for ex in load_cache(result.version):
            r = ref[ex.id]
            assert np.array_equal(ex.topk_ids, r.topk_ids)
            assert np.abs(ex.topk_logprobs - r.topk_logprobs).max() <= scheme.max_error + 2e-2
            # residual is stored exactly; dequantised probs are each off by at most a factor e^(step/2)
            approx = 1 - np.exp(ex.topk_logprobs).sum(1)
            slack = (1 - ex.residual) * (np.exp(scheme.max_error) - 1) + 2e-3
            assert np.all(np.abs(ex.residual - approx) <= slack)
            dense = reconstruct_logprobs(ex.topk_ids, ex.topk_logprobs, ex.residual, len(tiny_teacher[2]))
            assert np.allclose(np.exp(dense).sum(1), 1, atol=1e-6)


# ---- resume and sharding --------------------------------------------------------------------------------
def test_resume_after_crash_is_byte_identical(tmp_path: Path, small_dfar: Path, tiny_teacher,
                                             reference_cache: BuildResult) -> None:
    store = _fresh_store(tmp_path, small_dfar)
    first = _run(store, tiny_teacher, quantization="fp16", k=16, max_units=2)  # the run "dies" after 2 units
    assert isinstance(first, ShardReport) and first.computed == 2 and first.done_units == 2
    assert first.total_units == 3 and store.names() == ["dfar"]  # nothing in the store yet
    units_tokens = first.tokens
    (first.work_dir / ".unit-00002.parquet.tmp-deadbeef").write_bytes(b"PAR1 half a file")  # killed mid-write
    resumed = _run(store, tiny_teacher, quantization="fp16", k=16, merge=False)
    assert isinstance(resumed, ShardReport) and (resumed.computed, resumed.skipped) == (1, 2)
    # progress and rates count completion tokens, the number the finished version reports
    assert units_tokens + resumed.tokens == reference_cache.version.manifest["params"]["completion_tokens"]
    assert not list(first.work_dir.glob(".*tmp*"))
    final = _run(store, tiny_teacher, quantization="fp16", k=16, merge_only=True)
    assert isinstance(final, BuildResult) and final.created
    ref = reference_cache.version
    assert final.version.hash == ref.hash
    for a, b in zip(final.version.files("default"), ref.files("default"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert not first.work_dir.exists()  # scratch removed once the version exists


def test_two_shards_then_merge_equal_unsharded(tmp_path: Path, small_dfar: Path, tiny_teacher,
                                               reference_cache: BuildResult) -> None:
    store = _fresh_store(tmp_path, small_dfar)
    with pytest.raises(CurateError, match="units missing"):
        _run(store, tiny_teacher, quantization="fp16", k=16, merge_only=True)
    reports = [_run(store, tiny_teacher, quantization="fp16", k=16, shard=i, num_shards=2, merge=False)
               for i in (0, 1)]
    assert [r.computed for r in reports] == [2, 1]
    merged = _run(store, tiny_teacher, quantization="fp16", k=16, merge_only=True)
    assert merged.version.hash == reference_cache.version.hash
    again = _run(store, tiny_teacher, quantization="fp16", k=16)
    assert not again.created  # identical inputs add nothing


# ---- bad input: clear errors, nothing written ------------------------------------------------------------
def _toy_dataset(store: DatasetStore, rows: list[dict]) -> None:
    with store.new_version("toy", builder="test", builder_version="0", params={}, sources=[]) as w:
        w.write_table("lr", "train", pa.Table.from_pylist(rows))


def _nothing_written(store: DatasetStore, before: list[str]) -> None:
    assert store.names() == before
    assert not (store.root / "work").exists() or not any((store.root / "work").rglob("*.parquet"))


def test_bad_input_errors_write_nothing(tmp_path: Path, small_dfar: Path, tiny_teacher) -> None:
    store = _fresh_store(tmp_path, small_dfar)
    with pytest.raises(CurateError, match=r"lacks column\(s\) prompt, completion"):
        _run(store, tiny_teacher, config="default")
    with pytest.raises(CurateError, match=r"--k 100000 is larger than the teacher's vocabulary \(49,152"):
        _run(store, tiny_teacher, k=100_000)
    with pytest.raises(CurateError, match="share their first token"):
        _run(store, tiny_teacher, label_words={0: "ethical", 1: "ethicalness"})
    with pytest.raises(CurateError, match="--quantization must be one of"):
        _run(store, tiny_teacher, quantization="int3")
    good = {"id": "a", "prompt": "Statement: x\nAnswer:", "completion": " ethical", "label": 0,
            "label_text": "ethical", "split": "train"}
    _toy_dataset(store, [good, {**good, "id": "b", "completion": "  "}])
    with pytest.raises(CurateError, match=r"train row 2 \(id b\): empty completion"):
        _run(store, tiny_teacher, dataset="toy")
    _nothing_written(store, ["dfar", "toy"])


def test_cli_labels_outside_vocab_and_cpu_8bit(tmp_path: Path, small_dfar: Path) -> None:
    """A word-level tokenizer that lacks 'unethical'; and bitsandbytes flags on a CPU machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    store = _fresh_store(tmp_path, small_dfar)
    words = ["[UNK]", "[PAD]", "ethical", "Statement:", "Answer:", "Reason:"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        tmp_path / "wordlevel")
    runner = CliRunner()
    base = ["cache-logits", "--store", str(store.root), "--config", "l", "--k", "4"]
    out = runner.invoke(app, [*base, "--teacher", str(tmp_path / "wordlevel")])
    assert out.exit_code == 1
    assert "label word 'unethical' (label 1) is not covered by the vocabulary" in out.output
    out = runner.invoke(app, [*base, "--teacher", str(tmp_path / "wordlevel"), "--load-in-8bit"])
    if not torch.cuda.is_available():
        assert out.exit_code == 1 and "--load-in-8bit needs a CUDA GPU" in out.output
    _nothing_written(store, ["dfar"])


# ---- CLI, chat template, DuckDB ----------------------------------------------------------------------
def test_cli_chat_template_and_duckdb_queries(tmp_path: Path, small_dfar: Path, tiny_teacher) -> None:
    folder, _, tok = tiny_teacher
    store = _fresh_store(tmp_path, small_dfar)
    args = ["cache-logits", "--store", str(store.root), "--config", "l", "--teacher", str(folder), "--dtype",
            "float32", "--k", "8", "--template", "chat"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "built dfar-l-logits@v1" in out.output and "bytes/token" in out.output
    v = store.get("dfar-l-logits")
    assert v.manifest["params"]["template"] == "chat" and "README.md" in {p.name for p in v.path.iterdir()}
    assert len(v.manifest["params"]["chat_template_sha256"]) == 64
    ex = load_cache(v)[0]
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ex.target_ids) == 1
    per_label = query(
        "SELECT label, avg(list_avg(entropy)) AS mean_entropy, "
        "avg(exp(label_logprobs[label + 1])) AS p_gold FROM dfar_l_logits GROUP BY label ORDER BY label",
        store)
    assert per_label["label"].to_list() == [0, 1]
    assert all(0 < h < np.log(len(tok)) for h in per_label["mean_entropy"].to_list())
    assert all(0 < p < 1 for p in per_label["p_gold"].to_list())


# ---- the real teacher ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_teacher_on_dfar(tmp_path: Path, dfar_source: Path, smollm2_tokenizer: Any) -> None:
    """SmolLM2-135M-Instruct (GGUF) on 20 DFAR lr rows: a faithful, compact cache with sane statistics."""
    store = DatasetStore(tmp_path / "store")
    build_dfar(store, dfar_source, DfarConfig(limit=10))
    model = load_causal_lm(ModelRef.parse(SMOLLM2), dtype="float32", device="cpu").eval()
    params = LogitCacheConfig(model=SMOLLM2, k=64, batch_size=4)
    result = cache_teacher_logits(store, params, model=model, tokenizer=smollm2_tokenizer, progress=False)
    v = result.version
    p = v.manifest["params"]
    assert v.num_rows() == 20 and p["teacher"] == SMOLLM2 and p["teacher_revision"].startswith("sha256:")
    assert p["tokenizer_fingerprint"] == tokenizer_fingerprint(smollm2_tokenizer)
    assert v.manifest["sources"][0]["location"].endswith(".gguf")
    assert p["bytes_per_token"] < 200, p["bytes_per_token"]
    examples = load_cache(v)
    top1 = np.mean(np.concatenate([e.topk_ids[:, 0] == e.target_ids for e in examples]))
    assert top1 > 0.3, f"teacher top-1 agreement with the gold completion only {top1:.2f}"
    assert 0 < np.mean(np.concatenate([e.residual for e in examples])) < 0.5
    ex = examples[0]
    full = _direct(model, ex.input_ids)[ex.prompt_len - 1: -1]
    top = torch.topk(full, 64, dim=-1)
    assert (ex.topk_ids == top.indices.numpy()).mean() > 0.99  # batching noise may swap near-tied tail entries
    err = np.abs(ex.topk_logprobs[:, :8] - top.values[:, :8].numpy()).max()
    assert err <= SCHEMES["u8-delta"].max_error + 1e-3
    lab = np.array([e.label_logprobs for e in examples])
    assert np.all(lab < 0) and np.all(np.exp(lab).sum(1) < 1)
