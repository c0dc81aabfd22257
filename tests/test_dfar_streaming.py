"""DFAR builds stream in batches: many batches and row groups give the same rows an independent polars read
gives, the same bytes twice, and bad rows deep in a big file are named exactly as in a small one."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from builders.base import ROW_GROUP_ROWS
from builders.dfar import BATCH_ROWS, DfarConfig, build_dfar
from curate.cli import app
from curate.store import DatasetStore

N_TRAIN = ROW_GROUP_ROWS + 9_000  # more than one row group and several reader batches
N_TEST = 3_000


def _write_source(folder: Path, dfar_source: Path) -> Path:
    """Real DFAR rows with numbered statements; some train rows repeat (across batches) or reuse test statements."""
    real = pl.read_csv(dfar_source / "DFAR_trainset.csv", infer_schema=False)
    folder.mkdir(parents=True)

    def rows(n: int, tag: str) -> pl.DataFrame:
        i = pl.int_range(0, n, eager=True)
        base = real[(i % real.height).to_list()]
        return base.with_columns((pl.col("Statement") + f" [{tag} " + i.cast(pl.String) + "]").alias("Statement"))

    test = rows(N_TEST, "te")
    train = rows(N_TRAIN, "tr")
    stmt = train["Statement"].to_list()
    for k in range(0, N_TRAIN, 10_007):  # a repeat of row k, one batch or more later
        stmt[(k + BATCH_ROWS + 17) % N_TRAIN] = stmt[k]
    for k in range(0, N_TEST, 97):  # statements that also appear in test
        stmt[(k * 41) % N_TRAIN] = test["Statement"][k]
    train = train.with_columns(pl.Series("Statement", stmt))
    train.write_csv(folder / "DFAR_trainset.csv")
    test.write_csv(folder / "DFAR_testset.csv")
    return folder


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import shared

    return _write_source(tmp_path_factory.mktemp("big") / "src", shared("dfar"))


def test_many_batches_match_polars(big_source: Path, tmp_path: Path) -> None:
    train = pl.read_csv(big_source / "DFAR_trainset.csv", infer_schema=False)
    test = pl.read_csv(big_source / "DFAR_testset.csv", infer_schema=False)
    first = train.with_row_index().group_by("Statement").agg(pl.col("index").min())["index"]
    deduped = train.with_row_index().filter(pl.col("index").is_in(first.implode()))
    want_dups = train.height - deduped.height
    in_test = deduped["Statement"].is_in(test["Statement"].implode())
    want = deduped.filter(~in_test)
    assert want_dups > 0 and in_test.sum() > 0

    r = build_dfar(DatasetStore(tmp_path / "a"), big_source, DfarConfig(dedupe="within-split"))
    m = r.version.manifest
    assert m["configs"]["default"]["train"]["num_rows"] == want.height
    assert m["configs"]["lr"]["test"]["num_rows"] == N_TEST
    assert m["params"]["train_test_overlap"]["dropped"] == in_test.sum()
    assert any(f"train: {want_dups} duplicate statements; dropped" in n for n in r.notes)
    got = r.version.read_polars("lr", "train")
    assert got["prompt"].to_list()[-3:] == [
        "Is the following statement ethical or unethical? Answer with one word, then explain why.\n"
        f"Statement: {s}\nAnswer:" for s in want["Statement"].to_list()[-3:]]
    assert r.version.read_polars("default", "train")["statement"].to_list() == want["Statement"].to_list()

    again = build_dfar(DatasetStore(tmp_path / "b"), big_source, DfarConfig(dedupe="within-split"))
    assert again.version.hash == r.version.hash  # same inputs, same bytes, whatever the batching


@pytest.mark.parametrize("case", ["label", "utf8", "truncated"])
def test_bad_row_deep_in_a_big_file(case: str, big_source: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "DFAR_testset.csv").write_bytes((big_source / "DFAR_testset.csv").read_bytes())
    train = pl.read_csv(big_source / "DFAR_trainset.csv", infer_schema=False)
    target = N_TRAIN - 5  # 0-based record index: row target + 2 (the header is row 1)
    out = src / "DFAR_trainset.csv"
    if case == "label":
        train.with_columns(pl.when(pl.int_range(pl.len()) == target).then(pl.lit("7")).otherwise("Label")
                           .alias("Label")).write_csv(out)
        pattern = rf"DFAR_trainset.csv, row {target + 2}: Label '7' is not one of \[0, 1\]"
    elif case == "utf8":
        marked = train.with_columns(pl.when(pl.int_range(pl.len()) == target)
                                    .then(pl.col("Statement") + " @BAD@").otherwise("Statement").alias("Statement"))
        data = marked.write_csv().encode()
        pos = data.index(b"@BAD@")
        out.write_bytes(data.replace(b"@BAD@", b"\xff"))
        line = data[:pos].count(b"\n") + 1
        pattern = rf"DFAR_trainset.csv \(line {line}\): not valid UTF-8: byte 0xff"
    else:
        out.write_bytes(train.head(target).write_csv().encode() + b'I lied.,1,"Because')
        pattern = rf"DFAR_trainset.csv, row {target + 2}.*truncated"
    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["build", "dfar", "--source", str(src), "--store", str(store)])
    flat = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    assert re.search(pattern, flat), res.output
    assert "Traceback" not in res.output
    assert not list(store.rglob("*.parquet"))
