"""DFAR builder on the real data: counts, configs, templates, dedupe policies, the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from builders.dfar import DfarParams, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.sql_views import query


def test_counts_and_labels(built_dfar) -> None:
    v, st = built_dfar
    df = query("SELECT split, label, count(*) AS n FROM dfar GROUP BY ALL ORDER BY ALL", st)
    assert df.rows() == [("test", 0, 298), ("test", 1, 202), ("train", 0, 2588), ("train", 1, 1912)]
    assert v.configs() == ["default", "l", "lr"]
    m = v.manifest
    assert m["configs"]["default"]["train"]["num_rows"] == 4500
    assert m["configs"]["lr"]["test"]["num_rows"] == 500
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


def test_ids_are_stable_hashes(built_dfar) -> None:
    _, st = built_dfar
    df = query("SELECT count(DISTINCT id) AS ids, count(*) AS n FROM dfar WHERE split = 'train'", st)
    assert df.row(0) == (4500, 4500)


def test_loads_with_datasets_library(built_dfar) -> None:
    """The version folder is a valid Hub dataset layout: `datasets` reads its card's configs."""
    from datasets import load_dataset

    v, _ = built_dfar
    ds = load_dataset(str(v.path), "lr")
    assert ds["train"].num_rows == 4500 and ds["test"].num_rows == 500
    assert set(ds["train"].column_names) >= {"prompt", "completion", "label"}


def test_template_override_changes_version(store, dfar_source) -> None:
    a = build_dfar(store, dfar_source, DfarParams(limit=20)).version
    b = build_dfar(store, dfar_source, DfarParams(limit=20, prompt_template="Q: {statement}\nA:")).version
    assert a.hash != b.hash and b.tag == "v2"
    assert b.manifest["params"]["prompt_template"] == "Q: {statement}\nA:"
    assert b.read("lr")["prompt"][0].as_py().startswith("Q: ")
    with pytest.raises(CurateError, match="template field"):
        build_dfar(store, dfar_source, DfarParams(prompt_template="{nope}"))


def test_dedupe_train_test(store, dfar_source) -> None:
    r = build_dfar(store, dfar_source, DfarParams(dedupe="train-test"))
    assert any("189 train statements also appear in test" in n for n in r.notes)
    assert r.version.manifest["configs"]["default"]["train"]["num_rows"] == 4500 - 189
    assert r.version.manifest["params"]["dedupe"] == "train-test"


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
    r2 = build_dfar(store, src, DfarParams(dedupe="within-split"))
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
    assert json.loads(out.stdout) == [{"split": "test", "n": 500}, {"split": "train", "n": 4500}]
    shown = runner.invoke(app, ["show", "dfar@v1", "--store", str(tmp_path / "s")])
    assert shown.exit_code == 0 and "4,500" in shown.output
    listed = runner.invoke(app, ["datasets", "--store", str(tmp_path / "s")])
    assert listed.exit_code == 0 and "15,000" in listed.output
