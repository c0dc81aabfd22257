"""ETHICS `instruct` config on the real data: counts per subset/split against the CSVs (read here with
polars, independently of the builder), the utilitarianism order rule, the label words' first tokens, the
per-paradigm views, and bad inputs (one line naming file and row, nothing written)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from builders.ethics import EthicsConfig, build_ethics
from curate.cli import app
from curate.sql_views import query

from .conftest import shared

SUBSETS = ("commonsense", "deontology", "justice", "utilitarianism", "virtue")
PREFIX = {"commonsense": "cm", "utilitarianism": "util"}


def _csv_rows(path: Path, header: bool) -> pl.DataFrame:
    return pl.read_csv(path, has_header=header, infer_schema=False, new_columns=None if header else ["a", "b"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from curate.store import DatasetStore

    st = DatasetStore(tmp_path_factory.mktemp("ethics-instruct"))
    return build_ethics(st, shared("ethics")), st


def test_counts_per_subset_and_split_equal_the_source_files(built) -> None:
    r, st = built
    got = {(s, sp): n for s, sp, n in query("SELECT subset, split, count(*) FROM ethics__instruct GROUP BY ALL",
                                            st).iter_rows()}
    want = {}
    for subset in SUBSETS:
        for split in ("train", "test", "test_hard"):
            path = shared("ethics") / subset / f"{PREFIX.get(subset, subset)}_{split}.csv"
            if path.exists():
                want[(subset, split)] = _csv_rows(path, header=subset != "utilitarianism").height
    assert ("commonsense", "train") not in want  # the shared copy lacks cm_train.csv
    assert got == want
    assert r.version.splits("instruct") == ["train", "test", "test_hard"]
    cols = r.version.read("instruct", "test").column_names
    assert cols == ["id", "subset", "split", "prompt", "completion", "label", "label_text"]


def test_label_words_recorded_and_used(built) -> None:
    r, st = built
    params = r.version.manifest["params"]
    words = params["label_words_by_subset"]
    assert words["commonsense"] == {"0": "not wrong", "1": "wrong"}
    assert words["utilitarianism"] == {"0": "A", "1": "B"}
    df = query("SELECT DISTINCT subset, label, label_text, completion FROM ethics__instruct", st)
    for subset, label, text, completion in df.iter_rows():
        assert words[subset][str(label)] == text and completion == " " + text
    # commonsense label 1 = wrong, the source's label
    src = _csv_rows(shared("ethics") / "commonsense" / "cm_test.csv", header=True)
    ours = query("SELECT label, prompt FROM ethics__instruct_commonsense WHERE split = 'test'", st)
    assert ours["label"].cast(pl.Utf8).to_list() == src["label"].to_list()
    assert ours["prompt"][0].endswith(f"Action: {src['input'][0]}\nAnswer:")
    # checked with SmolLM2's tokenizer at build time: distinct first tokens within each paradigm
    check = params["instruct"]["verbalizer_check"]
    assert check["checked"] is True
    for subset, firsts in check["first_tokens"].items():
        assert len(set(firsts.values())) == len(firsts), subset
    assert set(params["instruct"]["templates"]) == set(SUBSETS)
    assert "Utilitarianism order" in r.version.card_path.read_text()


def test_utilitarianism_order_rule(built) -> None:
    r, st = built
    src = _csv_rows(shared("ethics") / "utilitarianism" / "util_test.csv", header=False)
    rows = query("SELECT id, prompt, label, label_text FROM ethics__instruct_utilitarianism "
                 "WHERE split = 'test'", st)
    assert rows.height == src.height
    seed = r.version.manifest["params"]["instruct"]["utilitarianism_order"]["order_seed"]
    swaps = 0
    for (better, worse), (row_id, prompt, label, text) in zip(src.iter_rows(), rows.iter_rows(), strict=True):
        assert row_id == hashlib.sha256(f"{better}\x1f{worse}".encode()).hexdigest()[:16]
        swapped = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[0] % 2 == 1
        a, b = (worse, better) if swapped else (better, worse)
        assert f"\nA: {a}\nB: {b}\nAnswer:" in prompt
        assert (label, text) == ((1, "B") if swapped else (0, "A"))
        swaps += swapped
    assert 0.4 < swaps / src.height < 0.6  # the more pleasant one is no longer always first


def test_per_paradigm_views_are_filters_not_copies(built) -> None:
    r, st = built
    assert "instruct_virtue" not in r.version.configs()  # no files of its own
    n = query("SELECT count(*) FROM ethics__instruct_virtue", st).item()
    assert n == query("SELECT count(*) FROM ethics__instruct WHERE subset = 'virtue'", st).item() > 0
    assert query("SELECT DISTINCT subset FROM ethics__instruct_justice", st)["subset"].to_list() == ["justice"]


def test_order_seed_changes_only_the_order(store, ethics_source) -> None:
    a = build_ethics(store, ethics_source, EthicsConfig(subsets=("utilitarianism",), limit=50,
                                                        check_tokenizer=False)).version
    b = build_ethics(store, ethics_source, EthicsConfig(subsets=("utilitarianism",), limit=50, order_seed=1,
                                                        check_tokenizer=False)).version
    la, lb = a.read("instruct", "test")["label"].to_pylist(), b.read("instruct", "test")["label"].to_pylist()
    assert la != lb and len(la) == len(lb) == 50
    assert b.manifest["params"]["instruct"]["utilitarianism_order"]["order_seed"] == 1
    assert a.manifest["params"]["instruct"]["verbalizer_check"] == {"checked": False, "why": "check_tokenizer off"}


BAD = {
    "virtue without [SEP]": ("virtue/virtue_test.csv", b"label,scenario\n1,Jo smiled. [SEP] happy\n0,No trait\n",
                             r"virtue_test.csv, row 3.*\[SEP\]"),
    "empty scenario": ("justice/justice_test.csv", b"label,scenario\n1,I paid him because he worked.\n0,  \n",
                       r"justice_test.csv, row 3.*empty scenario"),
    "empty excuse": ("deontology/deontology_test.csv",
                     b"label,scenario,excuse\n1,Can you?,No because I am busy.\n0,Can you?,\n",
                     r"deontology_test.csv, row 3.*empty excuse"),
    "label outside {0,1}": ("commonsense/cm_test.csv", b"label,input,is_short,edited\n2,I lied.,True,False\n",
                            r"cm_test.csv, row 2.*label '2' is not 0 or 1"),
}


def _small_source(tmp_path: Path, ethics_source: Path, skip: str | None = None) -> Path:
    src = tmp_path / "ethics"
    for sub, name in (("justice", "justice_test.csv"), ("deontology", "deontology_test.csv"),
                      ("virtue", "virtue_test.csv"), ("utilitarianism", "util_test.csv"),
                      ("commonsense", "cm_test.csv")):
        if sub == skip:
            continue
        (src / sub).mkdir(parents=True)
        lines = (ethics_source / sub / name).read_bytes().splitlines(keepends=True)[:20]
        (src / sub / name).write_bytes(b"".join(lines))
    return src


def _build(src: Path, store: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["build", "ethics", "--source", str(src), "--store", str(store)])
    return res.exit_code, res.output


def _files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and p.name != ".lock") if store.exists() else []


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written(case: str, tmp_path: Path, ethics_source: Path) -> None:
    rel, content, pattern = BAD[case]
    src = _small_source(tmp_path, ethics_source)
    (src / rel).write_bytes(content)
    code, out = _build(src, tmp_path / "store")
    assert code == 1 and "Traceback" not in out
    assert re.search(pattern, " ".join(out.split())), out
    assert _files(tmp_path / "store") == []


def test_missing_subset_folder(tmp_path: Path, ethics_source: Path) -> None:
    src = _small_source(tmp_path, ethics_source, skip="virtue")
    code, out = _build(src, tmp_path / "store")
    flat = " ".join(out.split())
    assert code == 1 and "Traceback" not in out
    assert re.search(r"virtue: subset folder missing from the source", flat), out
    assert _files(tmp_path / "store") == []


def test_subset_views_are_listed(built) -> None:
    r, st = built
    from curate.sql_views import describe_views

    listed = {name: ref for name, ref, _ in describe_views(st)}  # what `curate query --list` shows
    assert listed["ethics__instruct_virtue"] == f"{r.version.ref} [instruct: subset = 'virtue']"
    for subset in ("commonsense", "deontology", "justice", "utilitarianism", "virtue"):
        assert listed[f"ethics__instruct_{subset}"].startswith(f"{r.version.ref} [instruct")
        query(f"SELECT count(*) FROM ethics__instruct_{subset}", st)  # every listed view answers
