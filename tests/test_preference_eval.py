"""Preference evaluation: pair log-probs against a dense, unbatched computation; accuracies and margins on
constructed scores; `curate eval preferences` end to end on tiny random models and pairs of real DFAR rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curate.store import DatasetStore, Version
from tests.tiny import save_tiny, tiny_llama
from train.preference_eval import (
    PairScores,
    SideScores,
    preference_metrics,
    read_pairs,
    reward_margins,
    score_pairs,
    tokenize_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def write_pairs(store: DatasetStore, dfar_source: Path, n_train: int = 8, n_test: int = 6) -> Version:
    """A `preferences` version, config `pairs`, from real DFAR rows: chosen = the row's gold `lr` completion,
    rejected = the gold completion of another row with the opposite label (an answer for the wrong label)."""
    import pyarrow as pa

    from builders.dfar import build_dfar

    dfar = build_dfar(store, dfar_source).version
    tables = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = dfar.read("lr", split).to_pylist()
        by_label = {lab: [r for r in rows if r["label"] == lab] for lab in (0, 1)}
        out = []
        for i, r in enumerate(rows[:n]):
            other = by_label[1 - r["label"]][i % len(by_label[1 - r["label"]])]
            out.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
                        "rejected": other["completion"], "split": split})
        tables[split] = pa.Table.from_pylist(out)
    with store.new_version("preferences", builder="test", builder_version="0", params={}, sources=[],
                           parents=[{"name": dfar.name, "tag": dfar.tag, "content_hash": dfar.hash,
                                     "config": "lr"}]) as w:
        for split, table in tables.items():
            w.write_table("pairs", split, table)
    return store.get("preferences")


def dense_logprob(model: Any, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Sum of log p(response token | everything before it): one unpadded forward, float64 log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return sum(float(lp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(response_ids))


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    from tests.conftest import shared

    store = DatasetStore(tmp_path_factory.mktemp("pref") / "store")
    write_pairs(store, shared("dfar"))
    return store


def test_pair_logprobs_summed_and_per_token_equal_a_dense_computation(pairs_store: DatasetStore, tok) -> None:
    model = tiny_llama(len(tok), hidden=32, seed=3, pad_token_id=tok.pad_token_id).eval()
    table = read_pairs(pairs_store.get("preferences"), "pairs", "test", limit=5)
    pairs = tokenize_pairs(tok, table, template="plain", max_length=80).pairs
    d = table.to_pydict()
    # the house rule, spelled independently: tok(prompt) + tok(response, no special tokens), cut to max_length
    for p, prompt, chosen in zip(pairs, d["prompt"], d["chosen"], strict=True):
        assert p.prompt_ids == list(tok(prompt).input_ids)
        assert p.chosen_ids == list(tok(chosen, add_special_tokens=False).input_ids)[: 80 - len(p.prompt_ids)]
    assert len({len(p.chosen_ids) for p in pairs} | {len(p.rejected_ids) for p in pairs}) > 1  # padding matters
    scores = score_pairs(model, tok, pairs, batch_size=3)  # batches of 3 sequences: pairs split across batches
    for i, p in enumerate(pairs):
        for side, ids in ((scores.chosen, p.chosen_ids), (scores.rejected, p.rejected_ids)):
            want = dense_logprob(model, p.prompt_ids, ids)
            assert side.sums[i] == pytest.approx(want, abs=2e-4)
            assert side.lengths[i] == len(ids)
            assert side.means[i] == pytest.approx(want / len(ids), abs=1e-5)


def test_chat_template_wraps_the_prompt_only_and_eos_is_opt_in(pairs_store: DatasetStore, tok) -> None:
    table = read_pairs(pairs_store.get("preferences"), "pairs", "test", limit=2)
    d = table.to_pydict()
    chat = tokenize_pairs(tok, table, template="chat", max_length=4096).pairs
    eos = tokenize_pairs(tok, table, template="plain", max_length=4096, append_eos=True).pairs
    for i, p in enumerate(chat):
        wrapped = tok.apply_chat_template([{"role": "user", "content": d["prompt"][i]}], add_generation_prompt=True,
                                          tokenize=False)
        assert p.prompt_ids == list(tok(wrapped, add_special_tokens=False).input_ids)
        assert p.rejected_ids == list(tok(d["rejected"][i], add_special_tokens=False).input_ids)
        assert eos[i].chosen_ids == p.chosen_ids + [tok.eos_token_id]


def _scores(chosen: list[tuple[float, int]], rejected: list[tuple[float, int]]) -> PairScores:
    def side(v: list[tuple[float, int]]) -> SideScores:
        return SideScores(np.array([s for s, _ in v], dtype=np.float64), np.array([n for _, n in v]))

    return PairScores(side(chosen), side(rejected))


def test_accuracy_summed_and_length_normalised_on_a_constructed_case() -> None:
    # pair a: chosen wins both ways; b: chosen loses summed (-12 < -10) but wins per token (-2 > -5);
    # c: a tie counts as a loss; d: chosen loses both ways
    policy = _scores([(-4.0, 2), (-12.0, 6), (-6.0, 3), (-9.0, 3)], [(-6.0, 2), (-10.0, 2), (-6.0, 3), (-3.0, 3)])
    m, records = preference_metrics(["a", "b", "c", "d"], policy)
    assert m["accuracy_sum"] == 0.25 and m["accuracy_mean"] == 0.5
    assert m["logp_chosen"] == pytest.approx(-31.0 / 4) and m["tokens_rejected"] == pytest.approx(2.5)
    assert "margin" not in m and records[1] == {"id": "b", "logp_chosen": -12.0, "logp_rejected": -10.0,
                                                "tokens_chosen": 6, "tokens_rejected": 2}


def test_reward_margin_matches_the_formula() -> None:
    policy = _scores([(-4.0, 2), (-12.0, 6)], [(-6.0, 2), (-10.0, 2)])
    reference = _scores([(-5.0, 2), (-11.0, 6)], [(-5.5, 2), (-12.0, 2)])
    teacher = _scores([(-3.0, 2), (-10.0, 6)], [(-8.0, 2), (-13.0, 2)])
    beta = 0.1
    # beta * [(pc - rc) - (pr - rr)]: a: 0.1*[(1) - (-0.5)] = 0.15; b: 0.1*[(-1) - (2)] = -0.3
    assert reward_margins(policy, reference, beta).tolist() == pytest.approx([0.15, -0.3])
    m, records = preference_metrics(["a", "b"], policy, reference, beta, teacher)
    assert m["margin"] == pytest.approx(-0.075) and m["reward_accuracy"] == 0.5
    assert m["reward_chosen"] == pytest.approx(0.1 * (1.0 - 1.0) / 2)
    assert m["reward_rejected"] == pytest.approx(0.1 * (-0.5 + 2.0) / 2)
    # teacher: a: 0.1*[(2) - (-2.5)] = 0.45; b: 0.1*[(1) - (-1)] = 0.2
    assert m["teacher"]["margin"] == pytest.approx(0.325) and m["teacher"]["reward_accuracy"] == 1.0
    assert [r["margin"] for r in records] == pytest.approx([0.15, -0.3])
    assert [r["teacher_margin"] for r in records] == pytest.approx([0.45, 0.2])


def test_eval_preferences_command_prints_the_table_and_writes_the_margins(pairs_store: DatasetStore, tok,
                                                                          tmp_path: Path) -> None:
    from curate.cli import app

    a = save_tiny(tmp_path / "a", tok, hidden=32, seed=0)
    b = save_tiny(tmp_path / "b", tok, hidden=32, seed=1)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "preferences", "--model", str(a), "--reference", str(b), "--beta", "0.5",
                                   "--store", str(pairs_store.root), "--limit", "4", "--max-length", "64",
                                   "--batch-size", "4", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "acc (summed)" in res.output and "mean margin" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4 and m["beta"] == 0.5 and (out / "margins.png").is_file()
    records = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    ma = tiny_llama(len(tok), hidden=32, seed=0, pad_token_id=tok.pad_token_id).eval()
    mb = tiny_llama(len(tok), hidden=32, seed=1, pad_token_id=tok.pad_token_id).eval()
    pairs = tokenize_pairs(tok, read_pairs(pairs_store.get("preferences"), "pairs", "test", 4), template="plain",
                           max_length=64).pairs
    want = [0.5 * ((dense_logprob(ma, p.prompt_ids, p.chosen_ids) - dense_logprob(mb, p.prompt_ids, p.chosen_ids))
                   - (dense_logprob(ma, p.prompt_ids, p.rejected_ids)
                      - dense_logprob(mb, p.prompt_ids, p.rejected_ids))) for p in pairs]
    assert [r["margin"] for r in records] == pytest.approx(want, abs=2e-4)
    assert m["margin"] == pytest.approx(float(np.mean(want)), abs=2e-4)
    # a margin needs a reference: --beta alone is one line, no traceback
    bad = CliRunner().invoke(app, ["eval", "preferences", "--model", str(a), "--beta", "0.5", "--store",
                                   str(pairs_store.root)])
    assert bad.exit_code == 1 and "--beta without a reference" in bad.output and "Traceback" not in bad.output
