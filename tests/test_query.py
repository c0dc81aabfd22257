"""DuckDB views over the store, the Python API, and Hub (`hf://`) path building."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

import curate
from curate.cli import app
from curate.errors import CurateError
from curate.sql_views import hf_path, hub_views, parse_hub_ref, query


def test_python_api_returns_polars(built_dfar) -> None:
    _, st = built_dfar
    df = curate.query("SELECT label_text, count(*) AS n FROM dfar WHERE split='test' GROUP BY 1 ORDER BY 1",
                      store=st)
    assert isinstance(df, pl.DataFrame)
    assert df.rows() == [("ethical", 298), ("unethical", 202)]


def test_version_views(built_dfar) -> None:
    v, st = built_dfar
    assert query('SELECT count(*) FROM "dfar@v1__l"', st).item() == 5000
    assert query(f'SELECT count(*) FROM "dfar@{v.tag}"', st).item() == 5000


def test_bad_sql_is_one_clear_error(built_dfar) -> None:
    _, st = built_dfar
    with pytest.raises(CurateError, match="query failed: Catalog Error"):
        query("SELECT * FROM no_such_view", st)


def test_csv_format(built_dfar) -> None:
    _, st = built_dfar
    res = CliRunner().invoke(app, ["query", "SELECT split, count(*) AS n FROM dfar GROUP BY 1 ORDER BY 1",
                                   "--store", str(st.root), "--format", "csv"])
    assert res.exit_code == 0
    assert res.stdout.splitlines() == ["split,n", "test,500", "train,4500"]


def test_hub_paths() -> None:
    assert parse_hub_ref("org/dfar@v3") == ("org/dfar", "v3")
    assert parse_hub_ref("org/dfar") == ("org/dfar", None)
    with pytest.raises(CurateError):
        parse_hub_ref("dfar")
    assert hf_path("org/dfar", "v3", "lr/train-*.parquet") == "hf://datasets/org/dfar@v3/lr/train-*.parquet"
    assert hf_path("org/dfar", None, "lr/train-*.parquet") == "hf://datasets/org/dfar/lr/train-*.parquet"
    assert hf_path("org/d", "refs/convert/parquet", "x") == "hf://datasets/org/d@~parquet/x"
    assert hf_path("org/d", "feature/x", "y") == "hf://datasets/org/d@feature%2Fx/y"


def test_hub_views_from_manifest(built_dfar) -> None:
    """The SQL sent to DuckDB for `--hub`: same view names as locally, `hf://` globs per split."""
    v, _ = built_dfar
    specs = {s.name: s for s in hub_views("org/dfar@v1", manifest=v.manifest)}
    assert set(specs) == {"dfar", "dfar__l", "dfar__lr"}
    sql = specs["dfar__lr"].sql()
    assert "read_parquet(['hf://datasets/org/dfar@v1/lr/train-*.parquet'])" in sql
    assert "hf://datasets/org/dfar@v1/lr/test-*.parquet" in sql
