"""Annotation tasks: sampling (stratified, seeded), judgments (append-only, later wins), export with lineage,
Krippendorff's α against a hand computation, SaGE-vs-human agreement, and bad input through the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from curate import annotate as ann
from curate.agreement import compute_agreement, reliability_matrix
from curate.cli import app
from curate.errors import CurateError
from curate.store import DatasetStore
from tests.test_view_data import store_copy

runner = CliRunner()


def hand_alpha(units: list[list[str]]) -> float:
    """Nominal Krippendorff's α from its definition (coincidence matrix), written out independently of the
    `krippendorff` package: units are the values given to one item (NA / missing already left out)."""
    values = sorted({v for u in units for v in u})
    o = {(c, k): 0.0 for c in values for k in values}
    for u in units:
        if len(u) < 2:
            continue
        for i, j in itertools.permutations(range(len(u)), 2):
            o[(u[i], u[j])] += 1 / (len(u) - 1)
    n_c = {c: sum(o[(c, k)] for k in values) for c in values}
    n = sum(n_c.values())
    disagree = sum(o[(c, k)] for c in values for k in values if c != k)
    expected = sum(n_c[c] * n_c[k] for c in values for k in values if c != k)
    return 1 - (n - 1) * disagree / expected


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    return store_copy(tmp_path_factory.mktemp("annotate"))


@pytest.fixture(scope="module")
def pairs(st: DatasetStore) -> ann.Task:
    return ann.create_pair_task(st, "pairs", "sage-responses", n=8, seed=3, strata=4)


def test_pair_task_is_stratified_seeded_and_recorded(st: DatasetStore, pairs: ann.Task) -> None:
    src = st.get("sage-responses")
    assert pairs.source == {"name": "sage-responses", "tag": "v1", "content_hash": src.hash, "config": "responses"}
    assert len(pairs.items) == 8 and sorted(it["band"] for it in pairs.items) == [0, 0, 1, 1, 2, 2, 3, 3]
    # bands are similarity quartiles of every candidate pair: each band's items lie above the lower band's
    by_band = {b: [it["similarity"] for it in pairs.items if it["band"] == b] for b in range(4)}
    assert all(max(by_band[b]) <= min(by_band[b + 1]) for b in range(3))
    # the similarity is SaGE's edge weight, recomputed here from MiniLM embeddings of the two answers and RoTs
    from curate.sage import embed_texts, resolve_embedding_model

    enc = resolve_embedding_model("all-MiniLM-L6-v2")
    it = pairs.items[0]
    a, r = embed_texts([it["text_a"], it["text_b"]], enc), embed_texts([it["rot_a"], it["rot_b"]], enc)
    assert it["similarity"] == pytest.approx(0.8 * float(a[0] @ a[1]) + 0.2 * float(r[0] @ r[1]), abs=1e-5)
    again = ann.create_pair_task(st, "pairs-again", "sage-responses", n=8, seed=3, strata=4)
    assert again.item_ids() == pairs.item_ids(), "same seed, same items in the same order"
    on_disk = json.loads((pairs.path / "task.json").read_text())
    assert on_disk["seed"] == 3 and [i["id"] for i in on_disk["items"]] == pairs.item_ids()


def test_judgments_later_wins_history_kept_and_alpha_matches_hand(st: DatasetStore, pairs: ann.Task) -> None:
    j = ann.Judgments(pairs)
    ids = pairs.item_ids()
    answers = {"alice": ["Y", "Y", "N", "N", "Y", "NA", "N", "Y"],
               "bob": ["Y", "N", "N", "Y", "Y", "N", "N", "NA"],
               "carol": ["Y", "Y", "N", "N", "N", "N", "Y", "Y"]}
    j.record(ids[0], "alice", "same", "N")  # changed below: the later judgment wins
    for who, vals in answers.items():
        for item, v in zip(ids, vals, strict=True):
            j.record(item, who, "same", v)
    hist = [r for r in j.history() if r["item"] == ids[0] and r["annotator"] == "alice"]
    assert [r["value"] for r in hist] == ["N", "Y"]
    assert j.latest()[(ids[0], "alice", "same")]["value"] == "Y"
    assert j.progress("alice") == (8, None) and j.progress("dave") == (0, 0)

    names, m = reliability_matrix(pairs, j, "same")
    assert names == ["alice", "bob", "carol"] and np.isnan(m[0, 5]) and m[1, 1] == 0.0
    units = [[answers[w][i] for w in names if answers[w][i] != "NA"] for i in range(8)]
    res = compute_agreement(pairs, j, bootstrap=200, seed=1, threshold=0.75, figure=st.root / "fig.png")
    same = res["fields"]["same"]
    assert same["alpha"] == pytest.approx(hand_alpha(units), abs=1e-4)
    lo, hi = same["ci95"]
    assert lo <= same["alpha"] <= hi
    ab = next(p for p in same["pairs"] if p["annotators"] == ["alice", "bob"])
    pair_units = [[answers[w][i] for w in ("alice", "bob") if answers[w][i] != "NA"] for i in range(8)]
    assert ab["alpha"] == pytest.approx(hand_alpha(pair_units), abs=1e-4) and ab["items"] == 6

    # SaGE vs the human majority: AUC by counting concordant (positive, negative) pairs, accuracy at 0.75
    sims = [it["similarity"] for it in pairs.items]
    maj = []
    for i in range(8):
        y, n = units[i].count("Y"), units[i].count("N")
        maj.append(1 if y > n else 0 if n > y else None)
    pos = [s for s, m_ in zip(sims, maj, strict=True) if m_ == 1]
    neg = [s for s, m_ in zip(sims, maj, strict=True) if m_ == 0]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    acc = np.mean([(s >= 0.75) == bool(m_) for s, m_ in zip(sims, maj, strict=True) if m_ is not None])
    sv = res["sage_vs_human"]
    assert sv["roc_auc"] == pytest.approx(auc, abs=1e-4) and sv["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert sv["items_with_majority"] == len(pos) + len(neg)
    assert (st.root / "fig.png").stat().st_size > 5_000

    r = ann.export_task(st, "pairs")
    v = r.version
    assert v.name == "annotations" and v.manifest["params"]["task"] == "pairs"
    assert v.manifest["parents"][0]["content_hash"] == pairs.source["content_hash"]
    final = v.read_polars("judgments")
    assert final.height == 24 and v.read_polars("history").height == 25
    assert final.filter((final["item_id"] == ids[0]) & (final["annotator"] == "alice"))["value"].to_list() == ["Y"]
    assert v.read_polars("items")["item_id"].to_list() == ids
    assert ann.export_task(st, "pairs").created is False, "an unchanged task exports to the same version"

    out = runner.invoke(app, ["annotate", "agreement", "pairs", "--store", str(st.root), "--bootstrap", "50",
                              "--threshold", "0.75"])
    assert out.exit_code == 0, out.output
    assert f"{same['alpha']:.3f}" in out.output and "ROC AUC" in out.output and "alice & bob" in out.output


def test_label_task_two_questions_and_cli(st: DatasetStore) -> None:
    out = runner.invoke(app, ["annotate", "create", "labels", "--kind", "label", "--source", "dfar", "-n", "5",
                              "--split", "test", "--store", str(st.root)])
    assert out.exit_code == 0, out.output
    assert "created task labels: 5 label items from dfar@v1 (default)" in out.output
    task = ann.load_task(st, "labels")
    dfar = st.get("dfar").read_polars("default")
    row = dfar.filter(dfar["id"] == task.items[0]["id"]).to_dicts()[0]
    assert task.items[0]["statement"] == row["statement"] and task.items[0]["reason"] == row["reason"]
    assert task.items[0]["label"] == row["label_text"] and task.fields == ("correct", "supports")
    j = ann.Judgments(task)
    for who, vals in {"ann": "YYNYN", "ben": "YNNYN"}.items():
        for item, v in zip(task.item_ids(), vals, strict=True):
            j.record(item, who, "correct", v)
            j.record(item, who, "supports", "Y")
    res = compute_agreement(task, j, bootstrap=50)
    assert res["fields"]["correct"]["alpha"] == pytest.approx(hand_alpha([list(p) for p in zip("YYNYN", "YNNYN",
                                                                                                strict=True)]),
                                                              abs=1e-4)
    assert res["fields"]["supports"]["alpha"] is None, "one category only: α is undefined, not a crash"
    assert "sage_vs_human" not in res
    out = runner.invoke(app, ["annotate", "export", "labels", "--store", str(st.root)])
    assert out.exit_code == 0 and "exported annotations@" in out.output and "20 judgments" in out.output


def test_bad_input_is_one_line(st: DatasetStore, pairs: ann.Task) -> None:
    j = ann.Judgments(pairs)
    for bad, msg in [((pairs.item_ids()[0], "x y", "same", "Y"), "annotator name"),
                     (("nope", "alice", "same", "Y"), "has no item 'nope'"),
                     ((pairs.item_ids()[0], "alice", "same", "maybe"), "is not one of Y, N, NA"),
                     ((pairs.item_ids()[0], "alice", "correct", "Y"), "has no question 'correct'")]:
        with pytest.raises(CurateError, match=msg):
            j.record(*bad)
    folder = st.root / "annotations" / "broken"
    folder.mkdir(parents=True)
    for content, msg in [("{not json", "malformed task file"),
                         (json.dumps({"name": "broken", "kind": "pair", "source": {}, "seed": 0,
                                      "items": [{"id": "a", "text_a": "x"}]}), "item 1 'a' lacks 'text_b'"),
                         (json.dumps({"name": "broken", "kind": "vote", "source": {}, "seed": 0, "items": [1]}),
                          "kind 'vote'")]:
        (folder / "task.json").write_text(content)
        out = runner.invoke(app, ["annotate", "agreement", "broken", "--store", str(st.root)])
        assert out.exit_code == 1 and msg in out.output and str(folder / "task.json") in out.output, out.output
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    for args, msg in [(["create", "x", "--source", "dfar"], "dfar@v1 has no config 'responses'"),
                      (["create", "x", "--source", "dfar", "--config", "lr"], "no column 'question_id'"),
                      (["create", "../x", "--source", "dfar"], "task name '../x' is not allowed"),
                      (["create", "pairs", "--source", "sage-responses"], "already exists"),
                      (["export", "nothing"], "no annotation task 'nothing'")]:
        out = runner.invoke(app, ["annotate", *args, "--store", str(st.root)])
        assert out.exit_code == 1 and msg in out.output, out.output
    empty = ann.create_label_task(st, "empty", "dfar", n=2)
    with pytest.raises(CurateError, match="no judgments yet"):
        ann.export_task(st, empty.name)


def test_label_task_from_model_predictions(st: DatasetStore, tmp_path: Path) -> None:
    """A `curate eval` predictions.jsonl: the model's label and reason are what annotators review."""
    test_rows = st.get("dfar").read_polars("default", "test").to_dicts()
    preds = tmp_path / "predictions.jsonl"
    lines = [{"id": r["id"], "gold": r["label"], "generated_label": 1 - r["label"] if i % 2 else r["label"],
              "reason": f"model reason {i}", "generation": "x"} for i, r in enumerate(test_rows[:4])]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    task = ann.create_label_task(st, "model-review", "dfar", n=10, predictions=preds)
    assert sorted(task.item_ids()) == sorted(x["id"] for x in lines), "only rows the predictions cover"
    words = {0: "ethical", 1: "unethical"}
    for it in task.items:
        p = next(x for x in lines if x["id"] == it["id"])
        assert it["label"] == words[p["generated_label"]] and it["gold"] == words[p["gold"]]
        assert it["reason"] == p["reason"]
    assert task.params["predictions"]["sha256"] == hashlib.sha256(preds.read_bytes()).hexdigest()
    preds.write_text(json.dumps(lines[0]) + "\n{broken\n")
    out = runner.invoke(app, ["annotate", "create", "bad-preds", "--kind", "label", "--source", "dfar",
                              "--predictions", str(preds), "--store", str(st.root)])
    assert out.exit_code == 1 and f"{preds} (line 2): not JSON" in out.output, out.output
