"""Store benchmark: build DFAR and ETHICS, then the same group-by through DuckDB views vs polars.

Run: ``python benchmarks/store_bench.py`` (reads ../shared/data). Prints a table, writes
benchmarks/results/store_bench.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATA, emit, timeit  # noqa: E402
from builders.dfar import build_dfar  # noqa: E402
from builders.ethics import build_ethics  # noqa: E402
from curate.sql_views import connect  # noqa: E402
from curate.store import DatasetStore  # noqa: E402

QUERIES = {
    # (config, group-by SQL over its view, equivalent polars over the same parquet files)
    "dfar": (
        "default",
        "SELECT split, label, count(*) AS n, avg(length(reason)) AS reason_len FROM dfar GROUP BY ALL",
        lambda lf: lf.group_by("split", "label").agg(pl.len().alias("n"),
                                                     pl.col("reason").str.len_chars().mean().alias("reason_len")),
    ),
    "ethics": (
        "text_label",
        "SELECT subset, split, label, count(*) AS n, avg(length(text)) AS text_len FROM ethics GROUP BY ALL",
        lambda lf: lf.group_by("subset", "split", "label").agg(
            pl.len().alias("n"), pl.col("text").str.len_chars().mean().alias("text_len")),
    ),
}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(tmp)
        t = time.perf_counter()
        dfar = build_dfar(store, SHARED_DATA / "dfar").version
        build_dfar_s = time.perf_counter() - t
        t = time.perf_counter()
        ethics = build_ethics(store, SHARED_DATA / "ethics").version
        build_ethics_s = time.perf_counter() - t
        builds = {"dfar": (dfar, build_dfar_s), "ethics": (ethics, build_ethics_s)}
        for key, (config, sql, polars_q) in QUERIES.items():
            version, build_s = builds[key]
            n_rows = version.num_rows(config)

            def duck(sql: str = sql) -> pl.DataFrame:
                con = connect(store)  # includes view registration, as a CLI call would
                try:
                    return con.sql(sql).pl()
                finally:
                    con.close()

            files = [str(p) for p in version.files(config)]

            def polars_direct(files: list[str] = files, q=polars_q) -> pl.DataFrame:
                return q(pl.scan_parquet(files)).collect()

            con = connect(store)
            warm_s, _ = timeit(lambda con=con, sql=sql: con.sql(sql).pl())
            con.close()
            duck_s, d = timeit(duck)
            pol_s, p = timeit(polars_direct)
            assert d.height == p.height, (d, p)
            rows.append([key, n_rows, round(build_s, 3), round(n_rows / build_s), round(duck_s * 1e3, 2),
                         round(warm_s * 1e3, 2), round(pol_s * 1e3, 2), round(duck_s / pol_s, 2),
                         round(warm_s / pol_s, 2), round(n_rows / warm_s), round(n_rows / pol_s)])
    emit(
        "store_bench",
        "Store: build time and group-by query (median of 5)",
        ["dataset", "rows", "build s", "build rows/s", "duckdb cold ms", "duckdb warm ms", "polars ms",
         "cold/polars", "warm/polars", "duckdb warm rows/s", "polars rows/s"],
        rows,
        {"note": "cold = connect + register every store view + query, as each CLI call does; "
                 "warm = the query alone on an open connection"},
    )


if __name__ == "__main__":
    main()
