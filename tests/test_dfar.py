"""DFAR builder on the real data: counts, configs, templates, dedupe and overlap policies, the CLI.

Expected counts come from polars reading the same CSVs here, not from the builder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.sql_views import query


def _read(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema=False).with_columns(
        pl.col("Statement").str.strip_chars(), pl.col("Label").str.strip_chars().cast(pl.Int64))


def expected(src: Path, drop_overlap: bool = True) -> dict[str, pl.DataFrame]:
    """The rows each split should hold, computed independently: train minus statements also in test."""
    train, test = _read(src / "DFAR_trainset.csv"), _read(src / "DFAR_testset.csv")
    if drop_overlap:
        train = train.filter(~pl.col("Statement").is_in(test["Statement"].implode()))
    return {"train": train, "test": test}


def overlap(src: Path) -> int:
    return _read(src / "DFAR_trainset.csv")["Statement"].is_in(
        _read(src / "DFAR_testset.csv")["Statement"].implode()).sum()


def test_counts_and_labels(built_dfar, dfar_source) -> None:
    v, st = built_dfar
    exp = expected(dfar_source)
    want = sorted((split, label, n) for split, df in exp.items()
                  for label, n in df.group_by("Label").len().rows())
    df = query("SELECT split, label, count(*) AS n FROM dfar GROUP BY ALL ORDER BY ALL", st)
    assert df.rows() == want
    assert v.configs() == ["default", "l", "lr"]
    m = v.manifest
    assert m["configs"]["default"]["train"]["num_rows"] == exp["train"].height == 4500 - overlap(dfar_source)
    assert m["configs"]["lr"]["test"]["num_rows"] == exp["test"].height
    assert m["params"]["drop_overlap"] is True
    assert m["params"]["train_test_overlap"] == {"train_statements_in_test": overlap(dfar_source),
                                                 "dropped": overlap(dfar_source)}
    assert m["params"]["prompt_template"].endswith("Answer:")
    assert {s["location"].rsplit("/", 1)[-1] for s in m["sources"]} == {"DFAR_trainset.csv", "DFAR_testset.csv"}


def test_sft_views(built_dfar) -> None:
    v, st = built_dfar
    row = query("SELECT d.statement, d.reason, l.completion AS lc, lr.prompt, lr.completion AS lrc, d.label_text "
                "FROM dfar d JOIN dfar__l l USING (id, split) JOIN dfar__lr lr USING (id, split) "
                "WHERE split = 'train' LIMIT 1", st).row(0, named=True)
    assert row["statement"] in row["prompt"]
    assert row["lc"] == f" {row['label_text']}"
    assert row["lrc"] == f" {row['label_text']}. Reason: {row['reason']}"


def test_ids_are_stable_hashes(built_dfar, dfar_source) -> None:
    _, st = built_dfar
    n = expected(dfar_source)["train"].height
    df = query("SELECT count(DISTINCT id) AS ids, count(*) AS n FROM dfar WHERE split = 'train'", st)
    assert df.row(0) == (n, n)


def test_rows_equal_an_independent_read(built_dfar, dfar_source) -> None:
    """Every column of the default config, in order, equals polars + hashlib over the same CSVs."""
    v, _ = built_dfar
    for split, df in expected(dfar_source).items():
        got = v.read_polars("default", split)
        assert got["statement"].to_list() == df["Statement"].to_list()
        assert got["label"].to_list() == df["Label"].to_list()
        assert got["reason"].to_list() == df["Reason"].fill_null("").str.strip_chars().to_list()
        assert got["id"].to_list() == [hashlib.sha256(s.encode()).hexdigest()[:16] for s in df["Statement"]]
        assert got["label_text"].to_list() == [("ethical", "unethical")[x] for x in df["Label"]]


def test_loads_with_datasets_library(built_dfar, dfar_source) -> None:
    """The version folder is a valid Hub dataset layout: `datasets` reads its card's configs."""
    from datasets import load_dataset

    v, _ = built_dfar
    exp = expected(dfar_source)
    ds = load_dataset(str(v.path), "lr")
    assert ds["train"].num_rows == exp["train"].height and ds["test"].num_rows == exp["test"].height
    assert set(ds["train"].column_names) >= {"prompt", "completion", "label"}


def test_template_override_changes_version(store, dfar_source) -> None:
    a = build_dfar(store, dfar_source, DfarConfig(limit=20)).version
    b = build_dfar(store, dfar_source, DfarConfig(limit=20, prompt_template="Q: {statement}\nA:")).version
    assert a.hash != b.hash and b.tag == "v2"
    assert b.manifest["params"]["prompt_template"] == "Q: {statement}\nA:"
    assert b.read("lr")["prompt"][0].as_py().startswith("Q: ")
    with pytest.raises(CurateError, match="template field"):
        build_dfar(store, dfar_source, DfarConfig(prompt_template="{nope}"))


def test_overlap_dropped_by_default_kept_on_request(store, dfar_source) -> None:
    n = overlap(dfar_source)
    r = build_dfar(store, dfar_source)
    assert any(f"{n} train statements also appear in test" in x and "dropped" in x for x in r.notes)
    assert f"{n} train statements also appear in test" in r.version.card_path.read_text()
    kept = build_dfar(store, dfar_source, DfarConfig(drop_overlap=False))
    assert kept.version.manifest["configs"]["default"]["train"]["num_rows"] == \
        expected(dfar_source, drop_overlap=False)["train"].height == 4500
    assert kept.version.manifest["params"]["train_test_overlap"] == {"train_statements_in_test": n, "dropped": 0}
    assert any("kept" in x for x in kept.notes if "overlap" in x)
    # the legacy policy name is the new default plus within-split dedupe: identical data, hence identical hash
    legacy = build_dfar(store, dfar_source, DfarConfig(dedupe="train-test"))
    assert legacy.version.hash == build_dfar(store, dfar_source, DfarConfig(dedupe="within-split")).version.hash
    assert legacy.version.hash == r.version.hash  # the real data has no within-split duplicates
    with pytest.raises(CurateError, match="contradict|keeps"):
        build_dfar(store, dfar_source, DfarConfig(dedupe="train-test", drop_overlap=False))


def test_duplicates_and_empty_reasons_reported(store, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "DFAR_trainset.csv").write_text(
        "Statement,Label,Reason\nI lied.,1,Lying hurts.\nI lied.,1,Again.\nI helped.,0,\n"
    )
    (src / "DFAR_testset.csv").write_text("Statement,Label,Reason\nI stole.,1,Theft.\n")
    r = build_dfar(store, src)
    assert any("duplicate statement at row 3" in n for n in r.notes)
    assert any("1 empty reasons" in n for n in r.notes)
    assert r.version.manifest["configs"]["default"]["train"]["num_rows"] == 3
    r2 = build_dfar(store, src, DfarConfig(dedupe="within-split"))
    assert r2.version.manifest["configs"]["default"]["train"]["num_rows"] == 2


def test_cli_build_twice_and_query(tmp_path, dfar_source) -> None:
    runner = CliRunner()
    args = ["build", "dfar", "--source", str(dfar_source), "--store", str(tmp_path / "s")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "built dfar@v1" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "unchanged, already stored as dfar@v1" in second.output
    out = runner.invoke(app, ["query", "SELECT split, count(*) AS n FROM dfar__lr GROUP BY ALL ORDER BY 1",
                              "--store", str(tmp_path / "s"), "--format", "json"])
    assert out.exit_code == 0, out.output
    exp = expected(dfar_source)
    n_train, n_test = exp["train"].height, exp["test"].height
    assert f"{overlap(dfar_source)} train statements also appear in test" in " ".join(first.output.split())
    assert json.loads(out.stdout) == [{"split": "test", "n": n_test}, {"split": "train", "n": n_train}]
    shown = runner.invoke(app, ["show", "dfar@v1", "--store", str(tmp_path / "s")])
    assert shown.exit_code == 0 and f"{n_train:,}" in shown.output
    listed = runner.invoke(app, ["datasets", "--store", str(tmp_path / "s")])
    assert listed.exit_code == 0 and f"{3 * (n_train + n_test):,}" in listed.output
    kept = runner.invoke(app, args + ["--keep-overlap", "--name", "dfar-upstream"])
    assert kept.exit_code == 0 and "built dfar-upstream@v1" in kept.output, kept.output
    assert f"{3 * (4500 + n_test):,} rows" in " ".join(kept.output.split())
    bad = runner.invoke(app, args + ["--dedupe", "train-test", "--keep-overlap"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "--keep-overlap" in bad.output, bad.output


def test_streamed_hash_equals_a_plain_write_of_the_same_rows(store, dfar_source) -> None:
    """The streaming build's content hash equals `write_table` of the rows computed here, so it is the rows'."""
    import pyarrow as pa

    streamed = build_dfar(store, dfar_source).version
    prompt = ("Is the following statement ethical or unethical? Answer with one word, then explain why.\n"
              "Statement: {}\nAnswer:")
    with store.new_version("plain", builder="test", builder_version="0", params={}, sources=[]) as w:
        tables: dict[str, dict[str, pa.Table]] = {"default": {}, "l": {}, "lr": {}}
        for split, df in expected(dfar_source).items():
            ids = [hashlib.sha256(s.encode()).hexdigest()[:16] for s in df["Statement"]]
            words = [("ethical", "unethical")[x] for x in df["Label"]]
            reasons = df["Reason"].fill_null("").str.strip_chars().to_list()
            labels = pa.array(df["Label"].to_list(), pa.int8())
            tables["default"][split] = pa.table({"id": ids, "statement": df["Statement"].to_list(), "label": labels,
                                                 "label_text": words, "reason": reasons, "split": [split] * df.height})
            prompts = [prompt.format(s) for s in df["Statement"]]
            for config, completions in (("l", [f" {t}" for t in words]),
                                        ("lr", [f" {t}. Reason: {r}" for t, r in zip(words, reasons, strict=True)])):
                tables[config][split] = pa.table({"id": ids, "prompt": prompts, "completion": completions,
                                                  "label": labels, "label_text": words, "split": [split] * df.height})
        for config, splits in tables.items():
            for split in ("train", "test"):
                w.write_table(config, split, splits[split])
    assert w.result.version.hash == streamed.hash
