"""Training on ETHICS `instruct` (tiny random models, real ETHICS rows): SFT on chosen subsets in a seeded mix,
a teacher-logit cache of chosen subsets, label KD (also across paradigms with their own label words) and token KD
on it, and the unknown-subset refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from curate.store import DatasetStore
from tests.tiny import save_tiny, tiny_llama
from train.config import KDConfig, SFTConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUICK = dict(max_steps=6, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50, max_length=96,
             eval_limit=3, gen_max_new_tokens=2, lora_r=4, lora_alpha=8, lora_dropout=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok) -> dict[str, Any]:
    """ETHICS (12 rows per file), a tiny student, and a cache of deontology + justice (shared label words)
    and one of every subset (per-subset words) from a different, sharpened tiny teacher."""
    from builders.ethics import EthicsConfig, build_ethics
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits

    from .conftest import shared

    root = tmp_path_factory.mktemp("ethics-train")
    store = DatasetStore(root / "store")
    build_ethics(store, shared("ethics"), EthicsConfig(limit=12, check_tokenizer=False))
    student = save_tiny(root / "student", tok, hidden=32, seed=0)
    teacher = tiny_llama(len(tok), hidden=32, seed=1, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(40.0)
    for name, subsets in (("ethics-dj-logits", ["deontology", "justice"]), ("ethics-all-logits", None)):
        params = LogitCacheConfig(dataset="ethics", config="instruct", model=str(student), k=8, max_length=96,
                                  batch_size=8, chunk_size=16, splits=["train"], subsets=subsets, name=name)
        cache_teacher_logits(store, params, model=teacher, tokenizer=tok, progress=False)
    return {"root": root, "store": store.root, "student": student, "teacher": teacher}


def test_sft_on_chosen_subsets_mixes_them_in_a_seeded_order(world: dict[str, Any], tmp_path: Path, tok) -> None:
    from train.sft import prepare_sft, run_sft

    cfg = load_config(SFTConfig, None, {**QUICK, "model": str(world["student"]), "store": str(world["store"]),
                                        "dataset": "ethics", "dataset_config": "instruct",
                                        "subsets": ["deontology", "justice"], "run_dir": str(tmp_path / "run")})
    assert cfg.subsets == ["deontology", "justice"]
    result = run_sft(cfg, tokenizer=tok)
    notes = result.metrics["notes"]
    assert any("subsets mixed in seeded order (seed 0): deontology 12, justice 12" in n for n in notes), notes
    ev = result.metrics["eval"]
    assert set(ev["per_group"]) == {"deontology", "justice"} and ev["n"] == 6
    assert (result.run.path / "eval" / "confusion_matrix.png").is_file()
    assert "confusion_matrix.png" in (result.run.path / "README.md").read_text()
    # the order: a seeded permutation of the chosen rows, the same for the same seed, another for another seed
    rows = DatasetStore(world["store"]).get("ethics").read("instruct", "train").to_pylist()
    chosen = [r["prompt"] for r in rows if r["subset"] in ("deontology", "justice")]

    def order(seed: int) -> list[str]:
        prep = prepare_sft(load_config(SFTConfig, None, {**cfg.to_dict(), "seed": seed, "evaluate": False}),
                           tokenizer=tok)
        return [tok.decode(ex["input_ids"][: ex["labels"].index(next(x for x in ex["labels"] if x != -100))])
                for ex in prep.train_dataset.items]

    first, again, other = order(0), order(0), order(1)
    assert first == again != other
    assert sorted(first) == sorted(chosen)  # the prompts decode back to exactly the chosen rows
    head = [p.split("\n")[0] for p in first[:8]]
    assert len(set(head)) == 2  # both paradigms within the first 8 rows: mixed, not one block after the other


def test_unknown_subset_lists_the_known_ones(world: dict[str, Any], tmp_path: Path) -> None:
    from curate.cli import app

    res = CliRunner().invoke(app, ["train", "sft", "--model", str(world["student"]), "--store", str(world["store"]),
                                   "--dataset", "ethics", "--dataset-config", "instruct", "--subsets", "justice,karma",
                                   "--run-dir", str(tmp_path / "r"), "--max-steps", "1"])
    assert res.exit_code == 1
    line = " ".join(res.output.split())
    assert ("unknown subset(s) karma in ethics@v1 instruct/train; known: commonsense, deontology, justice, "
            "utilitarianism, virtue") in line or "known: deontology, justice, utilitarianism, virtue" in line, line
    assert "Traceback" not in res.output
    cache = CliRunner().invoke(app, ["cache-logits", "--store", str(world["store"]), "--dataset", "ethics",
                                     "--config", "instruct", "--subsets", "karma", "--teacher", str(world["student"])])
    assert cache.exit_code == 1 and "unknown subset(s) karma" in cache.output, cache.output


def test_label_kd_on_an_ethics_cache(world: dict[str, Any], tmp_path: Path, tok) -> None:
    from train.kd import run_kd

    cache = DatasetStore(world["store"]).get("ethics-dj-logits")
    params = cache.manifest["params"]
    assert params["subsets"] == ["deontology", "justice"]
    assert params["label_token_ids"] == [tok(" unreasonable", add_special_tokens=False).input_ids[0],
                   tok(" reasonable", add_special_tokens=False).input_ids[0]]
    cfg = load_config(KDConfig, None, {**QUICK, "model": str(world["student"]), "store": str(world["store"]),
                                       "cache": "ethics-dj-logits", "kd_target": "labels", "alpha": 0.5,
                                       "run_dir": str(tmp_path / "kd")})
    result = run_kd(cfg, tokenizer=tok)
    kd = [r["kd"] for r in result.metrics["log_history"] if "kd" in r]
    assert len(kd) == 6 and all(x > 0 for x in kd)
    assert any("deontology 12, justice 12" in n for n in result.metrics["notes"])
    assert set(result.metrics["eval"]["per_group"]) == {"deontology", "justice"}  # the cache's subsets


def test_all_subset_cache_stores_each_rows_own_label_words(world: dict[str, Any], tok) -> None:
    """Every paradigm in one cache: each row keeps the teacher's log-probs of ITS subset's words at the answer
    position (checked against a forward pass here) and those words' token ids; the manifest has the table."""
    store = DatasetStore(world["store"])
    cache = store.get("ethics-all-logits")
    params = cache.manifest["params"]
    assert not params["label_token_ids"]  # no single word set
    words = store.get("ethics").manifest["params"]["label_words_by_subset"]
    want_ids = {s: [tok(" " + w[k], add_special_tokens=False).input_ids[0] for k in sorted(w, key=int)]
                for s, w in words.items() if s in params["label_token_ids_by_subset"]}
    assert params["label_token_ids_by_subset"] == want_ids
    assert set(want_ids) == {"deontology", "justice", "utilitarianism", "virtue"}
    assert want_ids["utilitarianism"] != want_ids["justice"]
    rows = cache.read("default", "train").to_pylist()
    parent = store.get("ethics").read("instruct", "train").to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in parent]
    teacher = world["teacher"]
    for row, src in zip(rows, parent, strict=True):
        ids = want_ids[src["subset"]]
        assert row["label_token_ids"] == ids
        with torch.no_grad():
            logits = teacher(torch.tensor([row["input_ids"][: row["prompt_len"]]])).logits[0, -1]
        expect = torch.log_softmax(logits.double(), -1)[ids]
        assert row["label_logprobs"] == pytest.approx(expect.tolist(), abs=1e-4)
    # and the reader hands them to KD
    from curate.logit_codec import load_cache

    ex = load_cache(cache, "train")[0]
    assert ex.label_token_ids.tolist() == want_ids[parent[0]["subset"]]


def test_label_kd_renormalises_over_each_rows_own_label_tokens() -> None:
    """The label term on per-row label ids equals T² KL over each row's two tokens, computed by hand."""
    from train.kd import ce_and_distillation
    from train.losses import get_loss

    g = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(2, 50, generator=g), -1)  # the student at the answer positions
    rows, pos, targets = torch.tensor([0, 1]), torch.tensor([4, 6]), torch.tensor([7, 9])
    inputs = {"answer_pos": torch.tensor([4, 6]), "label_mask": torch.tensor([True, True]),
              "label_token_ids": torch.tensor([[3, 7], [9, 11]]),
              "label_logprobs": torch.tensor([[-0.5, -2.0], [-3.0, -0.1]])}
    ce, kd = ce_and_distillation(logprobs, rows, pos, targets, inputs, kd_loss=get_loss("forward_kl"),
                                 temperature=2.0, kd_target="labels")
    want = []
    for i, ids in enumerate(([3, 7], [9, 11])):
        p = torch.softmax(inputs["label_logprobs"][i] / 2.0, -1)
        q = torch.softmax(logprobs[i, ids] / 2.0, -1)
        want.append(4.0 * float((p * (p.log() - q.log())).sum()))
    assert float(kd) == pytest.approx(sum(want) / 2, rel=1e-5)
    assert float(ce) == pytest.approx(-float(logprobs[0, 7] + logprobs[1, 9]) / 2, rel=1e-6)


def test_label_kd_and_token_kd_on_an_all_subset_cache(world: dict[str, Any], tmp_path: Path, tok) -> None:
    from train.kd import run_kd

    base = {**QUICK, "model": str(world["student"]), "store": str(world["store"]), "cache": "ethics-all-logits",
            "evaluate": False}
    result = run_kd(load_config(KDConfig, None, {**base, "subsets": ["virtue", "utilitarianism"],
                                                 "run_dir": str(tmp_path / "tok")}), tokenizer=tok)
    assert any("utilitarianism 12, virtue 12" in n for n in result.metrics["notes"]), result.metrics["notes"]
    assert all(r["kd"] > 0 for r in result.metrics["log_history"] if "kd" in r)
    used = json.loads((result.run.path / "datasets.json").read_text())
    assert [d["name"] for d in used] == ["ethics-all-logits", "ethics"]
    labels = run_kd(load_config(KDConfig, None, {**base, "kd_target": "labels", "alpha": 0.5,
                                                 "run_dir": str(tmp_path / "lab")}), tokenizer=tok)
    kd = [r["kd"] for r in labels.metrics["log_history"] if "kd" in r]
    assert len(kd) == 6 and all(x > 0 for x in kd), kd
    assert any("deontology 12, justice 12, utilitarianism 12, virtue 12" in n for n in labels.metrics["notes"])


def test_head_per_subset_takes_every_paradigm(world: dict[str, Any]) -> None:
    from train.data import head_per_subset

    table = DatasetStore(world["store"]).get("ethics").read("instruct", "train")
    got = head_per_subset(table, 5)
    counts = {s: got["subset"].to_pylist().count(s) for s in set(got["subset"].to_pylist())}
    assert counts == {"deontology": 5, "justice": 5, "utilitarianism": 5, "virtue": 5}
    rows = table.to_pylist()
    want = [r for s in ("deontology", "justice", "utilitarianism", "virtue") for r in rows if r["subset"] == s][:0]
    for s in counts:
        want += [r for r in rows if r["subset"] == s][:5]
    assert sorted(r["id"] + r["subset"] for r in got.to_pylist()) == sorted(r["id"] + r["subset"] for r in want)


def test_smollm2_on_ethics_end_to_end(world: dict[str, Any], tmp_path: Path) -> None:
    """The real model: SmolLM2 zero-shot through `curate eval` on every paradigm's test and test_hard, each
    verbalizer word a single first token of the real tokenizer (the logit cache's rule)."""
    from curate.cli import app
    from curate.models import ModelRef, load_tokenizer

    res = CliRunner().invoke(app, ["eval", "--model", "smollm2", "--store", str(world["store"]), "--dataset", "ethics",
                                   "--dataset-config", "instruct", "--split", "test,test_hard", "--limit", "2",
                                   "--judge", "none", "--max-new-tokens", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 20 and len(m["per_group"]) == 5
    tok = load_tokenizer(ModelRef.parse("smollm2"))
    for words in m["label_words_by_group"].values():
        firsts = {tok(" " + w, add_special_tokens=False).input_ids[0] for w in words.values()}
        assert len(firsts) == len(words)
    preds = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["verbalizer"] in (0, 1) for p in preds)
