"""The SQL side of the streaming reader agrees with Python: stripping and reading match the exact reader."""

from __future__ import annotations

import duckdb

from curate.csvfile import PY_WHITESPACE, sql_strip


def test_sql_strip_is_python_strip() -> None:
    values = ["", " ", "a", " a ", "\ta b\n", "\u3000x\u3000", "\x1cq\x1f", "\u00a0 \u2028", "é ", " 😀 ", "a\u200b",
              "\x85mid\x85dle\x85", "x" * 1000 + "\u2029", "\r\n", "no change", "a\n", "\na", "  a  b  ", "\ta \t b\t"]
    values += [f"{c}v{c}" for c in PY_WHITESPACE] + [c * 3 for c in PY_WHITESPACE]
    con = duckdb.connect()
    got = con.sql(f"SELECT {sql_strip('v')} FROM unnest($vals) AS t(v)",
                  params={"vals": values}).fetchall()
    assert [g[0] for g in got] == [v.strip() for v in values]
