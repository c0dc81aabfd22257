"""Bad input: one clear error naming the file and row, a non-zero exit code, and an untouched store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app

GOOD_TEST = b'Statement,Label,Reason\nI stole a car.,1,"Theft harms, the owner."\n'
DFAR_CASES = {
    "missing column": (b"Statement,Reason\nI lied.,Lying hurts.\n", r"row 1.*missing column\(s\) Label"),
    "label outside set": (
        b"Statement,Label,Reason\nI lied.,1,Bad.\nI helped.,2,Good.\n", r"row 3.*Label '2' is not one of \[0, 1\]"
    ),
    "non-utf8": (
        b"Statement,Label,Reason\nI lied.,1,Bad.\nI helped.,0,Good \xff\xfe.\n", r"line 3.*not valid UTF-8"
    ),
    "truncated in quotes": (b'Statement,Label,Reason\nI lied.,1,Bad.\nI helped.,0,"Good because', r"row 3.*truncated"),
    "truncated mid-row": (
        b"Statement,Label,Reason\nI lied.,1,Bad.\nI helped.,0", r"row 3.*expected 3 fields, found 2.*truncated"
    ),
    "empty statement": (b"Statement,Label,Reason\n  ,1,Bad.\n", r"row 2.*empty Statement"),
    "header only": (b"Statement,Label,Reason\n", r"DFAR_trainset.csv: no data rows"),
    "reason column empty": (b"Statement,Label,Reason\nI lied.,1,\nI helped.,0, \n",
                            r"DFAR_trainset.csv: column\(s\) Reason empty in every row"),
}


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output


def _store_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and p.name != ".lock") if store.exists() else []


@pytest.mark.parametrize("case", list(DFAR_CASES))
def test_dfar_bad_input(case: str, tmp_path: Path) -> None:
    content, pattern = DFAR_CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    (src / "DFAR_trainset.csv").write_bytes(content)
    (src / "DFAR_testset.csv").write_bytes(GOOD_TEST)
    store = tmp_path / "store"
    code, out = _run(["build", "dfar", "--source", str(src), "--store", str(store)])
    assert code == 1
    flat = " ".join(out.split())
    assert "DFAR_trainset.csv" in flat, out
    assert re.search(pattern, flat), out
    assert "Traceback" not in out
    assert _store_files(store) == []


ETHICS_CASES = {
    "justice label": ("justice/justice_test.csv", b"label,scenario\n1,I paid him because he worked.\nyes,Hm.\n",
                      r"justice_test.csv, row 3.*label 'yes' is not 0 or 1"),
    "deontology columns": ("deontology/deontology_test.csv", b"label,scenario\n0,Aren't you?\n",
                           r"deontology_test.csv, row 1.*missing column\(s\) excuse"),
    "virtue sep": ("virtue/virtue_test.csv", b"label,scenario\n1,Jo smiled. [SEP] happy\n0,No trait here\n",
                   r"virtue_test.csv, row 3.*\[SEP\]"),
    "util non-utf8": ("utilitarianism/util_test.csv", b"A good day.,A bad day.\n\xc3\x28 broken,Worse.\n",
                      r"util_test.csv \(line 2\).*not valid UTF-8"),
    "commonsense truncated": ("commonsense/cm_test.csv", b'label,input,is_short,edited\n0,"I hugged',
                              r"cm_test.csv, row 2.*truncated"),
    "justice header only": ("justice/justice_test.csv", b"label,scenario\n", r"justice_test.csv: no data rows"),
    "deontology empty excuses": ("deontology/deontology_test.csv",
                                 b"label,scenario,excuse\n0,Aren't you?,\n1,Can you?, \n",
                                 r"deontology_test.csv: column\(s\) excuse empty in every row"),
    "commonsense empty inputs": ("commonsense/cm_test.csv", b"label,input,is_short,edited\n0,,True,False\n",
                                 r"cm_test.csv: column\(s\) input empty in every row"),
}


@pytest.mark.parametrize("case", list(ETHICS_CASES))
def test_ethics_bad_input(case: str, tmp_path: Path, ethics_source: Path) -> None:
    rel, content, pattern = ETHICS_CASES[case]
    src = tmp_path / "ethics"
    for sub in ("justice", "deontology", "virtue", "utilitarianism", "commonsense"):
        (src / sub).mkdir(parents=True)
    # a small, valid copy of one real file per subset keeps the build fast; then break one file
    for sub, name in (("justice", "justice_test.csv"), ("deontology", "deontology_test.csv"),
                      ("virtue", "virtue_test.csv"), ("utilitarianism", "util_test.csv"),
                      ("commonsense", "cm_test.csv")):
        lines = (ethics_source / sub / name).read_bytes().splitlines(keepends=True)[:20]
        (src / sub / name).write_bytes(b"".join(lines))
    (src / rel).write_bytes(content)
    store = tmp_path / "store"
    code, out = _run(["build", "ethics", "--source", str(src), "--store", str(store)])
    flat = " ".join(out.split())
    assert code == 1, out
    assert re.search(pattern, flat), out
    assert _store_files(store) == []


def test_missing_source_folder(tmp_path: Path) -> None:
    code, out = _run(["build", "dfar", "--source", str(tmp_path / "nope"), "--store", str(tmp_path / "s")])
    assert code == 1 and "is not a folder" in out


def test_missing_dfar_file(tmp_path: Path, dfar_source: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(dfar_source / "DFAR_testset.csv", src)
    code, out = _run(["build", "dfar", "--source", str(src), "--store", str(tmp_path / "s")])
    assert code == 1 and "lacks DFAR_trainset.csv" in out


def test_dfar_header_only_test_split(tmp_path: Path, dfar_source: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(dfar_source / "DFAR_trainset.csv", src)
    (src / "DFAR_testset.csv").write_bytes(b"Statement,Label,Reason\r\n")
    store = tmp_path / "store"
    code, out = _run(["build", "dfar", "--source", str(src), "--store", str(store)])
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert re.search(r"DFAR_testset.csv: no data rows", " ".join(out.split())), out
    assert _store_files(store) == []


def test_dfar_extra_columns_are_reported(tmp_path: Path, dfar_source: Path) -> None:
    """A dropped source column is named in the notes and the card; the data (and its hash) are unchanged."""
    import polars as pl

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(dfar_source / "DFAR_testset.csv", src)
    train = pl.read_csv(dfar_source / "DFAR_trainset.csv", infer_schema=False)
    train.with_columns(pl.lit("web").alias("Origin"), pl.lit("x").alias("Note")).write_csv(src / "DFAR_trainset.csv")
    store = tmp_path / "store"
    code, out = _run(["build", "dfar", "--source", str(src), "--store", str(store), "--name", "extra"])
    assert code == 0, out
    assert "DFAR_trainset.csv: extra column(s) Origin, Note dropped" in " ".join(out.split())
    card = next(store.rglob("README.md")).read_text()
    assert "extra column(s) Origin, Note dropped" in card
    code, plain = _run(["build", "dfar", "--source", str(dfar_source), "--store", str(store), "--name", "plain"])
    from curate.store import DatasetStore

    st = DatasetStore(store)
    assert st.get("extra").hash == st.get("plain").hash


def test_ethics_extra_columns_are_reported(tmp_path: Path, ethics_source: Path) -> None:
    src = tmp_path / "ethics" / "justice"
    src.mkdir(parents=True)
    lines = (ethics_source / "justice" / "justice_test.csv").read_text().splitlines()[:30]
    (src / "justice_test.csv").write_text("\n".join(f"{line},extra{i}" if i else f"{line},annotator"
                                                     for i, line in enumerate(lines)) + "\n")
    store = tmp_path / "store"
    code, out = _run(["build", "ethics", "--source", str(tmp_path / "ethics"), "--store", str(store),
                      "--subsets", "justice"])
    assert code == 0, out
    assert "justice/justice_test.csv: extra column(s) annotator dropped" in " ".join(out.split())
    assert "extra column(s) annotator dropped" in next(store.rglob("README.md")).read_text()
