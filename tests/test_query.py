"""DuckDB views over the store, the Python API, and Hub (`hf://`) path building."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner, Result

import curate
from builders.dfar import DfarConfig, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.sql_views import hf_path, hub_views, parse_hub_ref, query
from curate.store import MANIFEST, DatasetStore, Version


def test_python_api_returns_polars(built_dfar) -> None:
    _, st = built_dfar
    df = curate.query("SELECT label_text, count(*) AS n FROM dfar WHERE split='test' GROUP BY 1 ORDER BY 1",
                      store=st)
    assert isinstance(df, pl.DataFrame)
    assert df.rows() == [("ethical", 298), ("unethical", 202)]


def test_version_views(built_dfar) -> None:
    v, st = built_dfar
    assert query('SELECT count(*) FROM "dfar@v1__l"', st).item() == 4811  # 4500 - 189 overlap + 500
    assert query(f'SELECT count(*) FROM "dfar@{v.tag}"', st).item() == 4811


def test_bad_sql_is_one_clear_error(built_dfar) -> None:
    _, st = built_dfar
    with pytest.raises(CurateError, match=r"query failed: Catalog Error.*\(view names: curate query --list\)"):
        query("SELECT * FROM no_such_view", st)


def test_a_store_without_datasets_says_so(tmp_path: Path) -> None:
    """A mistyped --store (or a store not built yet) is named, not reported as a missing table."""
    res = CliRunner().invoke(app, ["query", "SELECT * FROM dfar", "--store", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and f"store {tmp_path / 'nowhere'} has no datasets yet" in " ".join(res.output.split())
    assert not (tmp_path / "nowhere").exists()  # asking creates nothing


def test_csv_format(built_dfar) -> None:
    _, st = built_dfar
    res = CliRunner().invoke(app, ["query", "SELECT split, count(*) AS n FROM dfar GROUP BY 1 ORDER BY 1",
                                   "--store", str(st.root), "--format", "csv"])
    assert res.exit_code == 0
    assert res.stdout.splitlines() == ["split,n", "test,500", "train,4311"]


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


# ---- a damaged dataset breaks only the queries that touch it ---------------------------------
def _parquet(v: Version, config: str = "lr", split: str = "test") -> Path:
    return v.path / v.manifest["configs"][config][split]["files"][0]


def _bad_footer(v: Version) -> Path:
    p = _parquet(v)
    data = p.read_bytes()
    p.write_bytes(data[:-8] + b"\0" * 8)  # the footer length and the PAR1 magic are gone
    return p


def _truncated_parquet(v: Version) -> Path:
    p = _parquet(v)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _missing_parquet(v: Version) -> Path:
    p = _parquet(v)
    p.unlink()
    return p


def _truncated_manifest(v: Version) -> Path:
    p = v.path / MANIFEST
    p.write_bytes(p.read_bytes()[:300])
    return p


def _missing_manifest(v: Version) -> Path:
    p = v.path / MANIFEST
    p.unlink()
    return p


def _manifest_without_configs(v: Version) -> Path:
    p = v.path / MANIFEST
    m = json.loads(p.read_text())
    del m["configs"]
    p.write_text(json.dumps(m))
    return p


def _truncated_tags(v: Version) -> Path:
    p = v.path.parents[1] / "tags.json"
    p.write_text('{"v1": ')
    return p


DAMAGE = {
    "bad parquet footer": (_bad_footer, "other__lr"),
    "truncated parquet": (_truncated_parquet, '"other@v1__lr"'),
    "missing parquet": (_missing_parquet, "other__lr"),
    "truncated manifest": (_truncated_manifest, "other"),
    "missing manifest": (_missing_manifest, "OTHER__l"),
    "manifest without configs": (_manifest_without_configs, "other"),
    "truncated tags.json": (_truncated_tags, '"other@v1"'),
}


@pytest.fixture
def two_datasets(tmp_path: Path, dfar_source: Path) -> tuple[DatasetStore, Version, Version]:
    st = DatasetStore(tmp_path / "store")
    good = build_dfar(st, dfar_source, DfarConfig(limit=300)).version
    other = build_dfar(st, dfar_source, DfarConfig(limit=300), name="other").version
    return st, good, other


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _one_error_line(res: Result, names: str) -> None:
    """Exit 1, no traceback (the exception is typer's clean exit), one non-blank line naming the file."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert names in lines[0] and "Traceback" not in res.output


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_dataset_fails_only_its_own_queries(kind: str, two_datasets) -> None:
    st, good, other = two_datasets
    damage, view = DAMAGE[kind]
    broken = damage(other)
    # expected counts straight from the parquet files with pyarrow, not through DuckDB
    expected = Counter(good.read("lr").column("split").to_pylist())
    sql = "SELECT split, count(*) AS n FROM dfar__lr GROUP BY 1 ORDER BY 1"
    res = _invoke("query", sql, "--store", str(st.root), "--format", "csv")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["split,n"] + [f"{s},{n}" for s, n in sorted(expected.items())]
    assert query(sql, st).rows() == sorted(expected.items())

    res = _invoke("query", f"SELECT count(*) FROM {view}", "--store", str(st.root))
    _one_error_line(res, str(broken))
    with pytest.raises(CurateError, match=re.escape(str(broken))):
        query(f"SELECT count(*) FROM {view}", st)

    # the other commands list what they can and say which file is wrong, without a traceback
    for args in (["datasets"], ["query", "--list"], ["show", "dfar"]):
        res = _invoke(*args, "--store", str(st.root))
        assert res.exit_code == 0 and res.exception is None, (args, res.output)
    if "parquet" not in kind:
        assert str(broken) in " ".join(_invoke("datasets", "--store", str(st.root)).output.split())
        _one_error_line(_invoke("show", "other", "--store", str(st.root)), str(broken))


def test_damage_seen_without_naming_a_view(two_datasets) -> None:
    """`SHOW TABLES` names no view: every view is created, the damaged ones skipped with a warning."""
    st, _, other = two_datasets
    broken = _bad_footer(other)
    res = _invoke("query", "SHOW TABLES", "--store", str(st.root), "--format", "csv")
    assert res.exit_code == 0, res.output
    names = set(res.stdout.splitlines()[1:])
    assert {"dfar", "dfar__lr", "other", "other__l"} <= names and "other__lr" not in names
    assert str(broken) in " ".join(res.stderr.split())


def test_corrupt_data_pages_name_the_file(two_datasets) -> None:
    """A footer that reads but pages that do not: the failure surfaces mid-query, still one line with the file."""
    st, _, other = two_datasets
    p = _parquet(other, "lr", "train")
    data = bytearray(p.read_bytes())
    data[100 : len(data) // 2] = b"A" * (len(data) // 2 - 100)
    p.write_bytes(bytes(data))
    res = _invoke("query", "SELECT * FROM other__lr", "--store", str(st.root))
    _one_error_line(res, str(p))


# ---- --format and width ------------------------------------------------------------------------
def test_format_is_a_checked_choice(built_dfar) -> None:
    _, st = built_dfar
    res = _invoke("query", "SELECT 1", "--store", str(st.root), "--format", "xml")
    assert res.exit_code == 2 and "xml" in res.output and "table" in res.output
    assert "table|csv|json" in " ".join(_invoke("query", "--help").output.split())


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_long_text_is_never_cut(built_dfar, fmt: str) -> None:
    """Off a terminal a table is as wide as its widest row: the longest reason is printed whole, on one line."""
    v, st = built_dfar
    reasons = v.read("default").column("reason").to_pylist()
    longest = max(reasons, key=len)
    assert len(longest) > 400 and "\n" not in longest
    res = _invoke("query", "SELECT reason FROM dfar ORDER BY length(reason) DESC LIMIT 1", "--store", str(st.root),
                  "--format", fmt)
    assert res.exit_code == 0, res.output
    if fmt == "json":
        assert json.loads(res.stdout) == [{"reason": longest}]
    else:
        assert any(longest in line for line in res.stdout.splitlines()), res.stdout[:500]
        assert "…" not in res.stdout
